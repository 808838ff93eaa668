"""``export_onnx``: a quantized model -> one standard ONNX file (INT4 weights) for ORT and TensorRT.

Pipeline: ``torch.onnx.export(dynamo=True)`` with a translation of ``svdq::linear`` to
a placeholder node (:mod:`.onnx_placeholder`), the exporter's own optimizer on the
rest of the model, then the placeholder expansion (:mod:`.onnx_linear`), an
``onnx.checker`` pass and the save. See docs/export.md.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from svdq_compile.artifacts import collect_packed
from svdq_compile.modules import SVDQLinear

__all__ = ["export_onnx", "OnnxExport", "onnx_op_types", "ort_session", "quantized_weight_bytes"]

log = logging.getLogger(__name__)

# ONNX protobuf files cannot exceed 2 GiB; above this many initializer bytes the weights
# go to an external data file next to the model.
_INLINE_LIMIT = 1_800_000_000


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    quantized_linears: int  # placeholder nodes expanded (one per svdq::linear call)
    opset: int
    op_types: dict[str, int] = field(default_factory=dict)  # op type -> count in the main graph
    file_bytes: int = 0  # model file + external data file, if any
    external_data: Optional[Path] = None


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as quantized: SVDQLinear tensors (packed INT4, fp16 scales,
    smoothing, low-rank, bias) + every other parameter/buffer at its own dtype."""
    quantized = 0
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, SVDQLinear):
            for t in m.packed.tensors().values():
                if id(t) not in seen:  # siblings may share one smoothing vector
                    seen.add(id(t))
                    quantized += t.numel() * t.element_size()
    other = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            other += t.numel() * t.element_size()
    return quantized + other


def onnx_op_types(path_or_model: Any) -> Counter:
    """``Counter`` of ``(domain, op_type)`` -> count over every graph (subgraphs included) of a model."""
    import onnx

    model = onnx.load(str(path_or_model), load_external_data=False) \
        if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    counts: Counter = Counter()

    def visit(graph) -> None:
        for node in graph.node:
            counts[(node.domain or "", node.op_type)] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.HasField("g"):
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    for fn in model.functions:
        for node in fn.node:
            counts[(node.domain or "", node.op_type)] += 1
    return counts


def ort_session(path: Union[str, os.PathLike], exact: bool = True, providers: Optional[Sequence[str]] = None):
    """An ONNX Runtime ``InferenceSession`` for an exported model.

    ``exact=True`` sets ``session.qdq_matmulnbits_accuracy_level=1``: ONNX Runtime fuses
    ``DequantizeLinear(INT4) -> MatMul`` into ``com.microsoft.MatMulNBits`` and, by default
    (accuracy level 4), re-quantizes that MatMul's input to int8 blocks, which adds an error of
    its own (~50 dB per layer) on top of our INT4 activation quantization. Level 1 keeps the
    fused kernel but computes in float32, reproducing PyTorch's numbers.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if exact:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), so, providers=list(providers or ["CPUExecutionProvider"]))


def _strip_debug_metadata(ir_model) -> None:
    import onnx_ir as ir

    graph = ir_model.graph
    values = list(graph.inputs) + list(graph.outputs) + list(graph.initializers.values())
    for node in ir.traversal.RecursiveGraphIterator(graph):
        node.metadata_props.clear()
        node.doc_string = None
        values.extend(node.outputs)
    for v in values:
        v.metadata_props.clear()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile'd module -> the eager one


def _check_model_is_exportable(model: nn.Module) -> int:
    n_modules = sum(isinstance(m, SVDQLinear) for m in model.modules())
    if n_modules == 0:
        if collect_packed(model):
            raise ValueError(
                "svdq_compile.export_onnx: this model was quantized by the torch.compile backend, whose "
                "quantized graphs are not part of the eager module; use svdq_compile.quantize(model, ...) "
                "or svdq_compile.save() + svdq_compile.load(model, path) to get SVDQLinear modules, then export"
            )
        log.warning("svdq_compile.export_onnx: the model has no SVDQLinear layers; exporting it in floating point")
    return n_modules


def export_onnx(
    model: nn.Module,
    example_inputs: Union[Sequence[Any], Mapping[str, Any], torch.Tensor],
    path: Union[str, os.PathLike],
    *,
    example_kwargs: Optional[Mapping[str, Any]] = None,
    dynamic_shapes: Any = None,
    dynamic_axes: Optional[Mapping[str, Any]] = None,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    opset: int = 21,
    external_data: Optional[bool] = None,
    check: bool = True,
    debug_info: bool = False,
) -> OnnxExport:
    """Export a model quantized with :func:`svdq_compile.quantize` / :func:`svdq_compile.load`.

    Args:
        model: the model with :class:`~svdq_compile.SVDQLinear` layers (a ``torch.compile``
            wrapper is unwrapped).
        example_inputs: positional inputs (tuple/list or one tensor), or a dict of keyword inputs.
        path: the ``.onnx`` file to write (parent directories are created).
        example_kwargs: keyword inputs in addition to positional ``example_inputs``.
        dynamic_shapes: ``torch.export`` dynamic shapes (e.g. ``{"x": {0: Dim("batch"), 1: Dim("tokens")}}``);
            inputs that share an axis (tokens of ``hidden_states`` and ``img_ids``) share a ``Dim``.
        dynamic_axes: the older ``torch.onnx`` form ``{input_name: {axis: "name"}}`` (needs
            ``input_names`` when the inputs are positional). Use one of the two.
        input_names, output_names: names of the graph inputs/outputs.
        opset: ONNX opset, >= 21 (INT4 ``DequantizeLinear`` with ``block_size``).
        external_data: store weights in ``<path>.data``; default: only above ~1.8 GB.
        check: run ``onnx.checker.check_model`` on the written file.
        debug_info: keep the exporter's per-node metadata (Python stack traces, FX node text,
            module paths). Off by default: it can be larger than the INT4 weights of a small
            model and it embeds local file paths.

    Returns:
        :class:`OnnxExport` (path, number of quantized linears, op types, file size).
    """
    try:
        import onnx
        import onnx_ir as ir
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"svdq_compile.export_onnx needs onnx, onnx-ir and onnxscript: "
                          f"pip install 'svdq-compile[onnx]' ({e})") from e
    from .onnx_linear import MIN_OPSET, expand_quantized_linears
    from .onnx_placeholder import translate_svdq_linear

    if opset < MIN_OPSET:
        raise ValueError(f"svdq_compile.export_onnx: opset must be >= {MIN_OPSET} "
                         f"(INT4 DequantizeLinear with block_size), got {opset}")
    if dynamic_shapes is not None and dynamic_axes is not None:
        raise ValueError("svdq_compile.export_onnx: pass dynamic_shapes or dynamic_axes, not both")
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"svdq_compile.export_onnx: model must be an nn.Module, got {type(model).__name__}")
    _check_model_is_exportable(model)
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), dict(example_kwargs or {})
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), {**example_inputs, **(example_kwargs or {})}
    else:
        args, kwargs = tuple(example_inputs), dict(example_kwargs or {})

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            model, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
            dynamic_shapes=dynamic_shapes, dynamic_axes=dynamic_axes,
            input_names=input_names, output_names=output_names,
            custom_translation_table={torch.ops.svdq.linear.default: translate_svdq_linear},
            optimize=True, verbose=False,
        )
    ir_model = program.model
    n_linears = expand_quantized_linears(ir_model)
    ir_model.producer_name = "svdq_compile"
    if not debug_info:
        _strip_debug_metadata(ir_model)

    total = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
    use_external = total > _INLINE_LIMIT if external_data is None else bool(external_data)
    data_path = path.with_name(path.name + ".data") if use_external else None
    if data_path is not None and data_path.exists():
        data_path.unlink()
    ir.save(ir_model, path, external_data=data_path.name if data_path is not None else None)
    if check:
        onnx.checker.check_model(str(path), full_check=True)
    size = path.stat().st_size + (data_path.stat().st_size if data_path is not None else 0)
    op_types = Counter(n.op_type for n in ir_model.graph)
    log.info("svdq_compile.export_onnx: wrote %s (%d quantized linears, %.1f MB)", path, n_linears, size / 1e6)
    return OnnxExport(path=path, quantized_linears=n_linears, opset=opset, op_types=dict(op_types),
                      file_bytes=size, external_data=data_path)

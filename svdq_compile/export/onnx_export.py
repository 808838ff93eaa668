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

from svdq_compile.quant.modules import SVDQLinear

__all__ = ["export_onnx", "OnnxExport", "onnx_op_types", "ort_session", "ort_optimized_op_types", "describe_op_types",
           "quantized_weight_bytes", "bf16_parameter_bytes", "export_onnx_variants"]

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
    flavor: str = "exact"  # "exact" | "deploy"
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


def bf16_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights at 16 bits each, counted as the float model had them: an
    SVDQLinear counts its ``[N, K]`` weight + bias, every other parameter/buffer its elements
    (the reference the file-size target "<= 0.35x of bf16" is measured against)."""
    total = 0
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, SVDQLinear):
            for t in m.packed.tensors().values():
                seen.add(id(t))
            total += 2 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            total += 2 * t.numel()
    return total


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


def _session_options(exact: bool, optimized_model_filepath: Optional[str] = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if exact:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if optimized_model_filepath is not None:
        so.optimized_model_filepath = str(optimized_model_filepath)
    return so


def ort_session(path: Union[str, os.PathLike], exact: bool = True, providers: Optional[Sequence[str]] = None):
    """An ONNX Runtime ``InferenceSession`` for an exported model.

    ``exact=True`` sets ``session.qdq_matmulnbits_accuracy_level=1``: ONNX Runtime fuses
    ``DequantizeLinear(INT4) -> MatMul`` into ``com.microsoft.MatMulNBits`` and, by default
    (accuracy level 4), re-quantizes that MatMul's input to int8 blocks, which adds an error of
    its own (~50 dB per layer) on top of our INT4 activation quantization. Level 1 keeps the
    fused kernel but computes in float32, reproducing PyTorch's numbers. For ``deploy`` files
    use ``exact=False`` (ONNX Runtime's defaults: what a deployment runs).
    """
    import onnxruntime as ort

    return ort.InferenceSession(str(path), _session_options(exact), providers=list(providers or ["CPUExecutionProvider"]))


def ort_optimized_op_types(path: Union[str, os.PathLike], exact: bool = False,
                           providers: Optional[Sequence[str]] = None) -> Counter:
    """``Counter`` of ``(domain, op_type)`` of the graph ONNX Runtime actually runs: the session's
    optimized model (``SessionOptions.optimized_model_filepath``: after constant folding and
    fusions, e.g. ``MatMulNBits``, ``MatMulIntegerToFloat``, ``BiasGelu``). Each node runs one
    kernel of its op type on the chosen provider (CPU: MLAS). Nodes that only read initializers
    (the deploy flavour's INT4 -> INT8 weight expansion) are folded away at session creation:
    they do not appear here."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="svdq_ort_opt_") as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        so = _session_options(exact, out)
        so.log_severity_level = 3  # the dump's "hardware specific optimizations" warning is expected
        ort.InferenceSession(str(path), so, providers=list(providers or ["CPUExecutionProvider"]))
        return onnx_op_types(out)


def describe_op_types(counts: Mapping) -> str:
    """One line per op type, most frequent first: ``  12  com.microsoft.MatMulNBits``."""
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return "\n".join(f"{c:5d}  {(d + '.') if d else ''}{op}" for (d, op), c in rows)


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
    flavor: str = "exact",
    int8_kernel: str = "u8u8",
    fp16_weights: bool = True,
) -> OnnxExport:
    """Export a model quantized with :func:`svdq_compile.quantize` / :func:`svdq_compile.load`,
    or compiled with ``torch.compile(model, backend="svdquant")`` and run at least once.

    Args:
        model: the model with :class:`~svdq_compile.SVDQLinear` layers, or a ``torch.compile``
            wrapper: its eager module is exported with the layers the svdquant backend quantized
            (recorded on their weights during the first calls) swapped in for the export. A
            compiled model that has not quantized anything yet raises
            :class:`~svdq_compile.export.compiled_state.NotQuantizedYetError` (a ``ValueError``).
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
        flavor: ``"exact"`` (standard ops only, float math reproducing our numerics: the
            reference, and the file for TensorRT) or ``"deploy"`` (ONNX Runtime's integer
            GEMMs for ``w4a8-int8`` layers, INT4 weights expanded in-graph; see
            :mod:`.onnx_deploy` and docs/export.md). Run deploy files with ONNX Runtime's
            default session options (``ort_session(path, exact=False)``).
        int8_kernel: deploy form of ``w4a8-int8`` layers: ``"u8u8"`` (exact, default),
            ``"u8s8"`` (faster without AVX-VNNI, saturating), ``"dynamic"`` (ONNX Runtime's
            per-tensor ``DynamicQuantizeMatMul``).
        fp16_weights: deploy flavour: store the float weights (low-rank factors with the bias row,
            the model's non-quantized layers, group-wise scales) as fp16 initializers + ``Cast``,
            which ONNX Runtime folds when the session is created (same graph at run time, half the
            bytes; adds fp16 rounding of those weights). ``False``: float32, the integer path's
            exact numerics. Ignored by the exact flavour.

    Returns:
        :class:`OnnxExport` (path, number of quantized linears, op types, file size).
    """
    try:
        import onnx  # noqa: F401
        import onnx_ir  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"svdq_compile.export_onnx needs onnx, onnx-ir and onnxscript: "
                          f"pip install 'svdq-compile[onnx]' ({e})") from e
    from svdq_compile.export.compiled_state import compiled_as_modules, is_compiled
    from svdq_compile.export.onnx_linear import FLAVORS, MIN_OPSET

    if opset < MIN_OPSET:
        raise ValueError(f"svdq_compile.export_onnx: opset must be >= {MIN_OPSET} "
                         f"(INT4 DequantizeLinear with block_size), got {opset}")
    if dynamic_shapes is not None and dynamic_axes is not None:
        raise ValueError("svdq_compile.export_onnx: pass dynamic_shapes or dynamic_axes, not both")
    if flavor not in FLAVORS:
        raise ValueError(f"svdq_compile.export_onnx: flavor must be one of {FLAVORS}, got {flavor!r}")
    compiled = is_compiled(model)
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"svdq_compile.export_onnx: model must be an nn.Module, got {type(model).__name__}")
    with compiled_as_modules(model, compiled=compiled) as swapped:
        if swapped:
            log.info("svdq_compile.export_onnx: exporting %d linears quantized by the torch.compile backend", swapped)
        return _export(model, example_inputs, path, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes,
                       dynamic_axes=dynamic_axes, input_names=input_names, output_names=output_names, opset=opset,
                       external_data=external_data, check=check, debug_info=debug_info, flavor=flavor,
                       int8_kernel=int8_kernel, fp16_weights=fp16_weights)


def _export(model, example_inputs, path, *, example_kwargs, dynamic_shapes, dynamic_axes, input_names, output_names,
            opset, external_data, check, debug_info, flavor, int8_kernel, fp16_weights=True) -> OnnxExport:
    program = _trace(model, example_inputs, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes,
                     dynamic_axes=dynamic_axes, input_names=input_names, output_names=output_names, opset=opset)
    return _write(program.model, path, opset=opset, external_data=external_data, check=check, debug_info=debug_info,
                  flavor=flavor, int8_kernel=int8_kernel, fp16_weights=fp16_weights)


def _trace(model, example_inputs, *, example_kwargs, dynamic_shapes, dynamic_axes, input_names, output_names, opset):
    """``torch.onnx.export`` with ``svdq::linear`` as placeholders (not yet expanded)."""
    from svdq_compile.export.onnx_placeholder import translate_svdq_linear

    _check_model_is_exportable(model)
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), dict(example_kwargs or {})
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), {**example_inputs, **(example_kwargs or {})}
    else:
        args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    with torch.no_grad():
        return torch.onnx.export(
            model, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
            dynamic_shapes=dynamic_shapes, dynamic_axes=dynamic_axes,
            input_names=input_names, output_names=output_names,
            custom_translation_table={torch.ops.svdq.linear.default: translate_svdq_linear},
            optimize=True, verbose=False,
        )


def _write(ir_model, path, *, opset, external_data, check, debug_info, flavor, int8_kernel,
           fp16_weights=True) -> OnnxExport:
    """Expand the placeholders of a traced model (in place), save and check it."""
    import onnx
    import onnx_ir as ir

    from svdq_compile.export.onnx_linear import expand_quantized_linears

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_linears = expand_quantized_linears(ir_model, flavor=flavor, int8_kernel=int8_kernel, fp16_weights=fp16_weights)
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
    log.info("svdq_compile.export_onnx: wrote %s (%s, %d quantized linears, %.1f MB)", path, flavor, n_linears,
             size / 1e6)
    return OnnxExport(path=path, quantized_linears=n_linears, opset=opset, flavor=flavor, op_types=dict(op_types),
                      file_bytes=size, external_data=data_path)


def export_onnx_variants(
    model: nn.Module,
    example_inputs: Union[Sequence[Any], Mapping[str, Any], torch.Tensor],
    variants: Mapping[Union[str, os.PathLike], tuple[str, str]],
    *,
    example_kwargs: Optional[Mapping[str, Any]] = None,
    dynamic_shapes: Any = None,
    opset: int = 21,
    check: bool = True,
) -> dict[Path, OnnxExport]:
    """Several files from one trace: ``variants = {path: (flavor, int8_kernel[, fp16_weights])}`` (the benchmark
    suite's way to write the exact and deploy files of a large model without tracing it again)."""
    import onnx_ir as ir

    from svdq_compile.export.compiled_state import compiled_as_modules, is_compiled

    compiled = is_compiled(model)
    model = _unwrap(model)
    with compiled_as_modules(model, compiled=compiled):
        program = _trace(model, example_inputs, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes,
                         dynamic_axes=None, input_names=None, output_names=None, opset=opset)
    proto = ir.serde.serialize_model(program.model)
    del program
    out = {}
    for path, spec in variants.items():
        flavor, kernel, fp16 = (tuple(spec) + (True,))[:3]
        out[Path(path)] = _write(ir.serde.deserialize_model(proto), path, opset=opset, external_data=None,
                                 check=check, debug_info=False, flavor=flavor, int8_kernel=kernel, fp16_weights=fp16)
    return out

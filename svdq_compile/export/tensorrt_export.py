"""``export_tensorrt``: a TensorRT engine through Torch-TensorRT (optional ``[tensorrt]`` extra).

The primary TensorRT path is the ONNX file of :func:`svdq_compile.export_onnx` fed to
``trtexec`` (docs/export.md): standard ops only, INT4 weights as blocked
``DequantizeLinear``. This module is the second path: Torch-TensorRT compiles the
model and the quantized linears become a TensorRT plugin generated from the op's fake
(meta) implementation by ``torch_tensorrt.dynamo.conversion.plugins.custom_op``; at run
time the plugin calls our op (the Triton kernels on CUDA).

Torch-TensorRT's plugin generator only handles Tensor/int/float/bool/str arguments, not
``Optional[Tensor]``, so the model's :class:`~svdq_compile.SVDQLinear` layers are swapped
(for the duration of the export) for :class:`_TRTLinear`, which calls
``svdq_export::trt_linear``: the same op with every optional tensor present (a missing
smoothing vector becomes ones, a missing low-rank branch a rank-1 zero branch, a missing
bias zeros), which is numerically identical.

NOT RUN BY THE PROJECT'S TESTS: tensorrt and torch_tensorrt cannot be installed on the
CPU-only CI machines; the tests only check the clear error raised without them.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from svdq_compile.quant.modules import SVDQLinear
from svdq_compile.runtime.modes import has_handler, register_handler

__all__ = ["export_tensorrt", "TensorRTUnavailableError", "require_tensorrt", "register_tensorrt_plugin",
           "TRT_PLUGIN_OP"]

log = logging.getLogger(__name__)

TRT_PLUGIN_OP = "svdq_export::trt_linear"
_INSTALL_HINT = "pip install 'svdq-compile[tensorrt]' on a CUDA machine (TensorRT >= 10.7 for generated plugins)"


class TensorRTUnavailableError(ImportError):
    """tensorrt / torch_tensorrt cannot be imported (the optional ``[tensorrt]`` extra)."""


def require_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, torch_tensorrt) modules, or :class:`TensorRTUnavailableError` with the install hint."""
    mods = []
    for name in ("tensorrt", "torch_tensorrt"):
        try:
            mods.append(importlib.import_module(name))
        except Exception as e:  # ImportError, or a broken install raising OSError/RuntimeError
            raise TensorRTUnavailableError(
                f"svdq_compile.export_tensorrt needs the '{name}' package, which cannot be imported here "
                f"({type(e).__name__}: {e}). Install it with: {_INSTALL_HINT}. Without TensorRT in Python, "
                "export ONNX with svdq_compile.export_onnx() and build the engine with trtexec (docs/export.md)."
            ) from e
    return mods[0], mods[1]


@torch.library.custom_op(TRT_PLUGIN_OP, mutates_args=())
def trt_linear(
    x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, smooth: torch.Tensor,
    lora_down: torch.Tensor, lora_up: torch.Tensor, bias: torch.Tensor,
    group_size: int, weight_bits: int, act_bits: int, act_unsigned: bool, act_shift: float,
) -> torch.Tensor:
    """``svdq::linear`` with every optional tensor present (TensorRT plugin signature)."""
    return torch.ops.svdq.linear(x, qweight, wscales, smooth, lora_down, lora_up, bias, None, None,
                                 group_size, weight_bits, act_bits, act_unsigned, act_shift, "none")


@trt_linear.register_fake
def _(x, qweight, wscales, smooth, lora_down, lora_up, bias, group_size, weight_bits, act_bits, act_unsigned,
      act_shift):
    return x.new_empty((*x.shape[:-1], wscales.shape[0]))


class _TRTLinear(nn.Module):
    """An SVDQLinear seen through ``svdq_export::trt_linear`` (no optional tensors)."""

    def __init__(self, m: SVDQLinear) -> None:
        super().__init__()
        p = m.packed
        s = p.spec
        if not has_handler(s.scheme, "tensorrt_linear"):
            raise ValueError(f"svdq_compile.export_tensorrt: layer {m.name!r} uses mode {s.mode}; the TensorRT "
                             "plugin covers the group-scaled modes (w4a4, w4a8, w8a8, w4a16) only. Quantize with "
                             "mode='w4a4' for TensorRT, or export ONNX (export_onnx supports every mode)")
        k, n = s.in_features, s.out_features
        dtype = p.lora_down.dtype if p.lora_down is not None else torch.float32
        dev = p.qweight.device
        self.spec = s
        self.register_buffer("qweight", p.qweight)
        self.register_buffer("wscales", p.wscales)
        self.register_buffer("smooth", p.smooth if p.smooth is not None else torch.ones(k, device=dev))
        self.register_buffer("lora_down", p.lora_down if p.lora_down is not None
                             else torch.zeros(1, k, dtype=dtype, device=dev))
        self.register_buffer("lora_up", p.lora_up if p.lora_up is not None
                             else torch.zeros(n, 1, dtype=dtype, device=dev))
        self.register_buffer("bias", p.bias if p.bias is not None else torch.zeros(n, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return torch.ops.svdq_export.trt_linear(x, self.qweight, self.wscales, self.smooth, self.lora_down,
                                                self.lora_up, self.bias, s.group_size, s.weight_bits, s.act_bits,
                                                s.act_unsigned, s.act_shift)


@contextlib.contextmanager
def _trt_linears(model: nn.Module):
    """Swap SVDQLinear -> _TRTLinear in place for the duration of the block (restored after)."""

    swapped = {name: m for name, m in model.named_modules() if isinstance(m, SVDQLinear)}
    try:
        for name, m in swapped.items():
            model.set_submodule(name, _TRTLinear(m))
        yield len(swapped)
    finally:
        for name, m in swapped.items():
            model.set_submodule(name, m)


_registered = False


def register_tensorrt_plugin() -> None:
    """Generate (once) the TensorRT plugin + converter of ``svdq_export::trt_linear``.

    Call it before loading a saved engine in a new process, too: the plugin's
    implementation is Python code that runs our op.
    """
    global _registered
    if _registered:
        return
    _, torch_tensorrt = require_tensorrt()
    torch_tensorrt.dynamo.conversion.plugins.custom_op(TRT_PLUGIN_OP, supports_dynamic_shapes=True)
    _registered = True


def export_tensorrt(
    model: nn.Module,
    example_inputs: Union[Sequence[Any], Mapping[str, Any], torch.Tensor],
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    dynamic_shapes: Any = None,
    trt_inputs: Optional[Sequence[Any]] = None,
    enabled_precisions: Sequence[torch.dtype] = (torch.float16, torch.float32),
    **compile_kwargs: Any,
) -> nn.Module:
    """Compile a quantized model to TensorRT with Torch-TensorRT (CUDA only). NOT run by the project's tests.

    Args:
        model: a model with :class:`~svdq_compile.SVDQLinear` layers, on a CUDA device.
        example_inputs: positional inputs (tuple/list or one tensor) or a dict of keyword inputs, on CUDA.
        path: if given, the compiled module is saved there with ``torch_tensorrt.save``.
        dynamic_shapes: ``torch.export`` dynamic shapes (as for :func:`svdq_compile.export_onnx`).
        trt_inputs: ``torch_tensorrt.Input`` specs (``min_shape``/``opt_shape``/``max_shape``)
            for dynamic axes; default: the example inputs (static shapes).
        enabled_precisions: TensorRT kernel precisions for the non-plugin layers.
        **compile_kwargs: passed on to ``torch_tensorrt.dynamo.compile``.

    Returns:
        The Torch-TensorRT compiled module.

    Raises:
        TensorRTUnavailableError: tensorrt / torch_tensorrt cannot be imported.
        RuntimeError: no CUDA device.
    """
    _, torch_tensorrt = require_tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("svdq_compile.export_tensorrt needs a CUDA device (TensorRT builds GPU engines)")
    register_tensorrt_plugin()
    model = getattr(model, "_orig_mod", model)
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = tuple(example_inputs), {}
    with _trt_linears(model) as n, torch.no_grad():
        log.info("svdq_compile.export_tensorrt: %d quantized linears become TensorRT plugin layers", n)
        program = torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=dynamic_shapes,
                                      strict=False)
    if trt_inputs is None:
        arg_inputs, kwarg_inputs = list(args), (kwargs or None)
    else:
        arg_inputs, kwarg_inputs = list(trt_inputs), None
    trt_module = torch_tensorrt.dynamo.compile(program, arg_inputs=arg_inputs, kwarg_inputs=kwarg_inputs,
                                               enabled_precisions=set(enabled_precisions), min_block_size=1,
                                               **compile_kwargs)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch_tensorrt.save(trt_module, str(path), arg_inputs=list(args), kwarg_inputs=kwargs or None)
        log.info("svdq_compile.export_tensorrt: saved %s", path)
    return trt_module


# The TensorRT plugin covers the group-scaled modes (runtime/modes.py slot "tensorrt_linear").
register_handler("group", "tensorrt_linear", _TRTLinear)

"""``svdq::linear``: the quantized linear as a torch.library custom op.

A custom op (with a fake implementation) keeps quantized models traceable by
``torch.compile`` and ``torch.export``. Device dispatch:
CPU -> :func:`.cpu.quantized_linear_cpu` (vectorised torch);
CUDA -> the generated Triton kernels of ``svdq_compile.codegen`` when Triton can run,
otherwise the same torch code as the CPU path (logged once).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from .cpu import quantized_linear_cpu
from .packed import EPILOGUES, PackedLinear

__all__ = ["svdq_linear", "linear_from_packed", "check_linear_args", "register_triton_impl", "triton_on_cpu"]

log = logging.getLogger(__name__)

_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def check_linear_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    group_size: int,
    weight_bits: int,
    act_bits: int,
    epilogue: str,
) -> None:
    """Raise a clear error for inputs the kernels would otherwise mis-handle."""
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(
            f"svdq.linear: input dtype {x.dtype} is not supported; use float32, float16 or bfloat16"
        )
    if x.dim() < 1:
        raise ValueError("svdq.linear: input must have at least one dimension")
    n, groups = wscales.shape
    k = groups * group_size
    if x.shape[-1] != k:
        raise ValueError(f"svdq.linear: input has {x.shape[-1]} features, the layer expects {k}")
    kq = k // 2 if weight_bits == 4 else k
    if qweight.dtype != torch.int8 or tuple(qweight.shape) != (n, kq):
        raise ValueError(
            f"svdq.linear: qweight must be int8 [{n}, {kq}], got {qweight.dtype} {list(qweight.shape)}"
        )
    if act_bits not in (4, 8, 16) or weight_bits not in (4, 8):
        raise ValueError(f"svdq.linear: unsupported mode w{weight_bits}a{act_bits}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"svdq.linear: unknown epilogue {epilogue!r}; expected one of {EPILOGUES}")
    if x.device != qweight.device:
        raise ValueError(
            f"svdq.linear: input is on {x.device} but the quantized weights are on {qweight.device}"
        )


@torch.library.custom_op("svdq::linear", mutates_args=())
def svdq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    smooth: Optional[torch.Tensor],
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    group_size: int,
    weight_bits: int,
    act_bits: int,
    act_unsigned: bool,
    act_shift: float,
    epilogue: str,
) -> torch.Tensor:
    check_linear_args(x, qweight, wscales, group_size, weight_bits, act_bits, epilogue)
    if _TRITON_IMPL is not None and (x.is_cuda or _TRITON_ON_CPU):
        return _TRITON_IMPL(
            x, qweight, wscales, smooth, lora_down, lora_up, bias, residual, gate,
            group_size, weight_bits, act_bits, act_unsigned, act_shift, epilogue,
        )
    if x.is_cuda:
        _warn_no_triton()
    return quantized_linear_cpu(
        x, qweight, wscales, smooth, lora_down, lora_up, bias, residual, gate,
        group_size, weight_bits, act_bits, act_unsigned, act_shift, epilogue,
    )


@svdq_linear.register_fake
def _(x, qweight, wscales, smooth, lora_down, lora_up, bias, residual, gate,
      group_size, weight_bits, act_bits, act_unsigned, act_shift, epilogue):
    n = wscales.shape[0]
    return x.new_empty((*x.shape[:-1], n))


_TRITON_IMPL = None
# Route CPU tensors through the Triton kernels too; only meaningful under
# TRITON_INTERPRET=1 (tests and debugging of the generated kernels without a GPU).
_TRITON_ON_CPU = False
_warned = False


def register_triton_impl(fn) -> None:
    """Install the Triton implementation (called by ``svdq_compile.codegen``)."""
    global _TRITON_IMPL
    _TRITON_IMPL = fn


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True):
    """Run ``svdq::linear`` on CPU tensors through the Triton kernels (interpreter)."""
    global _TRITON_ON_CPU
    old, _TRITON_ON_CPU = _TRITON_ON_CPU, enabled
    try:
        yield
    finally:
        _TRITON_ON_CPU = old


def _warn_no_triton() -> None:
    global _warned
    if not _warned:
        log.warning("svdq.linear: no Triton CUDA kernels available; running the torch fallback on CUDA")
        _warned = True


def linear_from_packed(
    x: torch.Tensor,
    p: PackedLinear,
    epilogue: str = "none",
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Convenience eager call of the op with a :class:`PackedLinear`."""
    s = p.spec
    return torch.ops.svdq.linear(
        x, p.qweight, p.wscales, p.smooth, p.lora_down, p.lora_up, p.bias, residual, gate,
        s.group_size, s.weight_bits, s.act_bits, s.act_unsigned, s.act_shift, epilogue,
    )

"""One call's kernel specialisation: the :class:`KernelSpec` of its operands, and the
small checks every Triton wrapper shares (tracing, unit inner stride)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from svdq_compile.codegen.spec import LORA_PRECISIONS, KernelSpec

__all__ = ["make_spec", "default_lora_precision", "is_tracing", "inner_contiguous"]


def default_lora_precision(device: torch.device) -> str:
    """``tl.dot`` precision of the low-rank branch: ``$SVDQ_LORA_PRECISION`` or a default.

    On GPU the default is "tf32x3" (three tensor-core MMAs, near-fp32 accuracy: the
    low-rank branch carries most of the output's energy, so its error should stay far
    below the bf16 output rounding). "ieee" is exact fp32 but runs on CUDA cores (a
    slower prologue); the interpreter computes every precision exactly.
    """
    env = os.environ.get("SVDQ_LORA_PRECISION")
    if env:
        if env not in LORA_PRECISIONS:
            raise ValueError(f"SVDQ_LORA_PRECISION must be one of {LORA_PRECISIONS}, got {env!r}")
        return env
    return "tf32x3" if device.type == "cuda" else "ieee"


def is_tracing(x: torch.Tensor) -> bool:
    """True while torch.compile / export traces us (fake tensors): never benchmark then."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(x) or torch.compiler.is_compiling()


def make_spec(
    x: torch.Tensor,
    smooth: Optional[torch.Tensor],
    lora_down: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    group_size: int,
    weight_bits: int,
    act_bits: int,
    act_unsigned: bool,
    epilogue: str,
    lora_precision: Optional[str] = None,
) -> KernelSpec:
    """The :class:`KernelSpec` of one call (dtype of Y = dtype of X, as the op defines)."""
    rank = 0 if lora_down is None else int(lora_down.shape[0])
    if rank == 0:
        lora_precision = "ieee"  # unused without a low-rank branch: one canonical spec
    return KernelSpec(
        weight_bits=weight_bits,
        act_bits=act_bits,
        act_unsigned=act_unsigned,
        group_size=group_size,
        rank=rank,
        epilogue=epilogue,
        has_smooth=smooth is not None,
        has_bias=bias is not None,
        has_gate=gate is not None,
        has_residual=residual is not None,
        in_dtype=x.dtype,
        out_dtype=x.dtype,
        lora_precision=lora_precision or default_lora_precision(x.device),
    )


def inner_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels index the last dim with unit stride; copy only when that is not so."""
    if t is None or t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()

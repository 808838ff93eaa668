"""Group-wise symmetric integer quantization: the exact numerics every kernel matches.

Rules (shared by the reference, the CPU path and the Triton kernels, so integer
parts can be compared bit-exactly):

- groups of ``group_size`` consecutive elements along the last dim (K);
- scale = absmax / qmax computed in fp32; an all-zero group gets scale 1 (no 0/0);
- weight scales are *stored* in 16 bits (fp16) and the integers are computed with the
  stored (rounded) scale, so dequantization is consistent with what is saved;
- activation scales stay fp32 (computed at run time, never stored);
- rounding is ``floor(v / scale + 0.5)`` (half away from -inf): trivially identical
  in PyTorch and Triton, unlike round-half-even which Triton lacks;
- signed: clamp to [-qmax-1, qmax]; unsigned (non-negative inputs): [0, 2*qmax+1].
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "QuantSpec",
    "qrange",
    "quantize_groups",
    "dequantize_groups",
    "quantize_weight",
    "quantize_activation",
    "WEIGHT_SCALE_DTYPE",
]

WEIGHT_SCALE_DTYPE = torch.float16


class QuantSpec(NamedTuple):
    bits: int
    group_size: int
    unsigned: bool = False


def qrange(bits: int, unsigned: bool) -> tuple[int, int]:
    """(qmin, qmax) of a signed symmetric or unsigned integer grid."""
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit integer grids are supported, got {bits}")
    if unsigned:
        if bits == 8:  # 0..255 does not fit int8, which our GEMMs consume
            raise ValueError("unsigned quantization is only supported for 4 bits")
        return 0, 2 ** bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _check_groups(x: torch.Tensor, group_size: int) -> None:
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if x.shape[-1] % group_size:
        raise ValueError(
            f"last dim {x.shape[-1]} is not a multiple of the group size {group_size}"
        )


def _scale_from_absmax(absmax: torch.Tensor, bits: int, unsigned: bool) -> torch.Tensor:
    qmin, qmax = qrange(bits, unsigned)
    # Symmetric: the divisor is qmax (7 for int4) so +-absmax both map inside the grid.
    # Tensor / tensor: PyTorch's CUDA kernel turns division by a Python scalar into a
    # multiplication by its (inexact) reciprocal; the kernels divide exactly.
    scale = absmax / torch.full_like(absmax, float(qmax))
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_groups(
    x: torch.Tensor, bits: int, group_size: int, unsigned: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., K] float -> (q: [..., K] int8, scales: [..., K // G] scale_dtype)."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"quantize_groups expects a floating tensor, got {x.dtype}")
    _check_groups(x, group_size)
    qmin, qmax = qrange(bits, unsigned)
    xg = x.float().unflatten(-1, (-1, group_size))  # [..., G, gs] fp32
    if unsigned:
        absmax = xg.clamp_min(0).amax(dim=-1)
    else:
        absmax = xg.abs().amax(dim=-1)
    scale32 = _scale_from_absmax(absmax, bits, unsigned)
    if scale_dtype != torch.float32:
        top = torch.finfo(scale_dtype).max
        if bool((scale32 > top).any()):
            raise ValueError(
                f"group absmax {float(absmax.max()):.3g} exceeds the {scale_dtype} scale range "
                f"(max {top * qmax:.3g} for {bits}-bit groups); cannot store these weights"
            )
    scale = scale32.to(scale_dtype)
    s = scale.float().unsqueeze(-1)
    if scale_dtype != torch.float32:
        # A scale that underflowed to 0 in 16 bits would divide by zero.
        s = torch.where(s > 0, s, torch.ones_like(s))
        scale = s.squeeze(-1).to(scale_dtype)
    q = torch.floor(xg / s + 0.5).clamp_(qmin, qmax)
    return q.flatten(-2).to(torch.int8), scale


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """q: [..., K] int, scales: [..., K // G] -> [..., K] fp32."""
    qg = q.float().unflatten(-1, (-1, group_size))
    return (qg * scales.float().unsqueeze(-1)).flatten(-2)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> (q: [N, K] int8 signed, wscales: [N, K // G] fp16)."""
    return quantize_groups(w, bits, group_size, unsigned=False, scale_dtype=WEIGHT_SCALE_DTYPE)


def quantize_activation(
    x: torch.Tensor, bits: int, group_size: int, unsigned: bool = False, shift: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token-group quantization. x: [M, K] -> (q: [M, K] int8, scales: [M, K // G] fp32).

    ``shift`` is added before unsigned quantization (e.g. +0.171875 after GELU so its
    small negative lobe is representable); the matching correction lives in the bias.
    """
    if shift:
        x = x.float() + shift
    return quantize_groups(x, bits, group_size, unsigned=unsigned, scale_dtype=torch.float32)

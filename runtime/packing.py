"""INT4 packing: two 4-bit values per int8 byte, low nibble = even index (ONNX order).

Packed bytes are stored as ``torch.int8`` so a Triton kernel can sign-extend the
nibbles in registers with arithmetic shifts (``(b << 4) >> 4`` and ``b >> 4``) and
feed ``int8 x int8 -> int32`` ``tl.dot``.
"""
from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4"]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit integers (signed -8..7 or unsigned 0..15) along the last dim.

    q: [..., K] integer tensor, K even -> [..., K // 2] int8.
    """
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise TypeError(f"pack_int4 expects an integer tensor, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 15):
        raise ValueError("pack_int4 values must lie in [-8, 15] (signed or unsigned int4)")
    q = q.to(torch.int16)  # room for the shift without overflow
    lo = q[..., 0::2] & 0xF
    hi = q[..., 1::2] & 0xF
    byte = lo | (hi << 4)  # 0..255
    return torch.where(byte > 127, byte - 256, byte).to(torch.int8)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: [..., K // 2] int8 -> [..., K] int8."""
    if packed.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"unpack_int4 expects int8/uint8 packed bytes, got {packed.dtype}")
    b = packed.to(torch.int16) & 0xFF
    lo = b & 0xF
    hi = b >> 4
    if signed:  # sign-extend the nibbles, as the kernels do with shifts
        lo = torch.where(lo > 7, lo - 16, lo)
        hi = torch.where(hi > 7, hi - 16, hi)
    out = torch.stack((lo, hi), dim=-1).flatten(-2)
    return out.to(torch.int8)

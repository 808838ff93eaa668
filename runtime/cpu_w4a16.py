"""Weight-only INT4 (W4A16) linear on CPU with the C++ kernels of ``cpu_kernels/w4a16.cpp``.

AdaLN modulation layers (W4A16 by default) run on one vector per sample: dequantizing
their whole weight per call cost ~40x an fp32 GEMV. Small M reads the packed weight
directly (fused unpack + FMA); large M dequantizes once in C++ (bit-identical to
:func:`svdq_compile.runtime.torch_path.dequantize_weight`) and runs one fp32 GEMM.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu_gemm

__all__ = ["w4a16_linear", "w4a16_dequantize", "GEMV_MAX_M"]

# Up to this many rows the fused kernel (one pass over the packed weight per 4 rows)
# beats dequantize + GEMM: K=3072, N=18432 on the 2-core AVX512 machine, M=128:
# 101 vs 113 ms, M=256: 195 vs 146 ms.
GEMV_MAX_M = 128


def _ops(qweight: torch.Tensor, group_size: int):
    if group_size % 32 or qweight.device.type != "cpu" or qweight.dtype != torch.int8:
        return None
    if cpu_gemm._backend(None) == "torch":
        return None
    return cpu_gemm._load_ops()


def w4a16_dequantize(qweight: torch.Tensor, wscales: torch.Tensor, group_size: int) -> Optional[torch.Tensor]:
    """[N, K/2] packed int4 + [N, K/G] scales -> [N, K] fp32, or None without the kernel."""
    ops = _ops(qweight, group_size)
    if ops is None:
        return None
    return ops.w4a16_dequant(qweight.contiguous(), wscales.float().contiguous(), group_size)


def w4a16_linear(
    x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, group_size: int
) -> Optional[torch.Tensor]:
    """x: [M, K] fp32 -> x @ dequant(W)^T: [M, N] fp32, or None (use the torch path)."""
    ops = _ops(qweight, group_size)
    if ops is None or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    m, k = x.shape
    sw = wscales.float().contiguous()
    if m > GEMV_MAX_M:
        return F.linear(x, ops.w4a16_dequant(qweight.contiguous(), sw, group_size))
    xv = x.reshape(m, k // 2, 2)
    # The kernel pairs low nibbles with even columns and high nibbles with odd ones.
    xe, xo = xv[..., 0].contiguous(), xv[..., 1].contiguous()  # [M, K/2] each
    return ops.w4a16_gemv(xe, xo, qweight.contiguous(), sw, group_size)

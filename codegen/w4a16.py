"""Weight-only INT4 (W4A16) product on the GPU: ``x @ dequant(W)^T`` without the fp32 weight.

AdaLN modulation layers are W4A16 by default and run on one vector per sample; the torch
fallback dequantized the whole weight per call (a [N, K] fp32 temporary: 226 MB for
FLUX's 3072 x 18432 modulation). This kernel unpacks nibbles in registers instead.

Per group of G columns: ``part = x_even @ lo + x_odd @ hi`` (``lo``/``hi`` are the low /
high nibbles of the packed bytes, i.e. the even / odd columns), then ``acc += part * s``.
With 16-bit activations the dot runs in that dtype on the GPU (the products of a 16-bit
value and a 4-bit integer are exact in the fp32 accumulator); with fp32 activations, and
always under the CPU interpreter, in IEEE fp32.
Equal to ``F.linear(x, dequantize_weight(...))`` up to fp32 summation order.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from svdq_compile.codegen.launch import interpreting, launch

__all__ = ["w4a16_kernel", "run_w4a16", "try_run_w4a16", "w4a16_supported"]

log = logging.getLogger(__name__)
_FAILED: list = []  # the first launch error; later calls go straight to the torch fallback


@triton.jit
def w4a16_kernel(
    x_ptr,  # [M, K] float (any strides)
    qw_ptr,  # [N, K/2] int8 packed, row-major
    sw_ptr,  # [N, K/G] float scales
    y_ptr,  # [M, N] fp32, row-major
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_qn,
    stride_sn,
    GROUP: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    # Out-of-range rows / columns wrap onto valid ones (unmasked loads); the store masks.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_h = tl.arange(0, GROUP // 2)  # [G/2]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP):
        kx = g * GROUP + 2 * offs_h  # even columns of the group
        x_rows = x_ptr + rm[:, None] * stride_xm
        xe = tl.load(x_rows + kx[None, :] * stride_xk)  # [BM, G/2]
        xo = tl.load(x_rows + (kx + 1)[None, :] * stride_xk)
        if IEEE:
            xe = xe.to(tl.float32)
            xo = xo.to(tl.float32)
        w = tl.load(qw_ptr + rn[None, :] * stride_qn + (g * (GROUP // 2) + offs_h)[:, None])  # [G/2, BN]
        # Sign-extend the nibbles in int32 (as the GEMM kernel does), then to x's dtype.
        w32 = w.to(tl.int32)
        lo = ((w32 << 28) >> 28).to(xe.dtype)  # even columns, [-8, 7]
        hi = (w32 >> 4).to(xe.dtype)  # odd columns
        if IEEE:
            part = tl.dot(xe, lo, input_precision="ieee")
            part = tl.dot(xo, hi, part, input_precision="ieee")
        else:
            part = tl.dot(xe, lo)
            part = tl.dot(xo, hi, part)
        s = tl.load(sw_ptr + rn * stride_sn + g).to(tl.float32)  # [BN]
        acc += part * s[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def w4a16_supported(group_size: int) -> bool:
    """Group halves must be tl.dot K dims (power of two >= 16)."""
    return group_size >= 32 and group_size & (group_size - 1) == 0


def run_w4a16(
    x2d: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, group_size: int, *, wrap: bool = False
) -> torch.Tensor:
    """x2d: [M, K] float, qweight: [N, K/2] int8, wscales: [N, K/G] -> [M, N] fp32."""
    m, k = x2d.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=torch.float32, device=x2d.device)
    if m == 0 or n == 0:
        return y
    qweight = qweight.contiguous()
    wscales = wscales if wscales.stride(-1) == 1 else wscales.contiguous()  # scales of a row: unit stride
    # Small M (AdaLN: one row per sample): one 16-row tile, more programs along N.
    block_m = 16 if m <= 16 else 64
    block_n = 32 if interpreting() else (64 if m <= 16 else 128)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    args = (x2d, qweight, wscales, y, m, n, k, x2d.stride(0), x2d.stride(1), qweight.stride(0), wscales.stride(0))
    # The CPU interpreter's 16-bit tl.dot is not usable (wrong results): fp32 there.
    ieee = x2d.dtype == torch.float32 or interpreting()
    kwargs = dict(GROUP=group_size, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=block_n,
                  num_warps=4, num_stages=3)
    launch(w4a16_kernel, grid, args, kwargs, wrap=wrap, device=x2d.device)
    return y


def try_run_w4a16(
    x2d: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, group_size: int
) -> Optional[torch.Tensor]:
    """:func:`run_w4a16`, or None (the caller's dequantize + matmul fallback) if the kernel
    cannot be compiled or launched here, e.g. no 16-bit ``tl.dot`` on an older GPU.

    Logged once; weight-only layers are a small part of a model's time, so a slower
    fallback beats failing the whole model.
    """
    if _FAILED:
        return None
    try:
        return run_w4a16(x2d, qweight, wscales, group_size)
    except Exception as e:  # noqa: BLE001 - compile/launch errors of a generated kernel
        _FAILED.append(e)
        log.warning("svdq_compile: the Triton W4A16 kernel failed (%s: %s); weight-only layers use the "
                    "dequantize + matmul fallback", type(e).__name__, e)
        return None

"""Prologue of the per-token schemes (``w4a8-int8``, ``w4a8-fp8``): smooth, quantize per token, down-project.

Each program owns ``BLOCK_M`` rows and walks K twice (a per-token scale needs the whole
row's absmax before the first value can be quantized):

- pass 1: ``x' = x / smooth`` in fp32 (IEEE division, ``tl.math.div_rn``: Triton's ``/``
  may be approximate on GPU), the row absmax, and the low-rank down projection
  ``h += x'_tile @ lora_down_tile^T`` (fp32, ``LORA_PRECISION``), so the rank-r branch
  needs no other read of X;
- pass 2 re-reads X (the row block was just read: mostly L2 hits) and writes the 8-bit
  activations, bit for bit those of
  ``runtime.per_token.quantize_tokens(runtime.reference.smooth_input(x, smooth), scheme)``:

  - int8: ``sa = absmax / 127``, ``qa = clamp(floor(x' / sa + 0.5), -128, 127)``;
  - fp8: ``sa = absmax / 448``, ``qa = e4m3_rne(x' / sa)`` (saturating);
  - an all-zero row gets ``sa = 1`` (no 0/0).

FP8 rounding: on a GPU ``.to(tl.float8e4nv)`` of an fp32 value is ``cvt.rn.satfinite``
(round to nearest even, saturating to +-448), which is what torch's ``.to(float8_e4m3fn)``
does for every finite value (torch also saturates: 1e9 -> 448). Triton's CPU interpreter
does not: it flushes e4m3 subnormals to zero and rounds values just below a power of two
into the wrong binade (0.031 -> 0.0156), so under the interpreter the kernels use
:func:`e4m3_bits`, an integer implementation of the same RNE + saturation
(``SOFT_FP8``), and the tests check it against torch on every rounding boundary.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from svdq_compile.runtime.per_token import FP8_DTYPE, FP8_MAX
from svdq_compile.codegen.autotune import PrologueConfig
from svdq_compile.codegen.launch import interpreting
from svdq_compile.codegen.prologue import tune_and_launch
from svdq_compile.codegen.spec import KernelSpec

__all__ = ["prologue_pt_kernel", "run_prologue_pt", "e4m3_bits", "to_e4m3", "PT_QMAX"]

# Symmetric per-token grid: qa = x' / (absmax / QMAX).
PT_QMAX = {"int8": 127.0, "fp8": FP8_MAX}
_BLOCK_K = 64  # K tile of both passes (the low-rank tl.dot needs >= 16)


@triton.jit
def e4m3_bits(v):
    """fp32 -> the e4m3fn bit pattern (int32 in [0, 255]): round to nearest even, saturate
    to +-448 (as ``cvt.rn.satfinite`` and torch), NaN -> 0x7F with the sign of ``v``."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80  # bit 31 -> bit 7
    a = tl.minimum(tl.abs(v), 448.0)
    ab = a.to(tl.int32, bitcast=True)
    # Normal range (a >= 2**-6): round the fp32 mantissa to 3 bits, nearest even (a carry
    # moves into the exponent), then rebias the exponent from 127 to 7.
    r = ab + 0x7FFFF + ((ab >> 20) & 1)
    normal = (r >> 20) - (120 << 3)
    # Subnormals (multiples of 2**-9): RNE(a * 2**9) via the 2**23 magic number (a * 512
    # is exact; adding 2**23 to a value below 8 rounds it to an integer, nearest even).
    t = a * 512.0 + 8388608.0
    sub = t.to(tl.int32, bitcast=True) - 0x4B000000
    out = tl.where(a >= 0.015625, normal, sub)
    out = tl.where(v != v, 0x7F, out)
    return out | sign


@triton.jit
def to_e4m3(v, SOFT_FP8: tl.constexpr):
    """fp32 -> float8e4nv, round to nearest even, saturating (see the module docstring)."""
    if SOFT_FP8:
        return e4m3_bits(v).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        return v.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _smoothed_tile(x_ptr, smooth_ptr, rows, mask_m, offs_k, K, stride_xm, stride_xk,
                   HAS_SMOOTH: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x'[rows, offs_k] = x / smooth in fp32 ([BM, BK]; masked rows/columns read 0)."""
    if EVEN_K:
        mask = mask_m[:, None]
    else:
        mask = mask_m[:, None] & (offs_k[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_SMOOTH:
        sm = tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=1.0).to(tl.float32)  # [BK]
        x = tl.math.div_rn(x, tl.broadcast_to(sm[None, :], (BLOCK_M, BLOCK_K)))
    return x


@triton.jit
def prologue_pt_kernel(
    x_ptr,  # [M, K] fp32/bf16/fp16, any strides
    smooth_ptr,  # [K] float (HAS_SMOOTH)
    ld_ptr,  # lora_down [R, K] float (HAS_LORA)
    qa_ptr,  # [M, K] int8 (int8) or float8e4nv (fp8)
    sa_ptr,  # [M] fp32
    h_ptr,  # [M, R] fp32 (HAS_LORA)
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_ldr,
    stride_ldk,
    stride_qm,
    stride_hm,
    HAS_SMOOTH: tl.constexpr,
    HAS_LORA: tl.constexpr,
    FP8: tl.constexpr,
    SOFT_FP8: tl.constexpr,
    QMAX: tl.constexpr,
    R_PAD: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)  # 64-bit row offsets: M * K may exceed 2**31
    offs_r = tl.arange(0, R_PAD)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)

    # ---- pass 1: row absmax and h = X' L2^T
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _smoothed_tile(x_ptr, smooth_ptr, rows, mask_m, offs_k, K, stride_xm, stride_xk,
                           HAS_SMOOTH, EVEN_K, BLOCK_M, BLOCK_K)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        if HAS_LORA:
            ld = tl.load(  # lora_down^T tile: [BK, R_PAD] (transposed through the pointers)
                ld_ptr + offs_r[None, :] * stride_ldr + offs_k[:, None] * stride_ldk,
                mask=(offs_r[None, :] < R) & (offs_k[:, None] < K),
                other=0.0,
            ).to(tl.float32)
            h = tl.dot(x, ld, h, input_precision=LORA_PRECISION)  # [BM, R_PAD] fp32

    sa = tl.math.div_rn(amax, tl.full((BLOCK_M,), QMAX, tl.float32))
    sa = tl.where(sa > 0.0, sa, 1.0)  # all-zero row -> 1
    tl.store(sa_ptr + rows, sa, mask=mask_m)
    if HAS_LORA:
        tl.store(h_ptr + rows[:, None] * stride_hm + offs_r[None, :], h,
                 mask=mask_m[:, None] & (offs_r[None, :] < R))

    # ---- pass 2: the 8-bit activations
    sa_b = tl.broadcast_to(sa[:, None], (BLOCK_M, BLOCK_K))
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _smoothed_tile(x_ptr, smooth_ptr, rows, mask_m, offs_k, K, stride_xm, stride_xk,
                           HAS_SMOOTH, EVEN_K, BLOCK_M, BLOCK_K)
        v = tl.math.div_rn(x, sa_b)
        if FP8:
            q = to_e4m3(v, SOFT_FP8)
        else:
            q = tl.minimum(tl.maximum(tl.math.floor(v + 0.5), -128.0), 127.0).to(tl.int8)
        if EVEN_K:
            smask = mask_m[:, None]
        else:
            smask = mask_m[:, None] & (offs_k[None, :] < K)
        tl.store(qa_ptr + rows[:, None] * stride_qm + offs_k[None, :], q, mask=smask)


@functools.lru_cache(maxsize=None)
def _constexprs(spec: KernelSpec, soft_fp8: bool) -> dict:
    return dict(
        HAS_SMOOTH=spec.has_smooth,
        HAS_LORA=spec.has_lora,
        FP8=spec.scheme == "fp8",
        SOFT_FP8=soft_fp8,
        QMAX=PT_QMAX[spec.scheme],
        R_PAD=spec.rank_pad,
        LORA_PRECISION=spec.lora_precision,
        BLOCK_K=_BLOCK_K,
    )


def run_prologue_pt(
    x2d: torch.Tensor,
    smooth: Optional[torch.Tensor],
    lora_down: Optional[torch.Tensor],
    spec: KernelSpec,
    *,
    wrap: bool = False,
    tune: bool = True,
    config: Optional[PrologueConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2d: [M, K] -> (qa [M, K] int8 or e4m3, sa [M] fp32, h [M, r] fp32; [M, 0] for rank 0)."""
    assert spec.scheme in PT_QMAX, spec.scheme
    assert (smooth is not None) == spec.has_smooth and (lora_down is not None) == spec.has_lora
    m, k = x2d.shape
    dev = x2d.device
    qa = torch.empty((m, k), dtype=FP8_DTYPE if spec.scheme == "fp8" else torch.int8, device=dev)
    sa = torch.empty((m,), dtype=torch.float32, device=dev)
    r = spec.rank
    h = torch.empty((m, r), dtype=torch.float32, device=dev)
    if m == 0:
        return qa, sa, h
    sm = smooth if smooth is not None else x2d  # unused pointer slots: a read-only tensor
    ld = lora_down if lora_down is not None else x2d
    const = dict(_constexprs(spec, interpreting()), EVEN_K=k % _BLOCK_K == 0)
    args = (
        x2d, sm, ld, qa, sa, h if r > 0 else x2d, m, k, r,
        x2d.stride(0), x2d.stride(1),
        ld.stride(0) if lora_down is not None else 0,
        ld.stride(1) if lora_down is not None else 0,
        qa.stride(0), h.stride(0) if r > 0 else 0,
    )
    tune_and_launch("prologue_pt", prologue_pt_kernel, args, const, spec, m, k,
                    wrap=wrap, tune=tune, config=config, device=dev)
    return qa, sa, h

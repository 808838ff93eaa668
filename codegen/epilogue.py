"""Triton device functions of the GEMM epilogue (activations), matching runtime/epilogue.py.

The codes are :data:`.spec.ACTIVATIONS`. Everything is computed in fp32 on the
accumulator tile. Only functions available in both Triton 3.6 and 3.9 are used
(``tl.math.erf``, ``tl.exp``, ``tl.sigmoid``); ``tanh`` is written with ``exp`` because
``tl.math.tanh`` is not in every Triton release.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["apply_activation", "finish_tile"]


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (exp(2u) + 1). |u| is clamped to 20 (tanh(20) == 1 in fp32) so
    # exp never overflows.
    u = tl.minimum(tl.maximum(u, -20.0), 20.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def apply_activation(y, ACT: tl.constexpr):
    """y: [BLOCK_M, BLOCK_N] fp32 -> act(y) fp32 (0 none, 1 gelu, 2 gelu_tanh, 3 silu, 4 relu)."""
    if ACT == 1:  # exact GELU, as F.gelu(approximate="none")
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 2:  # F.gelu(approximate="tanh")
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + _tanh(inner))
    elif ACT == 3:  # SiLU
        y = y * tl.sigmoid(y)
    elif ACT == 4:  # ReLU
        y = tl.maximum(y, 0.0)
    return y


@triton.jit
def finish_tile(
    acc,  # [BLOCK_M, BLOCK_N] fp32: the rescaled main product
    offs_m,  # [BM] row indices (unwrapped: the store is masked with them)
    offs_n,  # [BN]
    rm,  # [BM] int64 rows wrapped into [0, M) (unmasked epilogue loads)
    rn,  # [BN] int64 columns wrapped into [0, N)
    M,
    N,
    R,
    h_ptr,
    lu_ptr,
    bias_ptr,
    gate_ptr,
    res_ptr,
    y_ptr,
    stride_hm,
    stride_lun,
    stride_lur,
    gate_t,
    stride_gb,
    stride_gt,
    stride_gn,
    res_t,
    stride_rb,
    stride_rt,
    stride_rn,
    stride_ym,
    HAS_LORA: tl.constexpr,
    R_PAD: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_RES: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """The fused GEMM epilogue shared by every GEMM kernel, then the masked store:
    ``y = act(acc + h @ lora_up^T + bias) * gate + residual`` (runtime/epilogue.py's order).

    The low-rank up projection is a second ``tl.dot`` into the same fp32 accumulator;
    gate/residual rows are addressed as ``m -> (m // T, m % T)`` (see gemm.broadcast_operand).
    """
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        rmask = offs_r < R
        hh = tl.load(h_ptr + rm[:, None] * stride_hm + offs_r[None, :], mask=rmask[None, :], other=0.0)
        lu = tl.load(  # lora_up^T tile: [R_PAD, BN]
            lu_ptr + rn[None, :] * stride_lun + offs_r[:, None] * stride_lur,
            mask=rmask[:, None],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(hh, lu, acc, input_precision=LORA_PRECISION)
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn).to(tl.float32)  # [BN]
        acc = acc + b[None, :]
    acc = apply_activation(acc, ACT)
    if HAS_GATE:
        g_off = (rm // gate_t) * stride_gb + (rm % gate_t) * stride_gt
        gt = tl.load(gate_ptr + g_off[:, None] + rn[None, :] * stride_gn).to(tl.float32)
        acc = acc * gt
    if HAS_RES:
        r_off = (rm // res_t) * stride_rb + (rm % res_t) * stride_rt
        rs = tl.load(res_ptr + r_off[:, None] + rn[None, :] * stride_rn).to(tl.float32)
        acc = acc + rs

    if ROUND_BF16:
        # Triton's CPU interpreter truncates fp32 -> bf16; round to nearest even by hand
        # (GPU conversions already do) so interpreter results equal torch's bit for bit.
        bits = acc.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536 == 0xFFFF0000
        acc = tl.where(acc == acc, bits.to(tl.float32, bitcast=True), acc)  # keep NaNs
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

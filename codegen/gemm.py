"""GEMM kernel: grouped integer GEMM with per-group rescale and a fused epilogue.

``Y = act(sum_g sa[:, g] sw[:, g]^T * (QA_g @ QW_g^T) + H @ lora_up^T + bias) * gate + residual``

One K step is one quantization group (64 columns): the int8 ``tl.dot`` of the group
is exact in int32, then rescaled once by ``sa[m, g] * sw[n, g]`` into an fp32
accumulator. Hopper has no INT4 tensor cores, so 4-bit operands are loaded packed
(half the bytes) and sign-extended in registers into two int8 operands: the even K
indices (low nibbles) and the odd ones (high nibbles). ``A_even @ W_even^T +
A_odd @ W_odd^T`` is the full group product because A and W pair K indices the same
way, so no interleaving is needed. 8-bit operands are used as they are.

Rescale cost matters as much as the MMA here (a group of 64 is only 2 wgmma K steps),
so the int32 -> fp32 conversion uses the exact "magic number" trick (an integer add
and a bitcast instead of the slower ``cvt``), and the scale multiply is two FMAs.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from svdq_compile.codegen.autotune import GemmConfig, choose_config, gemm_candidates
from svdq_compile.codegen.epilogue import finish_tile
from svdq_compile.codegen.launch import interpreting, launch
from svdq_compile.codegen.spec import KernelSpec
from svdq_compile.codegen.tiling import grouped_tile

__all__ = ["gemm_kernel", "run_gemm", "broadcast_operand", "EpilogueInputs", "epilogue_operands",
           "epilogue_constexprs"]

# 0x4B400000 is the fp32 bit pattern of 1.5 * 2**23. For |p| < 2**22, the integer
# 0x4B400000 + p is the bit pattern of the fp32 value 1.5 * 2**23 + p (the ulp there is
# 1), so bitcast(p + MAGIC_I) - MAGIC_F == float(p) exactly. Group partial sums are at
# most 64 * 128 * 128 = 2**20 in magnitude, well inside the range.
_MAGIC_I = 0x4B400000
_MAGIC_F = 12582912.0


@triton.jit
def gemm_kernel(
    qa_ptr,  # [M, K/2] int8 packed (A_BITS=4) or [M, K] int8
    sa_ptr,  # [M, K/G] fp32, any strides (the prologue writes it group-major)
    qw_ptr,  # [N, K/2] int8 packed (W_BITS=4) or [N, K] int8
    sw_ptr,  # [N, K/G] fp16 (any float)
    h_ptr,  # [M, R] fp32 low-rank activations (HAS_LORA)
    lu_ptr,  # lora_up [N, R] float (HAS_LORA)
    bias_ptr,  # [N] float (HAS_BIAS)
    gate_ptr,  # broadcastable to [M, N], addressed as [B, T, N] (HAS_GATE)
    res_ptr,  # broadcastable to [M, N], addressed as [B, T, N] (HAS_RES)
    y_ptr,  # [M, N] output dtype, row-major
    M,
    N,
    K,
    R,
    stride_qam,
    stride_sam,
    stride_sag,
    stride_qwn,
    stride_swn,
    stride_hm,
    stride_lun,
    stride_lur,
    gate_t,  # rows per "batch" of the gate view: row m -> (m // gate_t, m % gate_t)
    stride_gb,
    stride_gt,
    stride_gn,
    res_t,
    stride_rb,
    stride_rt,
    stride_rn,
    stride_ym,
    W_BITS: tl.constexpr,
    A_BITS: tl.constexpr,
    A_UNSIGNED: tl.constexpr,
    GROUP: tl.constexpr,
    A_BYTES: tl.constexpr,  # bytes of A per row per group: GROUP/2 (4-bit) or GROUP
    W_BYTES: tl.constexpr,
    HAS_LORA: tl.constexpr,
    R_PAD: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_RES: tl.constexpr,
    MAGIC_I: tl.constexpr,
    MAGIC_F: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    # Wrap out-of-range rows/cols onto valid ones so the main-loop loads need no mask
    # (unmasked loads pipeline better); the final store is masked.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_ka = tl.arange(0, A_BYTES)
    offs_kw = tl.arange(0, W_BYTES)
    a_ptrs = qa_ptr + rm[:, None] * stride_qam + offs_ka[None, :]  # [BM, A_BYTES]
    w_ptrs = qw_ptr + rn[None, :] * stride_qwn + offs_kw[:, None]  # [W_BYTES, BN] (W^T tile)
    # Scales are read at the unwrapped rows with a mask: with the prologue's group-major
    # layout (stride_sam == 1) this is one contiguous, vectorisable load per group.
    sa_ptrs = sa_ptr + offs_m.to(tl.int64) * stride_sam  # [BM]
    mask_m = offs_m < M
    sw_ptrs = sw_ptr + rn * stride_swn  # [BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP):
        a = tl.load(a_ptrs)  # [BM, A_BYTES] int8
        w = tl.load(w_ptrs)  # [W_BYTES, BN] int8
        if W_BITS == 4:
            # Sign-extend the nibbles in int32 (explicit width: the result of int8
            # shifts by a literal differs between Triton releases), then narrow.
            w32 = w.to(tl.int32)
            w_lo = ((w32 << 28) >> 28).to(tl.int8)  # even K indices, [-8, 7]
            w_hi = (w32 >> 4).to(tl.int8)  # odd K indices, [-8, 7]
            if A_BITS == 4:
                a32 = a.to(tl.int32)
                if A_UNSIGNED:
                    a_lo = (a32 & 0xF).to(tl.int8)  # [0, 15]
                    a_hi = ((a32 >> 4) & 0xF).to(tl.int8)
                else:
                    a_lo = ((a32 << 28) >> 28).to(tl.int8)
                    a_hi = (a32 >> 4).to(tl.int8)
            else:
                # 8-bit A with 4-bit W: split A's group into its even/odd K indices.
                a_lo, a_hi = tl.split(tl.reshape(a, (BLOCK_M, GROUP // 2, 2)))
            # out_dtype spelled out: Triton 3.6 asserts acc dtype == out_dtype (default fp32).
            part = tl.dot(a_lo, w_lo, out_dtype=tl.int32)  # [BM, BN] int32, exact
            part = tl.dot(a_hi, w_hi, part, out_dtype=tl.int32)
        else:
            part = tl.dot(a, w, out_dtype=tl.int32)  # W8A8: [BM, G] x [G, BN] -> int32, exact

        sa = tl.load(sa_ptrs + g * stride_sag, mask=mask_m, other=1.0)  # [BM] fp32
        sw = tl.load(sw_ptrs + g).to(tl.float32)  # [BN]
        pf = (part + MAGIC_I).to(tl.float32, bitcast=True)  # 1.5*2^23 + part, exact
        sw_b = tl.broadcast_to(sw[None, :], (BLOCK_M, BLOCK_N))
        # One rounding: fma(1.5*2^23 + p, sw, -1.5*2^23*sw) = round(p * sw). The product
        # 1.5*2^23*sw is exact in fp32 (sw has an 11-bit fp16 mantissa).
        inner = tl.math.fma(pf, sw_b, -(MAGIC_F * sw_b))
        acc = tl.math.fma(inner, tl.broadcast_to(sa[:, None], (BLOCK_M, BLOCK_N)), acc)
        a_ptrs += A_BYTES
        w_ptrs += W_BYTES

    finish_tile(
        acc, offs_m, offs_n, rm, rn, M, N, R, h_ptr, lu_ptr, bias_ptr, gate_ptr, res_ptr, y_ptr,
        stride_hm, stride_lun, stride_lur, gate_t, stride_gb, stride_gt, stride_gn,
        res_t, stride_rb, stride_rt, stride_rn, stride_ym,
        HAS_LORA, R_PAD, LORA_PRECISION, HAS_BIAS, ACT, HAS_GATE, HAS_RES, ROUND_BF16,
    )


def broadcast_operand(
    t: torch.Tensor, lead: tuple[int, ...], n: int
) -> tuple[torch.Tensor, int, int, int, int]:
    """View a gate/residual broadcastable to ``(*lead, n)`` as rows ``m -> (m // T, m % T)``.

    Returns ``(tensor, T, stride_b, stride_t, stride_n)`` such that element ``[m, j]`` of
    the flattened ``[M, n]`` operand is at ``b * stride_b + t * stride_t + j * stride_n``.
    Broadcast dims keep stride 0, so e.g. a ``[B, 1, N]`` gate for ``[B, T, K]`` input is
    read in place. Only layouts that need more than two row strides are copied.
    """
    e = t.expand(*lead, n)
    m = 1
    for d in lead:
        m *= d
    try:
        v = e.view(m, n)
        return v, max(m, 1), 0, v.stride(0), v.stride(1)
    except RuntimeError:
        pass
    tdim = lead[-1]
    try:
        v = e.view(m // tdim, tdim, n)
        return v, tdim, v.stride(0), v.stride(1), v.stride(2)
    except RuntimeError:
        v = e.reshape(m, n).contiguous()
        return v, max(m, 1), 0, v.stride(0), v.stride(1)


class EpilogueInputs(NamedTuple):
    """Tensors of the fused epilogue (None when absent); gate/residual broadcast to (*lead, N)."""

    h: Optional[torch.Tensor]  # [M, r] fp32 low-rank activations
    lora_up: Optional[torch.Tensor]  # [N, r]
    bias: Optional[torch.Tensor]  # [N]
    gate: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]


def epilogue_operands(
    y: torch.Tensor, e: EpilogueInputs, spec: KernelSpec, lead: tuple[int, ...], dummy: torch.Tensor
) -> dict:
    """Run-time arguments of :func:`.epilogue.finish_tile`, by kernel parameter name.

    ``dummy`` is a read-only placeholder for absent operands (never dereferenced).
    """
    h, lora_up, bias, gate, residual = e
    n = y.shape[1]
    lora = spec.has_lora
    if gate is not None:
        gate_v, gate_t, sgb, sgt, sgn = broadcast_operand(gate, lead, n)
    else:
        gate_v, gate_t, sgb, sgt, sgn = dummy, 1, 0, 0, 0
    if residual is not None:
        res_v, res_t, srb, srt, srn = broadcast_operand(residual, lead, n)
    else:
        res_v, res_t, srb, srt, srn = dummy, 1, 0, 0, 0
    return dict(
        h_ptr=h if lora else dummy, lu_ptr=lora_up if lora else dummy,
        bias_ptr=bias if bias is not None else dummy, gate_ptr=gate_v, res_ptr=res_v, y_ptr=y,
        R=spec.rank,
        stride_hm=h.stride(0) if lora else 0,
        stride_lun=lora_up.stride(0) if lora else 0,
        stride_lur=lora_up.stride(1) if lora else 0,
        gate_t=gate_t, stride_gb=sgb, stride_gt=sgt, stride_gn=sgn,
        res_t=res_t, stride_rb=srb, stride_rt=srt, stride_rn=srn,
        stride_ym=y.stride(0),
    )


def epilogue_constexprs(spec: KernelSpec) -> dict:
    """Compile-time arguments of :func:`.epilogue.finish_tile` for ``spec``."""
    return dict(
        HAS_LORA=spec.has_lora,
        R_PAD=spec.rank_pad,
        LORA_PRECISION=spec.lora_precision,
        HAS_BIAS=spec.has_bias,
        ACT=spec.act_code,
        HAS_GATE=spec.has_gate,
        HAS_RES=spec.has_residual,
        ROUND_BF16=spec.out_dtype == torch.bfloat16 and interpreting(),
    )


@functools.lru_cache(maxsize=None)
def _constexprs(spec: KernelSpec) -> dict:
    """Compile-time parameters of the GEMM for ``spec`` (one Triton binary each)."""
    g = spec.group_size
    return dict(
        W_BITS=spec.weight_bits,
        A_BITS=spec.act_bits,
        A_UNSIGNED=spec.act_unsigned,
        GROUP=g,
        A_BYTES=g // 2 if spec.act_bits == 4 else g,
        W_BYTES=g // 2 if spec.weight_bits == 4 else g,
        MAGIC_I=_MAGIC_I,
        MAGIC_F=_MAGIC_F,
        **epilogue_constexprs(spec),
    )


def run_gemm(
    qa: torch.Tensor,
    sa: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    h: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    spec: KernelSpec,
    lead: tuple[int, ...],
    *,
    wrap: bool = False,
    tune: bool = True,
    config: Optional[GemmConfig] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """qa: [M, K/2|K] int8, sa: [M, K/G], qweight: [N, K/2|K] int8, wscales: [N, K/G] -> y [M, N].

    ``gate``/``residual`` must broadcast to ``(*lead, N)`` with ``prod(lead) == M``.
    Inputs are assumed validated (see :mod:`.linear`); last dims must be contiguous.
    """
    m = qa.shape[0]
    n, groups = wscales.shape
    k = groups * spec.group_size
    dev = qa.device
    y = out if out is not None else torch.empty((m, n), dtype=spec.out_dtype, device=dev)
    if m == 0 or n == 0:
        return y
    # wscales: read-only placeholder for absent operands (never dereferenced)
    epi = epilogue_operands(y, EpilogueInputs(h, lora_up, bias, gate, residual), spec, lead, wscales)
    const = _constexprs(spec)

    def run(cfg: GemmConfig) -> None:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        kwargs = dict(
            epi, qa_ptr=qa, sa_ptr=sa, qw_ptr=qweight, sw_ptr=wscales, M=m, N=n, K=k,
            stride_qam=qa.stride(0), stride_sam=sa.stride(0), stride_sag=sa.stride(1),
            stride_qwn=qweight.stride(0), stride_swn=wscales.stride(0),
            **const, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        launch(gemm_kernel, grid, (), kwargs, wrap=wrap, device=dev)

    if config is None:
        config = choose_config(
            "gemm", spec, m, n, k, gemm_candidates(m if isinstance(m, int) else 4096, n, k),
            run if tune else None, dev,
        )
    run(config)
    return y

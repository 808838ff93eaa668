"""GEMM of the per-token schemes: 8-bit x 8-bit with one accumulator over all of K.

``Y = act(float(QA @ W8^T) * sa[m] * c[n] + H @ lora_up^T + bias) * gate + residual``

Both operands are plain ``tl.load`` tiles from memory (the weight expanded beforehand by
:mod:`.expand_weight`) and the K loop is nothing but loads and ``tl.dot``: no float work
inside it, so Triton's Hopper pipeliner keeps a wgmma in flight for an fp32 accumulator
(fp8; offline sm_90 compile: ``pendings = 1``). After the loop: the per-token x
per-channel rescale, then the low-rank up projection as a second ``tl.dot`` into the same
fp32 accumulator, bias, activation, gate, residual and the store (:func:`.epilogue.finish_tile`,
shared with the group GEMM).

INT8 accumulates in int32 (exact): Triton's Hopper pipeliner serialises every wgmma of a
non-fp32 accumulator ("We don't make the dot async if the accumulator is not fp32",
docs/design.md section 2.1), so on a GPU the library composition (``torch._int_mm``, :mod:`.library_per_token`)
is a tuning candidate beside this kernel and comes first for int8.

``FROM_ACC``: the same kernel without the K loop reads a finished accumulator (the library
composition's GEMM output) and applies the identical epilogue.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from svdq_compile.codegen.autotune import PtGemmConfig, choose_config, pt_gemm_candidates
from svdq_compile.codegen.epilogue import finish_tile
from svdq_compile.codegen.gemm import EpilogueInputs, epilogue_constexprs, epilogue_operands
from svdq_compile.codegen.launch import launch
from svdq_compile.codegen.library_per_token import library_available, library_product
from svdq_compile.codegen.spec import KernelSpec
from svdq_compile.codegen.tiling import grouped_tile

__all__ = ["gemm_pt_kernel", "run_gemm_pt"]


@triton.jit
def gemm_pt_kernel(
    a_ptr,  # [M, K] int8 / float8e4nv activations (unused with FROM_ACC)
    sa_ptr,  # [M] fp32 per-token scales
    b_ptr,  # [N, K] int8 / float8e4nv expanded weight (unused with FROM_ACC)
    c_ptr,  # [N] fp32 per-channel scales
    acc_ptr,  # [M, N] int32 / fp32 finished accumulator (FROM_ACC only)
    h_ptr,  # [M, R] fp32 low-rank activations (HAS_LORA)
    lu_ptr,  # lora_up [N, R] float (HAS_LORA)
    bias_ptr,  # [N] float (HAS_BIAS)
    gate_ptr,  # broadcastable to [M, N], addressed as [B, T, N] (HAS_GATE)
    res_ptr,  # broadcastable to [M, N], addressed as [B, T, N] (HAS_RES)
    y_ptr,  # [M, N] output dtype
    M,
    N,
    K,
    R,
    stride_am,
    stride_bn,
    stride_accm,
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
    INT8: tl.constexpr,
    FROM_ACC: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_LORA: tl.constexpr,
    R_PAD: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_RES: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns wrap onto valid ones: no masks on the main-loop loads
    # (they pipeline better); the final store is masked.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)

    if FROM_ACC:
        acc = tl.load(acc_ptr + rm[:, None] * stride_accm + rn[None, :])
    else:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
        b_ptrs = b_ptr + rn[None, :] * stride_bn + offs_k[:, None]  # [BK, BN] (W^T tile)
        if INT8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0)
                b = tl.load(b_ptrs, mask=(k0 + offs_k)[:, None] < K, other=0)
            # out_dtype spelled out: Triton 3.6 asserts acc dtype == out_dtype.
            if INT8:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # exact
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.float32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

    sa = tl.load(sa_ptr + rm)  # [BM] fp32
    c = tl.load(c_ptr + rn).to(tl.float32)  # [BN]
    y = acc.to(tl.float32) * sa[:, None] * c[None, :]
    finish_tile(
        y, offs_m, offs_n, rm, rn, M, N, R, h_ptr, lu_ptr, bias_ptr, gate_ptr, res_ptr, y_ptr,
        stride_hm, stride_lun, stride_lur, gate_t, stride_gb, stride_gt, stride_gn,
        res_t, stride_rb, stride_rt, stride_rn, stride_ym,
        HAS_LORA, R_PAD, LORA_PRECISION, HAS_BIAS, ACT, HAS_GATE, HAS_RES, ROUND_BF16,
    )


@functools.lru_cache(maxsize=None)
def _constexprs(spec: KernelSpec) -> dict:
    return dict(INT8=spec.scheme == "int8", **epilogue_constexprs(spec))


def run_gemm_pt(
    qa: torch.Tensor,
    sa: torch.Tensor,
    w8: torch.Tensor,
    wchannel: torch.Tensor,
    inputs: EpilogueInputs,
    spec: KernelSpec,
    lead: tuple[int, ...],
    *,
    wrap: bool = False,
    tune: bool = True,
    config: Optional[PtGemmConfig] = None,
) -> torch.Tensor:
    """qa: [M, K] 8-bit, sa: [M] fp32, w8: [N, K] 8-bit, wchannel: [N] -> y [M, N] in spec.out_dtype.

    ``config.library`` selects the library composition (:mod:`.library_per_token`); without a
    config, :func:`.autotune.choose_config` picks fused kernel or composition per shape
    bucket. ``inputs``: the epilogue's tensors (gate/residual broadcast to ``(*lead, N)``);
    last dims contiguous.
    """
    m, k = qa.shape
    n = w8.shape[0]
    dev = qa.device
    y = torch.empty((m, n), dtype=spec.out_dtype, device=dev)
    if m == 0 or n == 0:
        return y
    epi = epilogue_operands(y, inputs, spec, lead, sa)
    const = _constexprs(spec)

    def run(cfg: PtGemmConfig) -> None:
        if cfg.library:
            acc = library_product(qa, w8, spec.scheme)
            ops = dict(a_ptr=sa, b_ptr=sa, acc_ptr=acc, stride_accm=acc.stride(0), stride_am=0, stride_bn=0)
        else:
            ops = dict(a_ptr=qa, b_ptr=w8, acc_ptr=sa, stride_accm=0, stride_am=qa.stride(0), stride_bn=w8.stride(0))
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        kwargs = dict(
            epi, **ops, sa_ptr=sa, c_ptr=wchannel, M=m, N=n, K=k, **const,
            FROM_ACC=cfg.library, EVEN_K=k % cfg.block_k == 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        launch(gemm_pt_kernel, grid, (), kwargs, wrap=wrap, device=dev)

    if config is None:
        mm = m if isinstance(m, int) else 4096
        lib = library_available(spec.scheme, m, n, k, dev)
        cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
        config = choose_config("gemm_pt", spec, m, n, k, pt_gemm_candidates(mm, n, k, spec.scheme, lib, cap),
                               run if tune else None, dev)
    run(config)
    return y

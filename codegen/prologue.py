"""Prologue kernel: one pass over X that smooths, quantizes, packs, and down-projects.

For each row block and each K group of ``GROUP`` (64) columns it computes, bit-exactly
like :func:`runtime.quantize.quantize_activation` + :func:`runtime.packing.pack_int4`:

- ``x' = x / smooth`` in fp32 (IEEE division, ``tl.math.div_rn``; Triton's ``/`` may be
  approximate on GPU);
- the per-token per-group scale ``absmax / qmax`` (fp32, IEEE division; all-zero
  group -> 1), where unsigned grids use ``max(x' + shift, 0)``;
- ``q = clamp(floor((x' + shift) / scale + 0.5))`` packed two per byte (low nibble =
  even K index) for 4 bits, or stored as int8 for 8 bits;
- the low-rank down projection ``h += x'_group @ lora_down[:, group]^T`` in fp32, so
  the rank-r branch needs no second read of X (the point of the fusion).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from svdq_compile.codegen.autotune import PrologueConfig, choose_config, prologue_candidates
from svdq_compile.codegen.launch import launch
from svdq_compile.codegen.spec import KernelSpec

__all__ = ["prologue_kernel", "run_prologue", "qrange_f"]


@triton.jit
def prologue_kernel(
    x_ptr,  # [M, K] fp32/bf16/fp16, any strides
    smooth_ptr,  # [K] float (unused unless HAS_SMOOTH)
    ld_ptr,  # lora_down [R, K] float (unused unless HAS_LORA)
    qa_ptr,  # [M, K // 2] int8 packed (4-bit) or [M, K] int8 (8-bit), row-major
    sa_ptr,  # [K // GROUP, M] fp32 (group-major: the GEMM reads BLOCK_M contiguous scales)
    h_ptr,  # [M, R] fp32 (unused unless HAS_LORA)
    M,
    K,
    R,
    shift,  # fp32 added before quantization (unsigned grids after GELU); 0.0 otherwise
    stride_xm,
    stride_xk,
    stride_ldr,
    stride_ldk,
    stride_qm,
    stride_sg,
    stride_hm,
    HAS_SMOOTH: tl.constexpr,
    HAS_LORA: tl.constexpr,
    ACT_BITS: tl.constexpr,
    UNSIGNED: tl.constexpr,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    GROUP: tl.constexpr,
    R_PAD: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)  # 64-bit row offsets: M * K may exceed 2**31
    offs_g = tl.arange(0, GROUP)  # [G]
    offs_half = tl.arange(0, GROUP // 2)  # [G/2]
    offs_r = tl.arange(0, R_PAD)  # [R_PAD]
    qmax_t = tl.full((BLOCK_M,), QMAX, tl.float32)
    h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)

    for g in range(0, K // GROUP):
        k0 = g * GROUP
        # x: [BM, G] -> fp32 (masked rows read 0: their scale becomes 1, never stored)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + (k0 + offs_g)[None, :] * stride_xk,
            mask=mask_m[:, None],
            other=0.0,
        ).to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + k0 + offs_g).to(tl.float32)  # [G]
            x = tl.math.div_rn(x, tl.broadcast_to(sm[None, :], (BLOCK_M, GROUP)))
        if HAS_LORA:
            # lora_down^T tile: [G, R_PAD] (transposed through the pointers)
            ld = tl.load(
                ld_ptr + offs_r[None, :] * stride_ldr + (k0 + offs_g)[:, None] * stride_ldk,
                mask=offs_r[None, :] < R,
                other=0.0,
            ).to(tl.float32)
            h = tl.dot(x, ld, h, input_precision=LORA_PRECISION)  # [BM, R_PAD] fp32

        # Explicit fp32: Inductor launches user Triton kernels with Python floats typed
        # fp64 (pytorch#190340), which would promote xq and break the fp32-only div_rn.
        xq = x + tl.cast(shift, tl.float32)  # [BM, G] fp32
        if UNSIGNED:
            amax = tl.max(tl.maximum(xq, 0.0), axis=1)  # [BM]
        else:
            amax = tl.max(tl.abs(xq), axis=1)
        scale = tl.math.div_rn(amax, qmax_t)
        scale = tl.where(scale > 0.0, scale, 1.0)  # all-zero group -> 1 (no 0/0)
        v = tl.math.div_rn(xq, tl.broadcast_to(scale[:, None], (BLOCK_M, GROUP)))
        q = tl.math.floor(v + 0.5)
        q = tl.minimum(tl.maximum(q, QMIN), QMAX)
        qi = q.to(tl.int32)  # [BM, G] in [QMIN, QMAX]

        tl.store(sa_ptr + g * stride_sg + rows, scale, mask=mask_m)
        if ACT_BITS == 4:
            # Pair K index 2j (low nibble) with 2j+1 (high nibble), as pack_int4 does.
            lo, hi = tl.split(tl.reshape(qi, (BLOCK_M, GROUP // 2, 2)))  # [BM, G/2] each
            byte = (lo & 0xF) | ((hi & 0xF) << 4)  # 0..255
            byte = tl.where(byte > 127, byte - 256, byte)  # as a signed int8 value
            tl.store(
                qa_ptr + rows[:, None] * stride_qm + (g * (GROUP // 2) + offs_half)[None, :],
                byte.to(tl.int8),
                mask=mask_m[:, None],
            )
        else:
            tl.store(
                qa_ptr + rows[:, None] * stride_qm + (k0 + offs_g)[None, :],
                qi.to(tl.int8),
                mask=mask_m[:, None],
            )

    if HAS_LORA:
        tl.store(
            h_ptr + rows[:, None] * stride_hm + offs_r[None, :],
            h,
            mask=mask_m[:, None] & (offs_r[None, :] < R),
        )


def qrange_f(bits: int, unsigned: bool) -> tuple[float, float]:
    """(qmin, qmax) as floats, the same grid as :func:`runtime.quantize.qrange`."""
    if unsigned:
        return 0.0, float(2**bits - 1)
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


@functools.lru_cache(maxsize=None)
def _constexprs(spec: KernelSpec) -> dict:
    """Compile-time parameters of the prologue for ``spec`` (one Triton binary each)."""
    qmin, qmax = qrange_f(spec.act_bits, spec.act_unsigned)
    return dict(
        HAS_SMOOTH=spec.has_smooth,
        HAS_LORA=spec.has_lora,
        ACT_BITS=spec.act_bits,
        UNSIGNED=spec.act_unsigned,
        QMIN=qmin,
        QMAX=qmax,
        GROUP=spec.group_size,
        R_PAD=spec.rank_pad,
        LORA_PRECISION=spec.lora_precision,
    )


def run_prologue(
    x2d: torch.Tensor,
    smooth: Optional[torch.Tensor],
    lora_down: Optional[torch.Tensor],
    spec: KernelSpec,
    shift: float = 0.0,
    *,
    wrap: bool = False,
    tune: bool = True,
    config: Optional[PrologueConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2d: [M, K] -> (qa [M, K/2 or K] int8, sa [M, K/G] fp32, h [M, r] fp32).

    ``sa`` is a transposed view of a group-major [K/G, M] buffer (strides (1, M)), so
    the GEMM loads each group's BLOCK_M scales contiguously.
    ``h`` is an empty [M, 0] tensor when ``spec.rank == 0``. ``wrap`` launches through
    ``wrap_triton`` (traceable); ``tune`` allows benchmarking configs on a cache miss.
    """
    m, k = x2d.shape
    g = spec.group_size
    assert k % g == 0, "checked by the caller"
    assert (smooth is not None) == spec.has_smooth and (lora_down is not None) == spec.has_lora
    dev = x2d.device
    kq = k // 2 if spec.act_bits == 4 else k
    qa = torch.empty((m, kq), dtype=torch.int8, device=dev)
    sa_t = torch.empty((k // g, m), dtype=torch.float32, device=dev)  # group-major
    sa = sa_t.t()  # [M, K/G] view
    r = spec.rank
    h = torch.empty((m, r), dtype=torch.float32, device=dev)
    if m == 0:
        return qa, sa, h
    # Unused pointer slots get a harmless read-only tensor (constexpr flags skip them).
    sm = smooth if smooth is not None else x2d
    ld = lora_down if lora_down is not None else x2d
    h_arg = h if r > 0 else x2d
    args = (
        x2d, sm, ld, qa, sa_t, h_arg, m, k, r, float(shift),
        x2d.stride(0), x2d.stride(1),
        ld.stride(0) if lora_down is not None else 0,
        ld.stride(1) if lora_down is not None else 0,
        qa.stride(0), sa_t.stride(0), h.stride(0) if r > 0 else 0,
    )
    tune_and_launch("prologue", prologue_kernel, args, _constexprs(spec), spec, m, k,
                    wrap=wrap, tune=tune, config=config, device=dev)
    return qa, sa, h


def tune_and_launch(
    name: str, kernel: Any, args: tuple, const: dict, spec: KernelSpec, m: int, k: int, *,
    wrap: bool, tune: bool, config: Optional[PrologueConfig], device: torch.device,
) -> None:
    """Launch a row-blocked prologue kernel with ``config``, or with the cached / autotuned
    choice among :func:`prologue_candidates` (benchmarked only when ``tune``)."""

    def run(cfg: PrologueConfig) -> None:
        kwargs = dict(const, BLOCK_M=cfg.block_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        launch(kernel, (triton.cdiv(m, cfg.block_m),), args, kwargs, wrap=wrap, device=device)

    if config is None:
        config = choose_config(
            name, spec, m, 0, k, prologue_candidates(m if isinstance(m, int) else 4096, k),
            run if tune else None, device,
        )
    run(config)

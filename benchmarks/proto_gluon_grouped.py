"""Prototype for a design decision (docs/kernels.md): the grouped W8A8 and W4A4 GEMMs with the
per-group rescale overlapped with the tensor cores, written in Gluon (Triton's explicit-layout
dialect).

Not used by the library. Triton's ``tl.dot`` waits for every wgmma as soon as it is issued
when the result feeds anything but the next dot (here: the per-group float rescale), so the
tensor cores idle during the rescale (``benchmarks/sass_report.py`` shows the ``pendings = 0``
waits). Gluon exposes ``warpgroup_mma(..., is_async=True)`` and
``warpgroup_mma_wait``: group g's wgmma is issued, group g-1's (complete) partial is rescaled
while g runs, then g is waited for. Loads are TMA copies into a STAGES-deep ring.

Same numerics as the library's GEMMs (``codegen/gemm.py``: exact int32 partial per group of
64, ``acc = fma(round(p * sw), sa, acc)`` with the magic-number conversion, groups in ascending
order), so the bf16 outputs must equal ``run_gemm``'s bit for bit. The W4A4 kernel computes the
transposed tile so the packed INT4 weights are wgmma's *register* operand (nibbles unpacked in
registers, no shared-memory round trip); its activations are INT8 values in [-8, 7] in a
per-group even/odd order (``activations_even_odd``; a Hopper prologue would write that layout:
twice the activation bytes of packed INT4). This answers, in one GPU run, how close group-64
numerics get to the docs' ~1.33x-of-bf16 bound on Hopper once the rescale overlaps the MMAs,
before anyone ports the library kernel.

    python benchmarks/proto_gluon_grouped.py [--out DIR]   # Hopper GPU: exactness + timing
    python benchmarks/proto_gluon_grouped.py --offline      # any machine: compile for sm_90
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

# Triton 3.6 (the GPU machine) names the TMA load async_copy_global_to_shared; later releases
# renamed it async_load (the old name raises).
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared

# Same constants as codegen/gemm.py: bitcast(p + MAGIC_I) - MAGIC_F == float(p) for |p| < 2**22.
MAGIC_I = 0x4B400000
MAGIC_F = 12582912.0
INT8_INSTR_N = (224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8)  # wgmma s8 shapes


@gluon.constexpr_function
def _warps_per_cta(block_m, num_warps):
    w = [4, 1]  # the wgmma atom: 4 warps along M, 16 rows each
    while w[0] * w[1] != num_warps:
        if block_m > 16 * w[0]:
            w[0] *= 2
        else:
            w[1] *= 2
    return w


@gluon.constexpr_function
def _instr_n(block_m, block_n, num_warps):
    m_reps = (block_m + 15) // 16
    n_reps = (num_warps + m_reps - 1) // m_reps
    max_n = max(block_n // n_reps, 8)
    for n in INT8_INSTR_N:
        if n <= max_n and block_n % n == 0:
            return n
    raise ValueError(f"no int8 wgmma N for block_n={block_n}")


@gluon.jit
def _rescale(acc, part, sa_ptr, sw_ptr, offs_m, offs_n, mask_m, g, stride_sag, stride_swn,
             MAGIC_I: gl.constexpr, MAGIC_F: gl.constexpr):
    # acc += round(part * sw[n, g]) * sa[m, g], as codegen/gemm.py does it.
    sa = gl.load(sa_ptr + g * stride_sag + offs_m, mask=mask_m, other=1.0)  # [BM] fp32, group-major
    sw = gl.load(sw_ptr + offs_n * stride_swn + g).to(gl.float32)  # [BN] (offs_n wrapped into range)
    pf = (part + MAGIC_I).to(gl.float32, bitcast=True)  # 1.5 * 2**23 + part, exact
    sw_b = gl.expand_dims(sw, 0)
    inner = gl.fma(pf, sw_b, -(MAGIC_F * sw_b))
    return gl.fma(inner, gl.expand_dims(sa, 1), acc)


@gluon.jit
def grouped_w8a8_overlap_kernel(a_desc, w_desc, sa_ptr, sw_ptr, y_ptr, M, N, K, stride_sag, stride_swn, stride_ym,
                                MAGIC_I: gl.constexpr, MAGIC_F: gl.constexpr, STAGES: gl.constexpr,
                                num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    GROUP: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    NBYTES: gl.constexpr = a_desc.block_type.nbytes + w_desc.block_type.nbytes
    off_m = gl.program_id(0) * BLOCK_M
    off_n = gl.program_id(1) * BLOCK_N
    n_groups = K // GROUP  # the host checks n_groups >= STAGES

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=_warps_per_cta(BLOCK_M, num_warps),
                                                  instr_shape=[16, _instr_n(BLOCK_M, BLOCK_N, num_warps), 32])
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, GROUP], a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, GROUP], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(STAGES - 1):  # groups 0 .. STAGES-2 in flight
        mbarrier.expect(bars.index(i), NBYTES)
        _tma_load(a_desc, [off_m, i * GROUP], bars.index(i), a_bufs.index(i))
        _tma_load(w_desc, [off_n, i * GROUP], bars.index(i), w_bufs.index(i))

    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
    offs_n = (off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))) % N
    mask_m = offs_m < M
    acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
    zero = gl.zeros((BLOCK_M, BLOCK_N), gl.int32, layout=mma)

    # Group 0, and the load of group STAGES-1 into the last free slot.
    mbarrier.wait(bars.index(0), phase=0)
    prev = warpgroup_mma(a_bufs.index(0), w_bufs.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
    last: gl.constexpr = STAGES - 1
    mbarrier.expect(bars.index(last), NBYTES)
    _tma_load(a_desc, [off_m, last * GROUP], bars.index(last), a_bufs.index(last))
    _tma_load(w_desc, [off_n, last * GROUP], bars.index(last), w_bufs.index(last))
    prev = warpgroup_mma_wait(num_outstanding=0, deps=(prev, ))

    # Each iteration issues group g's wgmma, rescales group g-1 (complete) while it runs, then
    # waits for g. Only completed partials cross the loop's back edge: with an in-flight one
    # carried instead (wait num_outstanding=1), Triton (3.6, 3.9) copies its registers at the
    # back edge and ptxas serialises every wgmma (ptxas info C7514; benchmarks/sass_report.py).
    for g in range(1, n_groups):
        slot = g % STAGES
        mbarrier.wait(bars.index(slot), phase=(g // STAGES) & 1)
        cur = warpgroup_mma(a_bufs.index(slot), w_bufs.index(slot).permute((1, 0)), zero, use_acc=False,
                            is_async=True)
        nxt = g - 1 + STAGES  # group g-1 is done: its slot takes group g-1+STAGES
        if nxt < n_groups:
            ps = (g - 1) % STAGES
            mbarrier.expect(bars.index(ps), NBYTES)
            _tma_load(a_desc, [off_m, nxt * GROUP], bars.index(ps), a_bufs.index(ps))
            _tma_load(w_desc, [off_n, nxt * GROUP], bars.index(ps), w_bufs.index(ps))
        acc = _rescale(acc, prev, sa_ptr, sw_ptr, offs_m, offs_n, mask_m, g - 1, stride_sag, stride_swn, MAGIC_I,
                       MAGIC_F)
        prev = warpgroup_mma_wait(num_outstanding=0, deps=(cur, ))
    acc = _rescale(acc, prev, sa_ptr, sw_ptr, offs_m, offs_n, mask_m, n_groups - 1, stride_sag, stride_swn, MAGIC_I,
                   MAGIC_F)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    rows = gl.expand_dims(offs_m.to(gl.int64), 1)
    cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    mask = gl.expand_dims(mask_m, 1) & gl.expand_dims(cols < N, 0)
    gl.store(y_ptr + rows * stride_ym + gl.expand_dims(cols, 0), acc.to(y_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _rescale_t(acc, part, sa_ptr, sw_ptr, offs_n, offs_m, mask_m, g, stride_sag, stride_swn,
               MAGIC_I: gl.constexpr, MAGIC_F: gl.constexpr):
    # The transposed tile [BN, BM] of the W4A4 kernel: sw per row, sa per column.
    sa = gl.load(sa_ptr + g * stride_sag + offs_m, mask=mask_m, other=1.0)  # [BM]
    sw = gl.load(sw_ptr + offs_n * stride_swn + g).to(gl.float32)  # [BN]
    pf = (part + MAGIC_I).to(gl.float32, bitcast=True)
    sw_b = gl.expand_dims(sw, 1)
    inner = gl.fma(pf, sw_b, -(MAGIC_F * sw_b))
    return gl.fma(inner, gl.expand_dims(sa, 0), acc)


@gluon.jit
def _w4a4_group_mma(w_smem, ae_smem, ao_smem, zero, w_op: gl.constexpr):
    # One group: packed INT4 weights -> two int8 register operands (even / odd k), two async
    # wgmmas against the even / odd activation halves, chained into one int32 partial.
    w32 = w_smem.load(w_op).to(gl.int32)  # [BN, G/2] packed bytes
    lo = ((w32 << 28) >> 28).to(gl.int8)  # even k, [-8, 7]
    hi = (w32 >> 4).to(gl.int8)  # odd k
    part = warpgroup_mma(lo, ae_smem.permute((1, 0)), zero, use_acc=False, is_async=True)
    return warpgroup_mma(hi, ao_smem.permute((1, 0)), part, is_async=True)


@gluon.jit
def grouped_w4a4_overlap_kernel(w_desc, ae_desc, ao_desc, sa_ptr, sw_ptr, y_ptr, M, N, K, stride_sag, stride_swn,
                                stride_ym, MAGIC_I: gl.constexpr, MAGIC_F: gl.constexpr, STAGES: gl.constexpr,
                                num_warps: gl.constexpr):
    """Y^T tile = W4 @ A^T: the packed INT4 weights are wgmma's register operand (nibbles
    sign-extended in registers, no shared-memory round trip), the activations its shared
    operand as INT8 (values in [-8, 7]) in a per-group even/odd order: each group of 64 is
    stored as its 32 even-k values then its 32 odd-k values, so low nibbles (even k) pair with
    the first half (ae_desc) and high nibbles with the second (ao_desc)."""
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    HALF: gl.constexpr = w_desc.block_type.shape[1]  # packed bytes per group = GROUP / 2
    BLOCK_M: gl.constexpr = ae_desc.block_type.shape[0]
    GROUP: gl.constexpr = 2 * HALF
    NBYTES: gl.constexpr = w_desc.block_type.nbytes + 2 * ae_desc.block_type.nbytes
    off_n = gl.program_id(0) * BLOCK_N
    off_m = gl.program_id(1) * BLOCK_M
    n_groups = K // GROUP

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=_warps_per_cta(BLOCK_N, num_warps),
                                                  instr_shape=[16, _instr_n(BLOCK_N, BLOCK_M, num_warps), 32])
    w_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, HALF], w_desc.layout)
    ae_bufs = gl.allocate_shared_memory(ae_desc.dtype, [STAGES, BLOCK_M, HALF], ae_desc.layout)
    ao_bufs = gl.allocate_shared_memory(ao_desc.dtype, [STAGES, BLOCK_M, HALF], ao_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(STAGES):  # groups 0 .. STAGES-1 in flight (the host checks n_groups >= STAGES)
        mbarrier.expect(bars.index(i), NBYTES)
        _tma_load(w_desc, [off_n, i * HALF], bars.index(i), w_bufs.index(i))
        _tma_load(ae_desc, [off_m, i * GROUP], bars.index(i), ae_bufs.index(i))
        _tma_load(ao_desc, [off_m, i * GROUP + HALF], bars.index(i), ao_bufs.index(i))

    offs_n = (off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))) % N
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    mask_m = offs_m < M
    acc = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, layout=mma)
    zero = gl.zeros((BLOCK_N, BLOCK_M), gl.int32, layout=mma)

    mbarrier.wait(bars.index(0), phase=0)
    prev = _w4a4_group_mma(w_bufs.index(0), ae_bufs.index(0), ao_bufs.index(0), zero, w_op)
    prev = warpgroup_mma_wait(num_outstanding=0, deps=(prev, ))
    # As in the W8A8 kernel: issue group g, rescale g-1 (complete) meanwhile, wait for g.
    for g in range(1, n_groups):
        slot = g % STAGES
        mbarrier.wait(bars.index(slot), phase=(g // STAGES) & 1)
        cur = _w4a4_group_mma(w_bufs.index(slot), ae_bufs.index(slot), ao_bufs.index(slot), zero, w_op)
        nxt = g - 1 + STAGES  # group g-1 is done: its slot takes group g-1+STAGES
        if nxt < n_groups:
            ps = (g - 1) % STAGES
            mbarrier.expect(bars.index(ps), NBYTES)
            _tma_load(w_desc, [off_n, nxt * HALF], bars.index(ps), w_bufs.index(ps))
            _tma_load(ae_desc, [off_m, nxt * GROUP], bars.index(ps), ae_bufs.index(ps))
            _tma_load(ao_desc, [off_m, nxt * GROUP + HALF], bars.index(ps), ao_bufs.index(ps))
        acc = _rescale_t(acc, prev, sa_ptr, sw_ptr, offs_n, offs_m, mask_m, g - 1, stride_sag, stride_swn,
                         MAGIC_I, MAGIC_F)
        prev = warpgroup_mma_wait(num_outstanding=0, deps=(cur, ))
    acc = _rescale_t(acc, prev, sa_ptr, sw_ptr, offs_n, offs_m, mask_m, n_groups - 1, stride_sag, stride_swn,
                     MAGIC_I, MAGIC_F)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    # Y is [M, N] row-major: store the transposed tile with n (dim 0 here) fastest.
    out: gl.constexpr = gl.BlockedLayout([BLOCK_N // 32, 1], [32, 1], [1, num_warps], [0, 1])
    acc_o = gl.convert_layout(acc, out)
    cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out))
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out))
    ptrs = y_ptr + gl.expand_dims(rows.to(gl.int64), 0) * stride_ym + gl.expand_dims(cols, 1)
    mask = gl.expand_dims(cols < N, 1) & gl.expand_dims(rows < M, 0)
    gl.store(ptrs, acc_o.to(y_ptr.dtype.element_ty), mask=mask)


def activations_even_odd(qa_packed: torch.Tensor, group: int = 64) -> torch.Tensor:
    """[M, K/2] packed INT4 activations (low nibble = even k) -> [M, K] int8 with each group of
    ``group`` stored as its even-k values then its odd-k values (the W4A4 kernel's A layout)."""
    m = qa_packed.shape[0]
    b = qa_packed.to(torch.int32)
    lo = (b << 28) >> 28  # even k, sign-extended
    hi = b >> 4  # odd k (int8 >> 4 is arithmetic)
    half = group // 2
    return torch.cat([lo.view(m, -1, half), hi.view(m, -1, half)], dim=2).reshape(m, -1).to(torch.int8)


W4A4_CONFIGS = [(128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 4)]  # BN, BM, warps, stages


def _descriptors_w4a4(qw_packed: torch.Tensor, a_eo: torch.Tensor, bn: int, bm: int, group: int = 64):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    half = group // 2
    w_layout = gl.NVMMASharedLayout.get_default_for([bn, half], gl.int8)
    a_layout = gl.NVMMASharedLayout.get_default_for([bm, half], gl.int8)
    return (TensorDescriptor.from_tensor(qw_packed, [bn, half], w_layout),
            TensorDescriptor.from_tensor(a_eo, [bm, half], a_layout),
            TensorDescriptor.from_tensor(a_eo, [bm, half], a_layout))


def run_w4a4(a_eo: torch.Tensor, sa_gm: torch.Tensor, qw_packed: torch.Tensor, sw: torch.Tensor, cfg=W4A4_CONFIGS[0],
             out_dtype=torch.bfloat16, group: int = 64) -> torch.Tensor:
    """a_eo: [M, K] int8 from :func:`activations_even_odd`, sa_gm: [K/G, M] fp32, qw_packed:
    [N, K/2] int8 (two INT4 per byte), sw: [N, K/G] -> y [M, N]."""
    m, k = a_eo.shape
    n = qw_packed.shape[0]
    bn, bm, warps, stages = cfg
    if k // group < stages:
        raise ValueError(f"K/G = {k // group} groups < {stages} pipeline stages")
    w_desc, ae_desc, ao_desc = _descriptors_w4a4(qw_packed, a_eo, bn, bm, group)
    y = torch.empty((m, n), dtype=out_dtype, device=a_eo.device)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    grouped_w4a4_overlap_kernel[grid](w_desc, ae_desc, ao_desc, sa_gm, sw, y, m, n, k, sa_gm.stride(0), sw.stride(0),
                                      y.stride(0), MAGIC_I, MAGIC_F, stages, num_warps=warps)
    return y


CONFIGS = [(128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3)]  # BM, BN, warps, stages: the ones without spills offline


def _descriptors(qa: torch.Tensor, qw: torch.Tensor, bm: int, bn: int, group: int = 64) -> tuple[Any, Any]:
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    a_layout = gl.NVMMASharedLayout.get_default_for([bm, group], gl.int8)
    w_layout = gl.NVMMASharedLayout.get_default_for([bn, group], gl.int8)
    return (TensorDescriptor.from_tensor(qa, [bm, group], a_layout),
            TensorDescriptor.from_tensor(qw, [bn, group], w_layout))


def run(qa: torch.Tensor, sa_gm: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, cfg=CONFIGS[0],
        out_dtype=torch.bfloat16, group: int = 64) -> torch.Tensor:
    """qa: [M, K] int8, sa_gm: [K/G, M] fp32 (group-major, the prologue's layout), qw: [N, K]
    int8, sw: [N, K/G] -> y [M, N]."""
    m, k = qa.shape
    n = qw.shape[0]
    bm, bn, warps, stages = cfg
    if k // group < stages:
        raise ValueError(f"K/G = {k // group} groups < {stages} pipeline stages")
    a_desc, w_desc = _descriptors(qa, qw, bm, bn, group)
    y = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    grouped_w8a8_overlap_kernel[grid](a_desc, w_desc, sa_gm, sw, y, m, n, k, sa_gm.stride(0), sw.stride(0),
                                      y.stride(0), MAGIC_I, MAGIC_F, stages, num_warps=warps)
    return y


def bench_rows(m: int = 4608, k: int = 3072, n: int = 3072) -> list[dict]:
    """Per mode (W8A8, W4A4): exactness against the library GEMM of the same mode, then
    timings vs bf16 F.linear and that GEMM (same process, do_bench medians)."""
    from triton.testing import do_bench

    from svdq_compile.codegen.gemm import run_gemm
    from svdq_compile.codegen.linear import make_spec
    from svdq_compile.codegen.prologue import run_prologue
    from svdq_compile.runtime import pack_int4, quantize_weight

    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
    w = torch.randn(n, k, generator=g)
    flops = 2 * m * n * k
    bench = lambda fn: do_bench(fn, warmup=5, rep=30, return_mode="median")  # noqa: E731
    wb = w.to(dev, torch.bfloat16)
    ms = bench(lambda: torch.nn.functional.linear(x, wb))
    rows = [{"variant": "bf16 F.linear", "ms": ms, "tops": flops / ms / 1e9}]
    ms_bf16 = ms
    for bits in (8, 4):
        q, s = quantize_weight(w, bits, 64)
        qw = (pack_int4(q) if bits == 4 else q).to(dev).contiguous()
        sw = s.to(dev)
        spec = make_spec(x, None, None, None, None, None, 64, bits, bits, False, "none", "ieee")
        qa, sa, _ = run_prologue(x, None, None, spec, 0.0)  # sa: [M, K/G] view of a group-major buffer
        sa_gm = sa.t()  # [K/G, M]
        assert sa_gm.is_contiguous()
        ref = run_gemm(qa, sa, qw, sw, None, None, None, None, None, spec, (m,))
        ms_lib = bench(lambda: run_gemm(qa, sa, qw, sw, None, None, None, None, None, spec, (m,)))
        rows.append({"variant": f"library Triton W{bits}A{bits} GEMM (autotuned)", "ms": ms_lib,
                     "tops": flops / ms_lib / 1e9, "vs_bf16": ms_bf16 / ms_lib})
        print(rows[-1], flush=True)
        if bits == 8:
            fn, cfgs, name = (lambda c: run(qa, sa_gm, qw, sw, c)), CONFIGS, "gluon W8A8, rescale overlapped"
        else:
            a_eo = activations_even_odd(qa)  # the prologue would write this layout directly
            fn, cfgs, name = (lambda c: run_w4a4(a_eo, sa_gm, qw, sw, c)), W4A4_CONFIGS, \
                "gluon W4A4 (INT4 weights unpacked in registers), rescale overlapped"
        for cfg in cfgs:
            try:
                y = fn(cfg)
                torch.cuda.synchronize()
                exact = bool(torch.equal(y, ref))
                ms = bench(lambda: fn(cfg))
                rows.append({"variant": name, "config": str(cfg), "ms": ms, "tops": flops / ms / 1e9,
                             "vs_bf16": ms_bf16 / ms, "vs_library": ms_lib / ms, "exact_vs_library": exact,
                             "max_abs_diff": float((y.float() - ref.float()).abs().max())})
            except Exception as e:  # noqa: BLE001 - record and keep going (e.g. out of shared memory)
                rows.append({"variant": name, "config": str(cfg), "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(rows[-1], flush=True)
    return rows


def offline_report(arch: int = 90, configs: Any = None, w4a4_configs: Any = None) -> list[dict]:
    """Compile the configs (default: CONFIGS and W4A4_CONFIGS) for sm_<arch> without a GPU;
    SASS summary per config."""
    import os

    from triton.runtime.jit import mangle_type

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    rows = []
    m, n, k = 4608, 3072, 3072
    for bn, bm, warps, stages in (W4A4_CONFIGS if w4a4_configs is None else w4a4_configs):
        w = torch.zeros(256, 256, dtype=torch.int8)
        w_desc, ae_desc, ao_desc = _descriptors_w4a4(w, w, bn, bm)
        sig = dict(w_desc=mangle_type(w_desc), ae_desc=mangle_type(ae_desc), ao_desc=mangle_type(ao_desc),
                   sa_ptr="*fp32", sw_ptr="*fp16", y_ptr="*bf16", M="i32", N="i32", K="i32", stride_sag="i32",
                   stride_swn="i32", stride_ym="i32", MAGIC_I="constexpr", MAGIC_F="constexpr", STAGES="constexpr",
                   num_warps="constexpr")
        rows.append(_offline_one(grouped_w4a4_overlap_kernel, sig, dict(m=m, n=n, k=k), (bn, bm, warps, stages),
                                 "w4a4", arch))
    for bm, bn, warps, stages in (CONFIGS if configs is None else configs):
        qa = torch.zeros(256, 256, dtype=torch.int8)  # only dtype/alignment matter for the signature
        a_desc, w_desc = _descriptors(qa, qa, bm, bn)
        sig = dict(a_desc=mangle_type(a_desc), w_desc=mangle_type(w_desc), sa_ptr="*fp32", sw_ptr="*fp16",
                   y_ptr="*bf16", M="i32", N="i32", K="i32", stride_sag="i32", stride_swn="i32", stride_ym="i32",
                   MAGIC_I="constexpr", MAGIC_F="constexpr", STAGES="constexpr", num_warps="constexpr")
        rows.append(_offline_one(grouped_w8a8_overlap_kernel, sig, dict(m=m, n=n, k=k), (bm, bn, warps, stages),
                                 "w8a8", arch))
    return rows


def _offline_one(kernel: Any, sig: dict, shape: dict, cfg: tuple, mode: str, arch: int) -> dict:
    """Compile one Gluon kernel config for sm_<arch>; SASS summary (see sass_report)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from sass_report import _summarise, divisibility_attrs  # noqa: E402  (benchmarks/ on sys.path)

    warps, stages = cfg[2], cfg[3]
    m, n, k = shape["m"], shape["n"], shape["k"]
    const = dict(MAGIC_I=MAGIC_I, MAGIC_F=MAGIC_F, STAGES=stages, num_warps=warps)
    ints = dict(M=m, N=n, K=k, stride_sag=m, stride_swn=k // 64, stride_ym=n)
    try:
        kern = triton.compile(GluonASTSource(kernel, sig, const, attrs=divisibility_attrs(sig, ints)),
                              target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
        row = {"mode": mode, "config": cfg, "compiles": True, **_summarise(kern, warps)}
    except Exception as e:  # noqa: BLE001 - a config that does not compile is the finding
        row = {"mode": mode, "config": cfg, "compiles": False, "error": f"{type(e).__name__}: {str(e)[:600]}"}
    print(row, flush=True)
    return row


if __name__ == "__main__":
    import argparse
    import json
    import os

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="directory for proto_gluon.json")
    ap.add_argument("--offline", action="store_true", help="compile for sm_90 without a GPU and report the SASS")
    args = ap.parse_args()
    if args.offline:
        result = {"what": "offline compile (static counts, not timings)", "triton": triton.__version__,
                  "rows": offline_report()}
    elif not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("proto_gluon_grouped: needs a Hopper GPU (sm_90); --offline compiles it without one")
        sys.exit(0)
    else:
        result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "shape_mkn": [4608, 3072, 3072], "rows": bench_rows()}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = f"proto_gluon_offline_triton-{triton.__version__}.json" if args.offline else "proto_gluon.json"
        with open(f"{args.out}/{name}", "w") as f:
            json.dump(result, f, indent=1)

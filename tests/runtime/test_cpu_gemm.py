"""Exactness of the CPU grouped integer GEMM (C++ kernels and torch fallback).

Oracle: the formula evaluated in float64 (every product and 64-term sum is exact there).
"cpp" below is the backend of the C++ kernels of the best ISA this CPU runs (AMX /
AVX512-VNNI / AVX-VNNI / AVX2, see ``cpu_gemm.active_isa()``); the first test that needs them builds
them (~20-60 s cold, cached afterwards in the torch extensions dir). Bit-exactness of every
ISA against one oracle is in test_cpu_isa.py.
"""
from __future__ import annotations

import itertools
import logging
import os

import pytest
import torch

from svdq_compile.runtime import cpu_gemm
from svdq_compile.runtime.cpu_gemm import grouped_int_gemm, prepare_weight

RANGES = {  # activation ranges: signed int4, unsigned int4, int8
    "s4": (-8, 7),
    "u4": (0, 15),
    "s8": (-128, 127),
}


def _oracle(qa, sa, qw, sw, g):
    m, k = qa.shape
    n = qw.shape[0]
    i = torch.einsum(
        "mgk,ngk->mng", qa.double().view(m, -1, g), qw.double().view(n, -1, g)
    )  # exact integer partials per group
    return (i * sa.double().unsqueeze(1) * sw.double().unsqueeze(0)).sum(-1)


def _data(m, n, k, g, act, w_int8=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = RANGES[act]
    qa = torch.randint(lo, hi + 1, (m, k), generator=gen).to(torch.int8)
    wlo, whi = (-128, 127) if w_int8 else (-8, 7)
    qw = torch.randint(wlo, whi + 1, (n, k), generator=gen).to(torch.int8)
    # scales spanning a few decades, like real absmax/qmax values
    sa = torch.exp(torch.randn(m, k // g, generator=gen)).float() * 0.01
    sw = (torch.exp(torch.randn(n, k // g, generator=gen)) * 0.1).half().float()  # fp16-stored
    return qa, sa, qw, sw


def _check(y, qa, sa, qw, sw, g, elem_tol=None):
    """Frobenius-relative error < 1e-6, and every element within ``elem_tol`` of the
    absolute-value sum (the magnitude fp32 rounding errors scale with)."""
    if elem_tol is None:  # kernel bound: one rounding per group fold + the scale product
        elem_tol = max(1e-6, (qa.shape[1] // g + 2) * 2.0**-24)
    ref = _oracle(qa, sa, qw, sw, g)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    if ref.numel() == 0:
        return
    err = y.double() - ref
    rel = err.norm() / ref.norm().clamp_min(1e-300)
    assert rel < 1e-6, f"relative Frobenius error {rel:.3g}"
    absref = _oracle(qa.double().abs(), sa.abs(), qw.double().abs(), sw.abs(), g)
    worst = (err.abs() / absref.clamp_min(1e-300)).max()
    assert worst <= elem_tol, f"max elementwise error / |terms| = {worst:.3g}"


# The kernel's error per element is <= (K/G + 1) fp32 roundings of |terms| (< 1e-6 here);
# the fp32-GEMM fallback accumulates over K, so it gets a K-proportional allowance.
_TOL = {"cpp": None, "torch": 2e-5}


def _no_kernel_reason() -> str:
    return f"no C++ CPU kernel runs here ({cpu_gemm._unavailable})"


needs_cpp = pytest.mark.skipif(not cpu_gemm.fast_backend_available(), reason=_no_kernel_reason())

SHAPES = list(itertools.product((1, 17, 130), (5, 96, 200), (64, 192, 512)))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("act", list(RANGES))
def test_exact_odd_shapes(backend, act):
    if backend == "cpp" and not cpu_gemm.fast_backend_available():
        pytest.skip(_no_kernel_reason())
    for i, (m, n, k) in enumerate(SHAPES):
        qa, sa, qw, sw = _data(m, n, k, 64, act, w_int8=(act == "s8"), seed=i)
        y = grouped_int_gemm(qa, sa, qw, sw, 64, backend=backend)
        _check(y, qa, sa, qw, sw, 64, _TOL[backend])


@needs_cpp
@pytest.mark.parametrize("g", [16, 32, 128, 256])
def test_other_group_sizes(g):
    qa, sa, qw, sw = _data(33, 70, 512, g, "s8", w_int8=True, seed=g)
    _check(grouped_int_gemm(qa, sa, qw, sw, g, backend="cpp"), qa, sa, qw, sw, g)


@needs_cpp
def test_extreme_values_no_overflow():
    # all-extreme operands: largest int32 partials (64 * 128 * 128) and worst bias correction
    m, n, k, g = 7, 33, 256, 64
    for a_val, w_val in [(-128, -128), (127, -128), (-128, 127), (127, 127), (-8, -8), (15, -8)]:
        qa = torch.full((m, k), a_val, dtype=torch.int8)
        qw = torch.full((n, k), w_val, dtype=torch.int8)
        sa = torch.rand(m, k // g) + 0.5
        sw = torch.rand(n, k // g) + 0.5
        _check(grouped_int_gemm(qa, sa, qw, sw, g, backend="cpp"), qa, sa, qw, sw, g)


@needs_cpp
def test_prepared_weight_matches_raw_and_reuses():
    qa, sa, qw, sw = _data(130, 200, 192, 64, "u4", seed=3)
    prep = prepare_weight(qw, sw, 64)
    assert prep.packed is not None
    y_raw = grouped_int_gemm(qa, sa, qw, sw, 64)
    y_prep = grouped_int_gemm(qa, sa, prep, None, 64)
    assert torch.equal(y_raw, y_prep)  # same kernel, same order: bitwise equal
    qa2, sa2, _, _ = _data(17, 200, 192, 64, "s4", seed=4)
    _check(grouped_int_gemm(qa2, sa2, prep, None, 64), qa2, sa2, qw, sw, 64)
    with pytest.raises(ValueError):
        grouped_int_gemm(qa, sa, prep, None, 32)


@needs_cpp
def test_noncontiguous_inputs_and_thread_counts():
    qa, sa, qw, sw = _data(40, 96, 192, 64, "s4", seed=5)
    qa_nc = qa.t().contiguous().t()  # non-contiguous view with identical values
    assert not qa_nc.is_contiguous()
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(grouped_int_gemm(qa_nc, sa, qw, sw.half(), 64, backend="cpp"))
    finally:
        torch.set_num_threads(old)
    _check(outs[0], qa, sa, qw, sw, 64)
    assert torch.equal(outs[0], outs[1])  # deterministic: no cross-thread reductions


def test_env_var_forces_fallback(monkeypatch):
    qa, sa, qw, sw = _data(17, 96, 192, 64, "s4", seed=6)
    monkeypatch.setenv(cpu_gemm.ENV_BACKEND, "torch")
    prep = prepare_weight(qw, sw, 64)
    assert prep.packed is None
    y = grouped_int_gemm(qa, sa, prep, None, 64)
    assert torch.equal(y, cpu_gemm.grouped_int_gemm_torch(qa, sa, qw, sw, 64))
    _check(y, qa, sa, qw, sw, 64, _TOL["torch"])


def test_odd_cases_fall_back():
    # group size not a multiple of 4 and empty tensors take the torch path in "auto"
    qa, sa, qw, sw = _data(9, 10, 36, 6, "s4", seed=7)
    _check(grouped_int_gemm(qa, sa, qw, sw, 6), qa, sa, qw, sw, 6, _TOL["torch"])
    with pytest.raises(RuntimeError):
        grouped_int_gemm(qa, sa, qw, sw, 6, backend="cpp")
    qa, sa, qw, sw = _data(0, 10, 64, 64, "s4")
    assert grouped_int_gemm(qa, sa, qw, sw, 64).shape == (0, 10)
    with pytest.raises(ValueError):
        grouped_int_gemm(qa, sa, qw, sw, 64, backend="bogus")


def test_unknown_backend_is_a_clear_error(monkeypatch):
    """backend= and $SVDQ_CPU_GEMM take auto, torch or cpp (any case); anything else, the
    pre-0.1 name "vnni" included, is a ValueError that names the valid values and the source."""
    qa, sa, qw, sw = _data(5, 10, 64, 64, "s4")
    assert cpu_gemm.BACKENDS == ("auto", "torch", "cpp")
    for bad in ("vnni", "bogus"):
        for call in (lambda: grouped_int_gemm(qa, sa, qw, sw, 64, backend=bad),
                     lambda: prepare_weight(qw, sw, 64, backend=bad)):
            with pytest.raises(ValueError, match="valid names: auto, torch, cpp") as e:
                call()
            assert repr(bad) in str(e.value) and "backend=" in str(e.value)
    monkeypatch.setenv(cpu_gemm.ENV_BACKEND, "vnni")
    with pytest.raises(ValueError, match=r"'vnni' \(from \$SVDQ_CPU_GEMM\); valid names: auto, torch, cpp"):
        grouped_int_gemm(qa, sa, qw, sw, 64)
    with pytest.raises(ValueError, match="valid names"):
        cpu_gemm.quantize_activation_fused(torch.zeros(2, 64), None, 4, 64)
    monkeypatch.setenv(cpu_gemm.ENV_BACKEND, "Torch")
    assert prepare_weight(qw, sw, 64).packed is None
    y = grouped_int_gemm(qa, sa, qw, sw, 64, backend="TORCH")
    assert torch.equal(y, cpu_gemm.grouped_int_gemm_torch(qa, sa, qw, sw, 64))


def test_unavailable_kernel_logs_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(cpu_gemm, "_ops", None)
    monkeypatch.setattr(cpu_gemm, "_unavailable", None)
    monkeypatch.setattr(cpu_gemm, "_why_no_fast_path", lambda: "simulated: no compiler")
    qa, sa, qw, sw = _data(17, 96, 192, 64, "s4", seed=8)
    with caplog.at_level(logging.WARNING, logger=cpu_gemm.__name__):
        y1 = grouped_int_gemm(qa, sa, qw, sw, 64)
        y2 = grouped_int_gemm(qa, sa, qw, sw, 64)
    assert torch.equal(y1, y2)
    _check(y1, qa, sa, qw, sw, 64, _TOL["torch"])
    assert sum("simulated: no compiler" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeError):
        grouped_int_gemm(qa, sa, qw, sw, 64, backend="cpp")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_prepare_from_packed_int4(backend):
    if backend == "cpp" and not cpu_gemm.fast_backend_available():
        pytest.skip(_no_kernel_reason())
    from svdq_compile.runtime.packing import pack_int4

    for i, (m, n, k) in enumerate([(17, 5, 64), (130, 200, 192), (1, 96, 512), (9, 70, 16)]):
        g = 16 if k == 16 else 64
        qa, sa, qw, sw = _data(m, n, k, g, "s4", seed=20 + i)
        qw[0, :] = -8  # extreme nibbles
        qw[-1, :] = 7
        prep4 = prepare_weight(pack_int4(qw), sw, g, weight_bits=4, backend=backend)
        prep8 = prepare_weight(qw, sw, g, backend=backend)
        assert (prep4.packed is not None) == (backend == "cpp")
        y4 = grouped_int_gemm(qa, sa, prep4, None, g)
        assert torch.equal(y4, grouped_int_gemm(qa, sa, prep8, None, g))
        if backend == "cpp" and prep4.packed.ext == "avx2":
            # AVX2: weights within [-8, 7] take the U4 layout (u8 w + 8) from either input
            assert prep4.packed[0].dtype == prep8.packed[0].dtype == torch.uint8
            assert all(torch.equal(a, b) for a, b in zip(prep4.packed, prep8.packed))
        elif backend == "cpp":
            bp4, bp8 = prep4.packed[0], prep8.packed[0]
            if g % 8 == 0 and prep4.packed.ext == "avx512":  # int4 inputs keep 4 bits per weight: k-quad pairs in nibbles
                assert bp4.dtype == torch.uint8 and 2 * bp4.numel() == bp8.numel()
                b = bp4.to(torch.int16)
                lo, hi = ((b & 15) ^ 8) - 8, (((b >> 4) & 15) ^ 8) - 8  # sign-extended nibbles
                bp4 = torch.stack([lo, hi], dim=2).reshape(bp8.shape).to(torch.int8)
            assert torch.equal(bp4, bp8)
            assert all(torch.equal(a, b) for a, b in zip(prep4.packed[1:], prep8.packed[1:]))
        _check(y4, qa, sa, qw, sw, g, _TOL[backend])


def _amx_available() -> bool:
    return cpu_gemm.fast_backend_available() and cpu_gemm.set_amx(True)


@pytest.mark.skipif(not _amx_available(), reason="AMX-INT8 unavailable (CPU, OS permission or kernel)")
def test_amx_blocks_bit_identical_to_avx512_vnni():
    """The AMX blocks (32-row blocks, G % 64 == 0) must give the VNNI tiles' bits exactly:
    same exact int32 partials, same fold order. Row counts around the 32-row block and the
    96-row task, int8 and packed-int4 weights, two group sizes, the fused low-rank/bias
    epilogue of the u8 entry point."""
    from svdq_compile.runtime.packing import pack_int4

    def run(amx: bool, fn):
        assert cpu_gemm.set_amx(amx) == amx
        try:
            return fn()
        finally:
            cpu_gemm.set_amx(True)

    cases = [(32, 96, 192, 64), (33, 200, 512, 64), (130, 70, 256, 128), (200, 5, 64, 64), (97, 130, 384, 64)]
    for i, (m, n, k, g) in enumerate(cases):
        for int4 in (False, True):
            qa, sa, qw, sw = _data(m, n, k, g, "s4" if int4 else "s8", w_int8=not int4, seed=40 + i)
            prep = prepare_weight(pack_int4(qw) if int4 else qw, sw, g, weight_bits=4 if int4 else 8)
            ys = [run(a, lambda: grouped_int_gemm(qa, sa, prep, None, g)) for a in (False, True)]
            assert torch.equal(ys[0], ys[1]), (m, n, k, g, int4)
            _check(ys[1], qa, sa, qw, sw, g)
            gen = torch.Generator().manual_seed(i)
            h, lu, b = torch.randn(m, 8, generator=gen), torch.randn(n, 8, generator=gen), torch.randn(n, generator=gen)
            qa_u8 = (qa.view(torch.uint8) ^ 0x80).contiguous()
            ys = [run(a, lambda: cpu_gemm.gemm_prepared_u8(qa_u8, sa, prep.packed, n, g, h, lu, b)) for a in (False, True)]
            assert torch.equal(ys[0], ys[1]), ("epilogue", m, n, k, g, int4)


def test_amx_env_var_turns_it_off():
    """SVDQ_CPU_AMX=0 keeps a fresh process on the VNNI tiles (checked in a subprocess:
    the flag is read when the kernels load)."""
    import subprocess
    import sys

    code = "from svdq_compile.runtime import cpu_gemm\nprint('on' if cpu_gemm.amx_enabled() else 'off')\n"
    env = dict(os.environ, SVDQ_CPU_AMX="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "off"


@needs_cpp
def test_block_diagonal_lora_up_epilogue():
    """Fused siblings give a block-diagonal lora_up ([3N, 3R]); the epilogue skips the all-zero
    rank columns of each 64-column panel. The result must still be Y + h @ lora_up^T (fp32
    accuracy), for sibling widths on and off the 64-column panel grid, with and without AMX."""
    gen = torch.Generator().manual_seed(7)
    for n_sib, m in ((64, 40), (50, 33), (96, 7)):
        n, r, k, g = 3 * n_sib, 3 * 8, 128, 64
        qa, sa, qw, sw = _data(m, n, k, g, "s4", seed=n_sib)
        prep = prepare_weight(qw, sw, g)
        lu = torch.zeros(n, r)
        for i in range(3):
            lu[i * n_sib:(i + 1) * n_sib, i * 8:(i + 1) * 8] = torch.randn(n_sib, 8, generator=gen)
        h = torch.randn(m, r, generator=gen)
        b = torch.randn(n, generator=gen)
        qa_u8 = (qa.view(torch.uint8) ^ 0x80).contiguous()
        for amx in (False, True):
            cpu_gemm.set_amx(amx)
            try:
                y = cpu_gemm.gemm_prepared_u8(qa_u8, sa, prep.packed, n, g, h, lu, b)
                y0 = cpu_gemm.gemm_prepared_u8(qa_u8, sa, prep.packed, n, g)
            finally:
                cpu_gemm.set_amx(True)
            ref = y0.double() + h.double() @ lu.double().t() + b.double()
            # fp32 FMAs over 8 nonzero terms + one bias add: a few ulps of the largest term
            assert ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6, (n_sib, m, amx)

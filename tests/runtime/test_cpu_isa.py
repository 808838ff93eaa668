"""Every CPU ISA's kernels against one exact torch oracle, bit for bit.

The oracle evaluates the kernels' arithmetic contract in torch with correctly rounded fp32
FMAs (emulated in float64 with round-to-odd, so no double rounding):

- grouped GEMM: exact int32 partial per group, ``acc = float(I_0) * (sa * sw)``, then
  ``acc = fma(float(I_g), sa * sw, acc)`` for g ascending; the u8 entry point's epilogue
  ``acc = fma(h[m, j], lora_up[n, j], acc)`` over the rank columns that are not all zero
  in the output's 64-column panel, ascending, then ``acc + bias``;
- fused quantizer: q / scales / x' equal to ``quantize_activation``; h = X' L2^T as the
  AVX-512 kernel sums it (16 lanes, ascending k per lane, GCC's ``_mm512_reduce_add_ps``);
- W4A16 GEMV: the same 16-lane structure per group.

Each ISA this machine can run (amx, avx512_vnni, avx_vnni, avx2) is compared with the
oracle, so all of them agree with each other bit for bit; one that cannot run here is
skipped with the reason (the CPU flag it lacks).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess

import pytest
import torch

from svdq_compile.runtime import cpu_gemm, cpu_w4a16
from svdq_compile.runtime.packing import pack_int4
from svdq_compile.runtime.quantize import quantize_activation

KERNEL_ISAS = ["amx", "avx512_vnni", "avx_vnni", "avx2"]


# ----------------------------------------------------------------------------- oracle


def fma32(a, b, c):
    """Correctly rounded fp32 fma(a, b, c), elementwise (finite inputs)."""
    a, b, c = torch.broadcast_tensors(a.double(), b.double(), c.double())
    p = a * b  # exact: 24 + 24 significant bits
    s = p + c
    bb = s - p
    e = (p - (s - bb)) + (c - bb)  # TwoSum: p + c == s + e exactly
    # round to odd in float64, then one rounding to fp32 is the correctly rounded result
    fix = (e != 0) & ((s.view(torch.int64) & 1) == 0)
    toward = torch.where(e > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    return torch.where(fix, torch.nextafter(s, toward), s).float()


def gemm_oracle(qa, sa, qw, sw, g, h=None, lora_up=None, bias=None):
    m, k = qa.shape
    n, ng = qw.shape[0], k // g
    i = torch.einsum("mgk,ngk->mng", qa.double().view(m, ng, g), qw.double().view(n, ng, g))  # exact
    i = i.to(torch.int32).float()  # int32 -> fp32, round to nearest even (as vcvtdq2ps)
    p = sa.float().unsqueeze(1) * sw.float().unsqueeze(0)  # [m, n, ng] fp32 products
    acc = i[..., 0] * p[..., 0]
    for gi in range(1, ng):
        acc = fma32(i[..., gi], p[..., gi], acc)
    if h is not None:
        lu = lora_up.float()
        for n0 in range(0, n, 64):
            panel = lu[n0:n0 + 64]
            for j in range(lu.shape[1]):
                if bool((panel[:, j] != 0).any()):
                    acc[:, n0:n0 + 64] = fma32(h[:, j:j + 1].float(), panel[:, j].unsqueeze(0), acc[:, n0:n0 + 64])
    if bias is not None:
        acc = acc + bias.float()
    return acc


def _reduce16(acc):
    """GCC's _mm512_reduce_add_ps over the last dim (16 lanes)."""
    t3 = acc[..., 8:] + acc[..., :8]
    t6 = t3[..., 4:] + t3[..., :4]
    return (t6[..., 0] + t6[..., 2]) + (t6[..., 1] + t6[..., 3])


def lora_down_oracle(xs, ld):
    m, k = xs.shape
    pad = (-k) % 16
    x = torch.nn.functional.pad(xs.float(), (0, pad)).view(m, 1, -1, 16)
    w = torch.nn.functional.pad(ld.float(), (0, pad)).view(1, ld.shape[0], -1, 16)
    acc = torch.zeros(m, ld.shape[0], 16)
    for s in range(x.shape[2]):
        acc = fma32(x[:, :, s], w[:, :, s], acc)
    return _reduce16(acc)


def gemv_oracle(x, qw, s, group):
    """x: [M, K], qw: [N, K/2] packed int4, s: [N, K/G] -> the W4A16 GEMV's exact sums."""
    m, k = x.shape
    n = qw.shape[0]
    b = qw.view(torch.uint8).long()
    lo, hi = (((b & 15) ^ 8) - 8).float(), ((((b >> 4) & 15) ^ 8) - 8).float()  # [N, K/2]
    xe, xo = x[:, 0::2].float(), x[:, 1::2].float()  # [M, K/2]
    acc = torch.zeros(m, n, 16)
    gh = group // 2
    for gi in range(k // group):
        part = torch.zeros(m, n, 16)
        for j in range(gi * gh, (gi + 1) * gh, 16):
            part = fma32(lo[None, :, j:j + 16], xe[:, None, j:j + 16], part)
            part = fma32(hi[None, :, j:j + 16], xo[:, None, j:j + 16], part)
        acc = fma32(part, s[None, :, gi:gi + 1].float(), acc)
    return _reduce16(acc)


def test_oracle_fma_is_correctly_rounded():
    # the last case: a*b + c rounded to float64 lands exactly on an fp32 tie (1 + 3 * 2^-24),
    # the exact value is 2^-70 below it: plain double rounding gives 1 + 2^-22, fma 1 + 2^-23
    a = torch.tensor([1.0 + 2.0**-23, 3.0, 0.1, -7.5, 1.0 + 2.0**-23], dtype=torch.float32)
    b = torch.tensor([1.0 + 2.0**-23, 1.0 / 3.0, 10.0, 1e-8, (1.0 - 2.0**-23) * 2.0**-24], dtype=torch.float32)
    c = torch.tensor([-1.0, -1.0, -1.0, 2.0, 1.0 + 2.0**-23], dtype=torch.float32)
    exact = [(float(x) * float(y) + float(z)) for x, y, z in zip(a.double(), b.double(), c.double())]
    from fractions import Fraction

    assert float(fma32(a[4:], b[4:], c[4:])) == 1.0 + 2.0**-23
    assert float(((a[4:].double() * b[4:].double()) + c[4:].double()).float()) == 1.0 + 2.0**-22  # double rounding
    for i in range(len(a)):
        ex = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        got = float(fma32(a[i:i + 1], b[i:i + 1], c[i:i + 1]))
        # the nearest fp32: neither neighbour is closer
        up = float(torch.nextafter(torch.tensor([got]), torch.tensor([float("inf")])))
        dn = float(torch.nextafter(torch.tensor([got]), torch.tensor([float("-inf")])))
        assert abs(Fraction(got) - ex) <= abs(Fraction(up) - ex), (i, exact[i])
        assert abs(Fraction(got) - ex) <= abs(Fraction(dn) - ex), (i, exact[i])


# ----------------------------------------------------------------------------- ISA fixture


def _skip_reason(isa: str):
    missing = cpu_gemm.isa_missing(isa)
    if missing is not None:
        if isa == "avx_vnni" and cpu_gemm.isa_missing("avx2") is None:
            missing += " (its kernels compile here, see test_avx_vnni_kernels_compile, but cannot run)"
        return f"{isa} kernels cannot run on this machine: {missing}"
    if not cpu_gemm.fast_backend_available() and cpu_gemm.active_isa() == "torch":
        return f"C++ CPU kernels unavailable: {cpu_gemm._unavailable}"
    return None


@pytest.fixture(params=KERNEL_ISAS)
def isa(request):
    reason = _skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    try:
        prev = cpu_gemm.set_isa(request.param)
    except RuntimeError as e:  # e.g. AMX flags present but the OS refused the tile state
        pytest.skip(str(e))
    try:
        yield request.param
    finally:
        cpu_gemm.set_isa(prev)


def _data(m, n, k, g, act, wbits, seed):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = {"s4": (-8, 7), "u4": (0, 15), "s8": (-128, 127), "s8pt": (-127, 127)}[act]
    qa = torch.randint(lo, hi + 1, (m, k), generator=gen).to(torch.int8)
    wlo, whi = {4: (-8, 7), 8: (-128, 127), 7: (-127, 127)}[wbits]
    qw = torch.randint(wlo, whi + 1, (n, k), generator=gen).to(torch.int8)
    sa = torch.exp(torch.randn(m, k // g, generator=gen)) * 0.01
    sw = (torch.exp(torch.randn(n, k // g, generator=gen)) * 0.1).half().float()
    return qa, sa, qw, sw


def _prep(qw, sw, g, int4):
    return cpu_gemm.prepare_weight(pack_int4(qw) if int4 else qw, sw, g, weight_bits=4 if int4 else 8)


# (M, N, K, G, activations, weight bits): rows 1/17/33/130, N tails off the 64-column panel
# and the 16-column micro-tile, G = 64 / 128, and G == K (the per-token mode).
GEMM_CASES = [
    (1, 5, 64, 64, "s4", 4),
    (17, 70, 192, 64, "u4", 4),
    (33, 130, 512, 128, "s4", 4),
    (130, 200, 256, 64, "s8", 8),
    (17, 33, 384, 128, "s8", 4),  # W4A8 groups: int16 chunks inside a group
    (33, 96, 256, 64, "u4", 8),
    (1, 64, 64, 64, "s8pt", 7),  # G == K
    (17, 70, 320, 320, "s8pt", 7),
    (33, 40, 3072, 3072, "s8pt", 7),
    (130, 18, 3072, 3072, "s4", 4),
]


@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: "m{}n{}k{}g{}{}w{}".format(*c))
def test_gemm_bit_exact(isa, case):
    m, n, k, g, act, wbits = case
    qa, sa, qw, sw = _data(m, n, k, g, act, wbits, seed=m + n + k)
    ref = gemm_oracle(qa, sa, qw, sw, g)
    for int4 in ((False, True) if wbits == 4 else (False,)):
        prep = _prep(qw, sw, g, int4)
        assert prep.packed is not None
        y = cpu_gemm.grouped_int_gemm(qa, sa, prep, None, g)
        assert torch.equal(y, ref), (isa, case, int4, (y - ref).abs().max().item())


@pytest.mark.parametrize("case", [(33, 130, 256, 64, "s4", 4), (17, 70, 320, 320, "s8pt", 7), (1, 200, 128, 64, "u4", 8)],
                         ids=lambda c: "m{}n{}k{}g{}{}w{}".format(*c))
def test_gemm_epilogue_bit_exact(isa, case):
    """u8 entry point with the fused low-rank / bias epilogue (a block-diagonal lora_up:
    some rank columns are all zero in some 64-column panels and are skipped)."""
    m, n, k, g, act, wbits = case
    qa, sa, qw, sw = _data(m, n, k, g, act, wbits, seed=7 + m)
    gen = torch.Generator().manual_seed(m)
    r = 12
    h = torch.randn(m, r, generator=gen)
    lu = torch.randn(n, r, generator=gen)
    lu[: n // 2, 6:] = 0  # block-diagonal: the first half of the columns only uses ranks 0-5
    lu[n // 2:, :6] = 0
    bias = torch.randn(n, generator=gen)
    qa_u8 = (qa.view(torch.uint8) ^ 0x80).contiguous()
    prep = _prep(qw, sw, g, wbits == 4)
    for args, ref in (((h, lu, bias), gemm_oracle(qa, sa, qw, sw, g, h, lu, bias)),
                      ((None, None, bias), gemm_oracle(qa, sa, qw, sw, g, None, None, bias)),
                      ((h, lu, None), gemm_oracle(qa, sa, qw, sw, g, h, lu, None))):
        y = cpu_gemm.gemm_prepared_u8(qa_u8, sa, prep.packed, n, g, *args)
        assert torch.equal(y, ref), (isa, case, [a is None for a in args])


def test_gemm_extreme_values(isa):
    """Largest partials and the saturation-prone operands of the AVX2 layouts (u8 x s8
    pair sums): -128 / 127 activations with -128 / 127 / -8 / 7 weights, G == K = 3072."""
    for g, k in ((64, 256), (3072, 3072)):
        for a_val, w_val in [(-128, -128), (127, -128), (-128, 127), (127, 127), (-128, -8), (127, 7), (15, -8)]:
            qa = torch.full((7, k), a_val, dtype=torch.int8)
            qw = torch.full((33, k), w_val, dtype=torch.int8)
            sa = torch.rand(7, k // g) + 0.5
            sw = torch.rand(33, k // g) + 0.5
            y = cpu_gemm.grouped_int_gemm(qa, sa, qw, sw, g, backend="cpp")
            assert torch.equal(y, gemm_oracle(qa, sa, qw, sw, g)), (isa, g, a_val, w_val)


def test_isas_agree_bitwise():
    """All runnable ISAs side by side (a direct comparison, on top of the oracle's)."""
    runnable = [i for i in KERNEL_ISAS if _skip_reason(i) is None]
    if len(runnable) < 2:
        pytest.skip(f"only {runnable or 'no'} C++ ISA runs on this machine (nothing to compare with)")
    qa, sa, qw, sw = _data(33, 130, 3072, 3072, "s8pt", 7, seed=1)
    qa4, sa4, qw4, sw4 = _data(130, 70, 512, 64, "s4", 4, seed=2)
    outs = {}
    for i in runnable:
        with cpu_gemm.use_isa(i):
            outs[i] = (cpu_gemm.grouped_int_gemm(qa, sa, _prep(qw, sw, 3072, False), None, 3072),
                       cpu_gemm.grouped_int_gemm(qa4, sa4, _prep(qw4, sw4, 64, True), None, 64))
    first = outs[runnable[0]]
    for i in runnable[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, outs[i])), (runnable[0], i)


QUANT_CASES = [(17, 192, 64, 4, False), (5, 320, 320, 8, False), (3, 3072, 3072, 8, False), (130, 96, 32, 4, True),
               (2, 40, 8, 4, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_quantizer_bit_exact(isa, dtype):
    """q, scales, x' equal to quantize_activation (torch); h = X' L2^T as the 16-lane oracle.
    Includes the per-token mode's bits=8, group_size=K."""
    gen = torch.Generator().manual_seed(0)
    for m, k, g, bits, unsigned in QUANT_CASES:
        x = (torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))).to(dtype)
        if unsigned:
            x = x.abs()
        if m > 2:  # a NaN (its group's scale falls back to 1, its code to 0) and an all-zero row
            x[1, k // 2] = float("nan")
            x[2] = 0
        smooth = torch.rand(k, generator=gen) + 0.5
        ld = torch.randn(5, k, generator=gen)
        q, s, xs, h = cpu_gemm.quantize_activation_fused(x, smooth, bits, g, unsigned=unsigned, emit_xs=True,
                                                         lora_down=ld)
        xs_ref = x.float() / smooth
        q_ref, s_ref = quantize_activation(xs_ref, bits, g, unsigned=unsigned)
        tag = (isa, m, k, g, bits, unsigned, dtype)
        assert torch.equal(xs.isnan(), xs_ref.isnan()), tag
        assert torch.equal(xs.nan_to_num(), xs_ref.nan_to_num()), tag
        assert torch.equal(q, q_ref), tag
        assert torch.equal(s, s_ref), tag
        hr = lora_down_oracle(xs_ref, ld)
        assert torch.equal(h.isnan(), hr.isnan()) and torch.equal(h.nan_to_num(), hr.nan_to_num()), tag


def test_w4a16_bit_exact(isa):
    from svdq_compile.runtime.quantize import quantize_weight

    gen = torch.Generator().manual_seed(3)
    for m, n, k, group in ((1, 40, 256, 64), (3, 17, 320, 32), (5, 64, 256, 128)):
        qi, s = quantize_weight(torch.randn(n, k, generator=gen), 4, group)
        qw = pack_int4(qi)
        x = torch.randn(m, k, generator=gen)
        y = cpu_w4a16.w4a16_linear(x, qw, s, group)
        assert torch.equal(y, gemv_oracle(x, qw, s, group)), (isa, m, n, k, group)
        w = cpu_w4a16.w4a16_dequantize(qw, s, group)
        assert torch.equal(w, (qi.float().view(n, -1, group) * s.float().unsqueeze(-1)).view(n, k))


def test_per_token_flow_g_equals_k(isa):
    """The per-token mode's calls: the fused quantizer with bits=8, group_size=K, then the
    grouped GEMM with int8 weights within +-127 and sw [N, 1]."""
    gen = torch.Generator().manual_seed(5)
    for m, n, k in ((17, 70, 64), (33, 130, 320), (5, 96, 3072)):
        x = torch.randn(m, k, generator=gen)
        qw = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
        sw = torch.rand(n, 1, generator=gen) * 0.01
        q, sa, _, _ = cpu_gemm.quantize_activation_fused(x, None, 8, k, biased=True)
        prep = cpu_gemm.prepare_weight(qw, sw, k)
        y = cpu_gemm.gemm_prepared_u8(q, sa, prep.packed, n, k)
        qa = (q ^ 0x80).view(torch.int8)
        assert torch.equal(y, gemm_oracle(qa, sa, qw, sw, k)), (isa, m, n, k)


# ----------------------------------------------------------------------------- dispatch


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Lets a test re-run the ISA choice; restores the process's state afterwards."""
    prev = cpu_gemm.active_isa()
    monkeypatch.setattr(cpu_gemm, "_ops", None)
    monkeypatch.setattr(cpu_gemm, "_isa", None)
    monkeypatch.setattr(cpu_gemm, "_unavailable", None)
    yield monkeypatch
    monkeypatch.undo()
    if prev != "torch":
        cpu_gemm.set_isa(prev)


def test_env_forces_isa_and_logs_choice(fresh_dispatch, caplog):
    runnable = [i for i in KERNEL_ISAS if _skip_reason(i) is None]
    if not runnable:
        pytest.skip(f"no C++ ISA runs here: {cpu_gemm._unavailable}")
    isa = runnable[-1]  # the smallest one (avx2 on x86-64 with AVX2)
    for name in ("_ops", "_isa", "_unavailable"):  # _skip_reason() above made the choice once
        fresh_dispatch.setattr(cpu_gemm, name, None)
    fresh_dispatch.setenv(cpu_gemm.ENV_ISA, isa)
    with caplog.at_level(logging.INFO, logger=cpu_gemm.__name__):
        assert cpu_gemm.fast_backend_available()
        assert cpu_gemm.active_isa() == isa
        cpu_gemm.fast_backend_available()
    chosen = [r for r in caplog.records if "CPU kernels: " + isa in r.getMessage()]
    assert len(chosen) == 1 and chosen[0].levelno == logging.INFO


def test_env_forced_torch(fresh_dispatch):
    fresh_dispatch.setenv(cpu_gemm.ENV_ISA, "torch")
    assert not cpu_gemm.fast_backend_available()
    assert cpu_gemm.active_isa() == "torch"
    qa, sa, qw, sw = _data(5, 10, 64, 64, "s4", 4, seed=0)
    assert cpu_gemm.prepare_weight(qw, sw, 64).packed is None
    torch.testing.assert_close(cpu_gemm.grouped_int_gemm(qa, sa, qw, sw, 64), gemm_oracle(qa, sa, qw, sw, 64))


def test_env_unavailable_isa_is_a_clear_error(fresh_dispatch):
    missing = [(i, cpu_gemm.isa_missing(i)) for i in ("amx", "avx512_vnni", "avx_vnni", "avx2", "neon")]
    isa, why = next((i, w) for i, w in missing if w is not None)  # neon at least, on x86-64
    fresh_dispatch.setenv(cpu_gemm.ENV_ISA, isa)
    with pytest.raises(RuntimeError, match=f"SVDQ_CPU_ISA={isa} cannot run here: .*") as e:
        cpu_gemm.fast_backend_available()
    assert why in str(e.value)
    fresh_dispatch.setenv(cpu_gemm.ENV_ISA, "sse2")
    with pytest.raises(ValueError, match="not one of"):
        cpu_gemm.fast_backend_available()


def test_automatic_order():
    order = [i for i in cpu_gemm.ISAS if i in cpu_gemm.available_isas()]
    assert order == cpu_gemm.available_isas() and order[-1] == "torch"
    if os.environ.get(cpu_gemm.ENV_ISA) or os.environ.get(cpu_gemm.ENV_AMX) == "0":
        pytest.skip("an ISA is forced by the environment")
    if cpu_gemm.fast_backend_available():
        best = next(i for i in order if i not in ("neon",))
        assert cpu_gemm.active_isa() in (best, "avx512_vnni" if best == "amx" else best)


def _compile_only(key: str, sources: list, flag: str) -> list:
    """Compile ``sources`` of extension ``key`` without linking or loading (``flag``: "-c -O0" or
    "-fsyntax-only"), all at once; returns [(source name, returncode, stderr)]."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    ext = cpu_gemm._EXTS[key]
    procs = []
    for src in sources:
        cmd = [cxx, *flag.split(), str(src), "-D_GLIBCXX_USE_CXX11_ABI=1"]
        cmd += ["-o", os.devnull] if "-c" in flag.split() else []
        cmd += [f for f in ext.cflags if f.startswith(("-m", "-D", "-std"))]
        cmd += [f"-I{p}" for p in include_paths()]
        procs.append((src.name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    # communicate(), not wait(): a compiler that fills the stderr pipe would block until the timeout.
    outs = [(name, proc.communicate(timeout=300)[1], proc) for name, proc in procs]
    return [(name, proc.returncode, err) for name, err, proc in outs]


def _need_compiler() -> None:
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None or not cpu_gemm._is_x86_linux():
        pytest.skip("no C++ compiler / not x86-64 Linux")


def test_avx_vnni_kernels_compile():
    """Where the CPU lacks AVX-VNNI its kernels can still be compiled (and assembled: the
    VEX vpdpbusd is inline asm): compile the GEMM translation unit with the AVX-VNNI flags."""
    _need_compiler()
    if cpu_gemm.isa_missing("avx_vnni") is None:
        pytest.skip("this CPU runs the AVX-VNNI kernels: the bit-exactness tests cover them")
    [(_, rc, err)] = _compile_only("avx_vnni", [cpu_gemm._EXTS["avx_vnni"].sources[0]], "-c -O0")
    if "unrecognized command-line option '-mavxvnni'" in err:
        pytest.skip("this compiler has no -mavxvnni (GCC >= 11 / clang >= 12 needed)")
    assert rc == 0, err[-3000:]


def test_avx512_kernels_compile():
    """Where the CPU lacks AVX-512 (CI) its translation units still type-check: they share
    op_glue.h with the AVX2 files, so a change made and tested on AVX2 could break them
    unseen. -fsyntax-only instantiates the templates (about 30 s for the four files on 2 cores)."""
    _need_compiler()
    if cpu_gemm.isa_missing("avx512_vnni") is None:
        pytest.skip("this CPU runs the AVX-512 kernels: the bit-exactness tests cover them")
    results = _compile_only("avx512", list(cpu_gemm._EXTS["avx512"].sources), "-fsyntax-only")
    assert len(results) == 4
    for name, rc, err in results:
        assert rc == 0, f"{name}: {err[-3000:]}"


def test_progressive_per_token_weights(isa):
    """w4a8-int8's progressive weights (u4 nibbles, integer group scale s and zero z, channel
    scale c) prepared directly: bit-identical to the expanded int8 weight e = (u - z) * s with
    G == K (on AVX2 the GEMM runs on u and applies s, z per weight group in int32)."""
    gen = torch.Generator().manual_seed(9)
    for m, n, k, gw in ((1, 70, 256, 64), (17, 130, 320, 32), (33, 40, 3072, 64), (130, 18, 512, 128)):
        u = torch.randint(0, 16, (n, k), generator=gen)
        s = torch.randint(1, 9, (n, k // gw), generator=gen).to(torch.int8)  # |e| <= 15 * 8 = 120
        z = torch.randint(0, 16, (n, k // gw), generator=gen).to(torch.int8)
        c = torch.rand(n, generator=gen) * 0.01 + 1e-4
        qweight = pack_int4((u - 8).to(torch.int8))
        prep = cpu_gemm.prepare_weight_progressive(qweight, s, z, c, gw)
        if isa == "avx2":  # the direct layout, not the expanded int8 weight
            assert prep.packed[1].dim() == 3 and prep.packed[0].dtype == torch.uint8
        e = cpu_gemm.expand_progressive_weight(qweight, s, z, gw)
        assert torch.equal(e, ((u.view(n, -1, gw) - z.long()[..., None]) * s.long()[..., None]).view(n, k).to(torch.int8))
        x = torch.randn(m, k, generator=gen)
        ld = torch.randn(4, k, generator=gen)
        q, sa, _, h = cpu_gemm.quantize_activation_fused(x, None, 8, k, biased=True, lora_down=ld)
        lu, bias = torch.randn(n, 4, generator=gen), torch.randn(n, generator=gen)
        y = cpu_gemm.gemm_prepared_u8(q, sa, prep.packed, n, k, h, lu, bias)
        qa = (q ^ 0x80).view(torch.int8)
        assert torch.equal(y, gemm_oracle(qa, sa, e, c[:, None], k, h, lu, bias)), (isa, m, n, k, gw)
        assert torch.equal(cpu_gemm.grouped_int_gemm(qa, sa, prep, None, k), gemm_oracle(qa, sa, e, c[:, None], k))

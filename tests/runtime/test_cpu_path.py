"""The fast CPU path of ``svdq::linear``: fused activation quantizer, cached prepared
weight, and the whole layer against the float64 reference.

The fused quantizer must be *bit-identical* to ``quantize_activation(smooth_input(x))``
(the rules shared with the Triton kernels); the layer must match
``quantized_linear_reference`` to fp32 accuracy. Tests needing the C++ kernels are
skipped without a usable C++ CPU kernel (no compiler; every x86-64 ISA from AVX2 up has one: the first
test builds the extension, cached after).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from svdq_compile.runtime import cpu_gemm
from svdq_compile.runtime import torch_path as cpu
from svdq_compile.runtime.torch_path import CACHE_ATTR, quantized_linear_cpu
from svdq_compile.runtime.packing import pack_int4
from svdq_compile.runtime.quantize import quantize_activation, quantize_weight
from svdq_compile.runtime.reference import quantized_linear_reference, smooth_input

needs_kernels = pytest.mark.skipif(
    not cpu_gemm.fast_backend_available(), reason="C++ CPU kernels unavailable (no C++ compiler, or a CPU below AVX2)"
)

# (bits, unsigned, shift): signed int4, unsigned int4 (with and without the GELU shift), int8
MODES = [(4, False, 0.0), (4, True, 0.0), (4, True, 0.171875), (8, False, 0.0), (4, False, 0.25)]
QSHAPES = [(1, 64, 64), (7, 192, 64), (33, 96, 32), (5, 40, 8), (3, 36, 12), (130, 320, 64), (2, 20, 20)]


def _act(m, k, g, dtype, unsigned, gen):
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))
    x[0, :g] = 0  # an all-zero group -> scale 1
    if m > 1:
        x[1, -g:] = -x[1, -g:].abs()  # all-negative group: unsigned absmax 0
    if m > 2:  # values exactly on rounding boundaries of a unit scale
        x[2, :g] = torch.arange(g, dtype=torch.float32) * 0.5 - 3.0
    return x.to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_quantizer_bit_exact(dtype):
    gen = torch.Generator().manual_seed(0)
    for (m, k, g), (bits, unsigned, shift), use_smooth in itertools.product(QSHAPES, MODES, (False, True)):
        x = _act(m, k, g, dtype, unsigned, gen)
        smooth = (torch.rand(k, generator=gen) + 0.5) if use_smooth else None
        xs_ref = smooth_input(x, smooth)
        q_ref, s_ref = quantize_activation(xs_ref, bits, g, unsigned=unsigned, shift=shift)
        ld = torch.randn(5, k, generator=gen)
        q, s, xs, h = cpu_gemm.quantize_activation_fused(x, smooth, bits, g, unsigned=unsigned, shift=shift,
                                                         emit_xs=True, lora_down=ld)
        tag = (m, k, g, bits, unsigned, shift, use_smooth)
        assert q.dtype == torch.int8 and s.dtype == torch.float32, tag
        assert torch.equal(q, q_ref), tag
        assert torch.equal(s, s_ref), tag
        assert torch.equal(xs, xs_ref), tag
        h_ref = xs_ref.double() @ ld.double().t()  # fused low-rank down projection: fp32 accuracy
        assert ((h.double() - h_ref).abs() <= 1e-5 * (xs_ref.double().abs() @ ld.double().abs().t())).all(), tag
        qb, sb, none, none2 = cpu_gemm.quantize_activation_fused(x, smooth, bits, g, unsigned=unsigned, shift=shift,
                                                                 biased=True)
        assert none is None and none2 is None and qb.dtype == torch.uint8
        assert torch.equal((qb ^ 0x80).view(torch.int8), q_ref) and torch.equal(sb, s_ref), tag


@needs_kernels
def test_fused_quantizer_extremes_and_layouts():
    # huge/tiny magnitudes, inf/NaN, fp16 smooth, non-contiguous input, a single-thread run
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 256, generator=gen) * torch.logspace(-30, 30, 9).unsqueeze(1)
    x[4, 5] = 3.0e38  # inf after smoothing
    x[5, 70] = float("nan")
    x[6, 3] = float("-inf")
    x[6, 200] = float("inf")
    smooth = (torch.rand(256, generator=gen) + 0.5).half()
    x_nc = x.t().contiguous().t()
    old = torch.get_num_threads()
    try:
        for threads in (1, old):
            torch.set_num_threads(threads)
            for bits, unsigned, shift in MODES:
                q_ref, s_ref = quantize_activation(smooth_input(x, smooth), bits, 64, unsigned=unsigned, shift=shift)
                q, s, _, _ = cpu_gemm.quantize_activation_fused(x_nc, smooth, bits, 64, unsigned=unsigned, shift=shift)
                assert torch.equal(q, q_ref) and torch.equal(s, s_ref), (threads, bits, unsigned, shift)
    finally:
        torch.set_num_threads(old)


def test_fused_quantizer_off_when_forced(monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV_BACKEND, "torch")
    assert cpu_gemm.quantize_activation_fused(torch.randn(2, 64), None, 4, 64) is None


def _layer(n, k, g, wbits, gen, rank=8):
    w = torch.randn(n, k, generator=gen) / k**0.5
    smooth = torch.rand(k, generator=gen) + 0.5
    qw, wscales = quantize_weight(w * smooth, wbits, g)
    qweight = pack_int4(qw) if wbits == 4 else qw
    lora_down = torch.randn(rank, k, generator=gen) / k**0.5
    lora_up = torch.randn(n, rank, generator=gen) / rank**0.5
    bias = torch.randn(n, generator=gen)
    return dict(qweight=qweight, wscales=wscales, smooth=smooth, lora_down=lora_down, lora_up=lora_up, bias=bias)


def _run(x, L, *, g, wbits, abits, unsigned=False, shift=0.0, epilogue="none", residual=None, gate=None,
         smooth=True, lora=True, bias=True, ref=False):
    args = (x, L["qweight"], L["wscales"], L["smooth"] if smooth else None,
            L["lora_down"] if lora else None, L["lora_up"] if lora else None, L["bias"] if bias else None,
            residual, gate)
    if ref:
        return quantized_linear_reference(*args, group_size=g, weight_bits=wbits, act_bits=abits,
                                          act_unsigned=unsigned, act_shift=shift, epilogue=epilogue)
    return quantized_linear_cpu(*args, g, wbits, abits, unsigned, shift, epilogue)


def _rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


CASES = [  # (lead shape, n, k, g, wbits, abits, unsigned, shift, epilogue, smooth, lora, bias)
    ((17,), 70, 192, 64, 4, 4, False, 0.0, "none", True, True, True),
    ((3, 5), 33, 128, 32, 4, 4, True, 0.171875, "gelu", True, True, True),
    ((1,), 200, 256, 64, 8, 8, False, 0.0, "silu", False, True, False),
    ((130,), 64, 320, 64, 4, 8, False, 0.0, "none", True, False, True),
    ((2, 9), 96, 64, 16, 8, 4, True, 0.0, "relu", False, False, False),
    ((40,), 130, 192, 64, 4, 4, False, 0.0, "none", True, True, True),  # a 32-row AMX block + tail, N tail
]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_layer_matches_reference(backend, monkeypatch):
    if backend == "auto" and not cpu_gemm.fast_backend_available():
        pytest.skip("C++ CPU kernels unavailable (no C++ compiler, or a CPU below AVX2)")
    monkeypatch.setenv(cpu_gemm.ENV_BACKEND, backend)
    gen = torch.Generator().manual_seed(2)
    for i, (lead, n, k, g, wb, ab, uns, sh, ep, sm, lo, bi) in enumerate(CASES):
        L = _layer(n, k, g, wb, gen)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(*lead, k, generator=gen).to(dtype)
            if uns:
                x = x.abs()
            residual = torch.randn(*lead, n, generator=gen).to(dtype) if i % 2 == 0 else None
            gate = torch.randn(n, generator=gen) if i % 2 == 0 else None  # broadcast over tokens
            kw = dict(g=g, wbits=wb, abits=ab, unsigned=uns, shift=sh, epilogue=ep, residual=residual, gate=gate,
                      smooth=sm, lora=lo, bias=bi)
            y = _run(x, L, **kw)
            ref = _run(x, L, **kw, ref=True)
            assert y.dtype == dtype and y.shape == ref.shape
            tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one output rounding
            assert _rel(y, ref) < tol, (i, dtype, _rel(y, ref))
            if dtype == torch.float32:
                # the integer part is exact: the fast path and the torch path agree to fp32 rounding
                monkeypatch.setenv(cpu_gemm.ENV_BACKEND, "torch" if backend == "auto" else "auto")
                assert _rel(_run(x, L, **kw), y) < 1e-6
                monkeypatch.setenv(cpu_gemm.ENV_BACKEND, backend)


@needs_kernels
def test_weight_cache_reused_and_invalidated():
    gen = torch.Generator().manual_seed(3)
    L = _layer(96, 192, 64, 4, gen)
    x = torch.randn(11, 192, generator=gen)
    kw = dict(g=64, wbits=4, abits=4)
    y0 = _run(x, L, **kw)
    entry = getattr(L["qweight"], CACHE_ATTR)
    assert entry.prep.packed is not None
    assert torch.equal(_run(x, L, **kw), y0)
    assert getattr(L["qweight"], CACHE_ATTR) is entry  # reused, not rebuilt

    # in-place write to qweight: version bump -> repacked, result follows the new weight
    with torch.no_grad():
        L["qweight"][:5].fill_(0x77)  # int4 pairs (7, 7)
    y1 = _run(x, L, **kw)
    assert getattr(L["qweight"], CACHE_ATTR) is not entry
    assert _rel(y1, _run(x, L, **kw, ref=True)) < 1e-5
    assert not torch.equal(y1[:, :5], y0[:, :5])

    # in-place write to wscales (a different tensor): detected by its version counter
    entry = getattr(L["qweight"], CACHE_ATTR)
    L["wscales"].mul_(2)
    y2 = _run(x, L, **kw)
    assert getattr(L["qweight"], CACHE_ATTR) is not entry
    assert _rel(y2, _run(x, L, **kw, ref=True)) < 1e-5

    # a new scales tensor (same shape, other values) for the same qweight: rebuilt too
    entry = getattr(L["qweight"], CACHE_ATTR)
    L = dict(L, wscales=L["wscales"] * 0.5)
    y3 = _run(x, L, **kw)
    assert getattr(L["qweight"], CACHE_ATTR) is not entry
    assert _rel(y3, _run(x, L, **kw, ref=True)) < 1e-5
    L = dict(L, wscales=L["wscales"] * 2.0)  # back to y2's values, as another new tensor

    # a new weight tensor never shares the entry
    L2 = dict(L, qweight=L["qweight"].clone())
    assert not hasattr(L2["qweight"], CACHE_ATTR)
    assert torch.equal(_run(x, L2, **kw), y2)


@needs_kernels
def test_weight_cache_inference_tensors():
    gen = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        L = _layer(64, 128, 64, 4, gen)
        x = torch.randn(5, 128, generator=gen)
        y0 = _run(x, L, g=64, wbits=4, abits=4)
        L["qweight"][0].fill_(0x11)  # no version counter: caught by the snapshot comparison
        y1 = _run(x, L, g=64, wbits=4, abits=4)
        ref = _run(x, L, g=64, wbits=4, abits=4, ref=True)
    assert not torch.equal(y0, y1)
    assert _rel(y1, ref) < 1e-5


def test_fallback_when_kernels_unavailable(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_ops", None)
    monkeypatch.setattr(cpu_gemm, "_unavailable", "simulated")
    gen = torch.Generator().manual_seed(5)
    L = _layer(40, 128, 64, 4, gen)
    x = torch.randn(6, 128, generator=gen)
    assert cpu._fast_path(x, L["qweight"], L["wscales"], L["smooth"], None, None, 64, 4, 4, False, 0.0) is None
    assert _rel(_run(x, L, g=64, wbits=4, abits=4), _run(x, L, g=64, wbits=4, abits=4, ref=True)) < 1e-5


def test_empty_input():
    gen = torch.Generator().manual_seed(6)
    L = _layer(40, 128, 64, 4, gen)
    y = _run(torch.randn(0, 128), L, g=64, wbits=4, abits=4)
    assert y.shape == (0, 40)

"""Per-token schemes (w4a8-int8, w4a8-fp8): numerics vs their definitions, the op vs the reference."""
from __future__ import annotations

import pytest
import torch

from svdq_compile.quant.decompose import LayerTarget, decompose_layer, quantized_output, sqnr_db
from svdq_compile.passes.concat import concat_packed
from svdq_compile.runtime.op_args import ARG_NAMES, SCHEMA, LinearArgs
from svdq_compile.runtime.ops import packed_args
from svdq_compile.runtime.modes import get_mode
from svdq_compile.runtime.packed import LinearSpec, PackedLinear
from svdq_compile.runtime.packing import unpack_int4
from svdq_compile.runtime.per_token import (
    FP8_DTYPE, expand_fp8, expand_progressive, quantize_tokens, quantize_weight_fp8, quantize_weight_progressive,
)
from svdq_compile.runtime.quantize import dequantize_groups, quantize_weight
from svdq_compile.runtime.reference import quantized_linear_reference


def _weights(n=72, k=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, 1, generator=g) * 3 + 0.01)
    w[:, 5] *= 20  # an outlier input channel
    w[7] = 0  # an all-zero row: scales must stay finite
    return w


def test_progressive_expansion_is_exact_and_in_int8():
    w = _weights()
    p = quantize_weight_progressive(w, 64)
    e = expand_progressive(p.qweight, p.wscales, p.wzeros, 64).int()
    assert int(e.abs().max()) <= 127  # the +-119 level-1 range leaves room for level-2 rounding
    assert 1 <= int(p.wscales.min()) and int(p.wscales.max()) <= 16
    assert 0 <= int(p.wzeros.min()) and int(p.wzeros.max()) <= 15
    # Integer definition, recomputed independently: e = (u - z) * s with u the stored nibble + 8.
    u = unpack_int4(p.qweight, signed=True).int() + 8
    s = p.wscales.int().repeat_interleave(64, dim=1)
    z = p.wzeros.int().repeat_interleave(64, dim=1)
    assert torch.equal(e, (u - z) * s)
    # Without an outlier column, the two-level error stays within 1 dB of INT4-g64's (level 2
    # rounds the int8 values to steps s <= 16, like a 4-bit grid per group); an outlier column
    # sets the row's level-1 scale and costs more (what the low-rank branch is for).
    w[:, 5] /= 20
    p = quantize_weight_progressive(w, 64)
    w_dq = expand_progressive(p.qweight, p.wscales, p.wzeros, 64).float() * p.wchannel[:, None]
    q4, s4 = quantize_weight(w, 4, 64)
    assert sqnr_db(w, w_dq) > sqnr_db(w, dequantize_groups(q4, s4, 64)) - 1.0


def test_fp8_expansion_single_rounding():
    w = _weights()
    f = quantize_weight_fp8(w, 64)
    c = f.wchannel
    # Power-of-two channel scales: dividing q * s_g by c is exact, the cast is the only rounding.
    assert torch.equal(torch.exp2(torch.log2(c).round()), c)
    w8 = expand_fp8(f.qweight, f.wscales, c, 64)
    assert w8.dtype == FP8_DTYPE and float(w8.float().abs().max()) <= 448.0
    q = unpack_int4(f.qweight, signed=True).double()
    exact = q * f.wscales.double().repeat_interleave(64, dim=1) / c.double()[:, None]  # float64: no rounding
    assert torch.equal(w8, exact.float().to(FP8_DTYPE))


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_token_quantization(scheme):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(17, 128, generator=g) * 4
    x[2] = 0
    qa, sa = quantize_tokens(x, scheme)
    assert sa.shape == (17,) and float(sa[2]) == 1.0  # an all-zero token gets scale 1
    top = 127.0 if scheme == "int8" else 448.0
    assert torch.allclose(qa.float().abs().amax(dim=1)[[0, 1, 3]], torch.full((3,), top))
    # int8 keeps ~43 dB of a Gaussian token, e4m3 (3 mantissa bits) ~31 dB: both far above INT4-g64's ~19.
    assert sqnr_db(x, qa.float() * sa[:, None]) > (40.0 if scheme == "int8" else 29.0)


def _packed(scheme: str, n=72, k=192, rank=8, seed=0) -> PackedLinear:
    w = _weights(n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    smooth = torch.rand(k, generator=g) + 0.5
    return decompose_layer(w, torch.randn(n, generator=g), smooth,
                           LayerTarget(4, 8, 64, rank, scheme=scheme, refine_iters=1))


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("epilogue,gated", [("none", False), ("gelu", True), ("silu", False), ("relu", True),
                                            ("gelu_tanh", False)])
@pytest.mark.parametrize("m", [1, 17, 130])
def test_op_matches_reference(scheme, epilogue, gated, m):
    p = _packed(scheme)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, p.spec.in_features, generator=g)
    res = torch.randn(m, p.spec.out_features, generator=g)
    gate = torch.randn(p.spec.out_features, generator=g) if gated else None
    y = torch.ops.svdq.linear(*packed_args(x, p, epilogue, res, gate))
    ref = quantized_linear_reference(x, p.qweight, p.wscales, p.smooth, p.lora_down, p.lora_up, p.bias, res, gate,
                                     act_bits=8, epilogue=epilogue, wzeros=p.wzeros, wchannel=p.wchannel,
                                     scheme=scheme)
    # Same quantized operands; only the fp32 accumulation order differs from the float64 reference.
    assert sqnr_db(ref, y) > 100.0


def test_schema_is_the_argument_list():
    assert tuple(a.name for a in torch.ops.svdq.linear.default._schema.arguments) == ARG_NAMES
    assert "str scheme='group'" in SCHEMA
    # The old 15-argument positional form still binds (new arguments come last with defaults).
    p = _packed("int8")
    x = torch.randn(3, p.spec.in_features)
    a = packed_args(x, p)
    y_kw = torch.ops.svdq.linear(*a[:15], wzeros=a.wzeros, wchannel=a.wchannel, scheme="int8")
    assert torch.equal(y_kw, torch.ops.svdq.linear(*a))


def test_bad_per_token_arguments():
    p = _packed("int8")
    x = torch.randn(3, p.spec.in_features)
    a = packed_args(x, p)
    with pytest.raises(ValueError, match="wchannel"):
        torch.ops.svdq.linear(*a._replace(wchannel=None))
    with pytest.raises(ValueError, match="wzeros"):
        torch.ops.svdq.linear(*a._replace(wzeros=None))
    with pytest.raises(ValueError, match="unknown scheme"):
        torch.ops.svdq.linear(*a._replace(scheme="int4"))
    with pytest.raises(ValueError, match="w4a8 only"):
        torch.ops.svdq.linear(*a._replace(act_bits=4))
    with pytest.raises(ValueError, match="needs wchannel"):
        PackedLinear(LinearSpec(192, 72, scheme="fp8", act_bits=8), p.qweight, p.wscales.half())


def test_quality_per_token_beats_w4a4_on_outlier_layer():
    """The planners' ordering (docs/design.md section 2.1), on a layer with an activation outlier channel."""
    g = torch.Generator().manual_seed(0)
    k, n = 256, 256
    w = torch.randn(n, k, generator=g) / k ** 0.5
    x = torch.randn(512, k, generator=g)
    x[:, 3] *= 40  # the outlier SVDQuant's smoothing + low-rank branch absorb
    lam = (x.abs().amax(0) ** 0.5 / w.abs().amax(0) ** 0.5).clamp(1e-4, 1e4)
    ref = x @ w.t()
    out = {}
    for scheme, abits in (("group", 4), ("int8", 8), ("fp8", 8)):
        p = decompose_layer(w, None, lam, LayerTarget(4, abits, 64, 16, scheme=scheme, refine_iters=1))
        out[scheme] = sqnr_db(ref, quantized_output(p, x))
    assert out["int8"] > out["group"] + 1.0, out
    assert out["fp8"] > out["group"], out


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_sibling_concat_is_exact(scheme):
    packs = [_packed(scheme, n=n, seed=i) for i, n in enumerate((64, 40))]
    packs[1] = packs[1].with_(smooth=packs[0].smooth)
    fused = concat_packed(packs)
    assert fused.spec.scheme == scheme and fused.wchannel.shape == (104,)
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(9))
    y = torch.ops.svdq.linear(*packed_args(x, fused))
    parts = torch.cat([torch.ops.svdq.linear(*packed_args(x, p)) for p in packs], dim=-1)
    # Same quantized activations and weights; only fp32 summation order can differ (GEMM blocking).
    assert sqnr_db(parts, y) > 120.0


def test_mode_names():
    assert get_mode("w4a8-int8").scheme == "int8" and get_mode("w4a8-fp8").scheme == "fp8" and get_mode("w4a4").scheme == "group"
    assert LinearSpec(64, 64, act_bits=8, scheme="fp8").mode == "w4a8-fp8"
    assert LinearSpec(64, 64, act_bits=8).mode == "w4a8"
    assert isinstance(packed_args(torch.randn(1, 192), _packed("fp8")), LinearArgs)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cpu_paths_match_reference(monkeypatch, backend):
    """The C++ kernel path (w4a8-int8: one group spanning K) and the torch path, each forced."""
    from svdq_compile.runtime import cpu_gemm
    from svdq_compile.runtime.torch_path import PT_CACHE_ATTR

    monkeypatch.setenv("SVDQ_CPU_GEMM", backend)
    if backend == "auto" and not cpu_gemm.fast_backend_available():
        pytest.skip("C++ CPU kernels unavailable (no C++ compiler, or a CPU below AVX2)")
    p = _packed("int8")
    x = torch.randn(33, p.spec.in_features, generator=torch.Generator().manual_seed(4))
    y = torch.ops.svdq.linear(*packed_args(x, p, "silu"))
    ref = quantized_linear_reference(x, p.qweight, p.wscales, p.smooth, p.lora_down, p.lora_up, p.bias,
                                     act_bits=8, epilogue="silu", wzeros=p.wzeros, wchannel=p.wchannel, scheme="int8")
    assert sqnr_db(ref, y) > 100.0  # exact integers; fp32 low-rank/rescale rounding only
    _, _, w8, prep = getattr(p.qweight, PT_CACHE_ATTR)
    used_kernel = prep is not None and prep.packed is not None
    assert used_kernel == (backend == "auto") and (w8 is None) == used_kernel

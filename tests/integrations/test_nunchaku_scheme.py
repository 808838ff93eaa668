"""The ``nunchaku`` and ``nvfp4`` schemes of runtime/nunchaku_scheme.py: Nunchaku's numerics.

- the activation quantizer follows Nunchaku's CUDA rule step by step (checked against a
  scalar re-statement of ``quantize_w4a4_from_fpsum_warp``);
- the layer equals a float64 evaluation of the same integers and scales;
- how far our exact integer GEMM (fp32 rescale per group) is from Nunchaku's half-precision
  group sums (``half_group_sums`` emulates ``__hfma2`` accumulation) at FLUX width.
"""
from __future__ import annotations

import pytest
import torch

from svdq_compile.quant.decompose import sqnr_db
from svdq_compile.runtime import nunchaku_scheme as NS
from svdq_compile.runtime.ops import linear_from_packed
from svdq_compile.runtime.packed import LinearSpec, PackedLinear
from svdq_compile.runtime.packing import pack_int4, unpack_int4


def _scalar_rule(v: float, amax: float, unsigned: bool) -> tuple[int, float]:
    """One element of quantize_w4a4_from_fpsum_warp, in numpy-free scalar fp32 steps."""
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    qmax = 15.0 if unsigned else 7.0
    scale = f32(amax) * (f32(1.0) / f32(qmax))
    if float(scale) == 0.0:
        return 0, 0.0
    q = torch.round(f32(v) * (f32(1.0) / scale)).item()
    q = min(max(q, 0.0 if unsigned else -8.0), qmax)
    return int(q), float(scale)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_activation_rule(half):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 128, generator=g) * 3
    x[0, :64] = 0  # an all-zero group
    smooth = (torch.rand(128, generator=g) + 0.5).to(half)
    unsigned = torch.tensor([False, True])
    q, s = NS.quantize_act_nunchaku(x, smooth, half, 64, unsigned, NS.SHIFT_GELU)
    assert q.dtype == torch.int8 and s.dtype == half
    for m in range(4):
        for grp in range(2):
            cols = slice(grp * 64, grp * 64 + 64)
            xh = x[m, cols].to(half)
            if unsigned[grp]:
                xh = (xh.float() + NS.SHIFT_GELU).to(half)
            v = (xh.float() / smooth[cols].float()).to(half).float()
            amax = float(v.abs().max())
            for j in range(0, 64, 7):
                qq, sc = _scalar_rule(float(v[j]), amax, bool(unsigned[grp]))
                assert int(q[m, grp * 64 + j]) == qq
            assert float(s[m, grp]) == float(torch.tensor(sc).to(half))
    assert int(q[1:, 64:].min()) >= 0 and int(q[:, :64].min()) >= -8


def _layer(n=96, k=192, r=8, half=torch.bfloat16, unsigned=False, mixed=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g)
    ws = (torch.rand(n, k // 64, generator=g) * 0.02 + 1e-3).to(half)
    wz = None
    if mixed:
        wz = torch.tensor([0] + [1] * (k // 64 - 1), dtype=torch.int8)[None].expand(n, -1).contiguous()
    spec = LinearSpec(k, n, act_unsigned=unsigned or mixed, act_shift=NS.SHIFT_GELU if (unsigned or mixed) else 0.0,
                      rank=r, scheme="nunchaku")
    return PackedLinear(spec, pack_int4(q), ws, (torch.rand(k, generator=g) + 0.5).to(half),
                        torch.randn(r, k, generator=g) * 0.1, (torch.randn(n, r, generator=g) * 0.1).to(half),
                        torch.randn(n, generator=g).to(half), wzeros=wz)


@pytest.mark.parametrize("unsigned,mixed", [(False, False), (True, False), (False, True)])
def test_layer_equals_float64(unsigned, mixed):
    p = _layer(unsigned=unsigned, mixed=mixed)
    x = torch.randn(33, p.spec.in_features, generator=torch.Generator().manual_seed(2)).abs() * 2 - 0.1
    half = p.wscales.dtype
    groups = NS.unsigned_group_mask(p.wzeros, p.spec.act_unsigned, p.spec.in_features // 64, x.device)
    qa, sa = NS.quantize_act_nunchaku(x, p.smooth, half, 64, groups, p.spec.act_shift)
    qw = unpack_int4(p.qweight).double()
    m, k = qa.shape
    ref = torch.zeros(m, p.spec.out_features, dtype=torch.float64)
    for j in range(k // 64):
        c = slice(j * 64, j * 64 + 64)
        ref += (qa[:, c].double() @ qw[:, c].t()) * (sa[:, j].double()[:, None] * p.wscales[:, j].double()[None])
    xs = x.double() / p.smooth.double()
    ref += (xs @ p.lora_down.double().t()) @ p.lora_up.double().t() + p.bias.double()
    y = linear_from_packed(x, p)
    assert sqnr_db(ref, y) > 110  # fp32 rounding only (products and partials are exact)


def test_no_weight_quantizer():
    """The checkpoint schemes are formats to load, not calibration targets."""
    from svdq_compile.runtime.modes import ModeUnsupportedError, get_mode

    with pytest.raises(ModeUnsupportedError, match="quantize weight"):
        get_mode("w4a4-nunchaku").quantize_weight(torch.zeros(8, 64), 64)


@pytest.mark.parametrize("half,bound", [(torch.float16, 45.0), (torch.bfloat16, 30.0)])
def test_half_accumulation_distance(half, bound):
    """Our exact group GEMM vs Nunchaku's half-precision accumulation, FLUX.1 width (K = 3072)."""
    g = torch.Generator().manual_seed(3)
    m, n, k = 64, 256, 3072
    x = torch.randn(m, k, generator=g)
    x[:, :8] *= 20  # a few outlier channels, as in real activations
    qw = torch.randint(-8, 8, (n, k), generator=g)
    ws = (torch.rand(n, k // 64, generator=g) * 0.01 + 2e-3).to(half)
    unsigned = torch.zeros(k // 64, dtype=torch.bool)
    qa, sa = NS.quantize_act_nunchaku(x, None, half, 64, unsigned)
    from svdq_compile.runtime import cpu_gemm

    exact = cpu_gemm.grouped_int_gemm(qa, sa.float(), qw.to(torch.int8), ws.float(), 64)
    theirs = NS.half_group_sums(qa, sa, qw, ws, 64, half)
    d = sqnr_db(exact, theirs)
    print(f"\n{half}: exact fp32 group sums vs Nunchaku's {half} accumulation (K={k}): {d:.1f} dB")
    assert d > bound


def test_e2m1_round():
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.25, -0.74, -5.01, 0.0])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0, -0.5, -6.0, 0.0])
    assert torch.equal(NS.e2m1_round(v), want)


def test_nvfp4_layer_equals_float64():
    g = torch.Generator().manual_seed(4)
    n, k, r = 128, 256, 16
    codes = torch.randint(0, 16, (n, k), generator=g)
    ws = (torch.rand(n, k // 16, generator=g) * 4 + 0.1).to(torch.float8_e4m3fn)
    wc = torch.rand(n, generator=g) * 0.01
    spec = LinearSpec(k, n, group_size=16, rank=r, scheme="nvfp4")
    p = PackedLinear(spec, pack_int4(codes), ws, (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16),
                     torch.randn(r, k, generator=g) * 0.1, (torch.randn(n, r, generator=g) * 0.1).to(torch.bfloat16),
                     torch.randn(n, generator=g).to(torch.bfloat16), wchannel=wc)
    x = torch.randn(17, k, generator=g)
    qa, sa = NS.quantize_act_nvfp4(x, p.smooth, torch.bfloat16)
    w = NS.dequantize_nvfp4(p.qweight, ws, wc).double()
    a = (qa.double().view(17, -1, 16) * sa.double()[..., None]).view(17, k)
    ref = a @ w.t() + ((x.double() / p.smooth.double()) @ p.lora_down.double().t()) @ p.lora_up.double().t()
    ref += p.bias.double()
    assert sqnr_db(ref, linear_from_packed(x, p)) > 110

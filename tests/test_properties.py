"""Property-based tests (hypothesis): packing, quantization bounds, decomposition
reconstruction, and graph passes preserving outputs on random small graphs.

Examples are derandomized (the same ones every run, so CI is reproducible) and sized
so the whole file runs in well under a minute on 2 CPU cores.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import svdq_compile
from svdq_compile import SVDQuantConfig
from svdq_compile.capture.backend import last_reports
from svdq_compile.quant.decompose import LayerTarget, decompose_layer
from svdq_compile.runtime.packing import pack_int4, unpack_int4
from svdq_compile.runtime.quantize import dequantize_groups, qrange, quantize_groups, quantize_weight

FAST_SETTINGS = dict(deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- packing -------------------------------------------------------------------------------

@settings(max_examples=60, **FAST_SETTINGS)
@given(data=st.data(), signed=st.booleans(), lead=st.lists(st.integers(1, 3), max_size=2),
       half_k=st.integers(1, 40))
def test_pack_unpack_identity(data, signed, lead, half_k):
    lo, hi = (-8, 7) if signed else (0, 15)
    shape = (*lead, 2 * half_k)
    n = 1
    for d in shape:
        n *= d
    vals = data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    q = torch.tensor(vals, dtype=torch.int8).reshape(shape)
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (*lead, half_k)
    assert torch.equal(unpack_int4(packed, signed=signed), q)
    # The low nibble is the even index (ONNX order).
    assert torch.equal(packed.to(torch.int16) & 0xF, q[..., 0::2].to(torch.int16) & 0xF)


# --- quantize / dequantize -----------------------------------------------------------------

def _tensor(seed, rows, groups, gs, log_mag, nonneg, zero_group, outlier):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, groups * gs, generator=g) * (10.0 ** log_mag)
    if nonneg:
        x = x.abs()
    if zero_group:
        x[0, :gs] = 0.0
    if outlier:
        x[-1, -1] *= 1000.0
    return x


@settings(max_examples=80, **FAST_SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([4, 8]), unsigned=st.booleans(),
       rows=st.integers(1, 5), groups=st.integers(1, 4), gs=st.sampled_from([2, 16, 64]),
       log_mag=st.integers(-4, 4), zero_group=st.booleans(), outlier=st.booleans(),
       fp16_scales=st.booleans())
def test_quantize_dequantize_error_bound(seed, bits, unsigned, rows, groups, gs, log_mag, zero_group,
                                         outlier, fp16_scales):
    x = _tensor(seed, rows, groups, gs, log_mag, unsigned, zero_group, outlier)
    if unsigned and bits == 8:
        with pytest.raises(ValueError, match="unsigned quantization is only supported for 4 bits"):
            quantize_groups(x, bits, gs, unsigned=True)
        return
    scale_dtype = torch.float16 if fp16_scales and not unsigned else torch.float32
    if scale_dtype == torch.float16 and log_mag < -2:
        x = x * 1e3  # keep scales in fp16's normal range (underflow has its own guard)
    if scale_dtype == torch.float16:
        x = x.clamp(-1e5, 1e5)  # overflow of fp16 scales: test_fp16_weight_scale_overflow
    q, s = quantize_groups(x, bits, gs, unsigned=unsigned, scale_dtype=scale_dtype)
    qmin, qmax = qrange(bits, unsigned)
    assert q.dtype == torch.int8 and int(q.min()) >= qmin and int(q.max()) <= qmax
    assert s.dtype == scale_dtype and torch.isfinite(s.float()).all() and (s.float() > 0).all()
    dq = dequantize_groups(q, s, gs)
    sx = s.float().repeat_interleave(gs, dim=-1)
    # Half a step, plus fp32 slack; with fp16 scales the stored scale can be 2^-11 below
    # absmax/qmax, so the clamped extreme value can miss by qmax * 2^-11 of a step more.
    extra = qmax * 2.0 ** -10 if scale_dtype == torch.float16 else 0.0
    bound = sx * (0.5 + extra + 1e-5) + 1e-6 * x.abs().amax()
    err = (x - dq).abs()
    assert (err <= bound).all(), float((err - bound).max())
    # All-zero groups quantize to exact zeros with scale 1 (no 0/0).
    if zero_group:
        assert torch.equal(dq[0, :gs], torch.zeros(gs)) and float(s[0, 0]) == 1.0


def test_fp16_weight_scale_overflow():
    # A group whose fp16 scale would overflow (absmax > 65504 * qmax) must not silently
    # become inf/NaN.
    w = torch.full((2, 64), 1.0e6)
    try:
        q, s = quantize_weight(w, 4, 64)
    except ValueError:
        return  # a clear error is an acceptable fix
    assert torch.isfinite(s.float()).all()
    assert torch.isfinite(dequantize_groups(q, s, 64)).all()


# --- decomposition -------------------------------------------------------------------------

@settings(max_examples=25, **FAST_SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([64, 128]), k=st.sampled_from([64, 128]),
       rank=st.sampled_from([0, 4, 16, 200]), wbits=st.sampled_from([4, 8]), smooth=st.booleans(),
       refine=st.integers(0, 2), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_decomposition_reconstruction(seed, n, k, rank, wbits, smooth, refine, dtype):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    w[:, 3] *= 20.0  # an outlier input channel
    lam = torch.exp(torch.randn(k, generator=g)).clamp(0.1, 10.0) if smooth else None
    p = decompose_layer(w, None, lam, LayerTarget(weight_bits=wbits, act_bits=16, rank=rank, refine_iters=refine))
    assert p.rank == min(rank, n, k)
    eff = p.effective_weight()
    wf = w.float()
    lam_f = torch.ones(k) if lam is None else lam.float()
    # |W' - L1 L2 - dq(R)| <= wscale / 2 (stored fp16 scales: +qmax * 2^-11 of a step),
    # divided by lambda to undo the smoothing; fp32 slack for the products.
    qmax = qrange(wbits, False)[1]
    step = p.wscales.float().repeat_interleave(p.spec.group_size, dim=-1)
    w_s = wf * lam_f
    slack = 1e-5 * (w_s.abs().amax() + (0 if p.lora_up is None else
                                        (p.lora_up.float().abs() @ p.lora_down.float().abs()).amax()))
    bound = (step * (0.5 + qmax * 2.0 ** -10) + slack) / lam_f
    err = (wf - eff).abs()
    assert (err <= bound).all(), float((err - bound).max())


# --- graph passes on random small graphs ---------------------------------------------------

_ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class RandomMLP(nn.Module):
    def __init__(self, width, hidden, act, residual, norm, siblings, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.act, self.residual, self.siblings = act, residual, siblings
        self.norm = nn.LayerNorm(width) if norm else None
        self.fc1 = nn.Linear(width, hidden)
        self.fc1b = nn.Linear(width, hidden) if siblings else None
        self.fc2 = nn.Linear(hidden, width)
        with torch.no_grad():  # an outlier channel, as in real models
            self.fc1.weight[:, 1] *= 5.0

    def forward(self, x):
        t = self.norm(x) if self.norm is not None else x
        h = _ACTS[self.act](self.fc1(t))
        if self.fc1b is not None:
            h = h * self.fc1b(t)
        y = self.fc2(h)
        return y + x if self.residual else y


def _compiled_out(model, x, **opts):
    torch._dynamo.reset()
    out = torch.compile(model, backend="svdquant", options=dict(use_inductor=False, search_grid=2, **opts))(x)
    torch._dynamo.reset()
    return out


@settings(max_examples=8, **FAST_SETTINGS)
@given(width=st.sampled_from([64, 128, 192]), hidden=st.sampled_from([64, 128, 192]),
       act=st.sampled_from(sorted(_ACTS)), residual=st.booleans(), norm=st.booleans(),
       siblings=st.booleans(), seed=st.integers(0, 1000))
def test_graph_passes_preserve_outputs(width, hidden, act, residual, norm, siblings, seed):
    model = RandomMLP(width, hidden, act, residual, norm, siblings, seed).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, width, generator=g)
    x[..., 0] *= 8.0
    cfg = SVDQuantConfig(use_inductor=False, search_grid=2, rank=8, skip=())
    rep = svdq_compile.quantize(model, (x,), [x], config=cfg, progress=False)
    assert rep.rewritten == (3 if siblings else 2)
    with torch.no_grad():
        eager = model(x)
    on = _compiled_out(model, x)
    fired = last_reports()[-1]
    off = _compiled_out(model, x, fuse_siblings=False, fold_smoothing=False, fuse_epilogue=False)
    assert last_reports()[-1].ops_inserted == rep.rewritten
    assert fired.fused_groups == (1 if siblings else 0)  # the passes did fire
    assert fired.ops_inserted == 2 and sum(fired.passes.values()) >= 1
    rel = float((on - off).norm() / off.norm())
    assert rel < 1e-4, rel
    # Passes off is exactly the module-by-module eager computation.
    assert float((off - eager).norm() / eager.norm()) < 1e-5

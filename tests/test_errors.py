"""Reliability: one test per bad input, asserting the exact error (type + message) or the
documented fallback. The table of what users see is docs/errors.md.

Artifact errors (truncated file, unknown version, tampered tensor, mismatched model,
not an artifact, interrupted save) are covered in tests/test_artifacts.py and not
repeated here.
"""
import threading

import pytest
import torch
import torch.nn as nn

import svdq_compile
from svdq_compile import SVDQuantConfig, sqnr_db
from svdq_compile.capture.backend import last_reports
from svdq_compile.quant.decompose import LayerTarget, decompose_layer
from svdq_compile.runtime.torch_path import quantized_linear_cpu
from svdq_compile.runtime.ops import linear_from_packed

FAST = dict(use_inductor=False, search_grid=2)
CFG = SVDQuantConfig(**FAST)


def _packed(n=64, k=128, rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    b = torch.randn(n, generator=g) * 0.1
    return w, b, decompose_layer(w, b, None, LayerTarget(rank=rank))


def _op_args(p):
    s = p.spec
    return (p.qweight, p.wscales, p.smooth, p.lora_down, p.lora_up, p.bias, None, None,
            s.group_size, s.weight_bits, s.act_bits, s.act_unsigned, s.act_shift, "none")


class Named(nn.Module):
    """fc1 -> GELU -> fc2, with stable layer names."""

    def __init__(self, k=128, h=128, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(k, h)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(h, k)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12))


# --- svdq.linear inputs --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int8])
def test_integer_input_raises_typeerror(dtype):
    _, _, p = _packed()
    x = torch.randint(-3, 3, (4, 128), dtype=dtype)
    with pytest.raises(TypeError, match=f"input dtype {dtype} is not supported"):
        torch.ops.svdq.linear(x, *_op_args(p))


def test_float64_input_raises_typeerror():
    _, _, p = _packed()
    x = torch.randn(4, 128, dtype=torch.float64)
    with pytest.raises(TypeError, match="input dtype torch.float64 is not supported"):
        torch.ops.svdq.linear(x, *_op_args(p))


def test_zero_size_batch_returns_empty():
    _, _, p = _packed(n=64, k=128)
    for shape in [(0, 128), (2, 0, 128)]:
        y = linear_from_packed(torch.randn(*shape), p)
        assert tuple(y.shape) == shape[:-1] + (64,)
        assert y.dtype == torch.float32


def test_wrong_feature_count_raises():
    _, _, p = _packed(n=64, k=128)
    with pytest.raises(ValueError, match="input has 96 features, the layer expects 128"):
        linear_from_packed(torch.randn(4, 96), p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_without_triton_falls_back(monkeypatch):
    from svdq_compile.runtime import ops

    _, _, p = _packed()
    x = torch.randn(8, 128)
    ref = linear_from_packed(x, p)
    monkeypatch.setattr(ops, "_TRITON_IMPL", None)
    y = linear_from_packed(x.cuda(), p.to("cuda"))
    assert y.is_cuda
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4)


def test_input_on_other_device_than_weights_raises():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, _, p = _packed()
    with pytest.raises(ValueError, match="input is on cuda"):
        linear_from_packed(torch.randn(2, 128, device="cuda"), p)


def test_device_mismatch_check_runs_without_gpu():
    # The same check as the CUDA row above, exercised on every machine: a "meta" input
    # against CPU weights must be named, not crash inside a kernel.
    from svdq_compile.runtime.ops import check_linear_args

    _, _, p = _packed()
    s = p.spec
    with pytest.raises(ValueError, match="input is on meta but the quantized weights are on cpu"):
        check_linear_args(torch.empty(2, 128, device="meta"), p.qweight, p.wscales,
                          s.group_size, s.weight_bits, s.act_bits, "none")


# --- planning / decomposition --------------------------------------------------------------

def test_k_not_multiple_of_group_size_stays_float():
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("odd", nn.Linear(96, 64))
    x = torch.randn(4, 96)
    ref = m(x)
    y = torch.compile(m, backend="svdquant", options=FAST)(x)
    r = last_reports()[-1]
    assert r.rewritten == 0
    assert r.skipped == [("odd", "in_features 96 is not a multiple of group_size 64")]
    torch.testing.assert_close(y, ref)


def test_rank_larger_than_min_dim_is_clamped():
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(128, 64))
    x = torch.randn(4, 16, 128)
    rep = svdq_compile.quantize(m, (x,), [x], config=SVDQuantConfig(rank=1000, **FAST), progress=False)
    assert rep.layers[0]["rank"] == 64
    q = m.fc
    assert q.lora_down.shape == (64, 128) and q.lora_up.shape == (64, 64)
    # Also through the backend (and decompose_layer directly).
    torch._dynamo.reset()
    m2 = Named(seed=1)
    svdq_compile.calibrate(m2, [x], progress=False)
    torch.compile(m2, backend="svdquant", options=dict(FAST, rank=500))(x)
    assert {l["rank"] for l in last_reports()[-1].layers} == {128}
    _, _, p = _packed(n=64, k=128, rank=10_000)
    assert p.rank == 64


def test_nan_in_calibration_data_names_layer():
    m = Named()
    bad = torch.randn(2, 128)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="calibration input of layer fc1 contains NaN or Inf"):
        svdq_compile.calibrate(m, [bad], progress=False)


def test_inf_in_auto_calibration_names_layer():
    m = Named()
    bad = torch.randn(2, 128)
    bad[0, 0] = float("inf")
    cm = torch.compile(m, backend="svdquant", options=FAST)
    with pytest.raises(ValueError, match=r"calibration input of layer \S*fc1\S* contains NaN or Inf"):
        cm(bad)


def test_all_zero_input_channels():
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(128, 64))
    x = torch.randn(4, 16, 128)
    dead = [0, 5, 77]
    x[..., dead] = 0.0
    ref = m(x)
    svdq_compile.quantize(m, (x,), [x], config=SVDQuantConfig(**dict(FAST, search_grid=4)), progress=False)
    lam = m.fc.smooth
    assert lam is not None and torch.isfinite(lam).all()
    assert torch.equal(lam[dead], torch.ones(len(dead)))
    y = m(x)
    assert torch.isfinite(y).all()
    assert _rel(y, ref) < 0.2
    # Values appearing at run time in channels that were zero in calibration stay finite.
    x2 = torch.randn(4, 16, 128)
    assert torch.isfinite(m(x2)).all()


def test_missing_calibration_with_require():
    m = Named()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                       match="missing calibration for 2 linear layer"):
        torch.compile(m, backend="svdquant", options=dict(FAST, calibration="require"))(torch.randn(2, 128))


def test_missing_calibration_quantize_api():
    m = Named()
    with pytest.raises(ValueError, match="layer fc1 has no calibration statistics"):
        svdq_compile.quantize(m, (torch.randn(2, 128),), config=CFG, progress=False)


def test_unknown_option():
    m = Named()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                       match=r"unknown svdquant option\(s\) \['rnak'\]; valid options are: .*rank"):
        torch.compile(m, backend="svdquant", options={"rnak": 4})(torch.randn(2, 128))
    with pytest.raises(ValueError, match=r"unknown svdquant option\(s\) \['bogus'\]"):
        SVDQuantConfig.from_options({"bogus": 1})


@pytest.mark.parametrize("opts, frag", [
    ({"mode": "w3a3"}, "mode must be one of"),
    ({"rank": -1}, "rank must be >= 0"),
    ({"group_size": 63}, "group_size must be a positive even number"),
    ({"alpha": 1.5}, "alpha must be in"),
    ({"calibration": "sometimes"}, "calibration must be 'auto' or 'require'"),
    ({"kernel": "cuda"}, "kernel must be"),
])
def test_invalid_option_values(opts, frag):
    with pytest.raises(ValueError, match=frag):
        SVDQuantConfig.from_options(opts)


# --- graphs --------------------------------------------------------------------------------

def test_model_without_linear_runs():
    m = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 4, 16)
    y = torch.compile(m, backend="svdquant", options=FAST)(x)
    torch.testing.assert_close(y, m(x))
    r = last_reports()[-1]
    assert r.rewritten == 0 and r.sites_found == 0


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc = nn.Linear(128, 128)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_weight_tying_quantized_consistently():
    m = Tied()
    x = torch.randn(2, 16, 128)
    ref = m(x)
    svdq_compile.calibrate(m, [x], progress=False)
    y = torch.compile(m, backend="svdquant", options=FAST)(x)
    r = last_reports()[-1]
    assert r.sites_found == 2 and r.rewritten == 2, r.summary()
    assert torch.isfinite(y).all()
    assert sqnr_db(ref, y) > 12, sqnr_db(ref, y)
    # Both uses are the same layer -> both quantized with the same residual integers.
    names = [l["name"] for l in r.layers]
    assert len(names) == 2
    y2 = torch.compile(m, backend="svdquant", options=FAST)(x)
    torch.testing.assert_close(y, y2)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(128, 128)
        self.fc2 = nn.Linear(128, 128)

    def forward(self, x):
        h = self.fc1(x)
        torch._dynamo.graph_break()
        return self.fc2(torch.relu(h))


def test_graph_break_both_graphs_quantized():
    m = Broken()
    x = torch.randn(2, 16, 128)
    ref = m(x)
    svdq_compile.calibrate(m, [x], progress=False)
    n0 = len(last_reports())
    y = torch.compile(m, backend="svdquant", options=FAST)(x)
    reps = last_reports()[n0:]
    assert len(reps) == 2, [r.summary() for r in reps]
    assert [r.rewritten for r in reps] == [1, 1]
    assert sqnr_db(ref, y) > 12


def test_two_compiled_models_of_different_classes():
    x = torch.randn(2, 16, 128)
    a, b = Named(seed=10), Tied()
    for m in (a, b):
        svdq_compile.calibrate(m, [x], progress=False)
    ca = torch.compile(a, backend="svdquant", options=FAST)
    ya1 = ca(x)
    yb = torch.compile(b, backend="svdquant", options=FAST)(x)
    torch.testing.assert_close(ca(x), ya1, rtol=0, atol=0)
    assert sqnr_db(a(x), ya1) > 12 and sqnr_db(b(x), yb) > 12


def test_two_compiled_models_independent():
    x = torch.randn(2, 16, 128)
    a, b = Named(seed=10), Named(seed=11)
    for m in (a, b):
        svdq_compile.calibrate(m, [x], progress=False)
    ca = torch.compile(a, backend="svdquant", options=FAST)
    ya1 = ca(x)
    cb = torch.compile(b, backend="svdquant", options=FAST)
    yb = cb(x)
    ya2 = ca(x)
    torch.testing.assert_close(ya1, ya2, rtol=0, atol=0)
    assert sqnr_db(a(x), ya1) > 12 and sqnr_db(b(x), yb) > 12
    assert not torch.allclose(ya1, yb)
    # b compiled alone gives the same result as b compiled next to a.
    torch._dynamo.reset()
    yb_alone = torch.compile(b, backend="svdquant", options=FAST)(x)
    torch.testing.assert_close(yb, yb_alone, rtol=0, atol=0)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.fc1 = nn.Linear(128, 128)
        self.fc2 = nn.Linear(128, 128)

    def forward(self, x):
        h = self.fc1(x)
        h.relu_()
        h.add_(0.5)
        y = self.fc2(h)
        y.mul_(2.0)
        y += x
        return y


def test_chained_linears():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    x = torch.randn(2, 16, 128)
    svdq_compile.calibrate(m, [x], progress=False)
    y = torch.compile(m, backend="svdquant", options=FAST)(x)
    assert sqnr_db(m(x), y) > 12


def test_inplace_ops_around_linears():
    m = InPlace()
    x = torch.randn(2, 16, 128)
    with torch.no_grad():
        ref = m(x.clone())
    svdq_compile.calibrate(m, [x.clone()], progress=False)
    x_in = x.clone()
    y = torch.compile(m, backend="svdquant", options=FAST)(x_in)
    torch.testing.assert_close(x_in, x)  # the input itself is not modified
    assert last_reports()[-1].rewritten == 2
    assert torch.isfinite(y).all()
    assert sqnr_db(ref - x, y - x) > 12


def test_weights_modified_after_compilation():
    m = Named()
    x = torch.randn(2, 128)
    svdq_compile.calibrate(m, [x], progress=False)
    cm = torch.compile(m, backend="svdquant", options=FAST)
    cm(x)
    with torch.no_grad():
        m.fc2.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified after compilation"):
        cm(x)


# --- threads -------------------------------------------------------------------------------

def _run_threads(fn, n=2, reps=3):
    barrier = threading.Barrier(n)
    out, errs = [None] * n, []

    def work(i):
        try:
            barrier.wait()
            out[i] = [fn() for _ in range(reps)]
        except BaseException as e:  # noqa: BLE001 - reported below
            errs.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errs, errs
    return out


def test_threads_quantized_linear_cpu_cold_cache():
    _, _, p = _packed(n=128, k=256, rank=8, seed=5)
    x = torch.randn(32, 256)
    serial = quantized_linear_cpu(x, *_op_args(_packed(n=128, k=256, rank=8, seed=5)[2]))
    # Fresh pack: the per-qweight prepared-weight cache is cold when both threads start.
    outs = _run_threads(lambda: quantized_linear_cpu(x, *_op_args(p)))
    for per_thread in outs:
        for y in per_thread:
            torch.testing.assert_close(y, serial, rtol=0, atol=0)


def test_threads_same_compiled_model():
    m = Named(seed=6)
    x = torch.randn(2, 16, 128)
    svdq_compile.calibrate(m, [x], progress=False)
    cm = torch.compile(m, backend="svdquant", options=FAST)
    serial = cm(x)
    outs = _run_threads(lambda: cm(x))
    for per_thread in outs:
        for y in per_thread:
            torch.testing.assert_close(y, serial, rtol=0, atol=0)

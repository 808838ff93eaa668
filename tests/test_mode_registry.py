"""The mode registry (runtime/modes.py): one table decides every mode, and a new mode is
added through it alone.

The toy mode below (W6A8 fake-quant: 6-bit group weights stored one per int8, 8-bit
per-group activations, computed in fp32 on the torch path) touches no library file: it
registers a scheme, its handlers and a mode, then a model compiled with
``backend="svdquant"`` runs with it end to end (calibration, smoothing search, SVD,
graph rewrite, the ``svdq::linear`` op).
"""
from __future__ import annotations

import pytest
import torch

import svdq_compile as sq
from svdq_compile.quant.auto_mode import resolve_mode
from svdq_compile.runtime import modes
from svdq_compile.runtime.modes import QuantMode, Scheme, find_mode, get_mode
from svdq_compile.runtime.packed import LinearSpec

W6_MAX = 31  # 6-bit signed codes in [-32, 31]


def _w6_quantize(res: torch.Tensor, mode: QuantMode, g: int) -> dict[str, torch.Tensor]:
    n, k = res.shape
    r = res.float().view(n, k // g, g)
    s = (r.abs().amax(-1) / W6_MAX).clamp_min(1e-8).half()  # [N, K/G] fp16
    q = torch.round(r / s.float()[..., None]).clamp(-W6_MAX - 1, W6_MAX).to(torch.int8)
    return {"qweight": q.view(n, k), "wscales": s}


def _w6_dequantize(t, mode: QuantMode, g: int) -> torch.Tensor:
    q = t["qweight"].float()
    n, k = q.shape
    return (q.view(n, k // g, g) * t["wscales"].float()[..., None]).view(n, k)


def _a8_fake_linear(a, x2: torch.Tensor, w4a16_product=None) -> torch.Tensor:
    """[M, N] fp32: fake-quantized 8-bit group activations @ dequantized 6-bit weights."""
    xs = x2.float() if a.smooth is None else x2.float() / a.smooth.float()
    m, k, g = xs.shape[0], xs.shape[1], a.group_size
    xg = xs.view(m, k // g, g)
    sa = (xg.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    xq = (torch.round(xg / sa).clamp(-128, 127) * sa).view(m, k)
    y = xq @ _w6_dequantize({"qweight": a.qweight, "wscales": a.wscales}, None, g).t()
    if a.lora_down is not None:
        y = y + (xs @ a.lora_down.float().t()) @ a.lora_up.float().t()
    if a.bias is not None:
        y = y + a.bias.float()
    return y


@pytest.fixture
def w6a8(monkeypatch):
    """Register the toy mode for one test (monkeypatch removes it again)."""
    monkeypatch.setattr(modes, "_SCHEMES", dict(modes._SCHEMES))
    monkeypatch.setattr(modes, "_MODES", dict(modes._MODES))
    monkeypatch.setattr(modes, "_HANDLERS", dict(modes._HANDLERS))
    modes.register_scheme(Scheme("fake6"))
    modes.register_handler("fake6", "quantize_weight", _w6_quantize)
    modes.register_handler("fake6", "dequantize_weight", _w6_dequantize)
    modes.register_handler("fake6", "check_weights", modes.check_group_weights)
    modes.register_handler("fake6", "torch_linear", _a8_fake_linear)
    return modes.register_mode(QuantMode("w6a8-fake", 6, 8, "fake6", "int8", "toy: W6A8 fake-quant"))


def _model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128)).eval()
    x = torch.randn(4, 16, 128)
    x[..., 3] *= 20  # an outlier channel, as in real activations
    return model, x


def _compiled_sqnr(mode: str) -> tuple[float, list[dict]]:
    torch._dynamo.reset()
    model, x = _model_and_data()
    with torch.no_grad():
        ref = model(x)
        cm = torch.compile(model, backend="svdquant",
                           options={"mode": mode, "rank": 8, "use_inductor": False, "search_grid": 3, "skip": ()})
        cm(x)  # the first call records the calibration statistics (float outputs)
        y = cm(x)
    from svdq_compile.capture.backend import last_reports

    return sq.sqnr_db(ref, y), last_reports()[-1].layers


def test_toy_mode_runs_a_model_through_the_registry_alone(w6a8):
    assert get_mode("w6a8-fake") is w6a8 and find_mode(6, 8, "fake6") is w6a8
    sq.SVDQuantConfig(mode="w6a8-fake")  # the config accepts it: its mode list is the registry's
    db_toy, layers = _compiled_sqnr("w6a8-fake")
    assert [l["mode"] for l in layers] == ["w6a8-fake", "w6a8-fake"], layers
    db_w4a4, _ = _compiled_sqnr("w4a4")
    # 6-bit weights + 8-bit activations carry ~2 and ~4 more bits than W4A4: the toy
    # numerics, really used, must land well above it (measured 33.6 vs 18.9 dB).
    assert db_toy > db_w4a4 + 6.0, (db_toy, db_w4a4)
    # and be a sane quantization of the model (measured 33.6 dB; 30 leaves run-to-run room)
    assert db_toy > 30.0, db_toy


def test_toy_mode_without_triton_or_export_handlers_says_so(w6a8):
    with pytest.raises(modes.ModeUnsupportedError, match="w6a8-fake .*no onnx linear"):
        modes.handler("fake6", "onnx_linear")


def test_registry_is_the_one_table():
    # Every built-in mode resolves through the same objects the specs carry.
    for name, m in modes.MODES.items():
        spec = LinearSpec(128, 64, weight_bits=m.weight_bits, act_bits=m.act_bits, scheme=m.scheme)
        assert spec.qmode is m and spec.mode == name
    assert LinearSpec(128, 64, act_unsigned=True).label == "w4a4u"
    with pytest.raises(ValueError, match="unknown quantization mode 'w5a5'"):
        get_mode("w5a5")
    with pytest.raises(ValueError, match="unsupported mode w2a4"):
        LinearSpec(128, 64, weight_bits=2)
    with pytest.raises(ValueError, match="w4a8 only"):
        LinearSpec(128, 64, act_bits=4, scheme="int8")
    with pytest.raises(ValueError, match="unknown scheme"):
        LinearSpec(128, 64, scheme="int4")
    # "auto" becomes a mode in one place, with its reason.
    mode, why = resolve_mode("auto", "cpu")
    assert mode in modes.MODES.values() and why.startswith("auto: cpu/")
    assert resolve_mode("w4a4", "cpu") == (modes.MODES["w4a4"], "mode option")

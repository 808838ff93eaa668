"""LoRA folding, explain(), and the streaming calibration's bounded memory."""
import torch
import torch.nn as nn

import svdq_compile as sq
from svdq_compile.quant.auto_mode import auto_choice
from svdq_compile.capture.calibration import LayerStats
from svdq_compile.quant.modules import SVDQLinear
from svdq_compile.testing.models import AttnMLPBlock


def _quantized():
    m = AttnMLPBlock()
    x = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(2))
    sq.quantize(m, [x], [x], sq.SVDQuantConfig(search_grid=4), progress=False)
    return m, x


def test_lora_fold_equals_dequantized_plus_delta():
    m, x = _quantized()
    layer: SVDQLinear = m.fc1
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 256, generator=g) * 0.1, torch.randn(512, 4, generator=g) * 0.1
    h = torch.randn(3, 256, generator=g)
    base = layer(h)
    layer.fold_lora(down, up, scale=0.7)
    # The folded branch reads X' = X/lambda with down*lambda: the same as adding the
    # LoRA delta to the original input, up to fp32 rounding.
    want = base.double() + 0.7 * (h.double() @ down.double().t()) @ up.double().t()
    torch.testing.assert_close(layer(h).double(), want, rtol=1e-5, atol=1e-5)
    assert layer.lora_down.shape[0] == 32 + 4
    layer.remove_loras()
    assert torch.equal(layer(h), base)  # removable, exactly


def test_explain_table_and_dict():
    m, _ = _quantized()
    info = sq.explain(m, as_dict=True)
    names = {r["name"] for r in info["layers"]}
    assert names == {"q", "k", "v", "out", "fc1", "fc2"}
    for r in info["layers"]:
        assert r["rank"] == 32 and r["sqnr_db"] > 10 and r["bytes"] > 0
    text = sq.explain(m)
    # Default mode "auto" -> the CPU's choice (by ISA), and explain() says why.
    expected = auto_choice("cpu")[0]
    assert "fc2" in text and expected in text and "SQNR" in text
    assert f"mode {expected} <- auto: cpu" in text, text
    assert all(r["mode_reason"].startswith("auto: cpu") for r in info["layers"])


def test_calibration_memory_flat_in_steps():
    """Peak statistics memory is set by calib_tokens, not by how many steps ran."""
    sizes = {}
    for steps in (4, 32):
        st = LayerStats(256, max_tokens=512, seed=0)
        for s in range(steps):
            st.update(torch.randn(2, 128, 256) * (1 + s))  # e.g. one denoising step, CFG batch 2
        sizes[steps] = st.nbytes()
        assert st.seen == steps * 256
    assert sizes[4] == sizes[32] == (512 + 2) * 256 * 4


def test_reservoir_is_uniform_and_deterministic():
    a, b = LayerStats(4, 100, seed=3), LayerStats(4, 100, seed=3)
    for i in range(50):
        x = torch.full((20, 4), float(i))
        a.update(x)
        b.update(x)
    assert torch.equal(a.sample, b.sample)
    # each of the 50 calls should hold ~2 of the 100 kept tokens; early calls must not dominate
    counts = torch.bincount(a.sample[:, 0].long(), minlength=50)
    assert counts[:25].sum() < 75 and counts[25:].sum() < 75


def test_calibrating_streams_over_a_denoising_loop():
    m = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128))
    with sq.calibrating(m, sq.SVDQuantConfig(calib_tokens=64)) as stats:
        for t in range(10):  # 10 "steps"
            m(torch.randn(2, 40, 128))
    assert stats["0"].seen == 10 * 80 and stats["0"].sample.shape == (64, 128)
    assert stats["2"].minimum.min() >= -0.2  # GELU output: the unsigned-quantization evidence


def test_svdqlinear_weight_stand_in():
    """Code that reads ``layer.weight.dtype`` (diffusers' attention processors) keeps
    working on quantized layers, eager and compiled; computing with it gives NaN."""
    import torch.nn.functional as F

    class Proc(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(128, 64)

        def forward(self, x):
            return self.q(x.to(self.q.weight.dtype))

    torch.manual_seed(0)
    m = Proc().to(torch.bfloat16)
    x = torch.randn(2, 8, 128, dtype=torch.bfloat16)
    sq.quantize(m, (x,), [(x,)], config=sq.SVDQuantConfig(rank=8, search_grid=2), progress=False)
    w = m.q.weight
    assert w.shape == (64, 128) and w.dtype == torch.bfloat16 and w.device == x.device
    assert w.untyped_storage().nbytes() == 2  # one element: no memory
    assert torch.isnan(F.linear(x, w)).all()
    eager = m(x.float())  # the cast to weight.dtype happens inside forward
    assert eager.dtype == torch.bfloat16
    for inductor in (False, True):
        cm = torch.compile(m, backend="svdquant", options={"use_inductor": inductor})
        with torch.no_grad():
            assert sq.sqnr_db(eager.float(), cm(x.float()).float()) > 30
        torch._dynamo.reset()
    dq = m.q.dequantized_weight()
    assert dq.shape == (64, 128) and dq.dtype == torch.float32


class _WithTail(nn.Module):
    """Another model compiled in the same process, with its own float-kept layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(128, 128)
        self.tail = nn.Linear(128, 8)  # 8 outputs < min_features: kept in float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(torch.relu(self.body(x)))


def test_explain_reports_only_the_model_it_is_given():
    a, b = AttnMLPBlock(seed=4), _WithTail()
    xa = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(0))
    xb = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(1))
    options = {"search_grid": 2, "use_inductor": False}
    ca = torch.compile(a, backend="svdquant", options=options)
    cb = torch.compile(b, backend="svdquant", options=options)
    with torch.no_grad():
        ca(xa)
        cb(xb)
        ca(xa)  # a second call compiles nothing new: no report counted twice
    info_a, info_b = sq.explain(ca, as_dict=True), sq.explain(b, as_dict=True)
    assert [name for name, _ in info_a["skipped"]] == ["head"]
    assert [name for name, _ in info_b["skipped"]] == ["tail"]
    assert {r["name"] for r in info_a["layers"]} == {"q", "k", "v", "out", "fc1", "fc2"}
    assert {r["name"] for r in info_b["layers"]} == {"body"}
    assert info_a["passes"]["quantize_linears"] == 6 and info_b["passes"]["quantize_linears"] == 1
    assert "tail" not in sq.explain(a) and "head" not in sq.explain(cb)
    assert sq.explain(nn.Linear(4, 4), as_dict=True)["skipped"] == []  # never compiled: nothing

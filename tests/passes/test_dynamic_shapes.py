"""Batch and token count vary between calls without a compilation (or quantization) per call."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import svdq_compile
import svdq_compile.passes.pipeline as pipeline
from tests.passes.passes_helpers import UNIT, Spy, outlier_input, svdq_ops

TOKENS = (16, 24, 40, 8)


class Block(nn.Module):
    """Pre-norm attention-free block: LN -> (a, b) siblings, LN -> GELU MLP, gated residuals."""

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.a, self.b = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.gate = nn.Linear(dim, dim)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() == 2 else 0.2) + (p.dim() == 1))

    def forward(self, x, cond):
        h = self.n1(x)
        x = x + self.a(h) * torch.sigmoid(self.b(h))
        g = self.gate(cond)[:, None]
        return x + g * self.fc2(F.gelu(self.fc1(self.n2(x))))


def _run(cm, m, shapes):
    """Run every shape; returns the worst SQNR (dB) of the block's update (y - x) vs float."""
    worst = float("inf")
    with torch.no_grad():
        for b, t in shapes:
            x = outlier_input((b, t, 128), seed=b * 100 + t)
            cond = torch.randn(b, 128)
            y = cm(x, cond)
            assert y.shape == x.shape
            worst = min(worst, svdq_compile.sqnr_db(m(x, cond) - x, y - x))
    return worst


@pytest.fixture
def quantize_calls(monkeypatch):
    calls = []
    real = pipeline.quantize_group

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "quantize_group", counting)
    return calls


def test_automatic_dynamic_two_compilations(quantize_calls):
    m = Block()
    svdq_compile.calibrate(m, [(outlier_input((2, 16, 128)), torch.randn(2, 128))], progress=False)
    spy = Spy(dict(UNIT, skip=("gate",)))
    before = counters["stats"]["unique_graphs"]
    cm = torch.compile(m, backend=spy)  # dynamic=None: Dynamo's automatic dynamic shapes
    # The 2nd call changes batch and tokens: one recompile marks both dims dynamic.
    shapes = [(2, 16), (4, 24)] + [(b, t) for b in (2, 4) for t in TOKENS]
    worst = _run(cm, m, shapes)
    assert len(spy.compiled) == 2
    assert counters["stats"]["unique_graphs"] - before == 2
    # Quantized once: 3 groups ((a, b) share n1's output; fc1; fc2) on the first compile;
    # the recompile for symbolic shapes reuses the cached packs.
    assert len(quantize_calls) == 3
    assert any(isinstance(e, torch.SymInt) for e in spy.example_inputs[1])
    r = svdq_compile.capture.backend.last_reports()[-1]
    # Same rewrites with symbolic shapes: 2 LayerNorm folds; (a, b) fused; fc1's GELU and
    # fc2's gate + residual fused (the gate [B, 1, N] broadcasts over symbolic tokens).
    assert r.passes == {"quantize_linears": 4, "fold_smoothing": 2, "fuse_siblings": 1, "fuse_epilogue": 3}
    assert len(svdq_ops(spy.compiled[1]._fn)) == 3
    assert worst > 15.0, worst  # W4A4 rank 32 on 128-wide layers: every shape well above 15 dB


def test_cfg_batches_with_inductor(quantize_calls):
    """dynamic=True, CFG batch 1 vs 2 (size 1 is specialised by Dynamo): two graphs, Inductor."""
    m = Block()
    svdq_compile.calibrate(m, [(outlier_input((2, 16, 128)), torch.randn(2, 128))], progress=False)
    spy = Spy(dict(UNIT, skip=("gate",), use_inductor=True))
    cm = torch.compile(m, backend=spy, dynamic=True)
    shapes = [(b, t) for b in (1, 2) for t in TOKENS]
    worst = _run(cm, m, shapes)
    assert len(spy.compiled) == 2
    assert len(quantize_calls) == 3
    r = svdq_compile.capture.backend.last_reports()[-1]
    assert r.passes == {"quantize_linears": 4, "fold_smoothing": 2, "fuse_siblings": 1, "fuse_epilogue": 3}
    assert worst > 15.0, worst

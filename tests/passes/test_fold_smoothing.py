"""fold_smoothing: lambda moves into norms / per-channel affines / AdaLN modulation."""
import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.passes.passes_helpers import outlier_input, quantized_graph, rel_diff, run_gm, svdq_ops
from svdq_compile.passes.fold_smoothing import fold_smoothing
from svdq_compile.passes.op_nodes import ARG, GraphTensors


class ManualRMSNorm(nn.Module):
    """diffusers' RMSNorm forward (x * rsqrt(mean(x^2) + eps), then * weight if affine)."""

    def __init__(self, dim: int, affine: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        h = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + 1e-6)
        return h * self.weight if self.weight is not None else h.to(x.dtype)


class NormQK(nn.Module):
    """norm -> two sibling linears (shared lambda); optional AdaLN modulation / extra user."""

    def __init__(self, norm: str, dim: int = 128, extra_user: bool = False) -> None:
        super().__init__()
        self.kind, self.extra_user = norm, extra_user
        self.norm = {
            "layer_norm": lambda: nn.LayerNorm(dim),
            "layer_norm_noaffine": lambda: nn.LayerNorm(dim, elementwise_affine=False),
            "layer_norm_bias_only": lambda: nn.LayerNorm(dim, bias=True),
            "rms_norm": lambda: nn.RMSNorm(dim),
            "manual_rms": lambda: ManualRMSNorm(dim, affine=True),
            "manual_rms_noaffine": lambda: ManualRMSNorm(dim, affine=False),
            "adaln": lambda: nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6),
        }[norm]()
        self.q, self.k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mod = nn.Linear(dim, 2 * dim)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                scale, offset = (0.05, 0.0) if p.dim() == 2 else (0.5, 1.0)
                p.copy_(torch.randn(p.shape, generator=g) * scale + offset)

    def forward(self, x, cond):
        h = self.norm(x)
        if self.kind == "adaln":
            scale, shift = self.mod(cond).chunk(2, dim=-1)
            h = h * (1 + scale[:, None]) + shift[:, None]
        out = self.q(h) * self.k(h)
        return out + h if self.extra_user else out


def _graph(kind: str, **kw):
    m = NormQK(kind, **kw)
    x, cond = outlier_input((2, 16, 128)), torch.randn(2, 128)
    return quantized_graph(m, (x, cond), dict(skip=("mod",)))


@pytest.mark.parametrize("kind, how", [
    ("layer_norm", "layer_norm affine"), ("layer_norm_noaffine", "weight = 1/lambda"), ("rms_norm", "rms_norm affine"),
    ("manual_rms", "per-channel affine"), ("adaln", "modulation"),
])
def test_fold_counts_and_exactness(kind, how, caplog):
    gm, ex = _graph(kind)
    ops = svdq_ops(gm)
    assert len(ops) == 2 and all(op.args[ARG["smooth"]] is not None for op in ops)
    y0 = run_gm(gm, ex)
    with caplog.at_level(logging.INFO, logger="svdq_compile.passes.fold_smoothing"):
        assert fold_smoothing(gm, GraphTensors(gm, ex)) == 1
    assert how in caplog.text
    assert all(op.args[ARG["smooth"]] is None for op in svdq_ops(gm))
    assert not [n for n, _ in gm.named_buffers() if n.endswith("_smooth")]  # dropped with their uses
    # X/lambda computed by the producer instead of the op: same values up to fp32 rounding
    # (a rounding change could only matter at an INT4 decision boundary; none here).
    assert rel_diff(run_gm(gm, ex), y0) < 1e-5


@pytest.mark.parametrize("kind, kw", [
    ("manual_rms_noaffine", {}),  # would need an inserted multiply: a pass over X, not cheaper
    ("layer_norm", {"extra_user": True}),  # the norm output also feeds the residual add
])
def test_not_foldable_is_untouched(kind, kw):
    gm, ex = _graph(kind, **kw)
    before = str(gm.graph)
    assert fold_smoothing(gm, GraphTensors(gm, ex)) == 0
    assert str(gm.graph) == before


def test_fold_follows_the_models_parameters():
    """The norm reads weight/lambda computed from the model's own LayerNorm parameters (a
    [K]-sized op per call): they are not modified, and in-place updates still apply."""
    m = NormQK("layer_norm")
    w0 = m.norm.weight.detach().clone()
    x, cond = outlier_input((2, 16, 128)), torch.randn(2, 128)
    gm, ex = quantized_graph(m, (x, cond), dict(skip=("mod",)))
    g2 = copy.deepcopy(gm)
    assert fold_smoothing(g2, GraphTensors(g2, ex)) == 1
    assert torch.equal(m.norm.weight, w0)
    norm = next(n for n in g2.graph.nodes if n.target is F.layer_norm)
    assert norm.args[2].target is torch.div and norm.args[2].args[0].op == "placeholder"
    idx = [n for n in g2.graph.nodes if n.op == "placeholder"].index(norm.args[2].args[0])
    assert ex[idx] is m.norm.weight
    with torch.no_grad():  # both graphs read the (changed) parameter through the placeholder
        m.norm.weight.mul_(1.5)
    assert rel_diff(run_gm(g2, ex), run_gm(gm, ex)) < 1e-5
    with torch.no_grad():
        m.norm.weight.copy_(w0)


def test_fold_with_symbolic_shapes():
    """Dynamo's dynamic graph (SymInt batch/tokens): the AdaLN per-sample check is symbolic."""
    import svdq_compile
    from tests.passes.passes_helpers import NO_PASSES, UNIT, Spy

    m = NormQK("adaln")
    svdq_compile.calibrate(m, [(outlier_input((2, 16, 128)), torch.randn(2, 128))], progress=False)
    spy = Spy(dict(UNIT, **NO_PASSES, skip=("mod",)))
    cm = torch.compile(m, backend=spy, dynamic=True)
    with torch.no_grad():
        cm(outlier_input((2, 16, 128)), torch.randn(2, 128))
    gm, ex = spy.gm, spy.example_inputs[-1]
    assert any(isinstance(e, torch.SymInt) for e in ex)
    y0 = run_gm(gm, ex)
    assert fold_smoothing(gm, GraphTensors(gm, ex)) == 1
    assert rel_diff(run_gm(gm, ex), y0) < 1e-5

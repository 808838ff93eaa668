"""The ordered pass pipeline: counts in the report, untouched graphs, per-pass dumps."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import svdq_compile
from tests.passes.passes_helpers import UNIT, Spy, outlier_input, quantized_graph, svdq_ops
from svdq_compile.capture.backend import last_reports
from svdq_compile.passes.fuse_siblings import fuse_siblings
from svdq_compile.passes.graph_passes import PASSES, run_graph_passes
from svdq_compile.passes.op_nodes import GraphTensors


class TwoInputs(nn.Module):
    """Two linears on two graph inputs, results concatenated: no pass has anything to do."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.q = nn.Linear(128, 128), nn.Linear(128, 128)

    def forward(self, x, z):
        return torch.cat([self.p(x), self.q(z)], dim=-1)


class PreNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(128)
        self.fc1, self.fc2 = nn.Linear(128, 256), nn.Linear(256, 128)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _args():
    return outlier_input((2, 16, 128)), outlier_input((2, 16, 128), seed=1)


def test_no_match_graph_is_untouched_by_every_pass():
    gm, ex = quantized_graph(TwoInputs(), _args())
    before = str(gm.graph)
    tensors = GraphTensors(gm, ex)
    for name, _, fn in PASSES:
        assert fn(gm, tensors) == 0, name
        assert str(gm.graph) == before, name
    cfg = svdq_compile.SVDQuantConfig.from_options(UNIT)
    assert run_graph_passes(gm, cfg, ex) == {"fold_smoothing": 0, "fuse_siblings": 0, "fuse_epilogue": 0}
    assert str(gm.graph) == before


def test_fuse_siblings_needs_one_input():
    gm, ex = quantized_graph(TwoInputs(), _args())
    before = str(gm.graph)
    assert fuse_siblings(gm, GraphTensors(gm, ex)) == 0 and str(gm.graph) == before


def test_report_explain_and_dumps(tmp_path, monkeypatch):
    import svdq_compile.capture.backend as backend

    monkeypatch.setattr(backend, "_REPORTS", [])  # explain() sums the reports of this process
    m = PreNormMLP()
    x = outlier_input((2, 16, 128))
    svdq_compile.calibrate(m, [x], progress=False)
    out = tmp_path / "graphs"
    with torch.no_grad():
        torch.compile(m, backend=Spy(dict(UNIT, dump_graphs=str(out))))(x)
    r = last_reports()[-1]
    assert r.passes == {"quantize_linears": 2, "fold_smoothing": 1, "fuse_siblings": 0, "fuse_epilogue": 2}
    text = svdq_compile.explain(m)
    assert "fold_smoothing=1, fuse_siblings=0, fuse_epilogue=2" in text
    files = sorted(os.listdir(out))
    assert [f[4:] for f in files] == ["input.txt", "quantized.txt", "after_fold_smoothing.txt",
                                      "after_fuse_siblings.txt", "after_fuse_epilogue.txt", "final.txt"]
    g = {f[4:-4]: (out / f).read_text() for f in files}
    assert g["quantized"] != g["after_fold_smoothing"]  # the norm got weight/lambda
    assert g["after_fold_smoothing"] == g["after_fuse_siblings"]  # nothing to fuse: untouched
    assert "target=torch._C._nn.gelu" in g["after_fuse_siblings"]
    assert "target=torch._C._nn.gelu" not in g["after_fuse_epilogue"]
    assert g["after_fuse_epilogue"] == g["final"]


def test_passes_off_leaves_quantized_graph():
    m = PreNormMLP()
    x = outlier_input((2, 16, 128))
    svdq_compile.calibrate(m, [x], progress=False)
    spy = Spy(dict(UNIT, fold_smoothing=False, fuse_siblings=False, fuse_epilogue=False))
    with torch.no_grad():
        torch.compile(m, backend=spy)(x)
    assert last_reports()[-1].passes == {"quantize_linears": 2, "fold_smoothing": 0, "fuse_siblings": 0,
                                         "fuse_epilogue": 0}
    assert len(svdq_ops(spy.gm)) == 2


def test_fused_siblings_alias_the_original_tensors():
    """After horizontal fusion, each sibling's tensors are rows of the fused ones: same
    values, one copy in memory (quantize()'d models would otherwise hold QKV twice)."""
    from svdq_compile.quant.decompose import LayerTarget, decompose_layer
    from svdq_compile.passes.concat import concat_packed
    from svdq_compile.passes.fuse_siblings import _alias_into  # applied by apply_aliases

    g = torch.Generator().manual_seed(0)
    lam = torch.rand(128, generator=g) + 0.5
    packs = [decompose_layer(torch.randn(n, 128, generator=g), torch.randn(n, generator=g), lam, LayerTarget(rank=r))
             for n, r in ((64, 8), (96, 0), (32, 4))]
    before = [{k: v.clone() for k, v in p.tensors().items()} for p in packs]
    fused = concat_packed(packs)
    freed = _alias_into(packs, fused)
    expect = sum(p.qweight.nbytes + p.wscales.nbytes + p.bias.nbytes
                 + (p.lora_down.nbytes if p.lora_down is not None else 0) for p in packs)
    assert freed == expect
    for p, b in zip(packs, before):
        for k, v in p.tensors().items():
            assert torch.equal(v, b[k]), k
        assert p.qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr()
    assert _alias_into(packs, fused) == 0  # already aliased: nothing left to free


class _QKV(nn.Module):
    """q/k/v reading one normalised input: the sibling-fusion case of quantize()'d models."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 128)

    def forward(self, x):
        h = F.layer_norm(x, (128,))
        return self.q(h) * self.k(h) + self.v(h)


def test_quantized_siblings_alias_after_inductor_compile():
    """quantize()'d QKV compiled with Inductor: the fused op runs, and only then do the
    modules' buffers alias it (aliasing earlier changed input storage offsets that
    Inductor checks against Dynamo's trace: BackendCompilerFailed)."""
    torch.manual_seed(0)

    m = _QKV()
    x = torch.randn(2, 16, 128)
    cfg = svdq_compile.SVDQuantConfig(rank=8, search_grid=2)
    svdq_compile.quantize(m, (x,), [(x,)], config=cfg, progress=False)
    with torch.no_grad():
        eager = m(x)
        cm = torch.compile(m, backend="svdquant", options={"use_inductor": True})
        y1, y2 = cm(x), cm(x)
    assert last_reports()[-1].fused_groups == 1
    ptrs = {l.qweight.untyped_storage().data_ptr() for l in (m.q, m.k, m.v)}
    assert len(ptrs) == 1
    with torch.no_grad():
        assert torch.equal(m(x), eager)
    assert svdq_compile.sqnr_db(eager, y1) > 60 and torch.equal(y1, y2)
    # The fused op bakes in the modules' buffers: an in-place edit is caught, not run stale.
    with torch.no_grad():
        m.k.lora_up.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified after compilation"):
            cm(x)


def test_recompile_for_new_shape_keeps_earlier_graph_valid():
    """A recompile for a new shape fuses the same quantize()'d siblings again; the first
    graph (still used for its shape) must not see that as a modified weight."""
    torch.manual_seed(0)

    m = _QKV()
    xs = [torch.randn(2, t, 128) for t in (16, 24, 16)]
    svdq_compile.quantize(m, (xs[0],), [(xs[0],)], config=svdq_compile.SVDQuantConfig(rank=8, search_grid=2),
                          progress=False)
    # dynamic=False: one static graph per token count, the first one is used again last.
    cm = torch.compile(m, backend="svdquant", options={"use_inductor": False}, dynamic=False)
    with torch.no_grad():
        for x in xs:
            assert torch.allclose(cm(x), m(x), rtol=1e-4, atol=1e-4)

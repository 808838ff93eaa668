"""Graph passes on a tiny diffusers FLUX (1 double block, 1 single block): exact counts.

Where the numbers come from (the Dynamo graph of FluxTransformer2DModel, diffusers 0.42):

28 linear sites: x_embedder, 4 time/text embedder linears, context_embedder, and per
double block norm1.linear, norm1_context.linear, to_q/k/v, add_q/k/v_proj, to_out.0,
to_add_out, ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2 (16), per
single block norm.linear, proj_mlp, to_q/k/v, proj_out (6), then norm_out.linear and
proj_out. With CFG below (embedders, norm_out and the last proj_out kept in float, AdaLN
modulation linears W4A16) 20 are quantized, reading 13 distinct tensors:
  double block: x (q, k, v), x_1 (add_q/k/v), attention out (to_out.0), context
    attention out (to_add_out), norm_hidden_states_1 (ff.0), gelu (ff.2),
    norm_encoder_hidden_states_1 (ff_context.0), gelu (ff_context.2), silu(temb) x2
    (norm1.linear, norm1_context.linear: two separate silu nodes);
  single block: x_2 (proj_mlp, q, k, v), cat([attn, gelu]) (proj_out), silu(temb) (norm.linear).
-> fuse_siblings = 3 groups (QKV, added QKV, proj_mlp+QKV) and 20 - 2 - 2 - 3 = 13 ops:
   one activation quantization per distinct input.

fold_smoothing = 5: every norm in FLUX is an affine-free LayerNorm *modulated* by AdaLN
(``norm(x) * (1 + scale[:, None]) + shift[:, None]``); the 5 modulated outputs read only
by quantized linears (x, x_1, norm_hidden_states_1, norm_encoder_hidden_states_1, x_2)
get lambda folded into the per-sample scale/shift. norm_out's modulated output feeds the
float proj_out: not folded.

fuse_epilogue = 12 absorbed ops: GELU(tanh) after ff.net.0.proj and ff_context.net.0.proj
(2; proj_mlp's GELU is not fusable: proj_mlp shares one op with q/k/v, and the epilogue
applies to all columns of an op), and gate + residual (``x + gate[:, None] * y``) after
to_out.0 (through its p=0 dropout), to_add_out, ff.net.2, ff_context.net.2 and the
single block's proj_out (5 + 5).
"""
import pytest
import torch

import svdq_compile
from tests.passes.passes_helpers import FAST, NO_PASSES, compile_run, flux_inputs, rel_diff, report, run_gm, svdq_ops, tiny_flux
from svdq_compile.passes.fuse_epilogue import fuse_epilogue
from svdq_compile.passes.graph_passes import PASSES
from svdq_compile.passes.op_nodes import ARG, GraphTensors

CFG = dict(FAST, skip=("*embed*", "proj_out", "norm_out*"), mode_overrides={"*norm*.linear": "w4a16"})


@pytest.fixture(scope="module")
def flux():
    m = tiny_flux()
    inp = flux_inputs()
    svdq_compile.calibrate(m, [inp, flux_inputs(seed=2)], progress=False)
    with torch.no_grad():
        ref = m(**inp)[0]
    return m, inp, ref


def test_tiny_flux_counts(flux):
    m, inp, _ = flux
    _, spy = compile_run(m, inp, CFG)
    r = report()
    assert r.sites_found == 28 and r.rewritten == 20, r.summary()
    assert r.passes == {"quantize_linears": 20, "fold_smoothing": 5, "fuse_siblings": 3, "fuse_epilogue": 12}
    ops = svdq_ops(spy.gm)
    assert len(ops) == r.ops_inserted == 13
    # one activation quantization per distinct linear input
    assert len({op.args[ARG["x"]] for op in ops}) == 13
    # lambda gone from exactly the 5 ops behind the folded modulations; the others keep it
    # (their inputs come from attention, GELU, SiLU: no foldable producer), except the
    # W4A16 modulation linears, which have no smoothing at all.
    no_smooth = [op for op in ops if op.args[ARG["smooth"]] is None]
    w4a16 = [op for op in ops if op.args[ARG["act_bits"]] == 16]
    assert len(w4a16) == 3 and len(no_smooth) == 5 + 3
    epis = sorted(op.args[ARG["epilogue"]] for op in ops if op.args[ARG["epilogue"]] != "none")
    assert epis == ["gelu_tanh", "gelu_tanh"]
    assert sum(op.args[ARG["gate"]] is not None for op in ops) == 5
    assert sum(op.args[ARG["residual"]] is not None for op in ops) == 5
    # The one GELU left is the single block's (after the split of the fused op).
    gelus = [n for n in spy.gm.graph.nodes if n.op == "call_function" and "gelu" in str(n.target)]
    assert len(gelus) == 1 and gelus[0].args[0].target is __import__("operator").getitem
    # Running the epilogue pass again finds nothing more (idempotent).
    before = str(spy.gm.graph)
    assert fuse_epilogue(spy.gm, GraphTensors(spy.gm, spy.example_inputs[-1])) == 0
    assert str(spy.gm.graph) == before


def test_tiny_flux_passes_preserve_numerics(flux):
    m, inp, ref = flux
    y_on, _ = compile_run(m, inp, CFG)
    torch._dynamo.reset()
    y_off, spy = compile_run(m, inp, dict(CFG, **NO_PASSES))
    assert report().passes["fuse_epilogue"] == 0 and report().ops_inserted == 20
    on, off = svdq_compile.sqnr_db(ref, y_on[0]), svdq_compile.sqnr_db(ref, y_off[0])
    # Same packed layers, same math: only fp32 rounding differs (the fold computes
    # (n*m + s)/lambda as n*(m/lambda) + s/lambda), so quality is unchanged.
    assert abs(on - off) < 0.1, (on, off)
    assert on > 10.0, on  # sanity: W4A4 with seeded random weights, 16 tokens
    # An activation that lands within rounding of an INT4 decision boundary could flip one
    # level; with these seeds none does and the outputs agree to fp32 rounding.
    assert rel_diff(y_on[0], y_off[0]) < 1e-5
    # Each pass on its own, applied in order to the unfused graph: same output every step.
    gm, ex = spy.gm, spy.example_inputs[-1]
    tensors = GraphTensors(gm, ex)
    y_prev = run_gm(gm, ex)
    for name, _, fn in PASSES:
        assert fn(gm, tensors) > 0, name
        y = run_gm(gm, ex)
        assert rel_diff(y, y_prev) < 1e-5, name
        assert abs(svdq_compile.sqnr_db(ref, y) - off) < 0.1, name
        y_prev = y


def test_quantize_api_model_gets_the_passes(tmp_path):
    """quantize() swaps in SVDQLinear modules: their tensors reach the graph as placeholders."""
    m = tiny_flux()
    inp = flux_inputs()
    cfg = svdq_compile.SVDQuantConfig.from_options(CFG)
    svdq_compile.quantize(m, (), [inp], config=cfg, example_kwargs=inp, progress=False)
    assert len(svdq_compile.quantized_modules(m)) == 20
    with torch.no_grad():
        eager = m(**inp)[0]  # the SVDQLinear modules, op by op
    y, spy = compile_run(m, inp, CFG)
    r = report()
    assert r.rewritten == 0 and r.passes["quantize_linears"] == 0
    assert (r.passes["fold_smoothing"], r.passes["fuse_siblings"], r.passes["fuse_epilogue"]) == (5, 3, 12)
    assert len(svdq_ops(spy.gm)) == 13
    diff = (y[0] - eager).abs().max() / eager.abs().max()
    assert diff < 1e-5, float(diff)
    # The fused QKV op and the SVDQLinear modules hold one copy of the weights: the
    # modules' buffers now alias the concatenated tensors, with unchanged values.
    attn = m.transformer_blocks[0].attn
    ptrs = {l.qweight.untyped_storage().data_ptr() for l in (attn.to_q, attn.to_k, attn.to_v)}
    assert len(ptrs) == 1
    with torch.no_grad():
        assert torch.equal(m(**inp)[0], eager)  # the modules still compute what they did
    svdq_compile.save(m, tmp_path / "a")  # aliased buffers save as their own rows
    m2 = tiny_flux()
    svdq_compile.load(m2, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(m2(**inp)[0], eager)


def test_tiny_flux_dynamic_tokens(flux):
    """Token counts vary (resolutions): one recompile with symbolic shapes, same rewrites."""
    from tests.passes.passes_helpers import Spy

    m, _, _ = flux
    spy = Spy(CFG)
    cm = torch.compile(m, backend=spy)
    with torch.no_grad():
        for t in (16, 24, 32, 40):
            inp = flux_inputs(tokens=t)
            y = cm(**inp)[0]
            assert y.shape == (2, t, 4)
            assert svdq_compile.sqnr_db(m(**inp)[0], y) > 10.0
    assert len(spy.compiled) == 2
    assert any(isinstance(e, torch.SymInt) for e in spy.example_inputs[1])
    assert report().passes == {"quantize_linears": 20, "fold_smoothing": 5, "fuse_siblings": 3, "fuse_epilogue": 12}

"""Suite ``passes``: activation passes and CPU latency of one FLUX block, graph passes off vs on.

    svdq bench --suite passes [--quick] [--repeats 9] [--param dim=3072 --param heads=24
        --param tokens=256 --param text_tokens=64 --param batch=1 --param decompose=fast|full]

For a diffusers ``FluxTransformerBlock`` (double) and ``FluxSingleTransformerBlock``
(single) with seeded random weights, compiled with the ``svdquant`` backend
(``use_inductor=False``: the rewritten FX graph runs as is, so the measurement is the
passes, not Inductor):

1. **Activation passes** per block, derived from the graphs: the number of times an
   activation-sized tensor (>= 8 tokens' worth of hidden width: [M, K] inputs, [M, N]
   outputs, attention tensors; never weights or per-sample AdaLN vectors) is read or
   written by a separate op. Each node is executed once by an FX interpreter with real
   tensors; a node whose outputs share storage with its inputs (views, no-op casts,
   identity dropout, split/getitem) moves no data and is not counted. An ``svdq::linear``
   is counted as the fused kernel of docs/design.md section 2 (one read of X: smoothing,
   quantization and the low-rank down projection in one prologue; one write of Y with
   bias/activation/gate/residual in the epilogue; +1 read of an activation-sized
   residual/gate), plus the *smoothing multiply* (read X, write X/lambda) when its
   lambda is not folded into the producer (on the CPU path the op materialises X/lambda
   for the low-rank branch). Also reported: the unquantized (fp32) graph.
2. **CPU latency** of one call of each block, passes off vs on, timed interleaved in
   one process (median/min/max of ``--repeats``, after a warm-up call; ``--quick``:
   hidden 512 / 4 heads, 64 + 16 tokens, 3 repeats).

``--decompose fast`` (default) packs each layer with lambda from the calibration
statistics (alpha = 0.5), a randomized rank-32 SVD and round-to-nearest INT4 residual:
the same packed format and op as the full SVDQuant search (``--decompose full``), but
seconds instead of ~2 minutes per 3072-wide layer on this 2-core CPU; kernel run times
do not depend on the values. AdaLN modulation linears (M = batch) stay in float: the passes
do not touch them, and the CPU W4A16 path dequantizes the whole weight per call (~3.5 s for
18432x3072 on the 2-core dev machine vs 60 ms fp32), which would swamp the block's time.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

import svdq_compile
import svdq_compile.passes.pipeline as pipeline
from svdq_compile.passes.op_nodes import ARG, GraphTensors, is_svdq
from svdq_compile.quant.decompose import smoothing_factors
from svdq_compile.runtime.packed import LinearSpec, PackedLinear

from .harness import Context
from .timing import time_interleaved, timed

__all__ = ["run", "to_markdown", "plot", "PARAMS", "DEVICE", "count_passes", "fast_quantize_group"]

DEVICE = "cpu"
DEFAULT_REPEATS = (3, 9)
PARAMS = {"dim": 3072, "heads": 24, "tokens": 256, "text_tokens": 64, "batch": 1, "decompose": "fast"}
QUICK_PARAMS = {"dim": 512, "heads": 4, "tokens": 64, "text_tokens": 16}
PASS_FLAGS = ("fold_smoothing", "fuse_siblings", "fuse_epilogue")


# --- model ----------------------------------------------------------------------------
def build_blocks(dim: int, heads: int, seed: int = 0):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    torch.manual_seed(seed)
    blocks = {
        "double": FluxTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=dim // heads),
        "single": FluxSingleTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=dim // heads),
    }
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in blocks.values():
            b.eval()
            for pname, p in b.named_parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
                else:  # biases ~0, norm weights ~1
                    one = float("norm" in pname and pname.endswith("weight"))
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02 + one)
    return blocks


def block_inputs(dim: int, heads: int, tokens: int, text_tokens: int, batch: int, seed: int = 1) -> tuple:
    from diffusers.models.embeddings import FluxPosEmbed

    g = torch.Generator().manual_seed(seed)
    hd = dim // heads
    axes = (hd // 8, 7 * hd // 16, 7 * hd // 16)  # FLUX: (16, 56, 56) for head_dim 128
    side = int(tokens ** 0.5)
    img = torch.stack([torch.zeros(tokens), torch.arange(tokens) // side, torch.arange(tokens) % side], -1).float()
    ids = torch.cat([torch.zeros(text_tokens, 3), img])
    rope = FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)
    return (torch.randn(batch, tokens, dim, generator=g), torch.randn(batch, text_tokens, dim, generator=g),
            torch.randn(batch, dim, generator=g), rope)


# --- fast packing (see module docstring) -----------------------------------------------
@torch.no_grad()
def fast_quantize_group(weights, biases, stats, target, config) -> list[PackedLinear]:
    from svdq_compile.quant.search import _shift_for

    lam = None
    if not target.qmode.weight_only and config.smooth and stats is not None and stats.seen:
        w_absmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)
        lam = smoothing_factors(stats.absmax, w_absmax, 0.5, 0.5)
    shift = _shift_for(stats, lam, target) if stats is not None and stats.seen else 0.0
    packs = []
    for i, (w, b) in enumerate(zip(weights, biases)):
        ws = w.float() * lam if lam is not None else w.float()
        r = min(target.rank, *ws.shape)
        up = down = None
        if r:
            torch.manual_seed(config.seed + i)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # LAPACK's small SVD/QR spin-waits with 2 threads on a busy CPU
            try:
                u, s, v = torch.svd_lowrank(ws, q=r + 8, niter=1)
            finally:
                torch.set_num_threads(threads)
            up, down = (u[:, :r] * s[:r]).contiguous(), v[:, :r].t().contiguous()
            ws = ws - up @ down
        w = target.qmode.quantize_weight(ws, target.group_size)  # {"qweight", "wscales"} of the group scheme
        spec = LinearSpec(in_features=ws.shape[1], out_features=ws.shape[0], group_size=target.group_size,
                          weight_bits=target.weight_bits, act_bits=target.act_bits,
                          act_unsigned=target.act_unsigned, act_shift=shift, rank=r)
        packs.append(PackedLinear(spec, **w,
                                  smooth=lam, lora_down=down, lora_up=up,
                                  bias=None if b is None else b.detach().float().clone()))
    return packs


# --- activation pass counting ---------------------------------------------------------
def _tensors(v: Any) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in _tensors(x)]
    return []


class PassCounter(fx.Interpreter):
    """Runs the graph once and counts reads/writes of activation-sized tensors per op."""

    def __init__(self, gm: fx.GraphModule, example_inputs, act_numel: int) -> None:
        super().__init__(gm)
        self.tensors = GraphTensors(gm, example_inputs)
        self.act_numel = act_numel
        self.by_op: dict[str, int] = {}
        self.total = 0
        self.bytes = 0
        self.smoothing = 0
        self.svdq = 0
        self.quantizations = 0

    def _act(self, node: Any) -> bool:
        if not isinstance(node, fx.Node) or node.op == "get_attr" or self.tensors.is_constant(node):
            return False
        return any(t.numel() >= self.act_numel for t in _tensors(self.env.get(node)))

    def _nbytes(self, node: Any) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(self.env.get(node)) if t.numel() >= self.act_numel)

    def _add(self, key: str, n: int) -> None:
        if n:
            self.by_op[key] = self.by_op.get(key, 0) + n
            self.total += n

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op not in ("call_function", "call_method", "call_module"):
            return out
        if is_svdq(n):
            a = n.args
            self.svdq += 1
            self.quantizations += int(a[ARG["act_bits"]] != 16)
            passes = int(self._act(a[ARG["x"]])) + 1
            passes += sum(int(self._act(a[ARG[k]])) for k in ("residual", "gate"))
            self._add("svdq::linear", passes)
            self.bytes += out.numel() * out.element_size() + sum(
                self._nbytes(a[ARG[k]]) for k in ("x", "residual", "gate") if self._act(a[ARG[k]]))
            if a[ARG["smooth"]] is not None and self._act(a[ARG["x"]]):
                self.smoothing += 1
                self._add("smoothing (X/lambda)", 2)
                self.bytes += 2 * self._nbytes(a[ARG["x"]])
            return out
        storages = {t.untyped_storage().data_ptr() for m in n.all_input_nodes for t in _tensors(self.env[m])}
        new = [t for t in _tensors(out) if t.untyped_storage().data_ptr() not in storages]
        if not new:
            return out  # a view / no-op: no data moved
        reads = sum(1 for m in n.all_input_nodes if self._act(m))
        writes = sum(1 for t in new if t.numel() >= self.act_numel)
        self.bytes += sum(self._nbytes(m) for m in n.all_input_nodes if self._act(m))
        self.bytes += sum(t.numel() * t.element_size() for t in new if t.numel() >= self.act_numel)
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        self._add(str(name), reads + writes)
        return out


def count_passes(gm: fx.GraphModule, example_inputs, act_numel: int) -> dict[str, Any]:
    pc = PassCounter(gm, example_inputs, act_numel)
    with torch.no_grad():
        pc.run(*example_inputs)
    return {"activation_passes": pc.total, "activation_mb": pc.bytes / 2**20, "svdq_ops": pc.svdq, "activation_quantizations": pc.quantizations,
            "smoothing_multiplies": pc.smoothing, "by_op": dict(sorted(pc.by_op.items(), key=lambda kv: -kv[1]))}


# --- compile + time ---------------------------------------------------------------------
class Spy:
    def __init__(self, options: dict) -> None:
        self.options, self.compiled, self.graphs = options, [], []

    def __call__(self, gm, example_inputs):
        self.graphs.append((gm, list(example_inputs)))
        c = svdq_compile.svdquant_backend(gm, example_inputs, options=self.options)
        self.compiled.append(c)
        return c


def run(ctx: Context, tqdm: Any) -> None:
    c = ctx.params
    if c["decompose"] not in ("fast", "full"):
        raise ValueError(f"decompose must be 'fast' or 'full', got {c['decompose']!r}")
    ctx.extra["config"] = {**c, "repeats": ctx.repeats}
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    original = pipeline.quantize_group
    if c["decompose"] == "fast":
        pipeline.quantize_group = fast_quantize_group
    try:
        blocks = build_blocks(c["dim"], c["heads"])
        inputs = block_inputs(c["dim"], c["heads"], c["tokens"], c["text_tokens"], c["batch"])
        # W4A4 (the table says so; "auto" would pick per CPU); AdaLN modulation linears in float
        # (module docstring).
        base = dict(mode="w4a4", use_inductor=False, skip=("*norm*.linear",), mode_overrides={}, search_grid=4,
                    refine_iters=1)
        act_numel = 8 * c["batch"] * c["dim"]
        bar = tqdm(total=len(blocks), desc="bench passes", disable=not ctx.progress)
        for name, block in blocks.items():
            ctx.record({"case": name, "block": name, **_block(ctx, block, inputs, base, act_numel)})
            r = ctx.rows[-1]
            bar.set_postfix_str(f"{name}: passes {r['graph_off']['activation_passes']} -> "
                                f"{r['graph_on']['activation_passes']}")
            bar.update(1)
            torch._dynamo.reset()
        bar.close()
    finally:
        pipeline.quantize_group = original
        torch.set_grad_enabled(grad)


def _block(ctx: Context, block: Any, inputs: tuple, base: dict, act_numel: int) -> dict:
    _, calibrate_s = timed(lambda: svdq_compile.calibrate(block, [inputs], progress=False))
    with torch.no_grad():
        ref = block(*inputs)
    res: dict[str, Any] = {"calibrate_s": calibrate_s}
    compiled, spies = {}, {}
    for tag, flags in (("off", dict.fromkeys(PASS_FLAGS, False)), ("on", {})):
        torch._dynamo.reset()
        spy = Spy(dict(base, **flags))
        cm = torch.compile(block, backend=spy)
        y, res[f"compile_{tag}_s"] = timed(lambda: cm(*inputs))
        assert len(spy.compiled) == 1, "expected one graph per block"
        report = svdq_compile.capture.backend.last_reports()[-1]
        res[f"passes_{tag}"] = dict(report.passes)
        res[f"sqnr_{tag}_db"] = min(svdq_compile.sqnr_db(r, o) for r, o in zip(ref, y))
        compiled[tag], spies[tag] = cm, spy
    gm_in, ex = spies["off"].graphs[0]
    res["graph_fp32"] = count_passes(gm_in, ex, act_numel)
    for tag in ("off", "on"):
        # The rewritten graph takes the inputs Dynamo gave the backend (the compiled object
        # drops its own copy once it has compiled).
        res[f"graph_{tag}"] = count_passes(spies[tag].compiled[0]._fn, spies[tag].graphs[0][1], act_numel)
    # latency: interleaved off/on calls (shared machine: load changes hit both)
    t = time_interleaved({tag: (lambda cm=compiled[tag]: cm(*inputs)) for tag in ("off", "on")}, "cpu",
                         repeats=ctx.repeats, warmup=1, keep_samples=True)
    for tag in ("off", "on"):
        if "error" in t[tag]:
            raise RuntimeError(f"passes {tag}: {t[tag]['error']}")
        res[f"latency_{tag}_ms"] = {"median": t[tag]["median_ms"], "min": t[tag]["min_ms"],
                                    "max": t[tag]["max_ms"], "all": t[tag]["samples_ms"]}
    res["speedup"] = res["latency_off_ms"]["median"] / res["latency_on_ms"]["median"]
    # paired: the off and on samples of one round (robust to slow load drifts)
    res["speedup_paired_median"] = statistics.median(a / b for a, b in zip(t["off"]["samples_ms"],
                                                                           t["on"]["samples_ms"]))
    return res


def _blocks(p: dict) -> dict:
    """{block: result}; files of benchmarks/bench_passes.py kept them under "blocks"."""
    return p.get("blocks") or {r["case"]: r for r in p.get("rows", [])}


def to_markdown(p: dict) -> str:
    from .report import footer, header

    c = p["config"]
    lines = header(p, "Graph passes: FLUX blocks, passes off vs on (CPU)") + [
        f"hidden {c['dim']}, {c['heads']} heads, MLP {4 * c['dim']}, batch {c['batch']}, "
        f"{c['tokens']} image + {c['text_tokens']} text tokens, fp32, W4A4 rank 32 (AdaLN linears in fp32), "
        f"packing: {c['decompose']}, `use_inductor=False`.",
        "",
        "Activation passes = reads/writes of activation-sized tensors by separate ops (svdq op = fused "
        "kernel: 1 read of X + 1 write of Y (+1 read of a residual), +2 for an unfolded X/lambda; "
        "see benchmarks/suites/passes.py); activation MB = the bytes those reads/writes move (a fused "
        "QKV op writes one [M, 3N] output: 1 pass, the bytes of 3).",
        "",
        "Packing `fast`: lambda from calibration (alpha 0.5), randomized rank-32 SVD, round-to-nearest INT4 "
        "residual (same format and op as the full search; run times do not depend on the values).",
        "",
        "| block | activation passes: fp32 graph | quantized, passes off | passes on "
        "| activation MB: fp32 / off / on | svdq ops off -> on | smoothing muls off -> on "
        "| latency off (ms) | latency on (ms) | speedup | pass counts (on) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    blocks = _blocks(p)
    for name, r in blocks.items():
        fp, off, on = r["graph_fp32"], r["graph_off"], r["graph_on"]
        pc = ", ".join(f"{k}={v}" for k, v in r["passes_on"].items())
        lines.append(
            f"| {name} | {fp['activation_passes']} | {off['activation_passes']} | {on['activation_passes']} "
            f"| {fp['activation_mb']:.0f} / {off['activation_mb']:.0f} / {on['activation_mb']:.0f} "
            f"| {off['svdq_ops']} -> {on['svdq_ops']} | {off['smoothing_multiplies']} -> {on['smoothing_multiplies']} "
            f"| {r['latency_off_ms']['median']:.0f} (min {r['latency_off_ms']['min']:.0f}) "
            f"| {r['latency_on_ms']['median']:.0f} (min {r['latency_on_ms']['min']:.0f}) "
            f"| {r['speedup']:.2f}x (paired {r['speedup_paired_median']:.2f}x) | {pc} |")
    lines += ["", "Per-op breakdown of activation passes (off / on):", ""]
    for name, r in blocks.items():
        keys = list(dict.fromkeys(list(r["graph_off"]["by_op"]) + list(r["graph_on"]["by_op"])))
        lines.append(f"- {name}: " + "; ".join(
            f"{k} {r['graph_off']['by_op'].get(k, 0)}/{r['graph_on']['by_op'].get(k, 0)}" for k in keys))
    lines += ["", "Output SQNR vs the fp32 block (dB, min over outputs): " + "; ".join(
        f"{n} off {r['sqnr_off_db']:.1f} / on {r['sqnr_on_db']:.1f}" for n, r in blocks.items())]
    return "\n".join(lines + footer(p)) + "\n"


def plot(p: dict, path: Path) -> bool:
    from .report import bar_chart

    blocks = _blocks(p)
    return bar_chart(path, list(blocks), {g: [r[f"graph_{g}"]["activation_passes"] for r in blocks.values()]
                                          for g in ("fp32", "off", "on")},
                     title="activation passes per block: fp32 graph, quantized with passes off / on",
                     ylabel="activation passes", figsize=(7, 4), rotation=0, hlines=())

"""Graph passes benchmark: activation passes and CPU latency of one FLUX block, passes off vs on.

Usage: python benchmarks/bench_passes.py [--dim 3072 --heads 24 --tokens 256 --text-tokens 64]
       [--repeats 5] [--decompose fast|full] [--quick]

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
   is counted as the fused kernel of DESIGN section 2 (one read of X: smoothing,
   quantization and the low-rank down projection in one prologue; one write of Y with
   bias/activation/gate/residual in the epilogue; +1 read of an activation-sized
   residual/gate), plus the *smoothing multiply* (read X, write X/lambda) when its
   lambda is not folded into the producer (on the CPU path the op materialises X/lambda
   for the low-rank branch). Also reported: the unquantized (fp32) graph.
2. **CPU latency** of one call of each block, passes off vs on, timed interleaved in
   one process (median/min/max of ``--repeats``, after a warm-up call).

``--decompose fast`` (default) packs each layer with lambda from the calibration
statistics (alpha = 0.5), a randomized rank-32 SVD and round-to-nearest INT4 residual:
the same packed format and op as the full SVDQuant search (``--decompose full``), but
seconds instead of ~2 minutes per 3072-wide layer on this 2-core CPU; kernel run times
do not depend on the values. Output: ``benchmarks/results/passes.{json,md}``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from benchmarks.common import RESULTS, machine_info, write_json  # noqa: E402

import svdq_compile  # noqa: E402
import svdq_compile.passes.pipeline as pipeline  # noqa: E402
from svdq_compile.quant.decompose import smoothing_factors  # noqa: E402
from svdq_compile.passes.op_nodes import ARG, GraphTensors, is_svdq  # noqa: E402
from svdq_compile.runtime.packed import LinearSpec, PackedLinear  # noqa: E402
from svdq_compile.runtime.quantize import quantize_weight  # noqa: E402

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
    if target.act_bits != 16 and config.smooth and stats is not None and stats.seen:
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
        q, sc = quantize_weight(ws, target.weight_bits, target.group_size)
        spec = LinearSpec(ws.shape[1], ws.shape[0], target.group_size, target.weight_bits, target.act_bits,
                          target.act_unsigned, shift, r)
        packs.append(PackedLinear(spec, PackedLinear.pack_weight(q, target.weight_bits), sc, lam, down, up,
                                  None if b is None else b.detach().float().clone()))
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


def run(args) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    if args.decompose == "fast":
        pipeline.quantize_group = fast_quantize_group
    blocks = build_blocks(args.dim, args.heads)
    inputs = block_inputs(args.dim, args.heads, args.tokens, args.text_tokens, args.batch)
    # AdaLN modulation linears (M = batch) stay in float: the passes do not touch them, and
    # the CPU W4A16 path dequantizes the whole weight per call (~3.5 s for 18432x3072 on
    # this machine vs 60 ms fp32), which would swamp the block's time.
    base = dict(use_inductor=False, skip=("*norm*.linear",), mode_overrides={}, search_grid=4, refine_iters=1)
    act_numel = 8 * args.batch * args.dim
    out: dict[str, Any] = {}
    for name, block in blocks.items():
        t0 = time.perf_counter()
        svdq_compile.calibrate(block, [inputs], progress=False)
        with torch.no_grad():
            ref = block(*inputs)
        res: dict[str, Any] = {"calibrate_s": time.perf_counter() - t0}
        compiled, spies = {}, {}
        for tag, flags in (("off", dict.fromkeys(PASS_FLAGS, False)), ("on", {})):
            torch._dynamo.reset()
            spy = Spy(dict(base, **flags))
            cm = torch.compile(block, backend=spy)
            t0 = time.perf_counter()
            y = cm(*inputs)
            res[f"compile_{tag}_s"] = time.perf_counter() - t0
            assert len(spy.compiled) == 1, "expected one graph per block"
            report = svdq_compile.capture.backend.last_reports()[-1]
            res[f"passes_{tag}"] = dict(report.passes)
            res[f"sqnr_{tag}_db"] = min(svdq_compile.sqnr_db(r, o) for r, o in zip(ref, y))
            compiled[tag], spies[tag] = cm, spy
        gm_in, ex = spies["off"].graphs[0]
        res["graph_fp32"] = count_passes(gm_in, ex, act_numel)
        for tag in ("off", "on"):
            c = spies[tag].compiled[0]
            res[f"graph_{tag}"] = count_passes(c._fn, c.example_inputs, act_numel)
        # latency: interleaved off/on calls (shared machine: load changes hit both)
        times: dict[str, list[float]] = {"off": [], "on": []}
        for tag in ("off", "on"):
            compiled[tag](*inputs)  # warm-up (weight caches, kernel build)
        for _ in range(args.repeats):
            for tag in ("off", "on"):
                t0 = time.perf_counter()
                compiled[tag](*inputs)
                times[tag].append((time.perf_counter() - t0) * 1e3)
        for tag in ("off", "on"):
            res[f"latency_{tag}_ms"] = {"median": statistics.median(times[tag]), "min": min(times[tag]),
                                        "max": max(times[tag]), "all": times[tag]}
        res["speedup"] = res["latency_off_ms"]["median"] / res["latency_on_ms"]["median"]
        # paired: each repeat times off then on back to back (robust to slow load drifts)
        res["speedup_paired_median"] = statistics.median(a / b for a, b in zip(times["off"], times["on"]))
        out[name] = res
        print(f"{name}: passes {res['graph_off']['activation_passes']} -> {res['graph_on']['activation_passes']}"
              f" (fp32 {res['graph_fp32']['activation_passes']}); latency "
              f"{res['latency_off_ms']['median']:.0f} -> {res['latency_on_ms']['median']:.0f} ms", flush=True)
        torch._dynamo.reset()
    return out


def markdown(payload: dict[str, Any]) -> str:
    c = payload["config"]
    lines = [
        "# Graph passes: FLUX blocks, passes off vs on (CPU)",
        "",
        f"hidden {c['dim']}, {c['heads']} heads, MLP {4 * c['dim']}, batch {c['batch']}, "
        f"{c['tokens']} image + {c['text_tokens']} text tokens, fp32, W4A4 rank 32 (AdaLN linears in fp32), "
        f"packing: {c['decompose']}, `use_inductor=False`. Machine: {payload['machine']['cpu']}, "
        f"{payload['machine']['cores']} cores, load {payload['machine'].get('loadavg')}.",
        "",
        "Activation passes = reads/writes of activation-sized tensors by separate ops (svdq op = fused "
        "kernel: 1 read of X + 1 write of Y (+1 read of a residual), +2 for an unfolded X/lambda; "
        "see benchmarks/bench_passes.py); activation MB = the bytes those reads/writes move (a fused "
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
    for name, r in payload["blocks"].items():
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
    for name, r in payload["blocks"].items():
        keys = list(dict.fromkeys(list(r["graph_off"]["by_op"]) + list(r["graph_on"]["by_op"])))
        lines.append(f"- {name}: " + "; ".join(
            f"{k} {r['graph_off']['by_op'].get(k, 0)}/{r['graph_on']['by_op'].get(k, 0)}" for k in keys))
    lines += ["", "Output SQNR vs the fp32 block (dB, min over outputs): " + "; ".join(
        f"{n} off {r['sqnr_off_db']:.1f} / on {r['sqnr_on_db']:.1f}" for n, r in payload["blocks"].items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=3072)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--decompose", choices=("fast", "full"), default="fast")
    ap.add_argument("--quick", action="store_true", help="hidden 512 / 4 heads, 64 tokens, 3 repeats")
    ap.add_argument("--out", default=str(RESULTS / "passes.json"))
    args = ap.parse_args()
    if args.quick:
        args.dim, args.heads, args.tokens, args.text_tokens, args.repeats = 512, 4, 64, 16, 3
    t0 = time.perf_counter()
    blocks = run(args)
    payload = {"machine": machine_info(), "config": vars(args), "blocks": blocks,
               "total_s": time.perf_counter() - t0}
    out = Path(args.out)
    if out.parent == RESULTS:
        write_json(out.name, payload)
    else:
        import json

        out.write_text(json.dumps(payload, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

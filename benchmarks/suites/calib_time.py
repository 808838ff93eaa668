"""Suite ``calib_time``: calibration (decomposition) time of FLUX-shaped linears on CPU,
extrapolated to FLUX.1.

Issue 5 target: <= 60 s per (K=3072, N=12288) layer with 4096 calibration tokens on the
2-core CPU. Measures the full default pipeline for one layer group: statistics update,
(alpha, beta) search (39 candidates), final decomposition with refinement. Each shape is
run once (minutes each): ``--repeats`` does not apply.

    svdq bench --suite calib_time [--quick]   # --quick: only the K=3072, N=12288 layer
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from svdq_compile import SVDQuantConfig
from svdq_compile.quant.decompose import LayerTarget, quantized_output, sqnr_db
from svdq_compile.quant.search import quantize_group
from svdq_compile.quant.stats import LayerStats

from .harness import Context
from .timing import timed

__all__ = ["run", "to_markdown", "plot", "PARAMS", "DEVICE", "time_layer"]

DEVICE = "cpu"
# (N, K, siblings sharing one search)
PARAMS = {"tokens": 4096, "shapes": ("12288x3072x1", "3072x3072x3", "3072x12288x1", "3072x15360x1")}
QUICK_PARAMS = {"shapes": ("12288x3072x1",)}

# FLUX.1 linears per block as (N, K, count, siblings-share-one-search); AdaLN modulation
# (W4A16 by default) has no activation search: timed as a decomposition without search.
FLUX_DOUBLE = [  # x19
    ("qkv (img)", 3072, 3072, 3), ("to_out", 3072, 3072, 1), ("ff up", 12288, 3072, 1), ("ff down", 3072, 12288, 1),
    ("qkv (txt)", 3072, 3072, 3), ("to_add_out", 3072, 3072, 1), ("ff_context up", 12288, 3072, 1),
    ("ff_context down", 3072, 12288, 1),
]
FLUX_SINGLE = [  # x38: q, k, v and proj_mlp read the same norm output
    ("qkv+proj_mlp", 3072, 3072, 3), ("proj_mlp", 12288, 3072, 1), ("proj_out", 3072, 15360, 1),
]


def _layer(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = 64
    w = (torch.randn(n, r, generator=g) @ torch.randn(r, k, generator=g)) / math.sqrt(k * r) * 3
    return w + torch.randn(n, k, generator=g) * 0.02


def time_layer(n: int, k: int, tokens: int, cfg: SVDQuantConfig, siblings: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, k, generator=g)
    x[:, torch.randperm(k, generator=g)[: k // 100]] *= 30.0
    ws = [_layer(n, k, s) for s in range(siblings)]

    def stats() -> LayerStats:
        st = LayerStats(k, cfg.calib_tokens)
        for chunk in x.split(1024):  # e.g. 4 denoising steps of 1024 tokens
            st.update(chunk)
        return st

    st, t_stats = timed(stats)
    packs, t_search = timed(lambda: quantize_group(ws, [None] * siblings, st,
                                                   LayerTarget(rank=cfg.rank, refine_iters=cfg.refine_iters), cfg))
    xs = x[:512]
    sq = sqnr_db(xs.double() @ ws[0].double().t(), quantized_output(packs[0], xs))
    return {"N": n, "K": k, "siblings": siblings, "tokens": tokens, "seconds": t_stats + t_search, "stats_s": t_stats,
            "alpha": packs[0].meta.get("alpha"), "sqnr_db": sq}


def run(ctx: Context, tqdm: Any) -> None:
    tokens = ctx.params["tokens"]
    cfg = SVDQuantConfig(calib_tokens=tokens)
    shapes = [tuple(int(v) for v in s.split("x")) for s in ctx.params["shapes"]]
    ctx.extra["config"] = cfg.to_dict()
    bar = tqdm(total=len(shapes), desc="bench calib_time", disable=not ctx.progress)
    for n, k, sib in shapes:
        r = time_layer(n, k, tokens, cfg, sib)
        ctx.record({"case": f"N={n} K={k} siblings={sib}", **r})
        bar.set_postfix_str(f"N={n} K={k}: {r['seconds']:.1f} s")
        bar.update(1)
    bar.close()
    by_shape = {(r["N"], r["K"], r["siblings"]): r["seconds"] for r in ctx.rows}
    if (12288, 3072, 1) not in by_shape:
        ctx.note("no FLUX.1 extrapolation: it scales from the measured N=12288 K=3072 layer")
        return

    def est(n, k, sib):
        if (n, k, sib) in by_shape:
            return by_shape[(n, k, sib)]
        ref = by_shape[(12288, 3072, 1)]  # scale by weight elements from the measured layer
        return ref * (n * k * sib) / (12288 * 3072)

    total = 19 * sum(est(n, k, s) for _, n, k, s in FLUX_DOUBLE) + 38 * sum(est(n, k, s) for _, n, k, s in FLUX_SINGLE)
    ctx.extra["flux1_extrapolated_seconds"] = total
    ctx.note("FLUX.1 transformer = 19 double + 38 single blocks; AdaLN modulation linears (W4A16, no "
             "search) not included; unmeasured shapes scaled by weight elements from the 12288x3072 layer")


def to_markdown(p: dict) -> str:
    from .report import footer, header

    lines = header(p, "Calibration time of FLUX-shaped linears (CPU)")
    lines += ["Full default pipeline per layer group: statistics, (alpha, beta) search, decomposition with "
              f"refinement; {p['rows'][0]['tokens'] if p['rows'] else '-'} calibration tokens.", "",
              "| N | K | siblings | seconds | statistics s | alpha | SQNR dB |", "|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        alpha = "-" if r.get("alpha") is None else f"{r['alpha']:.2f}"
        lines.append(f"| {r['N']} | {r['K']} | {r['siblings']} | {r['seconds']:.1f} | {r['stats_s']:.2f} | {alpha} "
                     f"| {r['sqnr_db']:.1f} |")
    if p.get("flux1_extrapolated_seconds") is not None:
        lines += ["", f"Extrapolated FLUX.1 transformer (19 double + 38 single blocks): "
                      f"**{p['flux1_extrapolated_seconds'] / 60:.1f} min** on this CPU."]
    if p.get("note"):  # the file of benchmarks/bench_calib_time.py
        lines += ["", p["note"]]
    return "\n".join(lines + footer(p)) + "\n"


def plot(p: dict, path: Path) -> bool:
    from .report import bar_chart

    return bar_chart(path, [f"{r['N']}x{r['K']} x{r['siblings']}" for r in p["rows"]],
                     {"seconds": [r["seconds"] for r in p["rows"]]}, title="calibration time per layer group",
                     ylabel="s", figsize=(7, 4), rotation=0, hlines=((60.0, {"color": "r", "ls": "--"}),))

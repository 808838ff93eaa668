"""Suite ``demo_speed``: the demo's sampling speed, steady state: fp32 vs the quantized rows,
interleaved.

``svdq demo`` times each row's 20 sampling steps one row after another, so on a shared
machine a load change between rows moves the ratio. This suite compiles every variant
first (same calibration and options as the demo), then times one model call at the
sampling batch shape (``2B`` = both CFG branches) round-robin over the variants, and
reports each variant's median s/step and its ratio to eager fp32 from the same rounds.

    svdq bench --suite demo_speed [--isa avx2] [--repeats 9] [--param threads=1]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .harness import Context
from .timing import time_interleaved

__all__ = ["run", "to_markdown", "plot", "PARAMS", "DEVICE"]

DEVICE = "cpu"
DEFAULT_REPEATS = (5, 9)  # rounds over all variants
PARAMS = {
    "variants": ("fp32", "SVDQuant W4A4 (rank 32)", "SVDQuant W4A4 (rank 4)", "SVDQuant W4A8-INT8 (rank 32)",
                 "SVDQuant W4A8-INT8 (rank 4)"),
    "threads": 1,  # the demo's default
    "inductor_fp32": False,  # also time fp32 under torch.compile (Inductor)
}
QUICK_PARAMS = {"variants": ("fp32", "SVDQuant W4A4 (rank 4)", "SVDQuant W4A8-INT8 (rank 4)")}


def run(ctx: Context, tqdm: Any) -> None:
    from svdq_compile.demo.model import NULL_LABEL, load_pretrained
    from svdq_compile.demo.run import VARIANTS, DemoOptions, _record_calibration_inputs, compile_variant

    names = list(ctx.params["variants"])
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or "fp32" not in names:
        raise ValueError(f"variants must include 'fp32' and come from {list(VARIANTS)}; got {unknown or names}")
    threads = torch.get_num_threads()
    torch.set_num_threads(ctx.params["threads"])
    try:
        opts = DemoOptions(progress=False)
        labels = torch.arange(10).repeat_interleave(opts.samples_per_class)  # [B]
        both = torch.cat([torch.full_like(labels, NULL_LABEL), labels])  # [2B]
        x = torch.randn(len(both), 16, 4, generator=torch.Generator().manual_seed(0))  # [2B, 16, 4]
        t = torch.full((len(both),), 0.5)  # [2B]
        calib = _record_calibration_inputs(load_pretrained(), opts)
        bar = tqdm(total=len(names), desc="bench demo_speed (compile)", disable=not ctx.progress)
        fns = {}
        for name in names:
            options = VARIANTS[name]
            if options is None:
                fns[name] = load_pretrained()
                if ctx.params["inductor_fp32"]:
                    fns["fp32 (Inductor)"] = torch.compile(load_pretrained())
            else:
                fns[name] = compile_variant(load_pretrained(), options, calib, opts)
            bar.update(1)
        bar.close()
        with torch.no_grad():
            # warm-up 2: the first call compiles / quantizes, the second is the first warm one
            timed = time_interleaved({k: (lambda f=f: f(x, t, both)) for k, f in fns.items()}, "cpu",
                                     repeats=ctx.repeats, warmup=2)
    finally:
        torch.set_num_threads(threads)
    ctx.extra.update(batch=len(both), threads=ctx.params["threads"])
    ctx.note(f"one model call at the sampling batch {len(both)} (both CFG branches), {ctx.params['threads']} "
             f"thread(s); median of {ctx.repeats} interleaved rounds")
    base = timed["fp32"]["median_ms"]
    for name, v in timed.items():
        if "error" in v:
            ctx.record({"case": name, "variant": name, "status": f"n/a (error: {v['error'][:200]})"})
            continue
        ctx.record({"case": name, "variant": name, "status": "ok", **v, "s_per_step": v["median_ms"] / 1e3,
                    "speedup": base / v["median_ms"]})


def _rows(p: dict) -> list[dict]:
    rows = p.get("rows", [])
    if isinstance(rows, dict):  # the file of benchmarks/bench_demo_speed.py: {variant: {s_per_step, min, max, ...}}
        return [{"case": k, "variant": k, "status": "ok", "s_per_step": v["s_per_step"], "min_ms": v["min"] * 1e3,
                 "max_ms": v["max"] * 1e3, "speedup": v["speedup_vs_fp32"]} for k, v in rows.items()]
    return rows


def to_markdown(p: dict) -> str:
    from .report import footer, header

    lines = header(p, "Demo sampling speed, steady state (CPU)")
    lines += ["| variant | s/step (median) | min-max s | vs fp32 |", "|---|---|---|---|"]
    for r in _rows(p):
        if r.get("status") != "ok":
            lines.append(f"| {r['variant']} | {r.get('status')} | | |")
            continue
        lines.append(f"| {r['variant']} | {r['s_per_step']:.3f} | {r['min_ms'] / 1e3:.3f}-{r['max_ms'] / 1e3:.3f} "
                     f"| {r['speedup']:.2f}x |")
    return "\n".join(lines + footer(p)) + "\n"


def plot(p: dict, path: Path) -> bool:
    from .report import bar_chart

    rows = [r for r in _rows(p) if r.get("status") == "ok"]
    return bar_chart(path, [r["variant"] for r in rows], {"vs fp32": [r["speedup"] for r in rows]},
                     title="demo: s/step speedup vs eager fp32, interleaved", ylabel="x fp32", figsize=(7, 4.5))

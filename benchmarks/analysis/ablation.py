"""Ablation of SVDQuant's parts (issue 5): naive W4A4 / smoothing only / low-rank only /
SVDQuant / SVDQuant + refinement, and a rank sweep, on

- synthetic layers with real-model-like statistics (a few activation channels ~30x
  larger, heavy-tailed tokens; weights with a decaying spectrum and outlier columns),
- the demo model (FLUX-architecture digits generator): image PSNR vs fp32 samples and
  classifier accuracy.

The demo model's layers are 128 wide, so rank 32 is a quarter of a layer (in FLUX it is
~1% of 3072): the rank sweep includes rank 2-4, proportional to FLUX, so the numbers do
not flatter the method (docs/design.md section 6).

    svdq bench --suite ablation [--quick] [--param skip_demo=1]
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

from ..suites.harness import Context
from ..suites.timing import timed

__all__ = ["run", "to_markdown", "plot", "PARAMS", "DEVICE", "VARIANTS", "RANKS"]

DEVICE = "cpu"
PARAMS = {"skip_demo": False}

VARIANTS = {
    "naive W4A4": dict(smooth=False, rank=0, refine_iters=0),
    "smoothing only": dict(rank=0, refine_iters=0),
    "low-rank only": dict(smooth=False, refine_iters=0),
    "SVDQuant": dict(refine_iters=0),
    "SVDQuant + refinement": dict(refine_iters=3),
}
RANKS = (0, 2, 4, 8, 16, 32, 64)


def synthetic_layer(k: int, n: int, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) * torch.rand(tokens, 1, generator=g).mul(2).exp()  # heavy-ish tails
    out_ch = torch.randperm(k, generator=g)[: max(1, k // 100)]
    x[:, out_ch] *= 30.0  # 1% of channels x30 (measured pattern in DiT activations)
    u = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    v = torch.linalg.qr(torch.randn(k, k, generator=g))[0]
    m = min(n, k)
    s = torch.logspace(0, -2, m) * 3.0  # decaying spectrum, like trained weights
    w = (u[:, :m] * s) @ v[:, :m].t() / math.sqrt(k) + torch.randn(n, k, generator=g) * 0.01
    w[:, torch.randperm(k, generator=g)[:4]] *= 8.0  # a few weight outlier columns
    return x, w


def run_synthetic(quick: bool, record) -> None:
    shapes = [(512, 512), (512, 2048)] if quick else [(1024, 1024), (1024, 4096), (4096, 1024)]
    for i, (k, n) in enumerate(shapes):
        x, w = synthetic_layer(k, n, 1024, seed=i)
        st = LayerStats(k, 1024)
        st.update(x)
        ref = x.double() @ w.double().t()

        def sqnr_of(opts, rank=32):
            cfg = SVDQuantConfig(**{"rank": rank, **opts, "search_grid": 10 if quick else 20})
            t = LayerTarget(rank=cfg.rank, refine_iters=cfg.refine_iters)
            p = quantize_group([w], [None], st, t, cfg)[0]
            return sqnr_db(ref, quantized_output(p, x))

        for name, opts in VARIANTS.items():
            record({"model": f"synthetic {n}x{k}", "variant": name, "rank": opts.get("rank", 32),
                    "sqnr_db": sqnr_of(opts)})
        for r in RANKS:
            record({"model": f"synthetic {n}x{k}", "variant": f"SVDQuant rank {r}", "rank": r,
                    "sqnr_db": sqnr_of({"refine_iters": 0}, rank=r)})


def run_demo(quick: bool, record) -> None:
    from svdq_compile.demo.model import load_pretrained
    from svdq_compile.demo.sampler import sample
    from svdq_compile.demo.classifier import accuracy
    from svdq_compile.capture.quantize_module import quantize

    n, steps = (20, 10) if quick else (100, 20)
    labels = torch.arange(n) % 10
    base = load_pretrained()
    ref = sample(base, labels, steps=steps, guidance=1.5, seed=0, progress=False)
    calib_labels = torch.arange(16) % 10

    def calib_items(model):
        # The model's inputs along real sampling trajectories (every step, both CFG branches).
        items = []
        def fn(x, t, y):
            items.append((x.clone(), t.clone(), y.clone()))
            return model(x, t, y)
        sample(fn, calib_labels, steps=steps, guidance=1.5, seed=1, progress=False)
        return items

    items = calib_items(base)

    def evaluate(name, opts, rank):
        model = load_pretrained()
        # W4A4 explicitly: the ablation is of the paper's method (the default mode is "auto").
        cfg = SVDQuantConfig(**{"mode": "w4a4", "rank": rank, **opts, "search_grid": 8 if quick else 20})
        _, secs = timed(lambda: quantize(model, list(items[0]), items, cfg, progress=False))
        imgs = sample(model, labels, steps=steps, guidance=1.5, seed=0, progress=False)
        mse = (imgs.clamp(-1, 1) - ref.clamp(-1, 1)).pow(2).mean().item()
        psnr = 10 * math.log10(4.0 / max(mse, 1e-12))  # peak-to-peak range 2 -> peak^2 = 4
        record({"model": "demo (digits FLUX)", "variant": name, "rank": rank, "psnr_db": psnr,
                "accuracy": accuracy(imgs, labels), "quantize_s": secs})
    for name, opts in VARIANTS.items():
        for rank in (32, 4):
            if opts.get("rank") == 0 and rank == 4:
                continue
            evaluate(name, opts, opts.get("rank", rank))
    for r in RANKS:
        evaluate(f"SVDQuant rank {r}", {"refine_iters": 0}, r)
    record({"model": "demo (digits FLUX)", "variant": "fp32", "rank": None, "psnr_db": math.inf,
            "accuracy": accuracy(ref, labels)})


def run(ctx: Context, tqdm: Any) -> None:
    bar = tqdm(desc="ablation", disable=not ctx.progress)

    def record(row: dict) -> None:
        ctx.record({"case": f"{row['model']} / {row['variant']} / rank {row['rank']}", **row})
        bar.update(1)

    run_synthetic(ctx.quick, record)
    if not ctx.params["skip_demo"]:
        run_demo(ctx.quick, record)
    bar.close()


def to_markdown(p: dict) -> str:
    from ..suites.report import footer, header

    lines = header(p, f"Ablation of SVDQuant's parts{' (--quick)' if p.get('quick') else ''}")
    lines += ["| model | variant | rank | output SQNR dB | image PSNR dB | accuracy |", "|---|---|---|---|---|---|"]
    for r in p["rows"]:
        f = lambda k, fmt: fmt.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
        lines.append(f"| {r['model']} | {r['variant']} | {r['rank'] if r['rank'] is not None else '-'} | "
                     f"{f('sqnr_db', '{:.2f}')} | {f('psnr_db', '{:.2f}')} | {f('accuracy', '{:.3f}')} |")
    return "\n".join(lines + footer(p)) + "\n"


def plot(p: dict, path: Path) -> bool:
    from ..suites.report import pyplot, save_figure

    plt, rows = pyplot(), p["rows"]
    if plt is None or not any(r["variant"].startswith("SVDQuant rank") for r in rows):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model in sorted({r["model"] for r in rows}):
        sweep = [r for r in rows if r["model"] == model and r["variant"].startswith("SVDQuant rank")]
        key = "sqnr_db" if "synthetic" in model else "psnr_db"
        ax = axes[0] if key == "sqnr_db" else axes[1]
        ax.plot([r["rank"] for r in sweep], [r[key] for r in sweep], marker="o", label=model)
    axes[0].set(title="synthetic layers: output SQNR vs rank", xlabel="rank", ylabel="dB")
    axes[1].set(title="demo model: image PSNR vs fp32, vs rank", xlabel="rank", ylabel="dB")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)

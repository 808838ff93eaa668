"""The demo pipeline behind ``svdq demo`` / ``make demo``.

Loads the bundled digits diffusion model (diffusers ``FluxTransformer2DModel``), records
calibration statistics along real sampling trajectories, compiles it with
``backend="svdquant"`` in several variants, samples the same seeds and classes with
each, and writes ``grid.png``, ``report.md`` and ``metrics.json``.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from svdq_compile.demo.classifier import accuracy, heldout_accuracy
from svdq_compile.demo.metrics import psnr, ssim
from svdq_compile.demo.model import load_pretrained
from svdq_compile.demo.sampler import sample

__all__ = ["DemoOptions", "VARIANTS", "compile_variant", "run_demo"]

log = logging.getLogger(__name__)

# name -> torch.compile options. Rank 32 is a quarter of these 128-wide layers (in FLUX
# it is ~1% of 3072), so the demo also shows rank 4, the proportional rank (docs/design.md section 6).
VARIANTS: dict[str, Optional[dict[str, Any]]] = {
    "fp32": None,
    "naive W4A4": {"mode": "w4a4", "smooth": False, "rank": 0, "refine_iters": 0},
    "SVDQuant W4A4 (rank 32)": {"mode": "w4a4"},
    "SVDQuant W4A4 (rank 4)": {"mode": "w4a4", "rank": 4},
    # INT4 weights, 8-bit per-token activations (mode="auto" picks w4a8-int8 on CPU).
    "SVDQuant W4A8-INT8 (rank 32)": {"mode": "w4a8-int8"},
    "SVDQuant W4A8-INT8 (rank 4)": {"mode": "w4a8-int8", "rank": 4},
    "SVDQuant W4A8-FP8 (rank 32)": {"mode": "w4a8-fp8"},
    "SVDQuant W8A8": {"mode": "w8a8"},
}


@dataclass(frozen=True)
class DemoOptions:
    """Sizes of the demo run (the test uses a reduced one)."""

    samples_per_class: int = 10
    steps: int = 20
    guidance: float = 1.5
    seed: int = 0
    calib_samples: int = 10  # trajectories recorded for calibration (different seed)
    search_grid: int = 10  # 19 candidates; vs 20 (39) measured within 0.6 dB PSNR here, half the time
    use_inductor: bool = True
    variants: tuple[str, ...] = tuple(VARIANTS)
    progress: bool = True


def _record_calibration_inputs(model: torch.nn.Module, opts: DemoOptions) -> list[tuple]:
    """Model inputs along fp32 sampling trajectories: every step, both CFG branches."""
    items: list[tuple] = []

    def fn(x, t, y):
        items.append((x.clone(), t.clone(), y.clone()))
        return model(x, t, y)

    labels = torch.arange(opts.calib_samples) % 10
    sample(fn, labels, steps=opts.steps, guidance=opts.guidance, seed=opts.seed + 1000, progress=False)
    return items


def _transformer_bytes(model: torch.nn.Module) -> dict[str, int]:
    from svdq_compile.export import artifacts

    packed = artifacts.collect_packed(model)
    q_names = set(packed)
    q_bytes = sum(p.nbytes() for p in packed.values())
    fp_rest = 0
    for name, mod in model.named_modules():
        if name in q_names:
            continue
        for p in mod.parameters(recurse=False):
            fp_rest += p.numel() * p.element_size()
    fp32 = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"fp32_bytes": fp32, "quantized_layer_bytes": q_bytes, "float_layer_bytes": fp_rest,
            "total_bytes": q_bytes + fp_rest if q_names else fp32}


def compile_variant(model: torch.nn.Module, options: dict[str, Any], calib_items: list[tuple],
                    opts: DemoOptions) -> Any:
    """``model`` calibrated on ``calib_items`` and compiled with the svdquant backend and one
    row's ``options`` (quantized on its first call)."""
    import svdq_compile as sq

    cfg_opts = {"search_grid": opts.search_grid, "use_inductor": opts.use_inductor, **options}
    sq.calibrate(model, calib_items, sq.SVDQuantConfig.from_options(cfg_opts), progress=opts.progress)
    return torch.compile(model, backend="svdquant", options=cfg_opts)


def run_demo(out_dir: str | Path, opts: DemoOptions = DemoOptions()) -> dict[str, Any]:
    import svdq_compile as sq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    labels = torch.arange(10).repeat_interleave(opts.samples_per_class)  # [B]
    base = load_pretrained()
    calib_items = _record_calibration_inputs(base, opts)
    images: dict[str, torch.Tensor] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in opts.variants:
        options = VARIANTS[name]
        model = load_pretrained()
        info: dict[str, Any] = {}
        if options is None:
            fn = model
        else:
            t0 = time.perf_counter()
            fn = compile_variant(model, options, calib_items, opts)
            # Quantize + compile now, at the sampling batch shape (2B: both CFG branches), so
            # neither the quantization nor a shape recompile lands in the s/step figure.
            # Under no_grad like the sampler: a grad-mode call would compile a graph whose
            # grad-mode guard fails on the first sampling step (a second compile, ~10 s).
            both = torch.cat([labels, labels])
            with torch.no_grad():
                fn(torch.zeros(len(both), 16, 4), torch.ones(len(both)), both)
            info["quantize_compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        imgs = sample(fn, labels, steps=opts.steps, guidance=opts.guidance, seed=opts.seed, progress=opts.progress)
        info["s_per_step"] = (time.perf_counter() - t0) / opts.steps
        images[name] = imgs
        info["accuracy"] = accuracy(imgs, labels)
        info.update(_transformer_bytes(model))
        if name != "fp32" and "fp32" in images:
            info["psnr_db"] = psnr(imgs, images["fp32"])
            info["ssim"] = ssim(imgs, images["fp32"])
        if options is not None:
            info["explain"] = sq.explain(model, as_dict=True)["totals"]
        rows[name] = info
        log.info("demo %s: %s", name, {k: v for k, v in info.items() if k != "explain"})
        torch._dynamo.reset()
    metrics = {
        "options": asdict(opts),
        "classifier_heldout_accuracy": heldout_accuracy(),
        "variants": rows,
        "torch": torch.__version__,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    _write_grid(images, labels, out / "grid.png")
    (out / "report.md").write_text(_report(metrics))
    return metrics


def _write_grid(images: dict[str, torch.Tensor], labels: torch.Tensor, path: Path, per_row: int = 20) -> None:
    from PIL import Image, ImageDraw

    scale, pad, label_w = 4, 2, 190
    # one sample per class twice: first two samples of each class
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:2] for c in range(10)])[:per_row]
    cell = 8 * scale + pad
    w = label_w + len(idx) * cell
    h = len(images) * cell + pad
    canvas = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (name, imgs) in enumerate(images.items()):
        y0 = pad + r * cell
        draw.text((4, y0 + cell // 2 - 6), name, fill=0)
        for c, i in enumerate(idx.tolist()):
            arr = ((imgs[i, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            tile = Image.fromarray(255 - arr).resize((8 * scale, 8 * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + c * cell, y0))
    canvas.save(path)


def _report(m: dict[str, Any]) -> str:
    o = m["options"]
    lines = [
        "# svdq_compile demo: 4-bit digits diffusion",
        "",
        f"Model: class-conditional rectified-flow `FluxTransformer2DModel` (2.3 M parameters) trained on "
        f"scikit-learn digits. {o['samples_per_class'] * 10} samples, {o['steps']} Euler steps, guidance "
        f"{o['guidance']}, same seeds for every variant. Classifier (SVC, real digits) held-out accuracy: "
        f"{m['classifier_heldout_accuracy']:.3f}.",
        "",
        "| variant | accuracy | PSNR vs fp32 (dB) | SSIM vs fp32 | transformer bytes | s / step |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in m["variants"].items():
        ps = "-" if r.get("psnr_db") is None else f"{r['psnr_db']:.2f}"
        ss = "-" if r.get("ssim") is None else f"{r['ssim']:.3f}"
        lines.append(f"| {name} | {r['accuracy']:.3f} | {ps} | {ss} | {r['total_bytes']:,} | {r['s_per_step']:.3f} |")
    lines += ["", "![grid](grid.png)", ""]
    return "\n".join(lines)

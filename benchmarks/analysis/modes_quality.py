"""Quality of the quantization modes on our own models (issue 16): ``w4a4`` vs the
per-token ``w4a8-int8`` and ``w4a8-fp8``, same seeds, same calibration, same config
otherwise (explicit ``mode=`` everywhere: the default is ``"auto"``).

- the demo (digits FLUX transformer): sample PSNR / SSIM vs the fp32 samples at rank 32
  and at the proportional rank 4 (docs/design.md section 6), with the demo's own calibration
  recording, sampler and metrics (svdq_compile/demo); fewer samples and steps than
  ``svdq demo`` with ``--quick``;
- the outlier block (svdq_compile/testing/models.py ``AttnMLPBlock``: LayerNorm -> QKV + GELU MLP, 1% of
  activation channels x30): output SQNR of the block's contribution (residual removed) vs
  fp32, as tests/test_backend.py measures it;
- every tiny diffusers pipeline (svdq_compile/testing/tiny_pipelines.py: FLUX, SD3,
  PixArt-Sigma, SDXL; outlier channels injected): the denoiser's output SQNR vs the float
  denoiser on the inputs it receives while generating the evaluation images (prompts
  and seeds distinct from calibration), and the images' PSNR vs the float pipeline.

Each row also keeps the per-layer SQNR the decomposition measured, so a mode that loses
can be traced to the layers where it loses.

    svdq bench --suite modes_quality [--quick] [--param only=demo,block,pipelines]
        [--param pipelines=flux,sd3,pixart_sigma,sdxl]

Takes ~27 min on a busy 2-core CPU (load ~8; the demo at `svdq demo`'s 100 samples x 20
steps is most of it), ~6 min with --quick. ``svdq bench --render FILE.json`` re-renders a
result file's table and markdown (the table and the ordering are recomputed from the rows).
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny pipelines are built locally
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from ..suites.harness import Context, env  # noqa: E402

__all__ = ["run", "to_markdown", "plot", "PARAMS", "DEVICE", "block_sqnr", "reference_run", "quantize_tiny_pipeline",
           "denoiser_sqnr", "table", "failures"]

MODES = ("w4a4", "w4a8-int8", "w4a8-fp8")
PER_TOKEN = ("w4a8-int8", "w4a8-fp8")

# The tiny pipelines: the settings of tests/pipelines/test_diffusers_pipelines.py (rank 4
# is ~3% of their 128-wide layers, FLUX.1's rank 32 is 1% of 3072).
PIPE_HW = 32
PIPE_STEPS = 3
PIPE_RANK = 4
CALIB_PROMPTS = ["a photo of a dog", "a green tree in the city", "a small bird on a flower"]
EVAL_PROMPTS = ["a photo of a cat", "a red house", "an astronaut riding a horse", "a blue car on the road"]
PIPE_NAMES = ("flux", "sd3", "pixart_sigma", "sdxl")
PARTS = ("demo", "block", "pipelines")
DEVICE = "cpu"
PARAMS = {"only": PARTS, "pipelines": PIPE_NAMES}


def _layer_sqnr(layers: list[dict]) -> dict[str, Optional[float]]:
    return {r["name"]: (None if r.get("sqnr_db") is None else round(float(r["sqnr_db"]), 3)) for r in layers}


def _mode_counts(layers: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in layers:
        out[r["mode"]] = out.get(r["mode"], 0) + 1
    return out


# ------------------------------------------------------------------------ outlier block
def block_config(mode: str, rank: int, quick: bool) -> dict[str, Any]:
    """torch.compile options of the outlier-block runs (eager graph: the glue around the
    custom op does not change the quantized numbers)."""
    return {"mode": mode, "rank": rank, "use_inductor": False, "search_grid": 6 if quick else 20}


def block_inputs(seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(evaluation input, calibration batches) of tests/test_backend.py."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 32, 256, generator=g), [torch.randn(4, 32, 256, generator=g)]


def block_sqnr(mode: str, options: dict[str, Any]) -> tuple[float, list[dict]]:
    """Output SQNR (dB) of the quantized outlier block's contribution ``block(x) - x``."""
    import svdq_compile
    from svdq_compile.testing.models import AttnMLPBlock

    m = AttnMLPBlock()
    x, cal = block_inputs()
    with torch.no_grad():
        ref = m(x)
    svdq_compile.calibrate(m, cal, progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(m, backend="svdquant", options={**options, "mode": mode})(x)
    layers = svdq_compile.explain(m, as_dict=True)["layers"]
    torch._dynamo.reset()
    return svdq_compile.sqnr_db(ref - x, y - x), layers


def run_block(quick: bool, log) -> list[dict]:
    rows = []
    for rank in (32, 4):
        for mode in MODES:
            t0 = time.perf_counter()
            sq, layers = block_sqnr(mode, block_config(mode, rank, quick))
            rows.append({"model": "outlier block", "metric": "output SQNR dB", "rank": rank, "mode": mode,
                         "value": sq, "seconds": time.perf_counter() - t0,
                         "layer_modes": _mode_counts(layers), "layer_sqnr_db": _layer_sqnr(layers)})
            log(rows[-1])
    return rows


# ------------------------------------------------------------------------ tiny pipelines
def pipeline_fast(quick: bool) -> dict[str, Any]:
    """Search/calibration sizes: the pipeline tests' short search with --quick, else the defaults."""
    if quick:
        return {"search_grid": 2, "search_tokens": 256, "calib_tokens": 512, "refine_iters": 1}
    return {}


def load_fp_pipeline(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Recorder:
    """Forward hook keeping (args, kwargs, output) of every call of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple] = []
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output) -> None:
        det = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
        tm = torch.utils._pytree.tree_map
        self.calls.append((tm(det, args), tm(det, dict(kwargs)), _flat(output)))


def _flat(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().reshape(-1).double()
    if isinstance(out, (tuple, list)):
        return torch.cat([_flat(o) for o in out])
    if hasattr(out, "sample"):
        return _flat(out.sample)
    raise TypeError(f"cannot compare outputs of type {type(out).__name__}")


def pipeline_images(pipe, name: str, prompts=EVAL_PROMPTS):
    import numpy as np
    from svdq_compile.testing import tiny_pipelines as tp

    out = pipe(list(prompts), num_inference_steps=PIPE_STEPS, height=PIPE_HW, width=PIPE_HW, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in range(len(prompts))], **tp.PIPE_KWARGS[name])
    return np.asarray(out.images)


def image_psnr(ref, x) -> float:
    import numpy as np

    mse = float(np.mean((ref.astype(np.float64) - x.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def reference_run(path: Path, name: str, prompts=EVAL_PROMPTS):
    """Float images and the float denoiser's calls (inputs + outputs) while generating them."""
    from svdq_compile.integrations.diffusers.pipelines import denoiser_name

    pipe = load_fp_pipeline(path)
    rec = _Recorder(getattr(pipe, denoiser_name(pipe)))
    with torch.no_grad():
        images = pipeline_images(pipe, name, prompts)
    rec.handle.remove()
    return images, rec.calls


def quantize_tiny_pipeline(path: Path, name: str, mode: str, rank: int, fast: dict[str, Any],
                           prompts=CALIB_PROMPTS):
    from svdq_compile.testing import tiny_pipelines as tp
    from svdq_compile.integrations.diffusers.pipelines import pipeline_config, quantize_pipeline

    pipe = load_fp_pipeline(path)
    cfg = pipeline_config(mode=mode, rank=rank, **fast)
    quantize_pipeline(pipe, list(prompts), config=cfg, num_inference_steps=PIPE_STEPS, compile=False,
                      progress=False, height=PIPE_HW, width=PIPE_HW, **tp.PIPE_KWARGS[name])
    return pipe


def denoiser_sqnr(pipe, calls: list[tuple]) -> float:
    """SQNR (dB) of the quantized denoiser's outputs vs the float ones, on recorded inputs."""
    from svdq_compile import sqnr_db
    from svdq_compile.integrations.diffusers.pipelines import denoiser_name

    den = getattr(pipe, denoiser_name(pipe))
    refs, outs = [], []
    with torch.no_grad():
        for args, kwargs, ref in calls:
            refs.append(ref)
            outs.append(_flat(den(*args, **kwargs)))
    return sqnr_db(torch.cat(refs), torch.cat(outs))


def run_pipelines(quick: bool, log, names=PIPE_NAMES) -> list[dict]:
    from svdq_compile.testing import tiny_pipelines as tp
    from svdq_compile.integrations.diffusers.pipelines import denoiser_name

    rows = []
    fast = pipeline_fast(quick)
    with tempfile.TemporaryDirectory(prefix="svdq_modes_") as tmp:
        for name in names:
            path = tp.build(name, Path(tmp) / name)
            ref_images, calls = reference_run(path, name)
            for mode in MODES:
                t0 = time.perf_counter()
                pipe = quantize_tiny_pipeline(path, name, mode, PIPE_RANK, fast)
                den_sqnr = denoiser_sqnr(pipe, calls)
                with torch.no_grad():
                    psnr = image_psnr(ref_images, pipeline_images(pipe, name))
                layers = pipe.svdq_reports[denoiser_name(pipe)].layers
                common = {"model": f"tiny {name}", "rank": PIPE_RANK, "mode": mode,
                          "seconds": time.perf_counter() - t0, "layer_modes": _mode_counts(layers)}
                rows.append({**common, "metric": "denoiser output SQNR dB", "value": den_sqnr,
                             "denoiser_calls": len(calls), "layer_sqnr_db": _layer_sqnr(layers)})
                rows.append({**common, "metric": "image PSNR dB", "value": psnr})
                log(rows[-2])
                log(rows[-1])
                del pipe
    return rows


# ------------------------------------------------------------------------ demo
def run_demo(quick: bool, log) -> list[dict]:
    import svdq_compile as sq
    from svdq_compile.demo.classifier import accuracy
    from svdq_compile.demo.metrics import psnr, ssim
    from svdq_compile.demo.model import load_pretrained
    from svdq_compile.demo.run import DemoOptions, _record_calibration_inputs
    from svdq_compile.demo.sampler import sample

    # --quick: 20 samples, 10 steps (as bench_ablation --quick); else `svdq demo`'s sizes.
    opts = DemoOptions(samples_per_class=2, steps=10) if quick else DemoOptions()
    opts = dataclasses.replace(opts, use_inductor=False, progress=False)
    labels = torch.arange(10).repeat_interleave(opts.samples_per_class)
    base = load_pretrained()
    calib_items = _record_calibration_inputs(base, opts)
    with torch.no_grad():
        ref = sample(base, labels, steps=opts.steps, guidance=opts.guidance, seed=opts.seed, progress=False)
    rows = []
    for rank in (32, 4):
        for mode in MODES:
            t0 = time.perf_counter()
            model = load_pretrained()
            cfg = {"mode": mode, "rank": rank, "search_grid": opts.search_grid, "use_inductor": opts.use_inductor}
            sq.calibrate(model, calib_items, sq.SVDQuantConfig.from_options(cfg), progress=False)
            torch._dynamo.reset()
            fn = torch.compile(model, backend="svdquant", options=cfg)
            with torch.no_grad():
                imgs = sample(fn, labels, steps=opts.steps, guidance=opts.guidance, seed=opts.seed, progress=False)
            layers = sq.explain(model, as_dict=True)["layers"]
            rows.append({"model": "demo", "metric": "sample PSNR dB", "rank": rank, "mode": mode,
                         "value": psnr(imgs, ref), "ssim": ssim(imgs, ref), "accuracy": accuracy(imgs, labels),
                         "seconds": time.perf_counter() - t0, "samples": len(labels), "steps": opts.steps,
                         "layer_modes": _mode_counts(layers), "layer_sqnr_db": _layer_sqnr(layers)})
            log(rows[-1])
            torch._dynamo.reset()
    return rows


# ------------------------------------------------------------------------ report
def table(rows: list[dict]) -> list[dict]:
    """One entry per (model, metric, rank): the value of each mode and the orderings."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["metric"], r["rank"])
        e = out.setdefault(key, {"model": r["model"], "metric": r["metric"], "rank": r["rank"], "values": {}})
        e["values"][r["mode"]] = r["value"]
        if "ssim" in r:
            e.setdefault("ssim", {})[r["mode"]] = r["ssim"]
    for e in out.values():
        v = e["values"]
        e["holds"] = {m: (v[m] >= v["w4a4"]) for m in PER_TOKEN if m in v and "w4a4" in v}
        e["delta_db"] = {m: v[m] - v["w4a4"] for m in PER_TOKEN if m in v and "w4a4" in v}
        if "ssim" in e:
            s = e["ssim"]
            e["ssim_holds"] = {m: (s[m] >= s["w4a4"]) for m in PER_TOKEN if m in s and "w4a4" in s}
    return list(out.values())


def failures(tab: list[dict]) -> list[str]:
    """Rows where a per-token mode scores below w4a4 (the main metric, and the demo's SSIM)."""
    out = [f"{e['model']} {e['metric']} rank {e['rank']}: {k} {e['values'][k]:.2f} < w4a4 {e['values']['w4a4']:.2f}"
           for e in tab for k, ok in e["holds"].items() if not ok]
    out += [f"{e['model']} SSIM rank {e['rank']}: {k} {e['ssim'][k]:.4f} < w4a4 {e['ssim']['w4a4']:.4f}"
            for e in tab for k, ok in e.get("ssim_holds", {}).items() if not ok]
    return out


def to_markdown(payload: dict) -> str:
    from ..suites.report import footer, header

    tab = table(payload["rows"])
    lines = header(payload, "Quality of the quantization modes (issue 16)") + [
        f"`svdq bench --suite modes_quality{' --quick' if payload['quick'] else ''}`, "
        f"{payload['elapsed_s']:.0f} s. "
        "Same seeds, calibration and config in every column; only `mode` changes. "
        "Higher is better; delta = mode minus w4a4.",
        "",
        "| model | metric | rank | w4a4 | w4a8-int8 | w4a8-fp8 | int8 - w4a4 | fp8 - w4a4 | >= w4a4 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in tab:
        v, d, h = e["values"], e["delta_db"], e["holds"]
        f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        ok = " / ".join(("yes" if h[k] else "**NO**") for k in PER_TOKEN if k in h)
        lines.append(f"| {e['model']} | {e['metric']} | {e['rank']} | {f(v.get('w4a4'))} | {f(v.get('w4a8-int8'))} | "
                     f"{f(v.get('w4a8-fp8'))} | {d.get('w4a8-int8', 0):+.2f} | {d.get('w4a8-fp8', 0):+.2f} | {ok} |")
    ss = [e for e in tab if "ssim" in e]
    if ss:
        lines += ["", "Demo SSIM vs fp32 (same samples):", "",
                  "| rank | w4a4 | w4a8-int8 | w4a8-fp8 | >= w4a4 |", "|---|---|---|---|---|"]
        for e in ss:
            s, h = e["ssim"], e.get("ssim_holds", {})
            ok = " / ".join(("yes" if h[k] else "**NO**") for k in PER_TOKEN if k in h)
            lines.append(f"| {e['rank']} | " + " | ".join(f"{s[k]:.4f}" if k in s else "-" for k in MODES)
                         + f" | {ok} |")
    lines += ["", "Setup:", ""] + [f"- {s}" for s in payload["setup"]]
    return "\n".join(lines + footer(payload)) + "\n"


def plot(p: dict, path: Path) -> bool:
    from ..suites.report import bar_chart

    tab = [e for e in table(p["rows"]) if "dB" in e["metric"]]
    cases = [f"{e['model']} {e['metric'].replace(' dB', '')} r{e['rank']}" for e in tab]
    return bar_chart(path, cases, {m: [e["values"].get(m) for e in tab] for m in MODES},
                     title="quality by mode (higher is better)", ylabel="dB", hlines=())


def setup_lines(quick: bool) -> list[str]:
    from svdq_compile.demo.run import DemoOptions

    d = DemoOptions(samples_per_class=2, steps=10) if quick else DemoOptions()
    return [
        f"demo: {d.samples_per_class * 10} samples, {d.steps} Euler steps, guidance {d.guidance}, seed {d.seed}; "
        f"calibration on {d.calib_samples} fp32 trajectories (the demo's own recording), search_grid "
        f"{d.search_grid}; torch.compile(backend='svdquant') with use_inductor=False; PSNR/SSIM with "
        "svdq_compile.demo.metrics" + (" (fewer samples and steps than `svdq demo`'s 100 x 20)" if quick else ""),
        f"outlier block: svdq_compile/testing/models.py AttnMLPBlock (dim 256, MLP 512, 1% of channels x30), "
        f"calibration 4x32 tokens, evaluation 2x32 tokens (tests/test_backend.py), search_grid "
        f"{6 if quick else 20}; SQNR of block(x) - x",
        f"tiny pipelines: svdq_compile/testing/tiny_pipelines.py, {PIPE_HW}x{PIPE_HW}, {PIPE_STEPS} steps, rank "
        f"{PIPE_RANK}, pipeline_config() (AdaLN modulation W4A16 in every column), "
        f"{len(CALIB_PROMPTS)} calibration prompts; "
        + ("the pipeline tests' short search " + str(pipeline_fast(True)) if quick else "default search")
        + f"; evaluated on {len(EVAL_PROMPTS)} other prompts (seeds 0-3): denoiser SQNR over every "
          "denoiser call of that generation, image PSNR vs the float pipeline",
    ]


def run(ctx: Context, tqdm: Any) -> None:
    parts = [p for p in ctx.params["only"] if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"only: unknown parts {bad}; choose from {PARTS}")
    bar = tqdm(desc="modes_quality", disable=not ctx.progress)

    def log(r):
        ctx.record({"case": f"{r['model']} / {r['metric']} / rank {r['rank']} / {r['mode']}", **r})
        bar.set_postfix_str(f"{r['model']} {r['mode']} rank {r['rank']}: {r['value']:.2f}")
        bar.update(1)

    ctx.extra.update(parts=parts, modes=list(MODES), setup=setup_lines(ctx.quick))
    with env("TQDM_DISABLE", "1"):  # the backend's per-layer progress bars
        if "block" in parts:
            run_block(ctx.quick, log)
        if "pipelines" in parts:
            run_pipelines(ctx.quick, log, list(ctx.params["pipelines"]))
        if "demo" in parts:
            run_demo(ctx.quick, log)
    bar.close()
    ctx.extra["table"] = table(ctx.rows)
    fails = failures(ctx.extra["table"])
    for note in ([f"ordering does NOT hold: {f}" for f in fails] if fails
                 else ["w4a8-int8 >= w4a4 and w4a8-fp8 >= w4a4 in every row"]):
        ctx.note(note)

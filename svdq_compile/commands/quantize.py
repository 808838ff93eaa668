"""``svdq quantize``: calibrate and quantize a local diffusers pipeline, save it.

    svdq quantize /models/FLUX.1-dev --prompts prompts.txt --out flux-svdq --steps 20
    svdq quantize ./sdxl --prompts p.txt --out sdxl-svdq --rank 16 --height 512 --width 512
    svdq quantize ./pixart --prompts p.txt --out px-q --set use_resolution_binning=false

PIPELINE_DIR is loaded with ``DiffusionPipeline.from_pretrained`` (local files only,
nothing is downloaded). The prompts file has one prompt per line (blank lines and
lines starting with ``#`` are ignored); each prompt is one calibration run of the
pipeline's own denoising loop. ``--option KEY=VALUE`` sets any ``SVDQuantConfig``
field, ``--set KEY=VALUE`` passes an extra argument to the pipeline call (values are
JSON: ``16``, ``false``, ``'["*embed*"]'``; anything else is a string). The output
directory is read by ``svdq generate`` and ``svdq_compile.load_pipeline``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_pairs(pairs: Optional[Sequence[str]], flag: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (values parsed as JSON when they parse)."""
    out: dict[str, Any] = {}
    for item in pairs or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def read_prompts(path: str) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} contains no prompts (one per line)")
    return prompts


def load_pipeline_dir(path: str, dtype: Optional[str], device: Optional[str]) -> Any:
    """A local pipeline directory, offline."""
    import torch
    from diffusers import DiffusionPipeline

    if not Path(path, "model_index.json").is_file():
        raise ValueError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype:
        kwargs["torch_dtype"] = getattr(torch, DTYPES[dtype])
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    if device:
        pipe.to(device)
    return pipe


def add_common(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``quantize`` and ``generate``."""
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="extra pipeline call argument, e.g. max_sequence_length=256 (repeatable)")
    p.add_argument("--device", default=None, help="torch device for the pipeline, e.g. cuda (default: as loaded)")


def call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = parse_pairs(args.set, "--set")
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return kw


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("quantize", help="quantize a local diffusers pipeline (SVDQuant) and save it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", metavar="PIPELINE_DIR", help="local diffusers pipeline directory")
    p.add_argument("--prompts", required=True, metavar="FILE", help="calibration prompts, one per line")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory of the quantized pipeline")
    add_common(p)
    p.add_argument("--rank", type=int, default=None, help="low-rank branch rank (default 32)")
    p.add_argument("--mode", default=None, help="auto (default: per device, see the README's Choosing a mode), "
                   "w4a4 (the paper's numerics), w4a8-int8, w4a8-fp8, w4a8, w8a8, w4a16 or w8a16")
    p.add_argument("--text-encoders", action="store_true", help="also quantize the text encoders' linears")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", default=[],
                   help="SVDQuantConfig field, e.g. search_grid=10 (repeatable)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="load the pipeline in this dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the first calibration prompt (default 0)")
    p.set_defaults(command="quantize")
    return p


def run(args: argparse.Namespace) -> int:
    from svdq_compile.integrations.diffusers.pipelines import pipeline_config, quantize_pipeline, save_pipeline

    options = parse_pairs(args.option, "--option")
    if args.rank is not None:
        options["rank"] = args.rank
    if args.mode is not None:
        options["mode"] = args.mode
    config = pipeline_config(**options)
    prompts = read_prompts(args.prompts)
    t0 = time.perf_counter()
    pipe = load_pipeline_dir(args.pipeline, args.dtype, args.device)
    pipe.set_progress_bar_config(disable=True)
    quantize_pipeline(pipe, prompts, config=config, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                      quantize_text_encoders=args.text_encoders, compile=False, seed=args.seed,
                      progress=args.verbose, **call_kwargs(args))
    save_pipeline(pipe, args.out)
    for name, report in pipe.svdq_reports.items():
        fp = sum(layer["fp_bytes"] for layer in report.layers)
        q = sum(layer["bytes"] for layer in report.layers)
        print(f"{name}: {report.rewritten} linears quantized ({len(report.skipped)} kept in float), "
              f"{fp / 2**20:.1f} MiB -> {q / 2**20:.1f} MiB")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0

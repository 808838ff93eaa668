"""``svdq generate``: one image from a pipeline directory.

    svdq generate flux-svdq --prompt "a cat in a hat" --seed 0 --steps 20 --out cat.png

DIR is a quantized pipeline written by ``svdq quantize`` / ``svdq_compile.save_pipeline``
(its denoiser is compiled with the ``svdquant`` backend unless ``--no-compile``) or an
ordinary diffusers pipeline directory (run as is, for a 16-bit reference image).
``--option KEY=VALUE`` overrides run-time backend options (e.g. ``use_inductor=false``),
``--set KEY=VALUE`` passes an extra argument to the pipeline call.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from svdq_compile.commands.quantize import DTYPES, add_common, call_kwargs, load_pipeline_dir, parse_pairs


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate an image with a (quantized) pipeline directory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="quantized pipeline (svdq quantize --out) or diffusers pipeline")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (pipelines that take one)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="image.png", help="output image file (default image.png)")
    add_common(p)
    p.add_argument("--no-compile", action="store_true", help="run the quantized denoiser eagerly")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", default=[],
                   help="backend option for torch.compile, e.g. use_inductor=false (repeatable)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the unquantized components (default: as saved)")
    p.set_defaults(command="generate")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from svdq_compile.integrations.diffusers.pipelines import PIPELINE_MANIFEST, load_pipeline

    t0 = time.perf_counter()
    if Path(args.dir, PIPELINE_MANIFEST).is_file():
        kwargs: dict[str, Any] = {"local_files_only": True}
        if args.dtype:
            kwargs["torch_dtype"] = getattr(torch, DTYPES[args.dtype])
        pipe = load_pipeline(args.dir, compile=not args.no_compile, device=args.device,
                             compile_options=parse_pairs(args.option, "--option"), **kwargs)
    else:
        pipe = load_pipeline_dir(args.dir, args.dtype, args.device)
    pipe.set_progress_bar_config(disable=not args.verbose)
    kw = call_kwargs(args)
    if args.steps is not None:
        kw["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    if args.negative_prompt is not None:
        kw["negative_prompt"] = args.negative_prompt
    device = getattr(pipe, "_execution_device", None) or torch.device("cpu")
    t1 = time.perf_counter()
    image = pipe(prompt=args.prompt, generator=torch.Generator(device).manual_seed(args.seed), **kw).images[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({image.width}x{image.height}) in {time.perf_counter() - t1:.1f}s "
          f"(load {t1 - t0:.1f}s)")
    return 0

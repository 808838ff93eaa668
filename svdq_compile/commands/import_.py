"""``svdq import``: a Nunchaku checkpoint + a diffusers pipeline -> our quantized pipeline directory.

    svdq import svdq-int4_r32-flux.1-dev.safetensors --base /models/FLUX.1-dev --out flux-nunchaku
    svdq generate flux-nunchaku --prompt "a cat holding a sign" --out cat.png

PATH is a Nunchaku svdq-int4 / svdq-fp4 checkpoint: a merged ``.safetensors`` file or a
legacy folder (``transformer_blocks.safetensors`` + ``unquantized_layers.safetensors``).
The transformer is built from the checkpoint's config (or the base pipeline's when the
checkpoint has none) without its float weights; the other components (VAE, text encoders,
scheduler, tokenizers) come from PIPELINE_DIR (its transformer weights are never read).
``--mode`` re-targets the INT4 layers (``w4a8-fp8``, ``w4a8-int8``, ``w4a4``); by default
they keep Nunchaku's numerics. The output is what ``svdq quantize`` writes: ``svdq
generate`` and ``svdq_compile.load_pipeline`` read it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from svdq_compile.commands.quantize import DTYPES


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from svdq_compile.integrations.nunchaku.loader import RETARGET_MODES

    p = sub.add_parser("import", help="import a Nunchaku checkpoint (svdq-int4 / svdq-fp4) into a pipeline directory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", help="Nunchaku checkpoint: merged .safetensors file or legacy folder")
    p.add_argument("--base", required=True, metavar="PIPELINE_DIR",
                   help="local diffusers pipeline of the same model (VAE, text encoders, scheduler)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (our quantized pipeline format)")
    p.add_argument("--mode", choices=RETARGET_MODES, default=None,
                   help="re-target the INT4 layers to one of our modes (default: Nunchaku's own numerics)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the unquantized parts (default: the checkpoint's)")
    p.set_defaults(command="import_")
    return p


def run(args: argparse.Namespace) -> int:
    import torch
    from diffusers import DiffusionPipeline

    from svdq_compile.integrations.diffusers.pipelines import save_pipeline
    from svdq_compile.integrations.nunchaku.checkpoint import read_checkpoint
    from svdq_compile.integrations.nunchaku.loader import _build_from, load_nunchaku

    t0 = time.perf_counter()
    base = Path(args.base)
    if not (base / "model_index.json").is_file():
        raise SystemExit(f"svdq import: {base} is not a diffusers pipeline directory (no model_index.json)")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    ck = read_checkpoint(args.path)
    if ck.config is None and (base / "transformer" / "config.json").is_file():
        import json

        ck.config = json.loads((base / "transformer" / "config.json").read_text())
    model = _build_from(ck, dtype)
    load_nunchaku(model, ck, mode=args.mode)
    kwargs: dict[str, Any] = {"local_files_only": True, "transformer": model}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = DiffusionPipeline.from_pretrained(str(base), **kwargs)
    save_pipeline(pipe, args.out)
    info = model.svdq_nunchaku
    print(f"imported {args.path} ({info['precision']}, mode {info['mode']}) into {args.out} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0

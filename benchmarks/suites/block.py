"""Suite ``block``: one FLUX.1 double-stream and one single-stream block (diffusers),
random seeded weights, eager vs compiled vs quantized.

Ours: ``svdq_compile.quantize`` (calibrated on two random inputs) then
``torch.compile(block, backend="svdquant", options={"use_inductor": True})``; the
same quantized module called eagerly is reported as "ours W4A4 no-compile".
Default config: AdaLN modulation linears (``norm*.linear``, M = batch) are W4A16.
"""
from __future__ import annotations

import time
from typing import Any

from .baselines import BUILDERS, MIN_TIME_LEFT_S, Unavailable, build_ours_quantized, ours_modes_for
from .flux import FULL, REDUCED, block_inputs, fast_svd, make_block
from .harness import Context, reset_compiler, run_case

__all__ = ["run", "plan"]


def plan(ctx: Context) -> tuple[Any, list[tuple[int, int]], list[str]]:
    """(dims, [(image tokens, text tokens)], notes)."""
    if ctx.device == "cuda":
        return FULL, [(4096, 512), (768, 256)], ["GPU: real FLUX.1 dims, 4096+512 and 768+256 (image+text) tokens"]
    if ctx.quick or ctx.smoke:
        return REDUCED, [(128, 32)], [
            f"--quick on CPU: the real-size FLUX block is skipped; FLUX-architecture block of reduced width "
            f"({REDUCED.label}), 128 image + 32 text tokens"]
    return FULL, [(512, 64)], ["CPU: real FLUX.1 dims, 512 image + 64 text tokens (GPU runs use 4096+512)"]


def run(ctx: Context, tqdm: Any) -> None:
    dims, token_cases, notes = plan(ctx)
    for n in notes:
        ctx.note(n)
    ctx.note(f"blocks: {dims.label}; ours quantized with alpha=0.5, no refinement, randomized SVD for layers "
             "wider than 1024 (speed and bytes do not depend on these); AdaLN modulation linears W4A16 "
             "(default config)")
    base_keys = ["eager", "inductor", "torchao_int8", "torchao_int4", "bnb_nf4"]
    ours_keys = ["ours_w4a4", "ours_w4a4_eager", "ours_w4a8-int8", "ours_w4a8-fp8", "ours_w4a8", "ours_w8a8"]
    active = ours_modes_for(ctx)
    keys = [k for k in base_keys + ours_keys if ctx.wants(k)]
    cases = [(kind, img, txt) for img, txt in token_cases for kind in ("double", "single")]
    bar = tqdm(total=len(cases) * len(keys), desc=f"bench block ({ctx.device})", disable=not ctx.progress)
    blocks: dict[str, Any] = {}
    prepared: dict[tuple[str, str], Any] = {}  # (block kind, method key) -> module or exception
    quantize_s: dict[tuple[str, str], float] = {}  # (block kind, mode) -> seconds
    for kind, img, txt in cases:
        if kind not in blocks:
            blocks[kind] = make_block(kind, dims, ctx.device, ctx.dtype, seed=0 if kind == "double" else 1)
        block = blocks[kind]
        example = block_inputs(dims, img, txt, ctx.device, ctx.dtype, seed=0)
        # Quantize every wanted mode first: quantize() resets Dynamo, which would throw
        # away (and re-trigger) compilations of the methods built before it.
        for mode in active:
            if not any(k.startswith(f"ours_{mode}") for k in keys) or (kind, mode) in prepared or ctx.out_of_time():
                continue
            calib = [block_inputs(dims, img, txt, ctx.device, ctx.dtype, seed=s) for s in (1, 2)]
            t0 = time.perf_counter()
            try:
                with fast_svd():
                    prepared[(kind, mode)] = build_ours_quantized(block, mode, example, calib)[0]
            except Exception as e:  # noqa: BLE001 - reported as n/a for this mode
                prepared[(kind, mode)] = e
            quantize_s[(kind, mode)] = round(time.perf_counter() - t0, 2)

        def builder(key: str, kind: str = kind, block: Any = block):
            if key.startswith("ours_"):
                if key.split("_")[1] not in active:
                    raise Unavailable("--quick on CPU: see the linear suite")
                got = prepared.get((kind, key.split("_")[1]))
                if got is None:
                    raise Unavailable("skipped: time budget")
                if isinstance(got, Exception):
                    raise got
                return got
            if (kind, key) not in prepared:
                try:
                    prepared[(kind, key)] = BUILDERS[key](block, device=ctx.device)
                except Exception as e:  # noqa: BLE001
                    prepared[(kind, key)] = e
            got = prepared[(kind, key)]
            if isinstance(got, Exception):
                raise got
            return got

        case = {"case": f"{kind} {img}+{txt} tok", "block": kind, "image_tokens": img, "text_tokens": txt,
                "hidden": dims.hidden, "reduced_width": dims is not FULL}
        run_case(ctx, case, {k: (lambda k=k, b=builder: b(k)) for k in keys},
                 lambda fn, x=example: fn(*x), bar=bar,
                 extra={f"ours_{m}": {"quantize_s": s} for (k, m), s in quantize_s.items() if k == kind},
                 min_time_left=MIN_TIME_LEFT_S)
        reset_compiler()
    bar.close()

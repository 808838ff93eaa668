"""Suite ``model``: whole models end to end.

- the demo model (``svdq_compile.demo.model.load_pretrained()``: a trained 2.3M-parameter
  FLUX-architecture digits generator, forward ``model(x [B,16,4], t [B], labels [B])``);
- a tiny diffusers ``FluxTransformer2DModel`` (random seeded weights).

Ours: ``svdq_compile.quantize`` then ``torch.compile(backend="svdquant")``. Both models
are tiny (layers 128-256 wide): launch and Python overheads weigh more than in FLUX.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn as nn

from .baselines import BUILDERS, MIN_TIME_LEFT_S, OURS_MODES, Unavailable, build_ours_quantized, ours_modes_for
from .harness import Context, reset_compiler, run_case

__all__ = ["run", "tiny_flux", "tiny_flux_inputs", "demo_inputs"]

TINY_FLUX = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
                 attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256,
                 pooled_projection_dim=128, guidance_embeds=False, axes_dims_rope=(16, 24, 24))


def demo_inputs(batch: int, device: str, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 4, generator=g)
    t = torch.rand(batch, generator=g)
    labels = torch.randint(0, 11, (batch,), generator=g)
    return x.to(device), t.to(device), labels.to(device)


def tiny_flux(device: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = FluxTransformer2DModel(**TINY_FLUX)
    return m.to(device, dtype).eval().requires_grad_(False)


def tiny_flux_inputs(img: int, txt: int, device: str, dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = int(img**0.5)
    r = torch.arange(img)
    img_ids = torch.stack([torch.zeros(img), (r // side).float(), (r % side).float()], -1)
    return dict(
        hidden_states=torch.randn(1, img, TINY_FLUX["in_channels"], generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, txt, TINY_FLUX["joint_attention_dim"], generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, TINY_FLUX["pooled_projection_dim"], generator=g).to(device, dtype),
        timestep=torch.rand(1, generator=g).to(device, dtype),
        img_ids=img_ids.to(device),
        txt_ids=torch.zeros(txt, 3).to(device),
        return_dict=False,
    )


def _case(ctx: Context, name: str, model: nn.Module, example: Any, calib: list, call: Callable, case: dict,
          bar: Any, kwargs: bool) -> None:
    keys = [k for k in ["eager", "inductor", "torchao_int8", "torchao_int4", "bnb_nf4"]
            + [f"ours_{m}" for m in OURS_MODES] + ["ours_w4a4_eager"] if ctx.wants(k)]
    active = ours_modes_for(ctx)
    prepared: dict[str, Any] = {}
    quantize_s: dict[str, float] = {}
    for mode in active:  # quantize first (quantize() resets Dynamo)
        if not any(k.startswith(f"ours_{mode}") for k in keys) or ctx.out_of_time():
            continue
        t0 = time.perf_counter()
        try:
            if kwargs:
                q, _ = build_ours_quantized(model, mode, (), calib, example_kwargs=example)
            else:
                q, _ = build_ours_quantized(model, mode, example, calib)
            prepared[mode] = q
        except Exception as e:  # noqa: BLE001
            prepared[mode] = e
        quantize_s[mode] = round(time.perf_counter() - t0, 2)

    def build(key: str):
        if key.startswith("ours_"):
            if key.split("_")[1] not in active:
                raise Unavailable("--quick on CPU: see the linear suite")
            got = prepared.get(key.split("_")[1])
            if got is None:
                raise Unavailable("skipped: time budget")
            if isinstance(got, Exception):
                raise got
            return got
        return BUILDERS[key](model, device=ctx.device)

    run_case(ctx, {"case": name, **case}, {k: (lambda k=k: build(k)) for k in keys}, call, bar=bar,
             extra={f"ours_{m}": {"quantize_s": s} for m, s in quantize_s.items()},
                 min_time_left=MIN_TIME_LEFT_S)
    reset_compiler()


def run(ctx: Context, tqdm: Any) -> None:
    from svdq_compile.demo.model import load_pretrained

    n_keys = 9
    n_cases = 1 if ctx.quick and ctx.device == "cpu" else 2
    bar = tqdm(total=n_cases * n_keys, desc=f"bench model ({ctx.device})", disable=not ctx.progress)
    batch = 256 if ctx.device == "cuda" else (32 if ctx.quick or ctx.smoke else 128)
    demo = load_pretrained(device=ctx.device, dtype=ctx.dtype)
    ex = demo_inputs(batch, ctx.device, 0)
    calib = [demo_inputs(batch, ctx.device, s) for s in (1, 2)]
    ctx.note(f"demo model: batch {batch} x 16 tokens (+1 class token); random x_t, t, labels; "
             "ours quantized with alpha=0.5, no refinement")
    _case(ctx, f"demo digits B={batch}", demo, ex, calib, lambda fn: fn(*ex),
          {"model": "demo (digits FLUX, 2.3M)", "batch": batch, "tokens": 17}, bar, kwargs=False)
    del demo

    if ctx.quick and ctx.device == "cpu":
        ctx.note("--quick on CPU: the tiny diffusers FluxTransformer2DModel is not run (compile time)")
        bar.close()
        return
    img, txt = (1024, 128) if ctx.device == "cuda" else (256, 32)
    flux = tiny_flux(ctx.device, ctx.dtype)
    params = sum(p.numel() for p in flux.parameters())
    ex2 = tiny_flux_inputs(img, txt, ctx.device, ctx.dtype, 0)
    calib2 = [tiny_flux_inputs(img, txt, ctx.device, ctx.dtype, s) for s in (1, 2)]
    ctx.note(f"tiny FluxTransformer2DModel: {TINY_FLUX['num_layers']} double + {TINY_FLUX['num_single_layers']} "
             f"single blocks, hidden {TINY_FLUX['num_attention_heads'] * TINY_FLUX['attention_head_dim']}, "
             f"{params / 1e6:.1f}M params, {img} image + {txt} text tokens; embedders / proj_out stay float")
    _case(ctx, f"tiny FLUX {img}+{txt} tok", flux, ex2, calib2, lambda fn: fn(**ex2),
          {"model": f"tiny FluxTransformer2DModel ({params / 1e6:.1f}M)", "batch": 1, "tokens": img + txt},
          bar, kwargs=True)
    bar.close()

"""Suite ``linear``: one linear layer of real diffusion-model shapes, eager vs quantized.

Shapes are ``K x N`` = in_features x out_features (the layer computes ``[M, K] -> [M, N]``),
M = tokens. Our layers are built directly (random weight with a random smoothing
vector and rank-32 branch, RTN-quantized residual): speed does not depend on how the
factors were found, and a full SVD of each FLUX-sized matrix would dominate the run.
Ours is the ``svdq::linear`` op called eagerly (one fused op; on GPU the Triton kernels).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .baselines import BUILDERS, OURS_MODES
from .harness import Context, reset_compiler, run_case

__all__ = ["SHAPES", "run", "shapes_for"]

RANK, GROUP = 32, 64

# (model, K = in_features, N = out_features)
SHAPES = (
    ("FLUX", 3072, 3072), ("FLUX", 3072, 12288), ("FLUX", 12288, 3072), ("FLUX", 15360, 3072),
    ("SD3", 1536, 1536), ("SD3", 1536, 6144),
    ("PixArt-Sigma", 1152, 1152), ("PixArt-Sigma", 1152, 4608),
    ("SDXL", 640, 640), ("SDXL", 1280, 1280), ("SDXL", 1280, 5120),
)
# --quick on CPU: one shape per model family (the others are listed as not run).
QUICK_CPU = (("FLUX", 3072, 3072), ("SD3", 1536, 6144), ("PixArt-Sigma", 1152, 4608), ("SDXL", 1280, 5120))
SMOKE = (("smoke", 256, 256),)


def shapes_for(ctx: Context) -> tuple[tuple, tuple[int, ...]]:
    """(shapes, token counts) for this run."""
    if ctx.smoke:
        return SMOKE, (32,)
    if ctx.device == "cuda":
        # One short GPU session: FLUX shapes only (the others are all smaller).
        return tuple(s for s in SHAPES if s[0] == "FLUX"), (4608, 1024)
    if ctx.quick:
        return QUICK_CPU, (256,)
    return SHAPES, (256, 1024)


def synthetic_svdq_linear(layer: nn.Linear, mode: str, gen: torch.Generator) -> nn.Module:
    """An SVDQLinear approximating ``layer`` (same shape, same output up to quantization error).

    Random smoothing vector and random rank-32 factors (not an SVD: speed does not depend
    on them), the residual ``W * smooth - up @ down`` quantized round-to-nearest, so the
    output SQNR against the float layer checks the kernels end to end.
    """
    from svdq_compile import SVDQLinear
    from svdq_compile.quant.decompose import LayerTarget, _quant_residual
    from svdq_compile.runtime.modes import get_mode
    from svdq_compile.runtime.packed import LinearSpec, PackedLinear

    qmode = get_mode(mode)
    wbits, abits, scheme = qmode.weight_bits, qmode.act_bits, qmode.scheme
    n, k = layer.weight.shape
    dtype, device = layer.weight.dtype, layer.weight.device
    w = layer.weight.detach().float().cpu()
    smooth = torch.rand(k, generator=gen) + 0.5
    w_s = w * smooth
    down = (torch.randn(RANK, k, generator=gen) * w_s.std() / k**0.25).to(dtype)
    up = (torch.randn(n, RANK, generator=gen) / (RANK**0.5 * k**0.25)).to(dtype)
    fields, _ = _quant_residual(w_s - up.float() @ down.float(),
                                LayerTarget(wbits, abits, GROUP, RANK, scheme=scheme))
    spec = LinearSpec(in_features=k, out_features=n, group_size=GROUP, weight_bits=wbits, act_bits=abits, rank=RANK,
                      scheme=scheme)
    bias = None if layer.bias is None else layer.bias.detach().cpu()
    p = PackedLinear(spec, smooth=smooth, lora_down=down, lora_up=up, bias=bias, **fields)
    return SVDQLinear(p, f"bench_{k}x{n}").to(device)


def run(ctx: Context, tqdm: Any) -> None:
    shapes, tokens = shapes_for(ctx)
    if ctx.quick and ctx.device == "cpu" and not ctx.smoke:
        skipped = [f"{m} {k}x{n}" for m, k, n in SHAPES if (m, k, n) not in QUICK_CPU]
        ctx.note(f"--quick on CPU: M=256 and one shape per model; not run: {', '.join(skipped)}")
    if ctx.device == "cuda" and not ctx.smoke:
        ctx.note("GPU: the four FLUX shapes at M=4608 and 1024 (one short session)")
    ctx.note("shapes are K x N (in_features x out_features), M = tokens")
    for mode in OURS_MODES:
        ctx.extra.setdefault("method_docs", {})[f"ours_{mode}"] = (
            f"SVDQLinear ({mode}, group {GROUP}, rank-{RANK} branch, smoothing vector, bias) called eagerly: one "
            "svdq::linear op (CPU: C++ int kernels; GPU: Triton); residual of the float layer quantized "
            "round-to-nearest, random smoothing/low-rank factors")
    keys = ["eager", "inductor", "torchao_int8", "torchao_int4", "bnb_nf4"] + [f"ours_{m}" for m in OURS_MODES]
    n_methods = len([k for k in keys if ctx.wants(k)])
    cases = [(s, m) for m in tokens for s in shapes]  # largest M first (GPU: within the time budget)
    bar = tqdm(total=len(cases) * n_methods, desc=f"bench linear ({ctx.device})", disable=not ctx.progress)
    gen = torch.Generator().manual_seed(0)
    for (model, k, n), m in cases:
        layer = nn.Linear(k, n).to(ctx.device, ctx.dtype).eval().requires_grad_(False)
        x = torch.randn(m, k, generator=gen).to(ctx.device, ctx.dtype)
        builders = {key: (lambda key=key: BUILDERS[key](layer, device=ctx.device)) for key in keys[:5]}
        for mode in OURS_MODES:
            builders[f"ours_{mode}"] = (lambda mode=mode: synthetic_svdq_linear(layer, mode, gen))
        case = {"case": f"{model} {k}x{n} M={m}", "model": model, "K": k, "N": n, "M": m,
                "gflop": round(2 * m * k * n / 1e9, 3)}
        run_case(ctx, case, builders, lambda fn: fn(x), bar=bar)
        del layer, x, builders
        reset_compiler()
    bar.close()

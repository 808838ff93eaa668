"""Smoothing search for a group of linears that read the same tensor (shared lambda).

Objective (docs/design.md section 1): the output MSE of the *fully* quantized layers (low-rank
branch and both quantizers included) on calibration tokens, summed over the group
with each layer's error relative to its output energy.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Optional, Sequence

import torch

from svdq_compile.quant.stats import LayerStats
from svdq_compile.quant.config import SVDQuantConfig
from svdq_compile.quant.decompose import (
    LayerTarget,
    decompose_layer,
    quantized_output,
    search_candidates,
    smoothing_factors,
    sqnr_db,
)
from svdq_compile.runtime.packed import PackedLinear

__all__ = ["quantize_group"]

log = logging.getLogger(__name__)


def _shift_for(stats: LayerStats, lam: Optional[torch.Tensor], target: LayerTarget) -> float:
    """Unsigned inputs: shift so the smallest calibrated value of X' maps to 0."""
    if not target.act_unsigned:
        return 0.0
    mn = stats.minimum.to(lam.device) if lam is not None else stats.minimum
    if lam is not None:
        mn = mn / lam
    lo = float(mn.min()) if torch.isfinite(mn).any() else 0.0
    return max(0.0, -lo)


def _evaluate(
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    lam: Optional[torch.Tensor],
    target: LayerTarget,
    shift: float,
    xs: torch.Tensor,
    refs: Sequence[torch.Tensor],
    seed: int,
) -> tuple[float, list[PackedLinear]]:
    packs, err = [], 0.0
    for w, b, y_ref in zip(weights, biases, refs):
        p = decompose_layer(w, b, lam, target, act_shift=shift, seed=seed, fast=True)
        y = quantized_output(p, xs)
        e = (y.double() - y_ref).pow(2).sum().item() / max(y_ref.pow(2).sum().item(), 1e-30)
        err += e
        packs.append(p)
    return err, packs


@torch.no_grad()
def quantize_group(
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    stats: Optional[LayerStats],
    target: LayerTarget,
    config: SVDQuantConfig,
) -> list[PackedLinear]:
    """Quantize linears sharing one input (one shared lambda). weights: each [N_i, K]."""
    k = weights[0].shape[1]
    if target.qmode.weight_only or not config.smooth or stats is None or stats.seen == 0:
        # Weight-only layers do not quantize activations: smoothing has nothing to trade.
        if stats is None and not target.qmode.weight_only and config.smooth:
            log.warning("no calibration statistics for a layer group; quantizing without smoothing")
        packs = [
            decompose_layer(w, b, None, target, act_shift=0.0, seed=config.seed)
            for w, b in zip(weights, biases)
        ]
        if stats is not None and stats.seen:
            _annotate(packs, weights, biases, stats, config, None)
        return packs

    gen = torch.Generator().manual_seed(config.seed)
    dev = weights[0].device  # statistics live on the CPU; the search runs where the weights are
    xs_all = stats.sample
    if xs_all.shape[0] > config.search_tokens:
        idx = torch.randperm(xs_all.shape[0], generator=gen)[: config.search_tokens]
        xs = xs_all[idx]
    else:
        xs = xs_all
    xs = xs.to(dev)
    # Evaluate candidates on a random subset of output rows: the objective is a sum over
    # output channels, so a subset estimates it at a fraction of the SVD/GEMM cost.
    search_ws, search_bs = [], []
    for w, b in zip(weights, biases):
        if w.shape[0] > config.search_rows:
            rows = torch.randperm(w.shape[0], generator=gen)[: config.search_rows].sort().values.to(dev)
            search_ws.append(w[rows])
            search_bs.append(None if b is None else b[rows])
        else:
            search_ws.append(w)
            search_bs.append(b)
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)  # [K]
    refs = [
        torch.nn.functional.linear(xs.double(), w.double(), None if b is None else b.double())
        for w, b in zip(search_ws, search_bs)
    ]
    if config.alpha is not None:
        cands = [(config.alpha, 1.0 - config.alpha)]
    else:
        cands = search_candidates(config.search_grid)
    search_target = replace(target, refine_iters=0)
    best = (math.inf, None, None)
    for alpha, beta in cands:
        lam = smoothing_factors(stats.absmax.to(dev), w_absmax, alpha, beta)
        shift = _shift_for(stats, lam, target)
        try:
            err, _ = _evaluate(search_ws, search_bs, lam, search_target, shift, xs, refs, config.seed)
        except ValueError as e:  # e.g. W * lambda out of the fp16 scale range: not a candidate
            log.debug("smoothing candidate (%s, %s) skipped: %s", alpha, beta, e)
            continue
        if err < best[0]:
            best = (err, (alpha, beta), lam)
    if best[1] is None:
        raise ValueError("svdquant: no smoothing candidate could be quantized for a layer group "
                         "(weights out of the fp16 scale range?)")
    _, (alpha, beta), lam = best
    shift = _shift_for(stats, lam, target)
    packs = [decompose_layer(w, b, lam, target, act_shift=shift, seed=config.seed) for w, b in zip(weights, biases)]
    for p in packs:
        p.meta.update(alpha=alpha, beta=beta)
    _annotate(packs, weights, biases, stats, config, xs)
    return packs


def _annotate(packs, weights, biases, stats, config, xs) -> None:
    """Record each layer's output SQNR on calibration tokens (for explain())."""
    if xs is None:
        xs = stats.sample[: config.search_tokens].to(weights[0].device)
    if xs.shape[0] == 0:
        return
    for p, w, b in zip(packs, weights, biases):
        ref = torch.nn.functional.linear(xs.double(), w.double(), None if b is None else b.double())
        p.meta["sqnr_db"] = sqnr_db(ref, quantized_output(p, xs))

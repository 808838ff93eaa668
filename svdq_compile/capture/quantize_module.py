"""``svdq_compile.quantize``: quantize a model's linears in place (module swap).

The same planning and decomposition as the backend: a Dynamo capture of the model
finds the linear sites and which ones share an input; each eligible ``nn.Linear``
becomes an :class:`SVDQLinear` and its float weight is released.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from svdq_compile.capture.calibration import calibrate, stats_of
from svdq_compile.quant.config import SVDQuantConfig
from svdq_compile.quant.modules import SVDQLinear
from svdq_compile.passes.pipeline import CompileReport, packed_for

__all__ = ["quantize", "capture_graphs", "quantized_modules"]

log = logging.getLogger(__name__)


def capture_graphs(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: Optional[dict] = None) -> list:
    """Dynamo graphs (with their example inputs) of one forward call, one per graph break."""
    graphs = []

    def capture(gm, ex):
        graphs.append((gm, list(ex)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(*example_inputs, **(example_kwargs or {}))
    torch._dynamo.reset()
    return graphs


def quantize(
    model: nn.Module,
    example_inputs: Sequence[Any],
    calibration_data: Optional[Iterable[Any]] = None,
    config: Optional[SVDQuantConfig] = None,
    example_kwargs: Optional[dict] = None,
    progress: bool = True,
) -> CompileReport:
    """Quantize ``model`` in place; returns a report (layers, skipped, counts).

    ``calibration_data`` (items as for :func:`svdq_compile.calibrate`) is recorded first
    unless statistics already exist (e.g. from :func:`svdq_compile.calibrating` around
    a denoising loop). Float weights of quantized layers are released.
    """
    from svdq_compile.passes.find_linears import find_linear_sites
    from svdq_compile.passes.plan import plan_sites

    cfg = config or SVDQuantConfig()
    if calibration_data is not None:
        calibrate(model, calibration_data, cfg, progress=progress)
    owner = {id(m.weight): (name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = CompileReport()
    swaps: dict[str, SVDQLinear] = {}
    for gm, ex in capture_graphs(model, example_inputs, example_kwargs):
        sites = find_linear_sites(gm, ex)
        report.sites_found += len(sites)
        groups, skipped = plan_sites(sites, cfg)
        report.skipped += skipped
        for g in groups:
            mods = [owner.get(id(s.weight)) for s in g.sites]
            if any(m is None for m in mods):
                for s, m in zip(g.sites, mods):
                    if m is None:
                        report.skipped.append((s.name, "not an nn.Linear module (functional linear)"))
                continue
            stats = stats_of(g.sites[0].weight)
            if stats is None and cfg.smooth and not g.target.qmode.weight_only:
                raise ValueError(
                    f"svdq_compile.quantize: layer {mods[0][0]} has no calibration statistics; pass "
                    "calibration_data or run the model inside svdq_compile.calibrating(model)"
                )
            packs = packed_for([s.weight for s in g.sites], [s.bias for s in g.sites], stats, g.target, cfg)
            for (name, _), p in zip(mods, packs):
                swaps[name] = SVDQLinear(p, name)
    for name, new in swaps.items():
        old = model.get_submodule(name)
        new.to(old.weight.device)
        model.set_submodule(name, new)
        report.layers.append({"name": name, "shape": [new.out_features, new.in_features], "mode": new.spec.label,
                              "alpha": new.meta.get("alpha"), "rank": new.base_rank,
                              "sqnr_db": new.meta.get("sqnr_db"), "bytes": new.packed.nbytes(),
                              "fp_bytes": old.weight.numel() * old.weight.element_size()})
    report.rewritten = len(swaps)
    report.passes["quantize_linears"] = len(swaps)
    log.info("svdq_compile.quantize: %d linears quantized, %d kept in float", len(swaps), len(report.skipped))
    return report


def quantized_modules(model: nn.Module) -> dict[str, SVDQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDQLinear)}

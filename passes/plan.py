"""Decide what each linear site becomes: skipped (with a reason) or a quantization target.

Also groups sites that read the same tensor: they share one smoothing vector and,
with ``fuse_siblings``, one activation quantization and one GEMM.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from svdq_compile.quant.config import SVDQuantConfig
from svdq_compile.quant.decompose import LayerTarget
from svdq_compile.quant.auto_mode import resolve_mode

from svdq_compile.passes.find_linears import LinearSite

__all__ = ["SiteGroup", "plan_sites", "nonneg_producer"]

log = logging.getLogger(__name__)

# Producers whose output is non-negative (ReLU) or nearly so (GELU: min -0.17, handled
# with a shift) -> unsigned INT4 doubles the resolution of the positive range.
_NONNEG = {torch.relu, F.relu, torch.ops.aten.relu.default, torch._C._nn.gelu, F.gelu, torch.ops.aten.gelu.default}


@dataclass
class SiteGroup:
    """Linears reading one input node with one target; quantized with a shared lambda."""

    x: fx.Node
    sites: list[LinearSite]
    target: LayerTarget
    names: list[str] = field(default_factory=list)


_DROPOUT = {F.dropout, torch.dropout, torch.ops.aten.dropout.default}


def nonneg_producer(x: fx.Node) -> bool:
    # Look through dropout (identity in inference; diffusers' FeedForward puts one
    # between the GELU and the down projection).
    while x.op == "call_function" and x.target in _DROPOUT and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    return x.op == "call_function" and x.target in _NONNEG


def _match(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _override(name: str, pairs, default):
    for pat, val in pairs:
        if fnmatch.fnmatchcase(name, pat):
            return val
    return default


def plan_sites(sites: list[LinearSite], config: SVDQuantConfig) -> tuple[list[SiteGroup], list[tuple[str, str]]]:
    """Returns (groups to quantize, [(skipped layer name, reason)])."""
    skipped: list[tuple[str, str]] = []
    by_key: dict[tuple, SiteGroup] = {}
    for s in sites:
        n, k = s.out_features, s.in_features
        reason = None
        if _match(s.name, config.skip):
            reason = "matches a skip pattern"
        elif k % config.group_size:
            reason = f"in_features {k} is not a multiple of group_size {config.group_size}"
        elif min(n, k) < config.min_features:
            reason = f"too small ({n}x{k} < min_features {config.min_features})"
        elif s.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            reason = f"weight dtype {s.weight.dtype} not supported"
        if reason:
            skipped.append((s.name, reason))
            log.info("svdquant: keeping %s in floating point: %s", s.name, reason)
            continue
        requested = _override(s.name, config.mode_overrides, None)
        why = "mode_overrides" if requested is not None else "mode option"
        mode, why = resolve_mode(config.mode if requested is None else requested, s.weight.device, why)
        rank = int(_override(s.name, config.rank_overrides, config.rank))
        unsigned = bool(config.unsigned_after_act and mode.unsigned_capable and nonneg_producer(s.x))
        target = LayerTarget.of(mode, group_size=config.group_size, rank=rank, act_unsigned=unsigned,
                                refine_iters=config.refine_iters, mode_reason=why)
        # Sites reading the same node share lambda whether or not they are fused later.
        key = (s.x, target)
        g = by_key.get(key)
        if g is None:
            g = by_key[key] = SiteGroup(s.x, [], target)
        g.sites.append(s)
        g.names.append(s.name)
    return list(by_key.values()), skipped

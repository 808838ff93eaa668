"""Streaming calibration statistics: bounded memory however many steps are recorded.

Per linear we keep the per-channel absmax and minimum of its input and a fixed-size
reservoir sample of tokens. Memory is ``calib_tokens * K`` floats per layer whatever
the number of denoising steps, timesteps or guidance branches the user runs.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from svdq_compile.quant.config import SVDQuantConfig
from svdq_compile.quant.stats import _NAME_ATTR, _STATS_ATTR, LayerStats, attach_stats, stats_of

__all__ = ["LayerStats", "calibrate", "calibrating", "stats_of", "clear_calibration"]

log = logging.getLogger(__name__)

def clear_calibration(model: nn.Module) -> None:
    """Drop all statistics attached to the model's linear weights."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and hasattr(m.weight, _STATS_ATTR):
            delattr(m.weight, _STATS_ATTR)


@contextlib.contextmanager
def calibrating(model: nn.Module, config: Optional[SVDQuantConfig] = None) -> Iterator[dict[str, LayerStats]]:
    """Record linear-input statistics for every forward run inside the block.

    Run the *eager* model (not a compiled one) inside, e.g. your whole denoising loop::

        with svdq_compile.calibrating(pipe.transformer):
            pipe(prompts, num_inference_steps=20)

    Yields ``{layer name: LayerStats}``; the statistics also stay attached to the
    weights, where the ``svdquant`` backend finds them at compile time.
    """
    from svdq_compile.capture.calib_share import SharedInputRouter

    cfg = config or SVDQuantConfig()
    stats: dict[str, LayerStats] = {}
    weights: dict[str, torch.Tensor] = {}

    def on_change(name: str, st: LayerStats) -> None:
        stats[name] = st
        attach_stats(weights[name], st)

    # Linears reading the same tensor (q/k/v) share one reservoir: see calib_share.py.
    router = SharedInputRouter(on_change)
    handles = []
    for i, (name, mod) in enumerate(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        st = LayerStats(mod.in_features, cfg.calib_tokens, seed=cfg.seed + i, name=name)
        weights[name] = mod.weight
        attach_stats(mod.weight, st)
        setattr(mod.weight, _NAME_ATTR, name)
        stats[name] = st
        router.add(name, st)

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            router.record(name, args[0])

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        router.flush()
        for h in handles:
            h.remove()
        shared = [g for g in router.groups() if len(g) > 1]
        log.info("calibration recorded %d linear layers (%d groups share an input)", len(stats), len(shared))


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    config: Optional[SVDQuantConfig] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Run ``model`` over ``data`` and record statistics for the backend.

    Each item of ``data`` is passed as ``model(*item)`` for tuples/lists,
    ``model(**item)`` for dicts, ``model(item)`` otherwise, or ``forward(model, item)``.
    """
    from tqdm.auto import tqdm

    items = list(data) if not hasattr(data, "__len__") else data
    with torch.no_grad(), calibrating(model, config) as stats:
        for item in tqdm(items, desc="svdq calibrate", disable=not progress, leave=False):
            if forward is not None:
                forward(model, item)
            elif isinstance(item, dict):
                model(**item)
            elif isinstance(item, (tuple, list)):
                model(*item)
            else:
                model(item)
    missing = [n for n, s in stats.items() if s.seen == 0]
    if missing and len(missing) < len(stats):
        log.info("%d linear layers were never called during calibration (e.g. %s)", len(missing), missing[0])
    if stats and len(missing) == len(stats):
        raise ValueError("calibration ran but no linear layer of the model was called; check the data")
    return stats

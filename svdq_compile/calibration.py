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

from .config import SVDQuantConfig

__all__ = ["LayerStats", "calibrate", "calibrating", "stats_of", "clear_calibration"]

log = logging.getLogger(__name__)

_STATS_ATTR = "_svdq_stats"
_NAME_ATTR = "_svdq_name"


class LayerStats:
    """Running statistics of one linear's input ``x: [..., K]``."""

    def __init__(self, in_features: int, max_tokens: int, seed: int = 0, name: str = "") -> None:
        self.in_features = in_features
        self.max_tokens = max_tokens
        self.name = name
        self.absmax = torch.zeros(in_features)
        self.minimum = torch.full((in_features,), float("inf"))
        self.sample = torch.empty(0, in_features)
        self.seen = 0
        self.calls = 0
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"calibration input of layer {self.name or '?'} has {x.shape[-1]} features, expected {self.in_features}"
            )
        x2 = x.detach().reshape(-1, self.in_features).to("cpu", torch.float32)  # [T, K]
        if x2.shape[0] == 0:
            return
        if not torch.isfinite(x2).all():
            raise ValueError(
                f"calibration input of layer {self.name or '?'} contains NaN or Inf; "
                "check the calibration data and the model's numerics"
            )
        self.calls += 1
        self.absmax = torch.maximum(self.absmax, x2.abs().amax(dim=0))
        self.minimum = torch.minimum(self.minimum, x2.amin(dim=0))
        self._reservoir(x2)

    def _reservoir(self, x2: torch.Tensor) -> None:
        # Vectorised reservoir sampling (algorithm R): token i is kept with p = cap / (i + 1).
        t = x2.shape[0]
        cap = self.max_tokens
        fill = max(0, min(cap - self.sample.shape[0], t))
        if fill:
            self.sample = torch.cat([self.sample, x2[:fill]])
        if fill < t:
            idx = torch.arange(self.seen + fill, self.seen + t)
            slots = (torch.rand(t - fill, generator=self._gen) * (idx + 1).float()).long()
            keep = slots < cap
            if keep.any():
                self.sample[slots[keep]] = x2[fill:][keep]
        self.seen += t

    def nbytes(self) -> int:
        return (self.sample.numel() + self.absmax.numel() + self.minimum.numel()) * 4


def stats_of(weight: torch.Tensor) -> Optional[LayerStats]:
    """Statistics recorded for the linear owning ``weight`` (None if never calibrated)."""
    return getattr(weight, _STATS_ATTR, None)


def attach_stats(weight: torch.Tensor, stats: LayerStats) -> None:
    setattr(weight, _STATS_ATTR, stats)


def layer_name(weight: torch.Tensor) -> Optional[str]:
    return getattr(weight, _NAME_ATTR, None)


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
    cfg = config or SVDQuantConfig()
    stats: dict[str, LayerStats] = {}
    handles = []
    for i, (name, mod) in enumerate(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        st = LayerStats(mod.in_features, cfg.calib_tokens, seed=cfg.seed + i, name=name)
        attach_stats(mod.weight, st)
        setattr(mod.weight, _NAME_ATTR, name)
        stats[name] = st

        def hook(module: nn.Module, args: tuple, st: LayerStats = st) -> None:
            st.update(args[0])

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        log.info("calibration recorded %d linear layers", len(stats))


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

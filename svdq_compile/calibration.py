"""Streaming calibration statistics: bounded memory however many steps are recorded.

Per linear we keep the per-channel absmax and minimum of its input and a fixed-size
reservoir sample of tokens. Memory is ``calib_tokens * K`` floats per layer whatever
the number of denoising steps, timesteps or guidance branches the user runs.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from .config import SVDQuantConfig

__all__ = ["LayerStats", "calibrate", "calibrating", "stats_of", "clear_calibration"]

log = logging.getLogger(__name__)

_STATS_ATTR = "_svdq_stats"
_NAME_ATTR = "_svdq_name"


# Reservoir rows keep the activation dtype when it is 16-bit: the values are exactly what
# the model computed, at half the memory of fp32 copies.
_SAMPLE_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class _Undo:
    """What one :meth:`LayerStats.update` changed, to rebuild the state before it."""

    absmax: torch.Tensor
    minimum: torch.Tensor
    seen: int
    calls: int
    rows: int  # reservoir length before the update
    gen_state: torch.Tensor
    slots: Optional[torch.Tensor] = None  # reservoir rows overwritten ...
    old: Optional[torch.Tensor] = None  # ... and their previous contents


class LayerStats:
    """Running statistics of one linear's input ``x: [..., K]``."""

    def __init__(self, in_features: int, max_tokens: int, seed: int = 0, name: str = "") -> None:
        self.in_features = in_features
        self.max_tokens = max_tokens
        self.name = name
        self.absmax = torch.zeros(in_features)
        self.minimum = torch.full((in_features,), float("inf"))
        self.sample = torch.empty(0, in_features)  # [<= max_tokens, K]
        self.seen = 0
        self.calls = 0
        self._gen = torch.Generator().manual_seed(seed)

    def check_features(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"calibration input of layer {self.name or '?'} has {x.shape[-1]} features, expected {self.in_features}"
            )

    def update(self, x: torch.Tensor, keep_undo: bool = False) -> Optional[_Undo]:
        """Add a batch of inputs; with ``keep_undo`` return what is needed to roll it back."""
        # The statistics must be normal tensors even when recorded under inference_mode:
        # inference tensors cannot be updated in place by a later call outside it.
        with torch.inference_mode(False), torch.no_grad():
            return self._update(x, keep_undo)

    def _update(self, x: torch.Tensor, keep_undo: bool) -> Optional[_Undo]:
        self.check_features(x)
        x2 = x.detach().reshape(-1, self.in_features).to("cpu")  # [T, K]
        if x2.dtype not in _SAMPLE_DTYPES or (self.sample.shape[0] and self.sample.dtype != x2.dtype):
            x2 = x2.float()
        if x2.shape[0] == 0:
            return None
        if not torch.isfinite(x2).all():
            raise ValueError(
                f"calibration input of layer {self.name or '?'} contains NaN or Inf; "
                "check the calibration data and the model's numerics"
            )
        undo = None
        if keep_undo:
            undo = _Undo(self.absmax, self.minimum, self.seen, self.calls, self.sample.shape[0], self._gen.get_state())
        if self.sample.shape[0] == 0 or self.sample.dtype != x2.dtype:
            self.sample = self.sample.to(x2.dtype)  # first rows, or a 16-bit model fed fp32
        self.calls += 1
        xf = x2.float()
        self.absmax = torch.maximum(self.absmax, xf.abs().amax(dim=0))  # new tensors: undo keeps the old
        self.minimum = torch.minimum(self.minimum, xf.amin(dim=0))
        self._reservoir(x2, undo)
        return undo

    def _reservoir(self, x2: torch.Tensor, undo: Optional[_Undo]) -> None:
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
                if undo is not None:
                    undo.slots = slots[keep].unique()
                    undo.old = self.sample[undo.slots].clone()
                self.sample[slots[keep]] = x2[fill:][keep]
        self.seen += t

    def rolled_back(self, undo: Optional[_Undo]) -> "LayerStats":
        """A copy of these statistics as they were before the update that returned ``undo``
        (``None``: an update that changed nothing, e.g. an empty batch: a plain copy)."""
        if undo is None:
            undo = _Undo(self.absmax, self.minimum, self.seen, self.calls, self.sample.shape[0], self._gen.get_state())
        c = LayerStats.__new__(LayerStats)
        c.in_features, c.max_tokens, c.name = self.in_features, self.max_tokens, self.name
        c.absmax, c.minimum, c.seen, c.calls = undo.absmax, undo.minimum, undo.seen, undo.calls
        sample = self.sample.clone()
        if undo.slots is not None:
            sample[undo.slots] = undo.old
        c.sample = sample[: undo.rows].clone() if undo.rows < sample.shape[0] else sample
        c._gen = torch.Generator()
        c._gen.set_state(undo.gen_state)
        return c

    def nbytes(self) -> int:
        return self.sample.numel() * self.sample.element_size() + (self.absmax.numel() + self.minimum.numel()) * 4


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
    from .calib_share import SharedInputRouter

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

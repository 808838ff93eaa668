"""Per-layer calibration statistics: what the quantizer reads, whoever recorded it.

A :class:`LayerStats` keeps the per-channel absmax and minimum of one linear's input and a
fixed-size reservoir sample of its tokens (bounded memory however many steps are recorded).
The hooks that fill them live in :mod:`svdq_compile.capture.calibration`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["LayerStats", "stats_of", "attach_stats", "layer_name"]

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

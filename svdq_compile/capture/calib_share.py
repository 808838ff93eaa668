"""One set of calibration statistics for linears that read the same tensor.

q/k/v projections (and FLUX's ``proj_mlp``) all read one normalised activation: keeping a
reservoir per linear stores the same tokens three or four times. The router below lets
such linears share one :class:`LayerStats` for as long as they keep reading the same
tensor object, and splits a linear off the moment it does not, so every linear's
statistics are exactly those of the inputs it saw.

Statistics are updated eagerly by the first linear that reads a tensor (no activation is
held for later). The update keeps an undo record until the next linear input arrives:
if a member of the group turns out not to read that tensor, it leaves the group with the
statistics as they were before it. Only one undo record exists at a time.

Under ``torch.inference_mode()`` tensors have no version counter: a tensor modified in
place between two linears that read it would go unnoticed there (identity only);
diffusers' attention blocks do not do that.
"""
from __future__ import annotations

import logging
import weakref
from typing import Callable, Optional

import torch

from svdq_compile.quant.stats import LayerStats, _Undo
from svdq_compile.capture.versions import tensor_version as _version

__all__ = ["SharedInputRouter"]

log = logging.getLogger(__name__)


class _Group:
    __slots__ = ("stats", "members")

    def __init__(self, stats: LayerStats, members: list[str]) -> None:
        self.stats = stats
        self.members = members


class SharedInputRouter:
    """Route each linear's input to the statistics of its sharing group.

    ``on_change(name, stats)`` is called whenever a linear's statistics object changes
    (it joined or left a group), so the caller can re-attach them to the weight.
    """

    def __init__(self, on_change: Callable[[str, LayerStats], None]) -> None:
        self._group: dict[str, _Group] = {}
        self._on_change = on_change
        # The latest input: identity (weak), version and the group it updated.
        self._ref: Optional[weakref.ref] = None
        self._version = -1
        self._pgroup: Optional[_Group] = None
        self._seen: set[str] = set()
        self._undo: Optional[_Undo] = None
        self._forming = False  # the pending update is the group's first: others may join

    def add(self, name: str, stats: LayerStats) -> None:
        self._group[name] = _Group(stats, [name])

    def record(self, name: str, x: torch.Tensor) -> None:
        g = self._group[name]
        g.stats.check_features(x)
        pending = self._ref() if self._ref is not None else None
        same = pending is not None and x is pending and _version(x) == self._version
        if same and name not in self._seen:
            if g is self._pgroup:
                self._seen.add(name)  # same tensor as the group's update: already counted
                return
            if self._forming and g.stats.calls == 0 and len(g.members) == 1:
                # First call of a fresh linear on the tensor a forming group just read.
                pg = self._pgroup
                pg.members.append(name)
                self._group[name] = pg
                self._seen.add(name)
                self._on_change(name, pg.stats)
                return
        if g is self._pgroup and name not in self._seen:
            # A member reads another tensor while its group's update is open: it leaves
            # with the statistics from before that update; the others may still read it.
            ng = self._split(g, [name])
            ng.stats.update(x)
            return
        if len(g.members) == 1 and g.stats.calls > 0 and g is not self._pgroup:
            # A lone linear past its first call: nothing to share or undo, and the open
            # update of another group stays open for its remaining members.
            g.stats.update(x)
            return
        self.flush()
        g = self._group[name]
        self._forming = g.stats.calls == 0
        self._undo = g.stats.update(x, keep_undo=len(g.members) > 1 or self._forming)
        self._ref = weakref.ref(x)
        self._version = _version(x)
        self._pgroup = g
        self._seen = {name}

    def _split(self, g: _Group, names: list[str]) -> _Group:
        # No undo record: the open update changed nothing (an empty batch).
        ng = _Group(g.stats.rolled_back(self._undo), names)
        g.members = [m for m in g.members if m not in names]
        for m in names:
            self._group[m] = ng
            self._on_change(m, ng.stats)
        log.debug("calibration: %s stopped sharing the input of %s", names, g.members)
        return ng

    def flush(self) -> None:
        """Close the pending update: members that did not read its tensor leave the group."""
        g = self._pgroup
        if g is not None:
            unseen = [m for m in g.members if m not in self._seen]
            if unseen:
                self._split(g, unseen)  # they did not run this time: keep their history
        self._ref, self._pgroup, self._seen, self._undo, self._forming = None, None, set(), None, False

    def groups(self) -> list[list[str]]:
        """Current sharing groups (names), for reports and tests."""
        seen, out = set(), []
        for g in self._group.values():
            if id(g) not in seen:
                seen.add(id(g))
                out.append(list(g.members))
        return out

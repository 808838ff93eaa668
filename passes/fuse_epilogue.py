"""Epilogue fusion: elementwise ops applied to an svdq op's output move into the op.

``svdq::linear`` computes ``act(acc + bias) * gate + residual`` in its epilogue (see
:func:`svdq_compile.runtime.epilogue.finish_output`), so each of these separate passes
over the [M, N] output can disappear:

- an activation (GELU erf/tanh, SiLU, ReLU) applied to the op output -> ``epilogue=``;
- then a multiply by a gate that broadcasts to the output (AdaLN-Zero's ``gate[:, None]``,
  [B, 1, N]) -> ``gate=``;
- then an add of a tensor of the output's shape (the residual stream) -> ``residual=``.

Only chains in exactly that order fuse, each link being the *only* user of the previous
one (so nothing else observes the intermediate); identity dropouts (eval mode or
``p=0``) inside a chain are dropped. Shapes and dtypes are checked statically (symbolic
sizes included): a gate must broadcast to the output without growing it, a residual
must have the output's shape, and neither may change the result dtype. In float32 the
fused op computes exactly the same values as the unfused graph (the op applies the same
fp32 operations in the same order); in 16-bit it rounds once instead of per op.

Returns the number of elementwise ops absorbed; ``stats`` (optional dict) receives the
split by kind (``act``, ``gate``, ``residual``, ``dropout``).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch.fx as fx

from svdq_compile.passes.op_nodes import ARG, GraphTensors, is_svdq, replace_op
from svdq_compile.passes.patterns import activation_of, is_add, is_identity_dropout, is_mul
from svdq_compile.passes.shapes import broadcasts_to, dtype_of, same_size, shape_of

__all__ = ["fuse_epilogue"]

log = logging.getLogger(__name__)


def _sole_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _same_shape(a: Optional[tuple], b: Optional[tuple]) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def _other(ops: tuple, prev: fx.Node) -> Optional[fx.Node]:
    """The operand of a binary op that is not ``prev`` (None for ``prev op prev`` or constants)."""
    a, b = ops
    other = b if a is prev else a if b is prev else None
    return other if isinstance(other, fx.Node) and other is not prev else None


class _Chain:
    """Walks the single-user chain after one op, collecting what can fuse."""

    def __init__(self, gm: fx.GraphModule, tensors: GraphTensors, op: fx.Node) -> None:
        self.gm, self.tensors, self.op = gm, tensors, op
        self.nodes: list[fx.Node] = [op]  # op ... tail, all to be replaced
        self.changes: dict[str, Any] = {}
        self.kinds: list[str] = []
        self.y_shape = shape_of(op, tensors)
        self.y_dtype = dtype_of(op, tensors)

    @property
    def tail(self) -> fx.Node:
        return self.nodes[-1]

    def _next(self) -> tuple[Optional[fx.Node], list[fx.Node]]:
        """The sole user of the tail, looking through identity dropouts."""
        skipped = []
        u = _sole_user(self.tail)
        while u is not None and is_identity_dropout(u, self.gm):
            skipped.append(u)
            nxt = _sole_user(u)
            if nxt is None:
                return None, []
            u = nxt
        return u, skipped

    def _take(self, u: fx.Node, skipped: list[fx.Node], kind: str, **changes: Any) -> None:
        self.nodes += skipped + [u]
        self.kinds += ["dropout"] * len(skipped) + [kind]
        self.changes.update(changes)

    def _keeps_dtype(self, *nodes: Any) -> bool:
        return self.y_dtype is not None and all(dtype_of(n, self.tensors) == self.y_dtype for n in nodes)

    def walk(self) -> None:
        a = self.op.args
        stage = 3 if a[ARG["residual"]] is not None else 2 if a[ARG["gate"]] is not None else (
            1 if a[ARG["epilogue"]] != "none" else 0)
        if self.y_shape is None or self.y_dtype is None:
            return
        u, skipped = self._next()
        if u is None:
            return
        prev = skipped[-1] if skipped else self.tail  # the value u reads
        if stage < 1:
            act = activation_of(u, self.gm)
            if act is not None and act[0] is prev:
                self._take(u, skipped, "act", epilogue=act[1])
                stage = 1
                u, skipped = self._next()
                if u is None:
                    return
                prev = skipped[-1] if skipped else self.tail
        if stage < 2:
            ops = is_mul(u)
            if ops is not None:
                g = _other(ops, prev)
                gs = shape_of(g, self.tensors)
                if gs is not None and broadcasts_to(gs, self.y_shape) and self._keeps_dtype(g, u):
                    self._take(u, skipped, "gate", gate=g)
                    stage = 2
                    u, skipped = self._next()
                    if u is None:
                        return
                    prev = skipped[-1] if skipped else self.tail
        if stage < 3:
            ops = is_add(u)
            if ops is not None:
                r = _other(ops, prev)
                if _same_shape(shape_of(r, self.tensors), self.y_shape) and self._keeps_dtype(r, u):
                    self._take(u, skipped, "residual", residual=r)

    def apply(self) -> fx.Node:
        tail = self.tail
        new = replace_op(self.gm, self.op, tail, **self.changes)
        new.meta = dict(tail.meta)  # the tail's fake value describes the fused output
        tail.replace_all_uses_with(new)
        for n in reversed(self.nodes):
            self.gm.graph.erase_node(n)
        return new


def fuse_epilogue(gm: fx.GraphModule, tensors: Optional[GraphTensors] = None, stats: Optional[dict] = None) -> int:
    """Fuse activation / gate / residual chains into svdq ops; returns the ops absorbed."""
    tensors = tensors or GraphTensors(gm)
    absorbed = 0
    counts = {"act": 0, "gate": 0, "residual": 0, "dropout": 0}
    for op in [n for n in gm.graph.nodes if is_svdq(n)]:
        chain = _Chain(gm, tensors, op)
        chain.walk()
        if not chain.changes:
            continue
        new = chain.apply()
        for k in chain.kinds:
            counts[k] += 1
        absorbed += sum(k != "dropout" for k in chain.kinds)
        log.info("fuse_epilogue: %s <- %s", new.name, ", ".join(chain.kinds))
    if absorbed:
        gm.graph.lint()
        gm.recompile()
    if stats is not None:
        stats.update(counts)
    return absorbed

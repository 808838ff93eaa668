"""Horizontal fusion: svdq::linear ops that read the same tensor become one op + split.

Siblings share lambda (so their quantized activations are identical); their residuals
and scales concatenate along N and their low-rank branches stack into one branch with
a block-diagonal up projection (see :mod:`.concat`), so outputs are unchanged while the
activation is read and quantized once and one GEMM runs instead of several.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Optional

import torch
import torch.fx as fx

from .concat import concat_packed
from .op_nodes import ARG, GraphTensors, drop_unused_buffers, insert_op, is_svdq, packed_of

__all__ = ["fuse_siblings"]

_SCALARS = ("group_size", "weight_bits", "act_bits", "act_unsigned", "act_shift")


def _key(gm: fx.GraphModule, node: fx.Node):
    a = node.args
    if a[ARG["residual"]] is not None or a[ARG["gate"]] is not None or a[ARG["epilogue"]] != "none":
        return None  # epilogue-fused ops have per-op extras; fuse siblings first
    return (a[ARG["x"]],) + tuple(a[ARG[k]] for k in _SCALARS)


def fuse_siblings(gm: fx.GraphModule, tensors: Optional[GraphTensors] = None) -> int:
    """Returns the number of fused groups (each of >= 2 ops).

    The ops' tensors may be buffers or placeholders (``tensors`` resolves the latter);
    the fused op always gets new buffers (the concatenated weights).
    """
    tensors = tensors or GraphTensors(gm)
    groups: dict = defaultdict(list)
    for node in gm.graph.nodes:
        if is_svdq(node):
            k = _key(gm, node)
            if k is not None:
                groups[k].append(node)
    fused = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        packs = [packed_of(gm, n, tensors) for n in nodes]
        s0 = packs[0].smooth
        # Only ops sharing one lambda can share the quantized activation.
        same = [n for n, p in zip(nodes, packs)
                if (p.smooth is None and s0 is None)
                or (p.smooth is not None and s0 is not None and torch.equal(p.smooth, s0))]
        if len(same) < 2:
            continue
        packs = [packed_of(gm, n, tensors) for n in same]
        first = same[0]  # graph order: the first sibling comes first
        with gm.graph.inserting_before(first):
            op = insert_op(gm, first.args[ARG["x"]], concat_packed(packs), f"fused_{first.name}")
            parts = gm.graph.call_function(torch.split, (op, [p.spec.out_features for p in packs]), {"dim": -1})
            for j, n in enumerate(same):
                piece = gm.graph.call_function(operator.getitem, (parts, j))
                n.replace_all_uses_with(piece)
        for n in same:
            gm.graph.erase_node(n)
        fused += 1
    if fused:
        drop_unused_buffers(gm)
        gm.graph.lint()
        gm.recompile()
    return fused


"""Horizontal fusion: svdq::linear ops that read the same tensor become one op + split.

Siblings share lambda (so their quantized activations are identical); their residuals
and scales concatenate along N and their low-rank branches stack into one branch with
a block-diagonal up projection (see :mod:`.concat`), so outputs are unchanged while the
activation is read and quantized once and one GEMM runs instead of several.
"""
from __future__ import annotations

import logging
import operator
from collections import defaultdict
from typing import Optional

import torch
import torch.fx as fx

from svdq_compile.passes.concat import concat_packed
from svdq_compile.passes.op_nodes import ARG, GraphTensors, drop_unused_buffers, insert_op, is_svdq, packed_of
from svdq_compile.runtime.packed import PackedLinear

__all__ = ["fuse_siblings", "apply_aliases"]

ALIAS_KEY = "svdq_sibling_aliases"  # gm.meta: [(sibling packs, fused pack)] to alias

log = logging.getLogger(__name__)

_SCALARS = ("group_size", "weight_bits", "act_bits", "act_unsigned", "act_shift", "scheme")


def _key(gm: fx.GraphModule, node: fx.Node):
    a = node.args
    if a[ARG["residual"]] is not None or a[ARG["gate"]] is not None or a[ARG["epilogue"]] != "none":
        return None  # epilogue-fused ops have per-op extras; fuse siblings first
    return (a[ARG["x"]],) + tuple(a[ARG[k]] for k in _SCALARS)


def _alias_into(packs: list[PackedLinear], fused: PackedLinear) -> int:
    """Point each sibling's tensors at its rows of the fused ones; returns bytes freed.

    The siblings' tensors may be the user's ``SVDQLinear`` buffers (quantize() / load()
    models reach the graph as placeholders): without this they and the concatenated copy
    would both stay alive, holding e.g. the QKV weights twice. ``set_`` keeps each tensor
    object (module buffers, state_dict and variant keys are unchanged) and its values;
    only the storage becomes shared, so a later in-place edit of a sibling's buffer is
    also seen by the fused op.
    """
    freed = 0
    n0 = r0 = 0
    with torch.no_grad():
        for p in packs:
            n, r = p.spec.out_features, p.rank
            for t, big, lo, cnt in ((p.qweight, fused.qweight, n0, n), (p.wscales, fused.wscales, n0, n),
                                    (p.bias, fused.bias, n0, n), (p.lora_down, fused.lora_down, r0, r),
                                    (p.wzeros, fused.wzeros, n0, n), (p.wchannel, fused.wchannel, n0, n)):
                if t is None or big is None or cnt == 0:
                    continue
                view = big[lo:lo + cnt]
                # Already part of a larger storage (a fused tensor of an earlier compile, e.g.
                # of a graph for another shape that is still used): re-pointing would free
                # nothing and would bump the version that graph checks.
                own = t.untyped_storage().nbytes() == t.numel() * t.element_size()
                if (not own or t.shape != view.shape or t.dtype != view.dtype or t.device != view.device
                        or t.requires_grad):
                    continue
                try:
                    t.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())
                except RuntimeError as e:  # e.g. an inference-mode tensor: keep the copy
                    log.debug("fuse_siblings: could not alias a sibling tensor: %s", e)
                    continue
                freed += t.numel() * t.element_size()
            n0, r0 = n0 + n, r0 + r
    return freed


def apply_aliases(gm: fx.GraphModule) -> int:
    """Point fused siblings' tensors into the fused ones (after compiling gm); bytes freed."""
    freed = sum(_alias_into(packs, fused) for packs, fused in gm.meta.pop(ALIAS_KEY, []))
    if freed:
        log.info("fuse_siblings: %.1f MB of sibling tensors now share the fused tensors' memory", freed / 2**20)
    return freed


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
        fused_pack = concat_packed(packs)
        # Aliasing changes the siblings' storage offsets; graph compilers check real inputs
        # against the metadata Dynamo traced, so it runs after compilation (apply_aliases).
        gm.meta.setdefault(ALIAS_KEY, []).append((packs, fused_pack))
        with gm.graph.inserting_before(first):
            op = insert_op(gm, first.args[ARG["x"]], fused_pack, f"fused_{first.name}")
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


"""Replace linear sites with ``svdq::linear`` calls on packed weights (graph surgery only).

With sibling fusion, one group of linears reading the same tensor becomes a single
``svdq::linear`` over the concatenated layer followed by a split.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx

from svdq_compile.runtime.packed import PackedLinear

from .concat import concat_packed
from .plan import SiteGroup

__all__ = ["RewriteResult", "rewrite_linears", "SVDQ_OP"]

log = logging.getLogger(__name__)

SVDQ_OP = torch.ops.svdq.linear.default


@dataclass
class RewriteResult:
    """Counts of what :func:`rewrite_linears` changed (tests assert these)."""

    sites_rewritten: int = 0  # original linear nodes replaced
    ops_inserted: int = 0  # svdq::linear nodes inserted (fused siblings count once)
    fused_groups: int = 0  # groups of >= 2 siblings fused into one op
    node_of_site: dict = field(default_factory=dict)  # site name -> svdq op node


def _buffer(gm: fx.GraphModule, prefix: str, t: torch.Tensor) -> fx.Node:
    name = prefix
    i = 0
    while hasattr(gm, name):
        i += 1
        name = f"{prefix}_{i}"
    gm.register_buffer(name, t)
    return gm.graph.get_attr(name)


def _insert_op(gm: fx.GraphModule, x: fx.Node, p: PackedLinear, tag: str) -> fx.Node:
    t = {k: _buffer(gm, f"svdq_{tag}_{k}", v) for k, v in p.tensors().items()}
    s = p.spec
    return gm.graph.call_function(
        SVDQ_OP,
        (x, t["qweight"], t["wscales"], t.get("smooth"), t.get("lora_down"), t.get("lora_up"),
         t.get("bias"), None, None, s.group_size, s.weight_bits, s.act_bits, s.act_unsigned,
         s.act_shift, "none"),
    )


def rewrite_linears(
    gm: fx.GraphModule,
    groups: Sequence[SiteGroup],
    packs: Sequence[Sequence[PackedLinear]],
    fuse_siblings: bool = True,
) -> RewriteResult:
    """Rewrite each group's sites; packs[i][j] is the packed layer of groups[i].sites[j]."""
    res = RewriteResult()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for gi, (group, gpacks) in enumerate(zip(groups, packs)):
        safe = lambda s: "".join(c if c.isalnum() else "_" for c in s)  # noqa: E731
        if fuse_siblings and len(group.sites) > 1:
            fused = concat_packed(gpacks)
            last = max(group.sites, key=lambda s: order[s.node]).node
            first = min(group.sites, key=lambda s: order[s.node]).node
            with gm.graph.inserting_before(first):
                op = _insert_op(gm, group.x, fused, f"g{gi}_{safe(group.names[0])}")
                sizes = [s.out_features for s in group.sites]
                parts = gm.graph.call_function(torch.split, (op, sizes), {"dim": -1})
                for j, site in enumerate(group.sites):
                    piece = gm.graph.call_function(operator.getitem, (parts, j))
                    site.node.replace_all_uses_with(piece)
                    res.node_of_site[site.name] = op
            res.fused_groups += 1
            res.ops_inserted += 1
        else:
            for j, (site, p) in enumerate(zip(group.sites, gpacks)):
                with gm.graph.inserting_before(site.node):
                    op = _insert_op(gm, group.x, p, f"{safe(site.name)}")
                site.node.replace_all_uses_with(op)
                res.node_of_site[site.name] = op
                res.ops_inserted += 1
        for site in group.sites:
            gm.graph.erase_node(site.node)
            res.sites_rewritten += 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return res


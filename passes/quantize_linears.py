"""Replace each linear site with one ``svdq::linear`` on its packed weights (graph surgery only)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx

from svdq_compile.runtime.packed import PackedLinear

from svdq_compile.passes.op_nodes import insert_op
from svdq_compile.passes.plan import SiteGroup

__all__ = ["RewriteResult", "rewrite_linears"]

log = logging.getLogger(__name__)


@dataclass
class RewriteResult:
    """Counts of what :func:`rewrite_linears` changed (tests assert these)."""

    sites_rewritten: int = 0
    node_of_site: dict = field(default_factory=dict)  # site name -> svdq op node


def rewrite_linears(
    gm: fx.GraphModule, groups: Sequence[SiteGroup], packs: Sequence[Sequence[PackedLinear]]
) -> RewriteResult:
    """packs[i][j] is the packed layer of groups[i].sites[j]."""
    res = RewriteResult()
    for group, gpacks in zip(groups, packs):
        for site, p in zip(group.sites, gpacks):
            # Read the input from the live node: when it was another linear site rewritten
            # earlier, replace_all_uses_with already pointed this node at its replacement.
            x = site.node.args[1] if site.kind == "addmm" else site.node.args[0]
            with gm.graph.inserting_before(site.node):
                op = insert_op(gm, x, p, site.name)
            site.node.replace_all_uses_with(op)
            wt = site.node.args[2] if site.kind == "addmm" else site.node.args[1]
            gm.graph.erase_node(site.node)
            # Drop the transpose that fed an aten.mm/addmm site if nothing else reads it. No
            # graph-wide DCE: FX counts in-place methods (h.relu_()) as dead code.
            if site.kind != "linear" and isinstance(wt, fx.Node) and not wt.users and wt.op == "call_function":
                gm.graph.erase_node(wt)
            res.node_of_site[site.name] = op
            res.sites_rewritten += 1
    if res.sites_rewritten:
        gm.graph.lint()
        gm.recompile()
    return res

"""Find linear sites in a Dynamo/FX graph and take their weights from the real tensors.

Matches ``F.linear`` / ``torch._C._nn.linear`` / ``aten.linear`` and the ATen forms
``aten.addmm(b, x, t(w))`` / ``aten.mm(x, t(w))`` where ``w`` is a graph input or
attribute (a parameter), never an activation.
"""
from __future__ import annotations

import fnmatch
import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["LinearSite", "find_linear_sites", "node_tensor", "site_name"]

log = logging.getLogger(__name__)

_LINEAR_TARGETS = {torch._C._nn.linear, F.linear, torch.ops.aten.linear.default}
_TRANSPOSE_TARGETS = {torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.t}


@dataclass
class LinearSite:
    """One ``y = x @ w^T + b`` in the graph."""

    node: fx.Node
    x: fx.Node
    weight_node: fx.Node
    bias_node: Optional[fx.Node]
    weight: torch.Tensor  # [N, K] the real parameter
    bias: Optional[torch.Tensor]
    name: str
    kind: str = "linear"

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


def node_tensor(gm: fx.GraphModule, node: Any, example_inputs: Sequence[Any]) -> Optional[torch.Tensor]:
    """The real tensor behind a placeholder/get_attr node (None for activations)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder":
        idx = [n for n in gm.graph.nodes if n.op == "placeholder"].index(node)
        val = example_inputs[idx] if idx < len(example_inputs) else None
        return val if isinstance(val, torch.Tensor) else None
    if node.op == "get_attr":
        obj: Any = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def _clean_module_path(path: str) -> str:
    # "L['self'].transformer_blocks[0].attn.to_q" -> "transformer_blocks.0.attn.to_q"
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    # Dynamo spells some module accesses through the instance/module dicts.
    path = re.sub(r"(^|\.)(__dict__|_modules)(?=\.)", "", path)
    return path.strip(".") or "linear"


def site_name(node: fx.Node, weight: torch.Tensor) -> str:
    name = getattr(weight, "_svdq_name", None)
    if name:
        return name
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_module_path(str(path))
    return node.name


def _is_param(t: Optional[torch.Tensor]) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 2 and t.dtype.is_floating_point


def find_linear_sites(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[LinearSite]:
    """All linear sites whose weight is a real 2-D floating tensor, in graph order."""
    sites: list[LinearSite] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _LINEAR_TARGETS:
            args = list(node.args) + [None] * 3
            x = node.args[0] if node.args else node.kwargs.get("input")
            w_node = args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            b_node = args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            kind = "linear"
        elif node.target in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
            if node.kwargs:
                continue  # beta/alpha scaling: not a plain linear
            if node.target is torch.ops.aten.addmm.default:
                b_node, x, wt = node.args
            else:
                (x, wt), b_node = node.args, None
            if not (isinstance(wt, fx.Node) and wt.op == "call_function" and wt.target in _TRANSPOSE_TARGETS):
                continue
            if wt.target is torch.ops.aten.permute.default and list(wt.args[1]) != [1, 0]:
                continue
            w_node = wt.args[0]
            kind = "addmm" if node.target is torch.ops.aten.addmm.default else "mm"
        else:
            continue
        w = node_tensor(gm, w_node, example_inputs)
        if not _is_param(w):
            continue
        b = node_tensor(gm, b_node, example_inputs) if b_node is not None else None
        if b_node is not None and b is None:
            continue  # bias computed at run time: leave this linear alone
        if not isinstance(x, fx.Node):
            continue
        sites.append(LinearSite(node, x, w_node, b_node, w, b, site_name(node, w), kind))
    return sites

"""Shapes and dtypes of graph values, for the legality checks of the passes.

Dynamo records a fake tensor per node (``meta["example_value"]``; ``meta["val"]``
after ``make_fx``/export; ``meta["tensor_meta"]`` after ``ShapeProp``). With dynamic
shapes its sizes are SymInts, so every comparison here is *static*: a check that is
not provably true for every size the graph accepts counts as false (the pass then
leaves the site alone). Nodes the passes insert (``svdq::linear``, the split of a
fused op) carry no meta; their shapes are derived from their inputs.
"""
from __future__ import annotations

import operator
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from svdq_compile.passes.op_nodes import ARG, GraphTensors, is_svdq

__all__ = ["shape_of", "dtype_of", "same_size", "is_one", "broadcasts_to", "per_sample"]


def _meta_value(node: fx.Node) -> Any:
    for key in ("example_value", "val"):
        v = node.meta.get(key)
        if isinstance(v, torch.Tensor):
            return v
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tm
    return None


def shape_of(node: Any, tensors: Optional[GraphTensors] = None) -> Optional[tuple]:
    """Sizes of the tensor a node produces (ints or SymInts), or None when unknown."""
    if not isinstance(node, fx.Node):
        return None
    v = _meta_value(node)
    if v is not None:
        return tuple(v.shape)
    if tensors is not None:
        t = tensors(node)
        if t is not None:
            return tuple(t.shape)
    if is_svdq(node):
        xs = shape_of(node.args[ARG["x"]], tensors)
        ws = node.args[ARG["wscales"]]
        n = None
        if tensors is not None and tensors(ws) is not None:
            n = tensors(ws).shape[0]
        if xs is None or n is None:
            return None
        return (*xs[:-1], n)
    if node.op == "call_function" and node.target is operator.getitem:
        src, j = node.args
        if isinstance(src, fx.Node) and src.op == "call_function" and src.target is torch.split:
            whole = shape_of(src.args[0], tensors)
            sizes = src.args[1]
            dim = src.kwargs.get("dim", src.args[2] if len(src.args) > 2 else 0)
            if whole is not None and isinstance(sizes, (list, tuple)) and dim in (-1, len(whole) - 1):
                return (*whole[:-1], sizes[j])
    return None


def dtype_of(node: Any, tensors: Optional[GraphTensors] = None) -> Optional[torch.dtype]:
    if not isinstance(node, fx.Node):
        return None
    v = _meta_value(node)
    if v is not None:
        return v.dtype
    if tensors is not None and tensors(node) is not None:
        return tensors(node).dtype
    if is_svdq(node):
        return dtype_of(node.args[ARG["x"]], tensors)
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_function" and src.target is torch.split:
            return dtype_of(src.args[0], tensors)
    return None


def _known(expr: Any) -> bool:
    if isinstance(expr, bool):
        return expr
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(expr))
    except Exception:  # pragma: no cover - unusual symbolic expressions: be conservative
        return False


def same_size(a: Any, b: Any) -> bool:
    """``a == b`` for every value the (symbolic) sizes can take."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return _known(a == b)


def is_one(a: Any) -> bool:
    return same_size(a, 1)


def broadcasts_to(small: Sequence, big: Sequence) -> bool:
    """``small`` broadcasts to ``big`` without changing ``big`` (provably, for all sizes)."""
    if len(small) > len(big):
        return False
    for s, b in zip(reversed(tuple(small)), reversed(tuple(big))):
        if not (is_one(s) or same_size(s, b)):
            return False
    return True


def per_sample(small: Sequence, big: Sequence) -> bool:
    """``small`` is a per-sample (or global) vector for the activation ``big``: it
    broadcasts to ``big`` and is constant over every dim but the leading (batch) and
    last (channel) dims, so it holds ~B*K values instead of ~B*T*K."""
    if not broadcasts_to(small, big):
        return False
    small = tuple(small)
    pad = len(big) - len(small)
    for i, s in enumerate(small):
        dim = i + pad
        if dim == len(big) - 1:
            continue
        if dim == 0 and len(big) >= 3:
            continue
        if not is_one(s):
            return False
    return True

"""Recognisers for the torch-level ops the passes match (Dynamo, ATen and module forms).

Each returns the operands of a match or None; they never change the graph.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["binary_operands", "is_mul", "is_add", "activation_of", "is_identity_dropout", "norm_of", "NormCall"]

aten = torch.ops.aten

_MUL = {operator.mul, torch.mul, aten.mul.Tensor}
_ADD = {operator.add, torch.add, aten.add.Tensor}


def _call(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method", "call_module")


def binary_operands(node: fx.Node, fns: set, method: str) -> Optional[tuple[Any, Any]]:
    """(a, b) of ``a <op> b`` written as a function or a method call; None otherwise.

    ``torch.add(a, b, alpha=2)`` and other extra arguments do not match.
    """
    if node.op == "call_function" and node.target in fns:
        if len(node.args) != 2 or node.kwargs:
            return None
        return node.args[0], node.args[1]
    if node.op == "call_method" and node.target == method:
        if len(node.args) != 2 or node.kwargs:
            return None
        return node.args[0], node.args[1]
    return None


def is_mul(node: Any) -> Optional[tuple[Any, Any]]:
    return binary_operands(node, _MUL, "mul") if _call(node) else None


def is_add(node: Any) -> Optional[tuple[Any, Any]]:
    return binary_operands(node, _ADD, "add") if _call(node) else None


_GELU = {torch._C._nn.gelu, F.gelu, aten.gelu.default}
_SILU = {F.silu, torch._C._nn.silu, aten.silu.default}
_RELU = {torch.relu, F.relu, aten.relu.default}


def _module(gm: Optional[fx.GraphModule], node: fx.Node) -> Optional[nn.Module]:
    if gm is None or node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def activation_of(node: Any, gm: Optional[fx.GraphModule] = None) -> Optional[tuple[fx.Node, str]]:
    """(input, epilogue name) when ``node`` applies GELU (erf/tanh), SiLU or ReLU out of place."""
    if not _call(node) or not node.args:
        return None
    x = node.args[0]
    if node.op == "call_function":
        t, extra, kw = node.target, node.args[1:], dict(node.kwargs)
        if t in _GELU:
            approx = kw.pop("approximate", extra[0] if extra else "none")
            if kw or len(extra) > 1 or approx not in ("none", "tanh"):
                return None
            return x, "gelu" if approx == "none" else "gelu_tanh"
        if t in _SILU or t in _RELU:
            inplace = kw.pop("inplace", extra[0] if extra else False)
            if kw or len(extra) > 1 or inplace:
                return None
            return x, "silu" if t in _SILU else "relu"
        return None
    if node.op == "call_method":
        if node.target == "relu" and len(node.args) == 1 and not node.kwargs:
            return x, "relu"
        return None
    mod = _module(gm, node)
    if len(node.args) != 1 or node.kwargs:
        return None
    if isinstance(mod, nn.GELU) and mod.approximate in ("none", "tanh"):
        return x, "gelu" if mod.approximate == "none" else "gelu_tanh"
    if isinstance(mod, nn.SiLU) and not mod.inplace:
        return x, "silu"
    if isinstance(mod, nn.ReLU) and not mod.inplace:
        return x, "relu"
    return None


_DROPOUT = {F.dropout, torch.dropout, aten.dropout.default}


def is_identity_dropout(node: Any, gm: Optional[fx.GraphModule] = None) -> bool:
    """Dropout that returns its input unchanged (``training=False`` or ``p == 0``), out of place."""
    if not _call(node) or not node.args:
        return False
    if node.op == "call_module":
        mod = _module(gm, node)
        return isinstance(mod, nn.Dropout) and (not mod.training or mod.p == 0) and not mod.inplace
    if node.op != "call_function" or node.target not in _DROPOUT:
        return False
    names = ("input", "p", "training", "inplace") if node.target is F.dropout else ("input", "p", "train")
    vals = dict(zip(names, node.args))
    vals.update(node.kwargs)
    p = vals.get("p", 0.5)
    training = vals.get("training", vals.get("train", True))
    if vals.get("inplace", False) or not isinstance(p, (int, float)) or not isinstance(training, bool):
        return False
    return (not training) or p == 0


class NormCall:
    """A normalization over the last dim with optional affine ``weight``/``bias`` arguments."""

    def __init__(self, node: fx.Node, kind: str, weight: Any, bias: Any, has_bias_arg: bool, dim: Any) -> None:
        self.node, self.kind, self.weight, self.bias, self.has_bias_arg, self.dim = (
            node, kind, weight, bias, has_bias_arg, dim)

    def set_affine(self, weight: Any, bias: Any = None) -> None:
        """Point the norm at new weight (and bias) nodes, keeping every other argument."""
        args = list(self.node.args)
        kwargs = dict(self.node.kwargs)
        # weight is positional argument 2 in every supported form; bias (layer_norm) is 3.
        for idx, name, val in ((2, "weight", weight), (3, "bias", bias)):
            if name == "bias" and not self.has_bias_arg:
                continue
            if len(args) > idx:
                args[idx] = val
            elif val is not None or name in kwargs:
                kwargs[name] = val
        self.node.args = tuple(args)
        self.node.kwargs = kwargs


_LAYER_NORM = {F.layer_norm, torch.layer_norm, aten.layer_norm.default}
_RMS_NORM = {torch.rms_norm, aten.rms_norm.default} | ({F.rms_norm} if hasattr(F, "rms_norm") else set())


def norm_of(node: Any) -> Optional[NormCall]:
    """A ``layer_norm``/``rms_norm`` call normalizing over one (the last) dim."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    if node.target in _LAYER_NORM:
        names = ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable")
        kind, has_bias = "layer_norm", True
    elif node.target in _RMS_NORM:
        names, kind, has_bias = ("input", "normalized_shape", "weight", "eps"), "rms_norm", False
    else:
        return None
    vals = dict(zip(names, node.args))
    vals.update(node.kwargs)
    shape = vals.get("normalized_shape")
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return None
    return NormCall(node, kind, vals.get("weight"), vals.get("bias"), has_bias, shape[0])

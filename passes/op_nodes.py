"""Read and write ``svdq::linear`` nodes of an FX graph (shared by the passes)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from svdq_compile.runtime.packed import LinearSpec, PackedLinear

__all__ = ["SVDQ_OP", "ARG", "is_svdq", "packed_of", "insert_op", "attr"]

SVDQ_OP = torch.ops.svdq.linear.default

# Positional argument index of each svdq::linear input (see runtime/ops.py).
ARG = {name: i for i, name in enumerate(
    ["x", "qweight", "wscales", "smooth", "lora_down", "lora_up", "bias", "residual", "gate",
     "group_size", "weight_bits", "act_bits", "act_unsigned", "act_shift", "epilogue"])}


def is_svdq(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is SVDQ_OP


def attr(gm: fx.GraphModule, node: Optional[fx.Node]) -> Optional[torch.Tensor]:
    if node is None:
        return None
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise ValueError(f"expected a get_attr node, got {node}")
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def packed_of(gm: fx.GraphModule, node: fx.Node) -> PackedLinear:
    """The PackedLinear an svdq::linear node applies (its tensors are graph buffers)."""
    a = node.args
    wscales = attr(gm, a[ARG["wscales"]])
    down = attr(gm, a[ARG["lora_down"]])
    spec = LinearSpec(
        in_features=wscales.shape[1] * a[ARG["group_size"]], out_features=wscales.shape[0],
        group_size=a[ARG["group_size"]], weight_bits=a[ARG["weight_bits"]], act_bits=a[ARG["act_bits"]],
        act_unsigned=a[ARG["act_unsigned"]], act_shift=a[ARG["act_shift"]],
        rank=0 if down is None else down.shape[0],
    )
    return PackedLinear(
        spec, attr(gm, a[ARG["qweight"]]), wscales, attr(gm, a[ARG["smooth"]]), down,
        attr(gm, a[ARG["lora_up"]]), attr(gm, a[ARG["bias"]]),
    )


def _buffer(gm: fx.GraphModule, prefix: str, t: torch.Tensor) -> fx.Node:
    name, i = prefix, 0
    while hasattr(gm, name):
        i += 1
        name = f"{prefix}_{i}"
    gm.register_buffer(name, t)
    return gm.graph.get_attr(name)


def insert_op(
    gm: fx.GraphModule, x: fx.Node, p: PackedLinear, tag: str, epilogue: str = "none",
    residual: Optional[fx.Node] = None, gate: Optional[fx.Node] = None,
) -> fx.Node:
    """Insert ``svdq::linear(x, <p's tensors as buffers>)`` at the current insert point."""
    safe = "".join(c if c.isalnum() else "_" for c in tag)
    t = {k: _buffer(gm, f"svdq_{safe}_{k}", v) for k, v in p.tensors().items()}
    s = p.spec
    return gm.graph.call_function(
        SVDQ_OP,
        (x, t["qweight"], t["wscales"], t.get("smooth"), t.get("lora_down"), t.get("lora_up"),
         t.get("bias"), residual, gate, s.group_size, s.weight_bits, s.act_bits, s.act_unsigned,
         s.act_shift, epilogue),
    )

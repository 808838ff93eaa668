"""Read and write ``svdq::linear`` nodes of an FX graph (shared by the passes).

The tensors an op applies are either graph attributes (``get_attr`` buffers, as
:mod:`.quantize_linears` inserts them) or graph *placeholders*: a model quantized with
:func:`svdq_compile.quantize` or loaded with :func:`svdq_compile.load` holds
``SVDQLinear`` modules, and Dynamo lifts their buffers to graph inputs whose real
tensors are the backend's ``example_inputs``. :class:`GraphTensors` resolves both.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from svdq_compile.runtime.op_args import ARG, ARG_NAMES
from svdq_compile.runtime.ops import spec_args
from svdq_compile.runtime.packed import LinearSpec, PackedLinear

__all__ = ["SVDQ_OP", "ARG", "is_svdq", "canonicalize", "packed_of", "insert_op", "attr", "GraphTensors", "add_buffer",
           "drop_unused_buffers", "replace_op"]

SVDQ_OP = torch.ops.svdq.linear.default

# ARG: positional index of each svdq::linear input (runtime/op_args.py, the one argument list).
assert tuple(a.name for a in SVDQ_OP._schema.arguments) == ARG_NAMES, "op schema out of sync with LinearArgs"


def is_svdq(node: Any) -> bool:
    """An ``svdq::linear`` call (the overload, as the passes write it, or the packet
    ``torch.ops.svdq.linear``, as Dynamo records a module's call)."""
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and (node.target is SVDQ_OP or node.target is torch.ops.svdq.linear))


def canonicalize(gm: fx.GraphModule) -> int:
    """Rewrite svdq calls to ``svdq.linear.default`` with all-positional arguments (the
    form every pass reads through :data:`ARG`); returns how many nodes changed."""
    names = [a.name for a in SVDQ_OP._schema.arguments]
    changed = 0
    for node in gm.graph.nodes:
        if not is_svdq(node) or (node.target is SVDQ_OP and not node.kwargs and len(node.args) == len(names)):
            continue
        args = list(node.args)
        for a in SVDQ_OP._schema.arguments[len(args):]:
            if a.name in node.kwargs:
                args.append(node.kwargs[a.name])
            elif a.has_default_value():
                args.append(a.default_value)
            else:
                raise ValueError(f"svdq::linear call {node.name} lacks argument {a.name!r}")
        node.target, node.args, node.kwargs = SVDQ_OP, tuple(args), {}
        changed += 1
    if changed:
        gm.recompile()
    return changed


class GraphTensors:
    """The real tensor behind a ``get_attr`` or ``placeholder`` node of ``gm``.

    Placeholders are matched to ``example_inputs`` by position (Dynamo passes one
    example per placeholder, SymInt size placeholders included). Passes never add or
    remove placeholders, so the index is computed once.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Optional[Sequence[Any]] = None) -> None:
        self.gm = gm
        self.example_inputs = list(example_inputs or [])
        self._index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}

    def __call__(self, node: Any) -> Optional[torch.Tensor]:
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part, None)
            return obj if isinstance(obj, torch.Tensor) else None
        if node.op == "placeholder":
            i = self._index.get(node)
            val = self.example_inputs[i] if i is not None and i < len(self.example_inputs) else None
            return val if isinstance(val, torch.Tensor) else None
        return None

    def is_constant(self, node: Any) -> bool:
        """A parameter or buffer (not an activation fed to the graph at run time)."""
        if not isinstance(node, fx.Node):
            return False
        if node.op == "get_attr":
            return self(node) is not None
        if node.op != "placeholder" or self(node) is None:
            return False
        if isinstance(self(node), torch.nn.Parameter):
            return True
        # Dynamo names lifted module state "L_self_modules_..._parameters_weight_" /
        # "..._buffers_smooth_" (inline_inbuilt_nn_modules); user inputs are "L_x_".
        name = str(node.target)
        return "_parameters_" in name or "_buffers_" in name


def attr(gm: fx.GraphModule, node: Optional[fx.Node], tensors: Optional[GraphTensors] = None) -> Optional[torch.Tensor]:
    """Tensor of a get_attr node, or (with ``tensors``) of a placeholder."""
    if node is None:
        return None
    t = (tensors or GraphTensors(gm))(node)
    if t is None:
        raise ValueError(f"expected a get_attr node (or a placeholder with an example tensor), got {node}")
    return t


def packed_of(gm: fx.GraphModule, node: fx.Node, tensors: Optional[GraphTensors] = None) -> PackedLinear:
    """The PackedLinear an svdq::linear node applies (its tensors are buffers or placeholders)."""
    tensors = tensors or GraphTensors(gm)
    a = node.args
    wscales = attr(gm, a[ARG["wscales"]], tensors)
    down = attr(gm, a[ARG["lora_down"]], tensors)
    spec = LinearSpec(
        in_features=wscales.shape[1] * a[ARG["group_size"]], out_features=wscales.shape[0],
        group_size=a[ARG["group_size"]], weight_bits=a[ARG["weight_bits"]], act_bits=a[ARG["act_bits"]],
        act_unsigned=a[ARG["act_unsigned"]], act_shift=a[ARG["act_shift"]],
        rank=0 if down is None else down.shape[0], scheme=a[ARG["scheme"]],
    )
    return PackedLinear(
        spec, attr(gm, a[ARG["qweight"]], tensors), wscales, attr(gm, a[ARG["smooth"]], tensors), down,
        attr(gm, a[ARG["lora_up"]], tensors), attr(gm, a[ARG["bias"]], tensors),
        attr(gm, a[ARG["wzeros"]], tensors), attr(gm, a[ARG["wchannel"]], tensors),
    )


def add_buffer(gm: fx.GraphModule, prefix: str, t: torch.Tensor) -> fx.Node:
    """Register ``t`` as a new buffer of gm and return a get_attr node (at the insert point)."""
    safe = "".join(c if c.isalnum() else "_" for c in prefix)
    name, i = safe, 0
    while hasattr(gm, name):
        i += 1
        name = f"{safe}_{i}"
    gm.register_buffer(name, t)
    return gm.graph.get_attr(name)


_buffer = add_buffer  # old name


def insert_op(
    gm: fx.GraphModule, x: fx.Node, p: PackedLinear, tag: str, epilogue: str = "none",
    residual: Optional[fx.Node] = None, gate: Optional[fx.Node] = None,
) -> fx.Node:
    """Insert ``svdq::linear(x, <p's tensors as buffers>)`` at the current insert point."""
    safe = "".join(c if c.isalnum() else "_" for c in tag)
    t = {k: add_buffer(gm, f"svdq_{safe}_{k}", v) for k, v in p.tensors().items()}
    return gm.graph.call_function(SVDQ_OP, tuple(spec_args(x, p.spec, t, epilogue, residual, gate)))


def replace_op(gm: fx.GraphModule, op: fx.Node, at: fx.Node, **changes: Any) -> fx.Node:
    """A copy of svdq op ``op`` with some arguments changed, inserted before ``at``.

    The caller rewires users and erases what the new op replaces. Inserting at a later
    node is always valid when every new argument is defined before ``at``.
    """
    args = list(op.args)
    for k, v in changes.items():
        args[ARG[k]] = v
    with gm.graph.inserting_before(at):
        new = gm.graph.call_function(SVDQ_OP, tuple(args), dict(op.kwargs))
    new.meta = dict(op.meta)
    return new


def drop_unused_buffers(gm: fx.GraphModule) -> int:
    """Remove get_attr nodes (and their buffers) no op uses any more; returns how many."""
    dead = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    for node in dead:
        gm.graph.erase_node(node)
    live = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for node in dead:
        if node.target in gm._buffers and node.target not in live:
            del gm._buffers[node.target]
    return len(dead)

"""Fold the smoothing ``X' = X / lambda`` into the producer of X (exact up to fp rounding).

When every consumer of a tensor is an ``svdq::linear`` reading it as its input with one
shared smoothing vector lambda, the division can move into whatever computed the tensor,
and the ops drop ``smooth`` (the prologue then reads X' directly: no per-element divide
and, on the CPU path, no materialised X' for the low-rank branch). Producers handled:

1. ``layer_norm`` / ``rms_norm`` (``F.``, ``torch.``, ``aten.`` forms) over the last dim:
   the norm's weight and bias become ``weight/lambda`` and ``bias/lambda`` (computed at
   run time from the parameters, [K] values, so in-place weight updates still apply;
   folded into a new buffer when they are graph constants); an affine-free norm gets
   ``weight = 1/lambda`` (applied inside the norm kernel, so no extra pass).
2. A per-channel affine ``a * w (+ b)`` with constant ``w``, ``b`` (parameters or buffers
   of shape [K]): diffusers' ``RMSNorm`` (``x * rsqrt(mean(x^2) + eps) * weight``),
   affine tails of hand-written norms.
3. AdaLN modulation ``n * m (+ s)`` with *per-sample* ``m``, ``s`` (FLUX/DiT/SD3:
   ``norm(x) * (1 + scale[:, None]) + shift[:, None]``): ``m/lambda`` and ``s/lambda``
   are computed at run time on ~B*K values (two tiny ops) instead of a pass over the
   [B, T, K] activation.

Anything else (an affine-free hand-written norm would need an inserted multiply, which is
a pass over X: not cheaper than the smoothing in the prologue) is left alone and logged.
Returns the number of producers rewritten.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Optional

import torch
import torch.fx as fx

from svdq_compile.passes.op_nodes import ARG, GraphTensors, add_buffer, drop_unused_buffers, is_svdq
from svdq_compile.passes.patterns import is_add, is_mul, norm_of
from svdq_compile.passes.shapes import broadcasts_to, dtype_of, per_sample, same_size, shape_of

__all__ = ["fold_smoothing"]

log = logging.getLogger(__name__)


def _consumers(x: fx.Node) -> Optional[list[fx.Node]]:
    """The svdq ops reading x, when x feeds nothing else (and only as their input)."""
    ops = []
    for u in x.users:
        if not is_svdq(u) or u.args[ARG["x"]] is not x:
            return None
        if any(a is x for i, a in enumerate(u.args) if i != ARG["x"]):
            return None
        ops.append(u)
    return ops


def _shared_smooth(ops: list[fx.Node], tensors: GraphTensors) -> Optional[torch.Tensor]:
    first = tensors(ops[0].args[ARG["smooth"]])
    if first is None:
        return None
    for op in ops[1:]:
        s = tensors(op.args[ARG["smooth"]])
        if s is None or not torch.equal(s, first):
            return None
    return first


def _scaled(t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """t / lambda in float64, back in t's dtype (one rounding)."""
    return (t.double() / lam.double()).to(t.dtype)


def _channel_vector(node: Any, k: int, tensors: GraphTensors) -> Optional[torch.Tensor]:
    """A constant tensor of K values along the last dim (shape [K], [1, K], [1, 1, K] ...)."""
    if not tensors.is_constant(node):
        return None
    t = tensors(node)
    if t is None or not t.dtype.is_floating_point or t.dim() == 0 or t.shape[-1] != k or t.numel() != k:
        return None
    return t


class _Folder:
    def __init__(self, gm: fx.GraphModule, tensors: GraphTensors) -> None:
        self.gm, self.tensors = gm, tensors

    def buffer(self, before: fx.Node, name: str, t: torch.Tensor) -> fx.Node:
        with self.gm.graph.inserting_before(before):
            return add_buffer(self.gm, f"svdq_fold_{name}", t)

    def scaled(self, before: fx.Node, src: fx.Node, t: torch.Tensor, lam: torch.Tensor, tag: str) -> fx.Node:
        """A node holding ``src / lambda`` in src's dtype, inserted before ``before``.

        A ``get_attr`` constant is folded now (new buffer). A parameter placeholder is
        divided at run time (a [K]-sized op): the graph then follows in-place updates of
        the model's norm weights exactly like the unfolded graph did.
        """
        if src.op == "get_attr":
            return self.buffer(before, tag, _scaled(t, lam))
        lam_node = self.buffer(before, f"{tag}_lambda", lam.float())
        with self.gm.graph.inserting_before(before):
            d = self.gm.graph.call_function(torch.div, (src, lam_node))
            if t.dtype != torch.float32:
                d = self.gm.graph.call_method("to", (d, t.dtype))
        return d

    # 1. layer_norm / rms_norm ---------------------------------------------------------
    def norm(self, x: fx.Node, lam: torch.Tensor) -> Optional[str]:
        nc = norm_of(x)
        if nc is None:
            return None
        k = lam.numel()
        if not same_size(nc.dim, k):
            return "skip: norm is not over the quantized dim"
        w = b = None
        if nc.weight is not None:
            w = _channel_vector(nc.weight, k, self.tensors)
            if w is None:
                return "skip: norm weight is not a constant [K] tensor"
        if nc.bias is not None:
            b = _channel_vector(nc.bias, k, self.tensors)
            if b is None:
                return "skip: norm bias is not a constant [K] tensor"
        if w is None:
            dt = dtype_of(x, self.tensors)
            if dt is None:
                return "skip: unknown dtype of an affine-free norm"
            wn = self.buffer(x, f"{x.name}_weight", (1.0 / lam.double()).to(dt))
        else:
            wn = self.scaled(x, nc.weight, w, lam, f"{x.name}_weight")
        bn = None if b is None else self.scaled(x, nc.bias, b, lam, f"{x.name}_bias")
        nc.set_affine(wn, bn)
        return f"{nc.kind} affine" if w is not None else f"{nc.kind} (weight = 1/lambda)"

    # 2. constant per-channel affine ------------------------------------------------------
    def channel_affine(self, x: fx.Node, lam: torch.Tensor) -> Optional[str]:
        k = lam.numel()
        mul, bias_node, b = x, None, None
        add = is_add(x)
        if add is not None:
            for m, c in (add, add[::-1]):
                cb = _channel_vector(c, k, self.tensors)
                if cb is not None and is_mul(m) is not None and len(m.users) == 1:
                    mul, bias_node, b = m, c, cb
                    break
            else:
                return None
        ops = is_mul(mul)
        if ops is None:
            return None
        for a, c in (ops, ops[::-1]):
            w = _channel_vector(c, k, self.tensors)
            if w is not None and isinstance(a, fx.Node):
                break
        else:
            return None
        mul.replace_input_with(c, self.scaled(mul, c, w, lam, f"{x.name}_scale"))
        if b is not None:
            x.replace_input_with(bias_node, self.scaled(x, bias_node, b, lam, f"{x.name}_shift"))
        return "per-channel affine"

    # 3. AdaLN modulation -----------------------------------------------------------------
    def modulation(self, x: fx.Node, lam: torch.Tensor) -> Optional[str]:
        out = shape_of(x, self.tensors)
        dt = dtype_of(x, self.tensors)
        if out is None or dt is None:
            return None

        def small(n: Any) -> bool:
            s = shape_of(n, self.tensors)
            return (isinstance(n, fx.Node) and s is not None and per_sample(s, out)
                    and dtype_of(n, self.tensors) == dt)

        def full(n: Any) -> bool:
            s = shape_of(n, self.tensors)
            return isinstance(n, fx.Node) and s is not None and broadcasts_to(out, s) and broadcasts_to(s, out)

        mul, shift = x, None
        add = is_add(x)
        if add is not None:
            for m, s in (add, add[::-1]):
                if is_mul(m) is not None and len(m.users) == 1 and small(s):
                    mul, shift = m, s
                    break
            else:
                return None
        ops = is_mul(mul)
        if ops is None:
            return None
        for n, scale in (ops, ops[::-1]):  # norm(x) * (1 + scale) first
            if full(n) and small(scale):
                break
        else:
            return None
        lam_node = self.buffer(mul, f"{x.name}_lambda", lam.float())
        for node, user in ((scale, mul), (shift, x)):
            if node is None:
                continue
            with self.gm.graph.inserting_before(user):
                div = self.gm.graph.call_function(torch.div, (node, lam_node))
                if dt != torch.float32:
                    div = self.gm.graph.call_method("to", (div, dt))
            user.replace_input_with(node, div)
        return "modulation (per-sample scale/shift)"

    def fold(self, x: fx.Node, lam: torch.Tensor) -> tuple[bool, str]:
        for rule in (self.norm, self.channel_affine, self.modulation):
            how = rule(x, lam)
            if how is not None:
                return not how.startswith("skip"), how
        return False, "producer is not a norm, a per-channel affine or an AdaLN modulation"


def fold_smoothing(gm: fx.GraphModule, tensors: Optional[GraphTensors] = None) -> int:
    """Fold each shared lambda into the producer of the svdq ops' input; returns the count."""
    tensors = tensors or GraphTensors(gm)
    by_input: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if is_svdq(node) and isinstance(node.args[ARG["x"]], fx.Node):
            by_input[node.args[ARG["x"]]].append(node)
    folder = _Folder(gm, tensors)
    folded = 0
    for x, _ in by_input.items():
        ops = _consumers(x)
        if ops is None:
            log.debug("fold_smoothing: %s also feeds other ops; smoothing stays in the linear", x.name)
            continue
        lam = _shared_smooth(ops, tensors)
        if lam is None:
            continue  # nothing to fold (or consumers disagree on lambda)
        ok, how = folder.fold(x, lam)
        if not ok:
            (log.info if how.startswith("skip") else log.debug)(
                "fold_smoothing: %s (%s) not folded: %s", x.name, getattr(x.target, "__name__", x.target), how)
            continue
        for op in ops:
            op.update_arg(ARG["smooth"], None)
        folded += 1
        log.info("fold_smoothing: lambda of %d op(s) folded into %s: %s", len(ops), x.name, how)
    if folded:
        drop_unused_buffers(gm)
        gm.graph.lint()
        gm.recompile()
    return folded

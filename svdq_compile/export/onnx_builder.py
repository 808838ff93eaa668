"""A thin recorder of named ONNX nodes and initializers for one graph (over ``ir.tape.Tape``),
shared by the exact and deploy expansions of the quantized linear."""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir

__all__ = ["Builder", "fresh_initializer_name", "PREFIX"]

_F32 = ir.DataType.FLOAT
PREFIX = "svdq_export"


def fresh_initializer_name(graph: ir.Graph, name: str) -> str:
    """``name``, with underscores appended until no initializer of ``graph`` uses it."""
    while name in graph.initializers:
        name += "_"
    return name



class Builder:
    """Records named nodes and initializers for one graph (a thin layer over ``ir.tape.Tape``)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.tape = ir.tape.Tape()
        self._consts: dict[tuple, ir.Value] = {}
        self.scope = ""
        self._count = 0

    def op(self, op_type: str, inputs: list, attributes: Optional[dict] = None, name: str = "",
           domain: str = "") -> ir.Value:
        self._count += 1
        out = self.tape.op(op_type, inputs, attributes=attributes, domain=domain,
                           name=f"{self.scope}/{op_type}_{self._count}")
        out.name = f"{self.scope}/{name or op_type.lower()}_{self._count}"
        return out

    def initializer(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        if name in self.graph.initializers:
            raise ValueError(f"svdq export: initializer name {name!r} is already used in the graph")
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def const(self, array: np.ndarray) -> ir.Value:
        """A small shared constant (shapes, axes, scalars), one initializer per distinct value."""
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = fresh_initializer_name(self.graph, f"{PREFIX}/const_{len(self._consts)}")
            self._consts[key] = self.initializer(name, ir.Tensor(array, name=name))
        return self._consts[key]

    def const_tensor(self, tensor: ir.TensorProtocol) -> ir.Value:
        """A small constant of a dtype numpy cannot key on (e.g. a float8 zero point)."""
        key = ("tensor", str(tensor.dtype), tuple(tensor.shape), tensor.tobytes())
        if key not in self._consts:
            name = fresh_initializer_name(self.graph, f"{PREFIX}/const_{len(self._consts)}")
            tensor.name = name
            self._consts[key] = self.initializer(name, tensor)
        return self._consts[key]

    def f32(self, value: float) -> ir.Value:
        return self.const(np.array(value, dtype=np.float32))

    def i64(self, values: list[int]) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64))

    def to_f32(self, v: ir.Value) -> ir.Value:
        return v if v.dtype == _F32 else self.op("Cast", [v], {"to": _F32}, "f32")

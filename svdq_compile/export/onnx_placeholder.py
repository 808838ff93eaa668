"""Step 1 of the ONNX export: ``svdq::linear`` -> one placeholder node ``svdq.export::QuantLinear``.

``torch.onnx.export(dynamo=True)`` translates every ``torch.ops.svdq.linear`` call
through :func:`translate_svdq_linear` into a single node of a private domain that
carries the op's tensors as inputs and its static arguments as attributes. The
exporter's optimizer leaves nodes of unknown domains alone, so the quantized weights
reach step 2 (:mod:`.onnx_linear`) untouched: there every placeholder is expanded into
standard ONNX ops with INT4 initializers, and the private domain disappears.

Why not emit the standard ops here directly: the translation function only sees
symbolic values, while the expansion needs the weight *bytes* (to re-pack them as
INT4 initializers) and must stop the optimizer from constant-folding the
``DequantizeLinear`` of a constant weight back into a float tensor.
"""
from __future__ import annotations

import onnxscript
from onnx.defs import OpSchema

from svdq_compile.runtime.op_args import ARG_NAMES, TENSOR_ARGS, bind, with_signature

__all__ = ["PLACEHOLDER_DOMAIN", "PLACEHOLDER_OP", "INPUT_NAMES", "ATTRIBUTES", "translate_svdq_linear"]

PLACEHOLDER_DOMAIN = "svdq.export"
PLACEHOLDER_OP = "QuantLinear"
# Tensor inputs of svdq::linear, in its schema order; missing optional ones become "".
INPUT_NAMES = TENSOR_ARGS  # runtime/op_args.py
ATTRIBUTES = tuple(n for n in ARG_NAMES if n not in TENSOR_ARGS)

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _schema() -> OpSchema:
    """The placeholder's schema (built, never registered globally: no side effects on onnx)."""
    fp = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [fp("x", "T"), fp("qweight", "tensor(int8)"), fp("wscales", "S")]
    inputs += [fp(n, f"T_{n}", param_option=optional) for n in INPUT_NAMES[3:]]
    attr = OpSchema.AttrType
    attributes = [
        OpSchema.Attribute("group_size", attr.INT, "quantization group along K"),
        OpSchema.Attribute("weight_bits", attr.INT, "4 or 8"),
        OpSchema.Attribute("act_bits", attr.INT, "4, 8 or 16 (16 = activations not quantized)"),
        OpSchema.Attribute("act_unsigned", attr.INT, "1 = unsigned activation grid"),
        OpSchema.Attribute("act_shift", attr.FLOAT, "added before unsigned quantization"),
        OpSchema.Attribute("epilogue", attr.STRING, "elementwise op after the bias"),
        OpSchema.Attribute("scheme", attr.STRING, "group | int8 | fp8 (per-token activation schemes)"),
    ]
    constraints = [("T", _FLOATS, ""), ("S", _FLOATS + ["tensor(int8)"], "")]
    constraints += [(f"T_{n}", ["tensor(int8)"] if n == "wzeros" else _FLOATS, "") for n in INPUT_NAMES[3:]]
    return OpSchema(PLACEHOLDER_OP, PLACEHOLDER_DOMAIN, 1, "svdq::linear, expanded after export",
                    inputs=inputs, outputs=[fp("y", "T")], type_constraints=constraints, attributes=attributes)


_OPSET = onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1)
_OP = onnxscript.values.Op(_OPSET, PLACEHOLDER_OP, _schema())


@with_signature
def translate_svdq_linear(*args, **kwargs):
    """``custom_translation_table`` entry for ``torch.ops.svdq.linear.default``."""
    a = bind(*args, **kwargs)
    return _OP(*(getattr(a, n) for n in INPUT_NAMES),
               group_size=int(a.group_size), weight_bits=int(a.weight_bits), act_bits=int(a.act_bits),
               act_unsigned=int(bool(a.act_unsigned)), act_shift=float(a.act_shift), epilogue=str(a.epilogue),
               scheme=str(a.scheme))

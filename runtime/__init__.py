"""Runtime: packed weight format, reference numerics, and the ``svdq::linear`` custom op."""
from svdq_compile.runtime.packing import pack_int4, unpack_int4
from svdq_compile.runtime.quantize import dequantize_groups, quantize_activation, quantize_groups, quantize_weight, qrange
from svdq_compile.runtime.packed import EPILOGUES, MODES, LinearSpec, PackedLinear, mode_bits
from svdq_compile.runtime.reference import quantized_linear_reference
from svdq_compile.runtime.ops import linear_from_packed, svdq_linear

__all__ = [
    "pack_int4", "unpack_int4", "quantize_groups", "dequantize_groups", "quantize_weight",
    "quantize_activation", "qrange", "LinearSpec", "PackedLinear", "EPILOGUES", "MODES",
    "mode_bits", "quantized_linear_reference", "svdq_linear", "linear_from_packed",
]

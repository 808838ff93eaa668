"""Runtime: packed weight format, reference numerics, and the ``svdq::linear`` custom op."""
from svdq_compile.runtime.packing import pack_int4, unpack_int4
from svdq_compile.runtime.quantize import dequantize_groups, quantize_activation, quantize_groups, quantize_weight, qrange
from svdq_compile.runtime.modes import MODES, QuantMode, get_mode, register_mode
from svdq_compile.runtime import per_token as _per_token  # registers the per-token schemes
from svdq_compile.runtime.packed import EPILOGUES, LinearSpec, PackedLinear
from svdq_compile.runtime.reference import quantized_linear_reference
from svdq_compile.runtime.ops import linear_from_packed, svdq_linear
from svdq_compile.runtime import torch_path as _torch_path  # registers the torch path of every scheme

__all__ = [
    "pack_int4", "unpack_int4", "quantize_groups", "dequantize_groups", "quantize_weight",
    "quantize_activation", "qrange", "LinearSpec", "PackedLinear", "EPILOGUES", "MODES",
    "QuantMode", "get_mode", "register_mode", "quantized_linear_reference", "svdq_linear", "linear_from_packed",
]

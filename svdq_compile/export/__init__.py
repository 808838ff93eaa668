"""Export of quantized models: ONNX (ONNX Runtime, TensorRT's ONNX parser) and TensorRT engines.

* :func:`export_onnx` - standard ONNX (opset >= 21): INT4 weights as blocked
  ``DequantizeLinear`` initializers, dynamic per-token-group INT4 activation
  quantization as plain float ops, the low-rank branch as float ``MatMul``
  (``flavor="exact"``); ``flavor="deploy"``: ONNX Runtime's integer GEMM for
  ``w4a8-int8`` layers, faster than the float model on CPU. Also accepts a model
  compiled with ``torch.compile(backend="svdquant")`` once it has run.
  Needs the ``[onnx]`` extra (onnx, onnxscript; onnxruntime to run the file).
* :func:`export_tensorrt` - Torch-TensorRT engine with a generated plugin for the
  quantized linear; needs the ``[tensorrt]`` extra and a CUDA GPU.

onnx / onnxscript / tensorrt are imported only when a function is called.
See docs/export.md.
"""
from __future__ import annotations

from svdq_compile.export.compiled_state import NotQuantizedYetError
from svdq_compile.export.onnx_export import (
    OnnxExport, bf16_parameter_bytes, describe_op_types, export_onnx, export_onnx_variants, onnx_op_types,
    ort_optimized_op_types,
    ort_session, quantized_weight_bytes,
)
from svdq_compile.export.tensorrt_export import TensorRTUnavailableError, export_tensorrt

__all__ = ["export_onnx", "OnnxExport", "ort_session", "onnx_op_types", "quantized_weight_bytes",
           "ort_optimized_op_types", "describe_op_types", "bf16_parameter_bytes", "NotQuantizedYetError",
           "export_onnx_variants",
           "export_tensorrt", "TensorRTUnavailableError"]

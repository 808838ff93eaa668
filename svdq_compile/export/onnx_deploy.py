"""The ``deploy`` flavour of the ONNX export: activations quantized for ONNX Runtime's integer GEMM.

The ``exact`` flavour (:mod:`.onnx_linear`) writes our activation quantization as float
ops in front of a dequantized float ``MatMul``: right numbers, but slower than the float
model in ONNX Runtime. The deploy flavour writes, per ``w4a8-int8`` layer::

    xs = Cast(x) / smooth                                  # shared by layers that read the same x
    s  = Max(s0, FLT_MIN),  s0 = ReduceMax(Abs(xs), axes=[-1]) / 127      # per token (0 rows: codes 0)
    qa = QuantizeLinear(xs, s, 128, axis=-1, block_size=K)                 # UINT8, one pass (ties: half to even)
    E  = Cast((Cast(U, INT32) - Cast(Z, INT32)) * Cast(S, INT32) + 128, UINT8)   # [K, N], from initializers
    y  = MatMulIntegerToFloat(qa, E, 1, c, 128, 128) * s                   # exact int32 sum over K, * c * s
    y  = y + ([xs @ lora_down^T, 1]) @ [lora_up^T; bias] -> epilogue      # bias as the up projection's last row

``U`` (UINT4 ``[K/G, G, N]``), ``Z`` (UINT4 ``[K/G, 1, N]``) and ``S`` (UINT8 ``[K/G, 1, N]``)
are QServe's progressive weight (:mod:`svdq_compile.runtime.per_token`) stored at 4 bits;
``int8_kernel="u8u8_floor"`` writes our ``floor(v/s + 0.5)`` as float ops instead of
``QuantizeLinear`` (bit-exact codes, 3 more passes over the input). The expansion to the INT8 operand ``e = (u - z) * s`` reads only initializers, so ONNX
Runtime constant-folds it when the session is created and the GEMM pre-packs the result
(check with :func:`.onnx_export.ort_optimized_op_types`). Both operands are passed as
UINT8 with zero point 128: MLAS's U8U8 kernel widens to 16 bits before multiplying, so the
int32 sum is exact on every x86 CPU. Its U8S8 kernel (``int8_kernel="u8s8"``) is faster
without AVX-VNNI but multiplies with ``vpmaddubsw``, whose int16 pair sums saturate
(|e| up to 127 against activations up to 255); ``"dynamic"`` uses
``com.microsoft.DynamicQuantizeMatMul`` (ONNX Runtime's own per-tensor asymmetric UINT8
activations, not our per-token numerics). docs/export.md has the measured trade-off.

Other schemes: group-wise modes (``w4a4``, ``w4a8``, ``w8a8``) keep their INT4 blocked
``DequantizeLinear`` weight and feed it the smoothed float input (no float activation
quantization): ONNX Runtime fuses that into ``com.microsoft.MatMulNBits``, which by default
(accuracy level 4) quantizes the input to int8 blocks itself. That is *not* our W4A4
numerics (it is closer to float); the error vs the torch model is stated in the docs.
``w4a8-fp8`` layers are written as in the exact flavour (no FP8 GEMM on ONNX Runtime CPU).
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import numpy as np
import onnx_ir as ir
import torch

from svdq_compile.runtime.packing import unpack_int4

from svdq_compile.export.onnx_builder import Builder, fresh_initializer_name

__all__ = ["INT8_KERNELS", "int8_weight", "int8_activation", "int8_matmul", "lowrank_with_bias", "unit_column",
           "store_fp16", "fresh_initializer_name", "FP16_MIN_ELEMENTS", "FP16_MIN_SQNR_DB"]

log = logging.getLogger(__name__)

INT8_KERNELS = ("u8u8", "u8u8_floor", "u8s8", "dynamic")
# Float initializers at least this large are stored in fp16 + Cast (smaller ones: not worth a node).
FP16_MIN_ELEMENTS = 256
# ... unless fp16 rounding costs more than this (values above 65504, or mostly below fp16's normal range).
FP16_MIN_SQNR_DB = 60.0


def _pack_u4(values: torch.Tensor, shape: list[int], name: str) -> ir.TensorProtocol:
    """Integers in [0, 15] -> an ONNX UINT4 tensor (two per byte, low nibble first)."""
    flat = values.reshape(-1).to(torch.uint8).numpy()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return ir.PackedTensor(packed, ir.DataType.UINT4, shape=ir.Shape(shape), name=name)


def int8_weight(b: Builder, arrays: dict, group: int, layer: str, kernel: str) -> tuple[ir.Value, ir.Value]:
    """w4a8-int8 weight: UINT4 codes + UINT4 zero points + UINT8 group scales as initializers,
    expanded in-graph to the ``[K, N]`` GEMM operand (UINT8 = e + 128, or INT8 e for
    ``u8s8``/``dynamic``). Returns (operand, channel scale c [N] fp32 initializer)."""
    q = torch.from_numpy(np.array(arrays["qweight"])).view(torch.int8)  # np.array: a writable copy
    s = torch.from_numpy(np.array(arrays["wscales"])).to(torch.int16)  # [N, K/G] in [1, 16]
    z = torch.from_numpy(np.array(arrays["wzeros"])).to(torch.int16)  # [N, K/G] in [0, 15]
    u = unpack_int4(q, signed=True).to(torch.int16) + 8  # [N, K] in [0, 15]
    n, k = u.shape
    groups = k // group
    u_t = u.t().contiguous().view(groups, group, n)  # [K/G, G, N]
    z_t = z.t().contiguous().view(groups, 1, n)
    s_t = s.t().contiguous().view(groups, 1, n)
    u_v = b.initializer(f"{layer}.wcodes_u4", _pack_u4(u_t, [groups, group, n], f"{layer}.wcodes_u4"))
    z_v = b.initializer(f"{layer}.wzeros_u4", _pack_u4(z_t, [groups, 1, n], f"{layer}.wzeros_u4"))
    s_v = b.initializer(f"{layer}.wscales_u8", ir.Tensor(s_t.to(torch.uint8).numpy(), name=f"{layer}.wscales_u8"))
    c_v = b.initializer(f"{layer}.wchannel_f32", ir.Tensor(np.ascontiguousarray(arrays["wchannel"], dtype=np.float32),
                                                           name=f"{layer}.wchannel_f32"))
    i32 = ir.DataType.INT32
    e = b.op("Mul", [b.op("Sub", [b.op("Cast", [u_v], {"to": i32}), b.op("Cast", [z_v], {"to": i32})]),
                     b.op("Cast", [s_v], {"to": i32})], name="wexpanded")  # (u - z) * s, |e| <= 127
    if kernel.startswith("u8u8"):
        e = b.op("Cast", [b.op("Add", [e, b.const(np.array(128, dtype=np.int32))])], {"to": ir.DataType.UINT8})
    else:
        e = b.op("Cast", [e], {"to": ir.DataType.INT8})
    return b.op("Reshape", [e, b.i64([k, n])], name="w8_kn"), c_v


def lowrank_with_bias(b: Builder, down: ir.Value, up: ir.Value, bias: ir.Value, layer: str) -> tuple[ir.Value, ir.Value]:
    """``[K, r+1]`` down projection with a zero column and ``[r+1, N]`` up projection whose last
    row is the bias: ``([xs @ down^T, 0] + [0, .., 0, 1]) @ up_aug = xs @ down^T @ up^T + bias``."""
    d, u, bias_arr = down.const_value.numpy(), up.const_value.numpy(), bias.const_value.numpy()
    dtype = d.dtype if d.dtype == u.dtype == bias_arr.dtype else np.float32
    d_aug = np.concatenate([d.T.astype(dtype), np.zeros((d.shape[1], 1), dtype)], axis=1)
    u_aug = np.concatenate([u.T.astype(dtype), bias_arr.reshape(1, -1).astype(dtype)], axis=0)
    dv = b.initializer(f"{layer}.lora_down_t_aug", ir.Tensor(np.ascontiguousarray(d_aug), name=f"{layer}.lora_down_t_aug"))
    uv = b.initializer(f"{layer}.lora_up_t_bias", ir.Tensor(np.ascontiguousarray(u_aug), name=f"{layer}.lora_up_t_bias"))
    return dv, uv


def unit_column(width: int) -> np.ndarray:
    """``[0, .., 0, 1]`` (float32, ``width`` entries): the constant 1 that picks the bias row."""
    e = np.zeros(width, dtype=np.float32)
    e[-1] = 1.0
    return e


def int8_activation(b: Builder, xs: ir.Value, k: int, exact_rounding: bool = False) -> tuple[ir.Value, ir.Value]:
    """Per-token int8 quantization of the smoothed input, shifted to UINT8 (zero point 128).
    ``exact_rounding``: our ``floor(v/s + 0.5)`` as float ops (4 passes over [M, K]); default: one
    ``QuantizeLinear`` (round half to even: differs on exact ties only). Returns (qa uint8
    [..., K], s fp32 [..., 1])."""
    absmax = b.op("ReduceMax", [b.op("Abs", [xs]), b.i64([-1])], {"keepdims": 1}, "absmax")
    s = b.op("Div", [absmax, b.f32(127.0)], name="act_scale_raw")
    # The reference's Where(s > 0, s, 1) as one op: equal for every s >= FLT_MIN; an all-zero row gets
    # s = FLT_MIN instead of 1, and its codes and output are 0 either way (two [M, 1] ops less per quantizer).
    s = b.op("Max", [s, b.f32(float(np.finfo(np.float32).tiny))], name="act_scale")
    if not exact_rounding:
        # One fused pass: blocked QuantizeLinear with one block spanning K (opset 21) =
        # saturate(round_half_even(xs / s) + 128). It differs from floor(v + 0.5) only where
        # xs / s lands exactly on a half (ties: measured 1 code in 435k on random data).
        zp = b.op("Expand", [b.const(np.array(128, dtype=np.uint8)), b.op("Shape", [s])], name="act_zero_point")
        return b.op("QuantizeLinear", [xs, s, zp], {"axis": -1, "block_size": int(k)}, "act_u8"), s
    # No Clip: |xs / s| <= 127 (1 + 2 eps) since s = absmax / 127, so floor(v + 0.5) is already in
    # [-127, 127], exactly what the reference's clamp to [-128, 127] leaves (one [M, K] pass less).
    q = b.op("Floor", [b.op("Add", [b.op("Div", [xs, s]), b.f32(0.5)])], name="act_int")
    qa = b.op("Cast", [b.op("Add", [q, b.f32(128.0)])], {"to": ir.DataType.UINT8}, "act_u8")
    return qa, s


def int8_matmul(b: Builder, xs: ir.Value, act: Optional[tuple[ir.Value, ir.Value]], w: ir.Value, chan: ir.Value,
                kernel: str) -> ir.Value:
    """``(qa @ E) * s * c`` in float32 [..., N]."""
    if kernel == "dynamic":
        return b.op("DynamicQuantizeMatMul", [xs, w, chan], name="y_int", domain="com.microsoft")
    qa, s = act
    zp = b.const(np.array(128, dtype=np.uint8))
    one = b.f32(1.0)
    # com.microsoft.MatMulIntegerToFloat = MatMulInteger + Cast + the channel scale in one kernel
    # (its a_scale is per tensor, so the per-token scale is one Mul after it).
    ins = [qa, w, one, chan, zp] + ([zp] if kernel.startswith("u8u8") else [])
    y = b.op("MatMulIntegerToFloat", ins, name="acc_scaled", domain="com.microsoft")
    return b.op("Mul", [y, s], name="y_int")


def _fp16_copy(arr: np.ndarray) -> Optional[np.ndarray]:
    """``arr`` rounded to fp16, or None where that loses more than ``FP16_MIN_SQNR_DB`` (overflow, or
    values mostly in fp16's subnormal range)."""
    h = arr.astype(np.float16)
    if not np.isfinite(h).all():
        return None
    ref = arr.astype(np.float64)
    signal = float(np.sum(ref * ref))
    noise = float(np.sum((ref - h.astype(np.float64)) ** 2))
    if noise > 0 and (signal == 0 or 10.0 * np.log10(signal / noise) < FP16_MIN_SQNR_DB):
        return None
    return h


def store_fp16(graph: ir.Graph, values: Iterable[ir.Value], min_elements: int = FP16_MIN_ELEMENTS) -> tuple[int, int]:
    """Store float32 initializers as fp16 initializers followed by ``Cast(to=FLOAT)`` (in place).

    The Cast reads only an initializer, so ONNX Runtime constant-folds it when the session is
    created (the GEMMs then pre-pack the fp32 result, as before): the file halves these tensors
    and the session runs the same graph, on weights rounded to fp16 (|rel. error| <= 2^-11).
    Initializers that are graph inputs or outputs, smaller than ``min_elements``, or that fp16
    cannot hold (:func:`_fp16_copy`) stay float32. Returns (tensors converted, bytes saved)."""
    first = next(iter(graph), None)
    n_done = saved = 0
    casts = []
    for v in values:
        t = v.const_value
        if (t is None or v.dtype != ir.DataType.FLOAT or v.name not in graph.initializers or v.is_graph_input()
                or v.is_graph_output() or not v.uses() or int(np.prod(t.shape)) < min_elements):
            continue
        h = _fp16_copy(t.numpy())
        if h is None:
            log.info("svdq export: %s stays float32 (fp16 would lose more than %.0f dB)", v.name, FP16_MIN_SQNR_DB)
            continue
        name = fresh_initializer_name(graph, f"{v.name}_fp16")
        hv = ir.Value(name=name, shape=ir.Shape(h.shape), type=ir.TensorType(ir.DataType.FLOAT16),
                      const_value=ir.Tensor(h, name=name))
        graph.register_initializer(hv)
        cast = ir.Node("", "Cast", [hv], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)], name=f"{name}/Cast",
                       num_outputs=1)
        out = cast.outputs[0]
        out.name, out.shape, out.type = f"{v.name}_f32", v.shape, v.type
        v.replace_all_uses_with(out)
        del graph.initializers[v.name]
        casts.append(cast)
        n_done += 1
        saved += h.nbytes
    if casts:
        if first is not None:
            graph.insert_before(first, casts)
        else:  # pragma: no cover - a graph of initializers only
            graph.extend(casts)
    return n_done, saved

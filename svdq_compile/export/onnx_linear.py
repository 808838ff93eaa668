"""Step 2 of the ONNX export: expand ``svdq.export::QuantLinear`` into standard ONNX ops.

One quantized linear becomes (all math in float32, as the reference and the CPU op)::

    xs = Cast(x) / smooth                               # X' (smoothing), [..., K]
    g  = Reshape(xs + shift, [0, .., 0, K/G, G])        # per-token groups of G
    s  = ReduceMax(Abs(g) | Relu(g), axes=[-1]) / qmax  # scale = absmax / qmax
    s  = Where(s > 0, s, 1)                             # all-zero group -> 1
    q  = Clip(Floor(g / s + 0.5), qmin, qmax)           # floor(v/s + 0.5), clamp
    a  = Reshape(q * s, [0, .., 0, K])                  # dequantized activations
    W  = DequantizeLinear(W_int4 [K, N], scale [K/G, N], axis=0, block_size=G)
    y  = a @ W + (xs @ lora_down^T) @ lora_up^T + bias  # low-rank branch reads X'
    y  = epilogue(y) * gate + residual                  # MatMul broadcasts: y is [..., N]

(An input of unknown rank is flattened to ``[-1, K]`` first and reshaped back after.)

Per-token schemes (``w4a8-int8``, ``w4a8-fp8``) keep their INT4 codes too and compute the
kernels' arithmetic, rebuilding the 8-bit operand from the codes in-graph
(:func:`_per_token_weight`, :func:`_per_token_matmul`)::

    q, s = per-token codes of xs (int8: clip(floor(xs/s + 0.5)), s = absmax/127; fp8: RNE to e4m3,
           s = absmax/448), as float
    int8: acc = q @ DequantizeLinear(codes, s_g) + ReduceSum(q per group) @ DequantizeLinear(o)
          (codes = u - 8, o = (8 - z) * s_g INT8: q @ e exactly, e = (u - z) * s_g)
    fp8:  acc = q @ DequantizeLinear(QuantizeLinear(DequantizeLinear(codes, s_g / c), 1, FLOAT8E4M3FN))
    y  = acc * s * c + low-rank + bias ...

The residual weight is stored as an INT4 (INT8 for 8-bit modes) initializer, transposed
to ``[K, N]`` so the ``DequantizeLinear`` output feeds ``MatMul`` directly (the weight-only
pattern TensorRT fuses). ONNX packs INT4 two per byte, low nibble first: the same byte
order as :func:`svdq_compile.runtime.packing.pack_int4`. Weight scales are stored as
float32 (the fp16 values, converted exactly) so that ``q * scale`` is exact, as in the
reference; with fp16 scales ``DequantizeLinear`` would round every product to fp16.

Activation quantization uses plain float ops (``DequantizeLinear``-free), because ONNX's
``QuantizeLinear`` rounds half-to-even and TensorRT does not accept INT4 activations;
the ops above reproduce ``floor(v / s + 0.5)`` exactly.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import onnx_ir as ir
import torch

from svdq_compile.runtime.epilogue import EPILOGUES
from svdq_compile.runtime.modes import handler, register_handler
from svdq_compile.runtime.packing import pack_int4, unpack_int4
from svdq_compile.runtime.per_token import FP8_MAX
from svdq_compile.runtime.quantize import qrange

from svdq_compile.export import onnx_deploy
from svdq_compile.export.onnx_builder import Builder
from svdq_compile.export.onnx_placeholder import ATTRIBUTES, INPUT_NAMES, PLACEHOLDER_DOMAIN, PLACEHOLDER_OP

__all__ = ["expand_quantized_linears", "MIN_OPSET", "FLAVORS"]

MIN_OPSET = 21  # DequantizeLinear with INT4 inputs and block_size
FLAVORS = ("exact", "deploy")
_F32 = ir.DataType.FLOAT
logger = logging.getLogger(__name__)


# The ONNX form of each epilogue of runtime/epilogue.py's table (checked to cover it).
_ONNX_EPILOGUES = {
    "none": lambda b, y: y,
    "gelu": lambda b, y: b.op("Gelu", [y]),
    "gelu_tanh": lambda b, y: b.op("Gelu", [y], {"approximate": "tanh"}),
    "silu": lambda b, y: b.op("Mul", [y, b.op("Sigmoid", [y])], name="silu"),
    "relu": lambda b, y: b.op("Relu", [y]),
}
assert set(_ONNX_EPILOGUES) == set(EPILOGUES), "every epilogue needs its ONNX form"


def _const_array(v: Optional[ir.Value], what: str, layer: str) -> np.ndarray:
    if v is None or v.const_value is None:
        raise ValueError(
            f"svdq export: {what} of quantized layer {layer!r} is not a constant initializer of the exported "
            "graph; export the model with its quantized buffers as constants (export_params=True)"
        )
    return v.const_value.numpy()


def _weight_tensor(qweight: np.ndarray, weight_bits: int, name: str) -> ir.TensorProtocol:
    """[N, K//2] packed int4 (or [N, K] int8) -> INT4/INT8 tensor of logical shape [K, N]."""
    q = torch.from_numpy(np.ascontiguousarray(qweight)).view(torch.int8)
    if weight_bits == 8:
        return ir.Tensor(np.ascontiguousarray(q.t().numpy()), dtype=ir.DataType.INT8, name=name)
    qt = unpack_int4(q, signed=True).t().contiguous()  # [K, N] int8 in [-8, 7]
    k, n = qt.shape
    flat = qt.reshape(-1)  # ONNX packs the flattened tensor: element i -> byte i // 2, low nibble first
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    packed = pack_int4(flat).view(torch.uint8).numpy()
    return ir.PackedTensor(packed, ir.DataType.INT4, shape=ir.Shape([k, n]), name=name)


def _per_token_weight(b: Builder, ins: dict, scheme: str, group: int, layer: str) -> dict:
    """Per-token schemes: the 4-bit codes as an INT4 ``[K, N]`` initializer (the stored nibbles,
    as for W4A4) plus fp32 scales from which the graph rebuilds the kernels' 8-bit operand exactly.

    ``int8``: the nibble is ``u - 8``, so ``DequantizeLinear(codes, s)`` gives ``(u - 8) * s``
    (integers, exact in fp32) and ``e = (u - z) * s`` is that plus the per-group offset
    ``o = (8 - z) * s`` (no zero point: TensorRT requires it to be 0). ``fp8``: the scale is
    ``s_g / c_n`` (exact: ``c_n`` is a power of two), so ``DequantizeLinear`` gives
    ``q * s_g / c_n`` exactly and one ``QuantizeLinear`` to FLOAT8E4M3FN rounds it as
    :func:`~svdq_compile.runtime.per_token.expand_fp8` does. Returns the initializers:
    ``codes``, ``scale`` ([K/G, N]), ``chan`` ([N]) and ``offset`` ([K/G, N] INT8, int8 only)."""
    arr = {key: (None if ins[key] is None else _const_array(ins[key], key, layer))
           for key in ("qweight", "wscales", "wzeros", "wchannel")}
    out = {"codes": b.initializer(f"{layer}.qweight_int4_kn", _weight_tensor(arr["qweight"], 4, f"{layer}.w"))}
    s = np.asarray(arr["wscales"]).astype(np.float32)  # [N, K/G]: int8 in [1, 16] or fp16, both exact in fp32
    c = np.asarray(arr["wchannel"], dtype=np.float32)  # [N]
    if scheme == "int8":
        if arr["wzeros"] is None:
            raise ValueError(f"svdq export: w4a8-int8 layer {layer!r} has no zero points (wzeros)")
        scale = s
        offset = np.ascontiguousarray(((8.0 - np.asarray(arr["wzeros"]).astype(np.float32)) * s).T)  # integers
        # QServe's quantizer keeps o in [-112, 127] (z = 0 needs min > -s/2, hence s <= 9): INT8; other
        # weights (e.g. imported ones) may reach 128, then fp32.
        fits = bool(np.all((offset >= -128) & (offset <= 127)))
        name = f"{layer}.wzero_offset_{'int8' if fits else 'f32'}_kn"
        out["offset"] = b.initializer(name, ir.Tensor(offset.astype(np.int8) if fits else offset, name=name))
    else:
        scale = s / c[:, None]
        if not np.array_equal(scale * c[:, None], s):  # c is a power of two: only an fp32 underflow could break it
            raise ValueError(f"svdq export: w4a8-fp8 layer {layer!r}: group scales / channel scale are not exact "
                             "in float32 (wchannel must be a power of two)")
    out["scale"] = b.initializer(f"{layer}.wscales_f32_kn",
                                 ir.Tensor(np.ascontiguousarray(scale.T), name=f"{layer}.wscales_f32_kn"))
    out["chan"] = b.initializer(f"{layer}.wchannel_f32", ir.Tensor(c, name=f"{layer}.wchannel_f32"))
    return out


def _per_token_matmul(b: Builder, q: ir.Value, s: ir.Value, wt: dict, scheme: str, group: int, k: int,
                      keep: list[int]) -> ir.Value:
    """``(q @ w8) * s * c``: the kernels' arithmetic (runtime/torch_path.py), with the 8-bit operand
    ``w8`` rebuilt from the INT4 codes (:func:`_per_token_weight`).

    ``int8``: ``q @ e = q @ ((u - 8) * s) + groupsum(q) @ o``; every product and partial sum is an
    integer, exact in fp32 below 2^24 (|q| <= 127, |(u - 8) * s| <= 128: any K <= 1024), so the
    int32 sum of the kernels is reproduced exactly; the ``DequantizeLinear -> MatMul`` pair is
    the INT4 weight-only pattern. ``fp8``: ``w8 = fp8(q * s_g / c_n)``, then an fp32 ``MatMul``."""
    w = b.op("DequantizeLinear", [wt["codes"], wt["scale"]], {"axis": 0, "block_size": group}, "weight")
    if scheme == "int8":
        acc = b.op("MatMul", [q, w], name="acc_codes")
        g = b.op("Reshape", [q, b.i64(keep + [k // group, group])], name="act_groups")
        gsum = b.op("ReduceSum", [g, b.i64([-1])], {"keepdims": 0}, "act_group_sum")
        o = wt["offset"]
        if o.dtype == ir.DataType.INT8:
            o = b.op("DequantizeLinear", [o, b.f32(1.0)], name="wzero_offset")  # per tensor, scale 1: exact
        acc = b.op("Add", [acc, b.op("MatMul", [gsum, o], name="acc_zero")], name="acc_int")
    else:
        zero = b.const_tensor(ir.Tensor(np.zeros((), dtype=np.uint8).view(_fp8_np()), dtype=ir.DataType.FLOAT8E4M3FN))
        w8 = b.op("QuantizeLinear", [w, b.f32(1.0), zero], {"saturate": 1}, "weight_fp8")
        acc = b.op("MatMul", [q, b.op("DequantizeLinear", [w8, b.f32(1.0)], name="weight_fp8_value")], name="acc")
    return b.op("Mul", [b.op("Mul", [acc, s], name="acc_token"), wt["chan"]], name="y_int")


def _per_token_activation(b: Builder, xs: ir.Value, scheme: str) -> tuple[ir.Value, ir.Value]:
    """Per-token codes (as float) and scale: int8 ``clip(floor(x'/s + 0.5))`` with s = absmax/127,
    or fp8 ``RNE_sat(x'/s)`` with s = absmax/448 (QuantizeLinear to FLOAT8E4M3FN rounds to
    nearest even and saturates, as torch's cast does). Returns (q [..., K], s [..., 1])."""
    qmax = 127.0 if scheme == "int8" else FP8_MAX
    absmax = b.op("ReduceMax", [b.op("Abs", [xs]), b.i64([-1])], {"keepdims": 1}, "absmax")
    s = b.op("Div", [absmax, b.f32(qmax)], name="act_scale_raw")
    s = b.op("Where", [b.op("Greater", [s, b.f32(0.0)]), s, b.f32(1.0)], name="act_scale")
    v = b.op("Div", [xs, s])
    if scheme == "int8":
        q = b.op("Clip", [b.op("Floor", [b.op("Add", [v, b.f32(0.5)])]), b.f32(-128.0), b.f32(127.0)], name="act_int")
    else:
        zero = b.const_tensor(ir.Tensor(np.zeros((), dtype=np.uint8).view(_fp8_np()), dtype=ir.DataType.FLOAT8E4M3FN))
        q8 = b.op("QuantizeLinear", [v, b.f32(1.0), zero], {"saturate": 1}, "act_fp8")
        q = b.op("DequantizeLinear", [q8, b.f32(1.0)], name="act_fp8_value")
    return q, s


def _fp8_np():
    import ml_dtypes

    return ml_dtypes.float8_e4m3fn


def _transposed(v: ir.Value, name: str) -> ir.TensorProtocol:
    """A constant [a, b] tensor as a new [b, a] tensor of the same dtype."""
    arr = np.ascontiguousarray(v.const_value.numpy().T)
    return ir.Tensor(arr, dtype=v.const_value.dtype, name=name)


def _layer_name(qweight: ir.Value, index: int) -> str:
    name = qweight.name or f"linear_{index}"
    return name[: -len(".qweight")] if name.endswith(".qweight") else name


def _expand_one(b: Builder, node: ir.Node, index: int, weights: dict, replaced: set, flavor: str = "exact",
                int8_kernel: str = "u8u8", shared: Optional[dict] = None) -> None:
    ins = dict(zip(INPUT_NAMES, list(node.inputs) + [None] * (len(INPUT_NAMES) - len(node.inputs))))
    attrs = {a: node.attributes[a].value for a in ATTRIBUTES if a in node.attributes}  # older nodes: no scheme
    group, wbits, abits = int(attrs["group_size"]), int(attrs["weight_bits"]), int(attrs["act_bits"])
    unsigned, shift, epilogue = bool(attrs["act_unsigned"]), float(attrs["act_shift"]), str(attrs["epilogue"])
    scheme = str(attrs.get("scheme", "group"))
    qweight, wscales = ins["qweight"], ins["wscales"]
    layer = _layer_name(qweight, index)
    b.scope = f"{layer}#{index}" if qweight in weights else layer
    deploy_int8 = flavor == "deploy" and scheme == "int8"
    shared = {} if shared is None else shared

    # Weights: one set of new initializers per original qweight (a module called twice shares them).
    if qweight not in weights:
        ws = _const_array(wscales, "wscales", layer)
        n, groups = ws.shape
        k = groups * group
        if deploy_int8:
            # INT4 codes in the file, expanded to the INT8 GEMM operand in-graph (onnx_deploy.py).
            arrays = {key: _const_array(ins[key], key, layer) for key in ("qweight", "wscales", "wzeros", "wchannel")}
            w, scale = onnx_deploy.int8_weight(b, arrays, group, layer, int8_kernel)
            replaced.update(v for v in (ins["wzeros"], ins["wchannel"]) if v is not None)
        elif scheme == "group":
            w = b.initializer(f"{layer}.qweight_{'int4' if wbits == 4 else 'int8'}_kn",
                              _weight_tensor(_const_array(qweight, "qweight", layer), wbits, f"{layer}.w"))
            scale_arr = np.ascontiguousarray(ws.astype(np.float32).T)  # exact fp16 -> fp32, [K/G, N]
            scale = b.initializer(f"{layer}.wscales_f32_kn", ir.Tensor(scale_arr, name=f"{layer}.wscales_f32_kn"))
        else:
            # INT4 codes + fp32 scales; the 8-bit operand is rebuilt in-graph (_per_token_matmul).
            w, scale = None, _per_token_weight(b, ins, scheme, group, layer)
            replaced.update(v for v in (ins["wzeros"], ins["wchannel"]) if v is not None)
        down = up = None
        bias_in_up = False
        if ins["lora_down"] is not None:
            _const_array(ins["lora_down"], "lora_down", layer)
            _const_array(ins["lora_up"], "lora_up", layer)
            if deploy_int8 and ins["bias"] is not None and ins["bias"].const_value is not None:
                # [h, 1] @ [up^T; bias]: the bias rides on the low-rank up projection (one [M, N] pass less).
                down, up = onnx_deploy.lowrank_with_bias(b, ins["lora_down"], ins["lora_up"], ins["bias"], layer)
                bias_in_up = True
            else:
                down = b.initializer(f"{layer}.lora_down_t", _transposed(ins["lora_down"], f"{layer}.lora_down_t"))
                up = b.initializer(f"{layer}.lora_up_t", _transposed(ins["lora_up"], f"{layer}.lora_up_t"))
            replaced.update({ins["lora_down"], ins["lora_up"]})
        replaced.update({qweight, wscales})
        if flavor == "deploy":
            # Low-rank factors (and the bias row riding on them) and group-wise fp16 scales held as fp32:
            # fp16 in the file + a Cast ONNX Runtime folds at session creation (onnx_deploy.store_fp16).
            shared.setdefault("fp16", []).extend(v for v in (down, up) if v is not None)
            if scheme == "group":
                shared["fp16"].append(scale)
        if bias_in_up:
            replaced.add(ins["bias"])
        weights[qweight] = (n, k, w, scale, down, up, bias_in_up)
    n, k, w, scale, down, up, bias_in_up = weights[qweight]

    x = ins["x"]
    x_dtype = x.dtype or node.outputs[0].dtype or _F32
    rank = len(x.shape) if x.shape is not None else None
    # Known rank: MatMul broadcasts over the leading dims and Reshape copies them (0 = keep
    # the input's dim), so no Shape/Slice/Concat is needed for dynamic batch/token axes.
    keep = [0] * (rank - 1) if rank is not None else [-1]
    # Deploy: layers reading the same input with the same smoothing (q/k/v) share X' and its
    # quantization (exact: one expansion per layer, as written before this flavour existed).
    skey = None
    if flavor == "deploy":
        smooth = ins["smooth"]
        sbytes = None if smooth is None else (smooth.const_value.tobytes() if smooth.const_value is not None
                                              else id(smooth))
        skey = (id(x), sbytes)
    if skey is not None and skey in shared:
        xs = shared[skey]
    else:
        xf = b.to_f32(x) if rank is not None else b.op("Reshape", [b.to_f32(x), b.i64([-1, k])], name="x2d")
        xs = xf if ins["smooth"] is None else b.op("Div", [xf, b.to_f32(ins["smooth"])], name="x_smoothed")
        if skey is not None:
            shared[skey] = xs
    if deploy_int8:
        act = None
        if int8_kernel != "dynamic":
            akey = ("int8_act", skey)
            if akey not in shared:
                shared[akey] = onnx_deploy.int8_activation(b, xs, k, exact_rounding=int8_kernel == "u8u8_floor")
            act = shared[akey]
        a = None
    elif flavor == "deploy" and scheme == "group":
        a = xs  # ONNX Runtime's MatMulNBits quantizes the input itself (module docstring of onnx_deploy)
    elif scheme != "group":
        a = _per_token_activation(b, xs, scheme)  # (codes, per-token scale)
    elif abits == 16:
        a = xs
    else:
        qmin, qmax = qrange(abits, unsigned)
        xa = b.op("Add", [xs, b.f32(shift)], name="x_shifted") if shift else xs
        g = b.op("Reshape", [xa, b.i64(keep + [k // group, group])], name="x_groups")
        mag = b.op("Relu" if unsigned else "Abs", [g])
        absmax = b.op("ReduceMax", [mag, b.i64([-1])], {"keepdims": 1}, "absmax")
        s = b.op("Div", [absmax, b.f32(float(qmax))], name="act_scale_raw")
        s = b.op("Where", [b.op("Greater", [s, b.f32(0.0)]), s, b.f32(1.0)], name="act_scale")
        v = b.op("Add", [b.op("Div", [g, s]), b.f32(0.5)])
        q = b.op("Clip", [b.op("Floor", [v]), b.f32(float(qmin)), b.f32(float(qmax))], name="act_int")
        a = b.op("Reshape", [b.op("Mul", [q, s]), b.i64(keep + [k])], name="act_dequant")
    if deploy_int8:
        y = onnx_deploy.int8_matmul(b, xs, act, w, scale, int8_kernel)
    elif scheme != "group":
        y = _per_token_matmul(b, a[0], a[1], scale, scheme, group, k, keep)
    else:
        w_dq = b.op("DequantizeLinear", [w, scale], {"axis": 0, "block_size": group}, "weight")
        y = b.op("MatMul", [a, w_dq], name="y_int")
    if down is not None:
        h = b.op("MatMul", [xs, b.to_f32(down)], name="lowrank_down")
        if bias_in_up:
            h = b.op("Add", [h, b.const(onnx_deploy.unit_column(int(up.shape[0])))], name="lowrank_one")
        y = b.op("Add", [y, b.op("MatMul", [h, b.to_f32(up)], name="lowrank_up")], name="y_lowrank")
    if ins["bias"] is not None and not bias_in_up:
        y = b.op("Add", [y, b.to_f32(ins["bias"])], name="y_bias")
    if epilogue not in _ONNX_EPILOGUES:
        raise ValueError(f"svdq export: unknown epilogue {epilogue!r} in layer {layer!r}")
    y = _ONNX_EPILOGUES[epilogue](b, y)
    if rank is None:
        lead = b.op("Slice", [b.op("Shape", [x]), b.i64([0]), b.i64([-1]), b.i64([0])], name="lead_shape")
        y = b.op("Reshape", [y, b.op("Concat", [lead, b.i64([n])], {"axis": 0}, "out_shape")], name="y")
    if ins["gate"] is not None:
        y = b.op("Mul", [y, b.to_f32(ins["gate"])], name="y_gated")
    if ins["residual"] is not None:
        y = b.op("Add", [y, b.to_f32(ins["residual"])], name="y_residual")
    if x_dtype != _F32:
        y = b.op("Cast", [y], {"to": x_dtype}, "y_cast")

    # Splice: new nodes before the placeholder, then rewire its consumers and drop it.
    b.graph.insert_before(node, list(b.tape.nodes))
    b.tape = ir.tape.Tape()
    old = node.outputs[0]
    y.type, y.shape = old.type, old.shape
    name = old.name
    old.replace_all_uses_with(y, replace_graph_outputs=True)
    b.graph.remove(node, safe=True)
    y.name = name


def _placeholders(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.domain == PLACEHOLDER_DOMAIN and n.op_type == PLACEHOLDER_OP]


def expand_quantized_linears(model: ir.Model, flavor: str = "exact", int8_kernel: str = "u8u8",
                             fp16_weights: bool = True) -> int:
    """Replace every placeholder of ``model`` (in place); returns how many were expanded.

    ``flavor``: ``"exact"`` (this module's float reproduction of our numerics) or
    ``"deploy"`` (integer GEMMs for ONNX Runtime, :mod:`.onnx_deploy`); ``int8_kernel``
    picks the deploy form of ``w4a8-int8`` layers (``onnx_deploy.INT8_KERNELS``); ``fp16_weights``
    (deploy only) stores the float weights (low-rank factors, float layers) as fp16 + Cast
    (:func:`.onnx_deploy.store_fp16`)."""
    if flavor not in FLAVORS:
        raise ValueError(f"svdq export: flavor must be one of {FLAVORS}, got {flavor!r}")
    if int8_kernel not in onnx_deploy.INT8_KERNELS:
        raise ValueError(f"svdq export: int8_kernel must be one of {onnx_deploy.INT8_KERNELS}, got {int8_kernel!r}")
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise ValueError(f"svdq export needs ONNX opset >= {MIN_OPSET} (INT4 DequantizeLinear with block_size), "
                         f"the model has opset {opset}")
    graph = model.graph
    builder = Builder(graph)
    weights: dict = {}
    replaced: set = set()
    nodes = _placeholders(graph)
    shared: dict = {}
    # The model's own float weights (embedders, final layer, norms), not the quantized layers' inputs.
    own = [v for v in graph.initializers.values()
           if not any(u.node.domain == PLACEHOLDER_DOMAIN for u in v.uses())] if flavor == "deploy" and fp16_weights else []
    for i, node in enumerate(nodes):
        scheme = str(node.attributes["scheme"].value) if "scheme" in node.attributes else "group"
        handler(scheme, "onnx_linear")(builder, node, i, weights, replaced, flavor, int8_kernel, shared)
    # A placeholder left inside a subgraph (If/Loop body) or a local function is not supported.
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.domain == PLACEHOLDER_DOMAIN:
            raise ValueError("svdq export: a quantized linear inside a control-flow subgraph cannot be exported")
    for fn in model.functions.values():
        if any(n.domain == PLACEHOLDER_DOMAIN for n in fn):
            raise ValueError("svdq export: a quantized linear inside an ONNX local function cannot be exported")
    # The original int8/fp16 buffers are superseded by the INT4 [K, N] copies.
    for v in replaced:
        if not v.uses() and not v.is_graph_output() and v.name in graph.initializers:
            del graph.initializers[v.name]
    if flavor == "deploy" and fp16_weights:
        n16, saved = onnx_deploy.store_fp16(graph, list(dict.fromkeys(own + shared.get("fp16", []))))
        logger.info("svdq export (deploy): %d float initializers stored as fp16 + Cast (%.2f MB saved)", n16, saved / 1e6)
    model.opset_imports.pop(PLACEHOLDER_DOMAIN, None)
    if any(n.domain == "com.microsoft" for n in graph):
        model.opset_imports["com.microsoft"] = 1
    return len(nodes)


# The built-in schemes' ONNX expansion (runtime/modes.py); another scheme registers its own.
for _scheme in ("group", "int8", "fp8"):
    register_handler(_scheme, "onnx_linear", _expand_one)

"""Exact ONNX export of the per-token modes (``w4a8-int8``, ``w4a8-fp8``): INT4 codes in the file,
the kernels' 8-bit operand rebuilt in-graph, the kernels' arithmetic ``(q @ w8) * s * c``.

Before (expanded INT8 / FLOAT8E4M3FN ``[K, N]`` initializers) the 512-wide block's exact file was
3.19 MB = 0.675x of its bf16 parameters in both modes; now 2.20 MB (0.465x, int8) and 2.16 MB
(0.457x, fp8). Sizes of every mode: docs/export.md ("File size per mode"), ``python -m
tests.export.mode_sizes``.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx", reason="needs the [onnx] extra")
pytest.importorskip("onnxscript", reason="needs the [onnx] extra")
pytest.importorskip("onnxruntime", reason="needs the [onnx] extra")

import onnx  # noqa: E402

from svdq_compile import SVDQLinear, sqnr_db  # noqa: E402
from svdq_compile.export import bf16_parameter_bytes, export_onnx, onnx_op_types, ort_session  # noqa: E402
from svdq_compile.runtime import LinearSpec, PackedLinear, pack_int4, unpack_int4  # noqa: E402
from svdq_compile.runtime.per_token import quantize_weight_fp8, quantize_weight_progressive  # noqa: E402
from tests.export.export_helpers import qmlp_input, quantized_qmlp_block  # noqa: E402
from tests.export.test_export_onnx import TENSORRT_10_ONNX_OPS  # noqa: E402

MODES = ("w4a8-int8", "w4a8-fp8")
# The acceptance bound of issue 25: INT4 codes (0.25x) + fp32 group scales (+ INT8 zero-point
# offsets for int8) + the 16-bit branch at rank 32 (0.17x); measured 0.465x / 0.457x, was 0.675x.
MAX_FILE_VS_BF16 = 0.5
# Whole block vs the torch model: measured 131.7 dB (int8) / 87.5 dB (fp8) on the dev CPU (AVX512-VNNI,
# ORT 1.32), 129.5 / 87.5 dB with the expanded 8-bit initializers before. Below ~130 dB the error is
# an activation code flipped where ORT's LayerNorm / GELU round differently from torch's (one flip
# ~ 75-90 dB here); 60 dB leaves room for a few more flips on other CPUs and still fails on any real
# error (a dropped zero-point offset, a wrong scale or nibble order gives < 20 dB).
BLOCK_MIN_DB = 60.0
# One layer alone (no float op before it that ORT rounds differently, so no flips): the expanded
# 8-bit form measured 132.6 dB (int8) / 132.5 dB (fp8) on these layers (float products of
# dequantized operands); the INT4 form multiplies the integer / fp8 codes (exact products; int8:
# the kernels' int32 sum, exact in fp32 below 2^24) and scales after the sum like the kernels:
# 145.8 / 162.1 dB measured (int8: bit-identical to the torch path, whose scale order it follows;
# the C++ kernels multiply by sa * c in one step; fp8: fp32 summation order only).
LAYER_MIN_DB = 140.0


def _run(sess, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.fixture(scope="module", params=MODES)
def block(request, tmp_path_factory):
    model = quantized_qmlp_block(request.param)
    x = qmlp_input()
    res = export_onnx(model, (x,), tmp_path_factory.mktemp("per_token") / "block.onnx")
    return request.param, model, x, res


def test_block_file_is_small_and_matches_torch(block, record_property):
    mode, model, x, res = block
    ratio = res.file_bytes / bf16_parameter_bytes(model)
    with torch.no_grad():
        ref = model(x)
    db = float(sqnr_db(ref, _run(ort_session(res.path), x)))
    record_property("file_vs_bf16", round(ratio, 4))
    record_property("sqnr_db", round(db, 1))
    assert ratio <= MAX_FILE_VS_BF16, (mode, ratio)
    assert db >= BLOCK_MIN_DB, (mode, db)


def test_block_stores_int4_codes_only(block):
    """One INT4 [K, N] code tensor per layer; no 8-bit [K, N] weight, no zero point on any
    DequantizeLinear (TensorRT: "x_zero_point must be zero"), only ops TensorRT's parser lists."""
    mode, model, _, res = block
    proto = onnx.load(str(res.path))
    n_layers = sum(isinstance(m, SVDQLinear) for m in model.modules())
    assert n_layers == 3
    shapes = sorted([m.in_features, m.out_features] for m in model.modules() if isinstance(m, SVDQLinear))
    int4 = sorted(list(t.dims) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT4)
    assert int4 == shapes  # [K, N] codes, one per layer
    # 8-bit tensors: at most the [K/G, N] zero-point offsets (int8), no [K, N] operand, no FLOAT8 weight
    eight = [t for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                                                                    onnx.TensorProto.FLOAT8E4M3FN) and t.dims]
    assert all(t.dims[0] * 64 <= max(k for k, _ in shapes) and t.name.endswith(".wzero_offset_int8_kn")
               for t in eight), [(t.name, list(t.dims)) for t in eight]
    assert all(len(n.input) == 2 for n in proto.graph.node if n.op_type == "DequantizeLinear")
    counts = onnx_op_types(proto)
    assert {d for d, _ in counts} == {""}
    assert {op for _, op in counts} - TENSORRT_10_ONNX_OPS == set()
    if mode == "w4a8-int8":
        offsets = [t for t in proto.graph.initializer if t.name.endswith(".wzero_offset_int8_kn")]
        assert len(offsets) == n_layers and all(t.data_type == onnx.TensorProto.INT8 for t in offsets)


def _int8_layer(k: int, n: int, *, rank: int = 0, seed: int = 0, wide_offsets: bool = False) -> SVDQLinear:
    g = torch.Generator().manual_seed(seed)
    pw = quantize_weight_progressive(torch.randn(n, k, generator=g) * 0.1, 64)
    qweight, wscales, wzeros = pw.qweight, pw.wscales, pw.wzeros
    if wide_offsets:
        # Group 0 of every row: z = 0, s = 16, u in [0, 7], so e = u * 16 <= 112 is a valid operand but
        # the offset (8 - z) * s = 128 does not fit INT8 (QServe's quantizer never makes this; an
        # imported weight might): the export stores those offsets as fp32.
        u = unpack_int4(qweight, signed=True) + 8
        u[:, :64] = u[:, :64].clamp(0, 7)
        qweight = pack_int4((u - 8).to(torch.int8))
        wscales, wzeros = wscales.clone(), wzeros.clone()
        wscales[:, 0], wzeros[:, 0] = 16, 0
    p = PackedLinear(LinearSpec(k, n, 64, 4, 8, False, 0.0, rank, scheme="int8"), qweight, wscales,
                     smooth=torch.rand(k, generator=g) + 0.5,
                     lora_down=torch.randn(rank, k, generator=g) * 0.1 if rank else None,
                     lora_up=torch.randn(n, rank, generator=g) * 0.1 if rank else None,
                     wzeros=wzeros, wchannel=pw.wchannel)
    return SVDQLinear(p, name=f"i{seed}")


def _fp8_layer(k: int, n: int, *, seed: int = 0) -> SVDQLinear:
    g = torch.Generator().manual_seed(seed)
    pw = quantize_weight_fp8(torch.randn(n, k, generator=g) * 0.1, 64)
    p = PackedLinear(LinearSpec(k, n, 64, 4, 8, False, 0.0, 0, scheme="fp8"), pw.qweight, pw.wscales,
                     smooth=torch.rand(k, generator=g) + 0.5, wchannel=pw.wchannel)
    return SVDQLinear(p, name=f"f{seed}")


@pytest.mark.parametrize("kind", ["int8", "int8_wide_offsets", "fp8"])
def test_layer_arithmetic_matches_the_kernels(tmp_path, monkeypatch, kind):
    """K = 1024 (the int8 sum's exactness bound: |q| <= 127, |(u - 8) * s| <= 128), odd N, no low-rank
    branch: what is left is the per-token arithmetic itself. int8 against the torch path
    (``SVDQ_CPU_GEMM=torch``, the same ops in the same order): bit-identical."""
    layer = _fp8_layer(1024, 136, seed=3) if kind == "fp8" else \
        _int8_layer(1024, 136, seed=3, wide_offsets=kind == "int8_wide_offsets")
    model = torch.nn.Sequential(layer).eval()
    x = torch.randn(3, 7, 1024, generator=torch.Generator().manual_seed(0))
    res = export_onnx(model, (x,), tmp_path / f"{kind}.onnx")
    with torch.no_grad():
        ref = model(x)
    out = _run(ort_session(res.path), x)
    assert sqnr_db(ref, out) >= LAYER_MIN_DB
    if kind.startswith("int8"):
        monkeypatch.setenv("SVDQ_CPU_GEMM", "torch")
        with torch.no_grad():
            assert torch.equal(model(x), out)
    names = {t.name: t.data_type for t in onnx.load(str(res.path)).graph.initializer}
    if kind.startswith("int8"):
        dtype = onnx.TensorProto.FLOAT if kind == "int8_wide_offsets" else onnx.TensorProto.INT8
        (offset,) = [v for name, v in names.items() if ".wzero_offset_" in name]
        assert offset == dtype


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_operand_is_the_kernels_bit_for_bit(tmp_path, monkeypatch, scheme):
    """One-hot input rows pick single weights (every sum has one term, so no summation order):
    the file's ``w8 * s * c`` equals the torch path's for every weight, i.e. the 8-bit operand
    rebuilt from the INT4 codes is the kernels' (int8: ``(u - z) * s``; fp8: ``fp8(q * s_g / c)``)."""
    k, n = 256, 72
    g = torch.Generator().manual_seed(0)
    r = torch.randn(n, k, generator=g) * 0.1
    if scheme == "fp8":
        pw = quantize_weight_fp8(r, 64)
        extra = {"wchannel": pw.wchannel}
    else:
        pw = quantize_weight_progressive(r, 64)
        extra = {"wzeros": pw.wzeros, "wchannel": pw.wchannel}
    p = PackedLinear(LinearSpec(k, n, 64, 4, 8, False, 0.0, 0, scheme=scheme), pw.qweight, pw.wscales, **extra)
    model = torch.nn.Sequential(SVDQLinear(p, name=scheme)).eval()
    x = torch.eye(k).unsqueeze(0) * 0.75
    res = export_onnx(model, (x,), tmp_path / f"{scheme}.onnx")
    monkeypatch.setenv("SVDQ_CPU_GEMM", "torch")  # the C++ kernels scale by sa * c in one step
    with torch.no_grad():
        assert torch.equal(model(x), _run(ort_session(res.path), x))

"""ONNX export, ``flavor="deploy"``: ONNX Runtime's integer GEMM for w4a8-int8 layers, INT4 weights
expanded in-graph (and folded by ONNX Runtime), a torch.compile'd model as input.

The speed targets (>= 1.3x the float ONNX on the FLUX.1-width block and the demo) are measured by
``svdq bench --suite export`` (benchmarks/suites/export.py), not here: these models are small.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx", reason="needs the [onnx] extra")
pytest.importorskip("onnxscript", reason="needs the [onnx] extra")
pytest.importorskip("onnxruntime", reason="needs the [onnx] extra")

import onnx  # noqa: E402

from tests.export.export_helpers import Int8Block, NormMLP, TEST_CONFIG  # noqa: E402
from svdq_compile import SVDQLinear, sqnr_db  # noqa: E402
from svdq_compile.export import (  # noqa: E402
    NotQuantizedYetError, bf16_parameter_bytes, export_onnx, onnx_op_types, ort_optimized_op_types, ort_session,
)
from tests.export.test_export_onnx import TENSORRT_10_ONNX_OPS  # noqa: E402

DIMS = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")},)
# u8u8 MatMulInteger computes our w4a8-int8 numerics exactly (int32 sum, same rounding of the
# activations); the rest is float32 rounding of the epilogue: measured ~125-130 dB.
EXACT_INT8_DB = 60.0
MIN_SQNR_DB = 30.0  # the acceptance threshold for every deploy file vs the torch model


def _run(sess, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _int8_only() -> torch.nn.Module:
    m = Int8Block().eval()
    m.w4a4, m.w4a16 = torch.nn.Identity(), torch.nn.Identity()
    return m


# Default deploy file: the low-rank factors (and the bias row on them) in fp16 + Cast. Their fp16
# rounding flips a few int8 activation codes of the next layers: measured 51.5 dB on this 4-layer chain.
FP16_DB = 45.0


def _export_int8_block(tmp_path_factory, name: str, **kwargs):
    model = _int8_only()
    path = tmp_path_factory.mktemp("deploy") / name
    return model, export_onnx(model, (torch.randn(2, 5, 256),), path, dynamic_shapes=DIMS, flavor="deploy", **kwargs)


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    return _export_int8_block(tmp_path_factory, "int8_block.onnx")


@pytest.fixture(scope="module")
def deploy_fp32(tmp_path_factory):
    return _export_int8_block(tmp_path_factory, "int8_block_fp32.onnx", fp16_weights=False)


def _assert_ort_matches_torch(model, res, min_db: float) -> None:
    """ORT's output of the file vs the torch model, at two (batch, tokens) shapes."""
    sess = ort_session(res.path, exact=False)
    for shape in [(2, 5), (1, 33)]:
        x = torch.randn(*shape, 256, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            ref = model(x)
        assert sqnr_db(ref, _run(sess, x)) >= min_db, shape


def test_deploy_matches_torch_exactly(deploy_fp32):
    """fp16_weights=False: float32 low-rank factors, so only the epilogue's float32 rounding differs."""
    _assert_ort_matches_torch(*deploy_fp32, EXACT_INT8_DB)


def test_deploy_fp16_weights_match_torch(deploy):
    _assert_ort_matches_torch(*deploy, FP16_DB)


def test_deploy_fp16_initializers_are_cast_and_folded(deploy, deploy_fp32):
    """The float initializers of the default deploy file are fp16 followed by a Cast to fp32 that ONNX
    Runtime folds at session creation (no Cast in the graph it runs); the file is smaller."""
    _, res = deploy
    _, res32 = deploy_fp32
    proto = onnx.load(str(res.path))
    init = {t.name: t for t in proto.graph.initializer}
    lowrank = [t for n, t in init.items() if "lora" in n]  # q, k, fc1: down + up (fc2 has no low-rank branch)
    assert len(lowrank) == 6 and all(t.data_type == onnx.TensorProto.FLOAT16 for t in lowrank)
    # every fp16 initializer feeds exactly one Cast(to=FLOAT), and nothing else reads it
    readers = {}
    for node in proto.graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    f16 = [n for n, t in init.items() if t.data_type == onnx.TensorProto.FLOAT16]
    for n in f16:
        (node,) = readers[n]
        assert node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.FLOAT
    # the quantizer's own vectors (channel scales, smoothing) and a bias not folded into a low-rank
    # branch stay float32 (exact); nothing else of >= 256 elements does
    assert {n.split(".")[-1] for n, t in init.items() if t.data_type == onnx.TensorProto.FLOAT
            and len(t.raw_data) >= 4 * 256} <= {"smooth", "wchannel_f32", "bias"}
    assert res.op_types["Cast"] >= len(f16)
    assert ("", "Cast") not in ort_optimized_op_types(res.path)
    assert ("", "Cast") not in ort_optimized_op_types(res32.path)
    lowrank_bytes = sum(t.ByteSize() for t in lowrank)
    assert res32.file_bytes - res.file_bytes >= 0.9 * lowrank_bytes  # ~ the fp16 bytes saved


def test_deploy_file_stores_int4_and_ort_folds_the_expansion(deploy):
    model, res = deploy
    proto = onnx.load(str(res.path))
    onnx.checker.check_model(proto, full_check=True)
    n_int8 = sum(isinstance(m, SVDQLinear) for m in model.modules())
    assert res.quantized_linears == n_int8 == 4
    # One UINT4 code tensor per layer, no 8-bit [K, N] weight in the file.
    u4 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.UINT4 and len(t.dims) == 3
          and t.dims[1] > 1]
    assert len(u4) == n_int8
    assert not [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert res.op_types["MatMulIntegerToFloat"] == n_int8
    # q and k share the input and the smoothing: one activation quantization for both.
    assert res.op_types["ReduceMax"] == 3
    ops = ort_optimized_op_types(res.path)
    assert ops[("com.microsoft", "MatMulIntegerToFloat")] == n_int8
    assert ("", "Sub") not in ops  # (u - z) * s was constant-folded at session creation
    assert ops[("", "QuantizeLinear")] == 3  # the per-token activation quantization, one pass each


def test_deploy_file_is_small():
    """INT4 codes + UINT4 zero points + UINT8 group scales (+ fp32 channel scales, low-rank, bias):
    0.29x of the bf16 weights at K=N=1024, rank 8 (the FLUX.1-width block: see docs/export.md)."""
    import tempfile

    from tests.export.export_helpers import int8_linear

    model = torch.nn.Sequential(int8_linear(1024, 1024, seed=3)).eval()
    with tempfile.TemporaryDirectory() as d:
        res = export_onnx(model, (torch.randn(1, 4, 1024),), f"{d}/big.onnx", flavor="deploy")
        ratio = res.file_bytes / bf16_parameter_bytes(model)
    assert ratio <= 0.35, ratio


def test_deploy_ops_for_tensorrt_are_listed(deploy):
    """TensorRT is not a deploy target: com.microsoft.MatMulIntegerToFloat (ONNX Runtime's integer
    GEMM) is the one op outside onnx-tensorrt's operators.md (docs/export.md says so); use
    flavor='exact' for TensorRT."""
    _, res = deploy
    counts = onnx_op_types(str(res.path))
    assert {d for d, _ in counts} == {"", "com.microsoft"}
    assert {op for d, op in counts if d == "com.microsoft"} == {"MatMulIntegerToFloat"}
    assert {op for d, op in counts if d == ""} - TENSORRT_10_ONNX_OPS == set()


@pytest.mark.parametrize("kernel,min_db", [("u8s8", 20.0), ("dynamic", 20.0)])
def test_deploy_alternative_kernels(tmp_path, kernel, min_db):
    """The measured alternatives: U8S8 (saturating int16 pair sums on AVX2 without VNNI: measured
    29 dB on this model on the dev CPU; exact where MLAS uses VNNI) and ORT's DynamicQuantizeMatMul
    (per-tensor asymmetric uint8 activations). Not our numerics: only a sanity bound here."""
    model = _int8_only()
    res = export_onnx(model, (torch.randn(2, 5, 256),), tmp_path / f"{kernel}.onnx", dynamic_shapes=DIMS,
                      flavor="deploy", int8_kernel=kernel)
    x = torch.randn(2, 9, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    assert sqnr_db(ref, _run(ort_session(res.path, exact=False), x)) >= min_db
    if kernel == "dynamic":
        assert res.op_types.get("DynamicQuantizeMatMul") == 4


def test_deploy_group_modes(tmp_path):
    """W4A4 / W4A16 layers in a deploy file: the smoothed float input into DequantizeLinear(INT4) ->
    MatMul, which ORT runs as MatMulNBits with its own int8 block quantization of the input (not our
    INT4 groups): closer to float than our W4A4, so a few dB from the torch W4A4 model."""
    model = Int8Block().eval()
    res = export_onnx(model, (torch.randn(2, 5, 256),), tmp_path / "mixed.onnx", dynamic_shapes=DIMS,
                      flavor="deploy")
    x = torch.randn(2, 9, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    out = _run(ort_session(res.path, exact=False), x)
    assert sqnr_db(ref, out) >= 15.0
    ops = ort_optimized_op_types(res.path)
    assert ops[("com.microsoft", "MatMulNBits")] == 2


def test_flavor_is_checked(tmp_path):
    with pytest.raises(ValueError, match="flavor"):
        export_onnx(NormMLP(), (torch.randn(1, 4, 64),), tmp_path / "m.onnx", flavor="fast")


def test_compiled_model_before_and_after_calls(tmp_path):
    """torch.compile(m, backend='svdquant'): a clear error before it has quantized anything; after
    two calls the file reproduces the compiled model, and the compiled model is left as it was."""
    torch._dynamo.reset()
    model = NormMLP().eval()
    # w4a8-int8 explicitly: the deploy flavour's exact integer path (mode "auto" depends on the CPU's
    # ISA; W4A4 deploys through ORT's own int8 activations, see test_w4a4_deploy_*).
    compiled = torch.compile(model, backend="svdquant",
                             options={"min_features": TEST_CONFIG.min_features, "search_grid": 4,
                                      "mode": "w4a8-int8"})
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(NotQuantizedYetError, match="run the compiled model"):
        export_onnx(compiled, (x,), tmp_path / "early.onnx")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            compiled(torch.randn(2, 16, 64, generator=g))
        ref = compiled(x)
    for flavor in ("exact", "deploy"):
        res = export_onnx(compiled, (x,), tmp_path / f"{flavor}.onnx", flavor=flavor)
        assert res.quantized_linears == 2
        out = _run(ort_session(res.path, exact=flavor == "exact"), x)
        assert sqnr_db(ref, out) >= MIN_SQNR_DB
    assert type(model.fc1) is torch.nn.Linear  # the float modules are back
    with torch.no_grad():
        assert torch.equal(compiled(x), ref)
    torch._dynamo.reset()

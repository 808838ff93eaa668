"""Weight-only INT4 (W4A16) Triton product against the dequantized reference."""
import pytest
import torch

pytest.importorskip("triton")

from tests.codegen.codegen_helpers import CAN_RUN, DEVICE, make_input, make_layer, rel_err  # noqa: E402

from svdq_compile.codegen.linear import quantized_linear_triton  # noqa: E402
from svdq_compile.codegen.w4a16 import run_w4a16  # noqa: E402
from svdq_compile.runtime.torch_path import dequantize_weight, quantized_linear_cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not CAN_RUN, reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize("m", [1, 5, 17])
@pytest.mark.parametrize("k,group", [(64, 64), (192, 64), (128, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_product_matches_dequantized_float64(m, k, group, dtype):
    n = 40 + 3  # not a multiple of the block
    layer = make_layer(n, k, rank=0, smooth=False, group_size=group)
    x = make_input(m, k, dtype=dtype)
    y = run_w4a16(x, layer.qweight, layer.wscales, group)
    w = dequantize_weight(layer.qweight.cpu(), layer.wscales.cpu(), group, 4)
    ref = x.cpu().double() @ w.double().t()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # 1e-5: fp32 summation order only (16-bit x times a 4-bit integer is exact in fp32;
    # on GPU the fp32 case runs IEEE, not TF32).
    assert rel_err(y.cpu(), ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_w4a16_with_branch_and_epilogue_matches_torch_path(dtype):
    n, k = 72, 128
    layer = make_layer(n, k, rank=8, smooth=False)
    x = make_input(6, k, dtype=dtype).reshape(2, 3, k)
    res = make_input(6, n, dtype=dtype, seed=4).reshape(2, 3, n)
    args = (x, *layer.args(), res, None, 64, 4, 16, False, 0.0, "silu")
    y = quantized_linear_triton(*args)
    ref = quantized_linear_cpu(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    assert y.dtype == dtype and y.shape == (2, 3, n)
    # fp32: summation order only; bf16: the same plus at most one bf16 rounding flip.
    assert rel_err(y.cpu(), ref) < (1e-5 if dtype == torch.float32 else 4e-3)


def test_smoothed_w4a16_runs_in_fp32():
    layer = make_layer(40, 64, rank=4, smooth=True)
    x = make_input(3, 64, dtype=torch.bfloat16)
    args = (x, *layer.args(), None, None, 64, 4, 16, False, 0.0, "none")
    y = quantized_linear_triton(*args)
    ref = quantized_linear_cpu(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    assert rel_err(y.cpu().float(), ref.float()) < 4e-3


def test_kernel_failure_falls_back_once(monkeypatch, caplog):
    from svdq_compile.codegen import w4a16

    def boom(*a, **k):
        raise RuntimeError("no 16-bit dot on this GPU")

    monkeypatch.setattr(w4a16, "_FAILED", [])
    monkeypatch.setattr(w4a16, "launch", boom)
    layer = make_layer(40, 64, rank=4, smooth=False)
    x = make_input(3, 64)
    args = (x, *layer.args(), None, None, 64, 4, 16, False, 0.0, "none")
    with caplog.at_level("WARNING"):
        y = quantized_linear_triton(*args)
        y2 = quantized_linear_triton(*args)
    ref = quantized_linear_cpu(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    assert rel_err(y.cpu(), ref) < 1e-5 and torch.equal(y, y2)
    assert sum("W4A16 kernel failed" in r.message for r in caplog.records) == 1

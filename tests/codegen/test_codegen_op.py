"""End to end through the custom ops: ``svdq::linear`` routed to the kernels, ``svdq::triton_linear``."""
import pytest
import torch

pytest.importorskip("triton")

from tests.codegen.codegen_helpers import CAN_RUN, DEVICE, make_input, make_layer, rel_err  # noqa: E402
from svdq_compile.quant.decompose import sqnr_db  # noqa: E402

import svdq_compile.codegen as codegen  # noqa: E402
from svdq_compile.codegen.linear import quantized_linear_triton  # noqa: E402
from svdq_compile.runtime.torch_path import quantized_linear_cpu  # noqa: E402
from svdq_compile.runtime.ops import triton_on_cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not CAN_RUN, reason="needs CUDA or TRITON_INTERPRET=1")

N = 80 + 3


@pytest.fixture(scope="module", autouse=True)
def _installed():
    assert codegen.available()
    assert codegen.install()


def _op_args(x, layer, residual=None, gate=None, act_bits=4, unsigned=False, shift=0.0, epilogue="none"):
    return (x, *layer.args(), residual, gate, layer.group_size, layer.weight_bits, act_bits,
            unsigned, shift, epilogue)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_svdq_linear_op_matches_cpu_path(dtype):
    b, t, k = 2, 7, 128
    layer = make_layer(N, k, rank=16, lora_dtype=torch.bfloat16)
    x = make_input(b * t, k, dtype=dtype).reshape(b, t, k)
    gate = make_input(b, N, dtype=dtype, seed=3).reshape(b, 1, N)
    res = make_input(b * t, N, dtype=dtype, seed=4).reshape(b, t, N)
    args = _op_args(x, layer, res, gate, epilogue="gelu_tanh")
    with triton_on_cpu():
        y = torch.ops.svdq.linear(*args)
    y_cpu = quantized_linear_cpu(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    assert y.shape == (b, t, N) and y.dtype == dtype and y.device == x.device
    # Same quantized integers on both paths; only fp32 summation order (and, for bf16, a
    # rare output rounding tie) differ: 60 dB is ~0.1% error, far above that noise and
    # far below a real bug. (On CUDA the default low-rank precision is tf32x3, also near fp32.)
    assert sqnr_db(y_cpu, y.cpu()) >= 60


def test_triton_op_eager():
    from svdq_compile.codegen import op

    if op.triton_linear is None:
        pytest.skip("torch.library.triton_op unavailable")
    layer = make_layer(N, 128, rank=8)
    x = make_input(9, 128)
    args = _op_args(x, layer, epilogue="relu")
    y = torch.ops.svdq.triton_linear(*args)
    y2 = quantized_linear_triton(*args)
    assert torch.equal(y, y2)


def test_weight_only_mode_falls_back_to_torch():
    layer = make_layer(N, 128, rank=8)
    x = make_input(5, 128)
    args = _op_args(x, layer, act_bits=16)
    y = quantized_linear_triton(*args)
    y_cpu = quantized_linear_cpu(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    assert rel_err(y.cpu(), y_cpu) < 1e-6


def test_bad_arguments_raise_clear_errors():
    layer = make_layer(N, 128, rank=8)
    x = make_input(5, 128)
    with pytest.raises(ValueError, match="features"):
        quantized_linear_triton(*_op_args(make_input(5, 64), layer))
    bad = _op_args(x, layer)
    bad = (bad[0], bad[1], bad[2], bad[3], bad[4][:, :64], *bad[5:])  # lora_down [r, 64]
    with pytest.raises(ValueError, match="low-rank"):
        quantized_linear_triton(*bad)
    with pytest.raises(ValueError, match="broadcast"):
        quantized_linear_triton(*_op_args(x, layer, residual=torch.randn(3, N, device=DEVICE)))
    with pytest.raises(TypeError):
        quantized_linear_triton(*_op_args(x.to(torch.int32), layer))


def test_group_gemm_failure_falls_back_once(monkeypatch, caplog):
    """quantized_linear_triton itself: an autotune failure of the group GEMM ("every gemm
    config failed", seen on a GPU in the memory suite) runs the torch path, logged once."""
    import logging

    from svdq_compile.codegen import fallback, linear
    from svdq_compile.codegen.autotune import AutotuneError

    monkeypatch.setattr(fallback, "_FAILED", set())
    monkeypatch.setattr(fallback, "_WARNED", [])
    calls = []

    def failing_gemm(*a, **k):
        calls.append(1)
        raise AutotuneError("svdq autotune: every gemm config failed for ... m4096")

    monkeypatch.setattr(linear, "run_gemm", failing_gemm)
    layer = make_layer(N, 128, rank=8)
    args = _op_args(make_input(5, 128), layer, epilogue="gelu")
    with caplog.at_level(logging.WARNING, logger="svdq_compile.codegen.fallback"):
        y1 = quantized_linear_triton(*args)
        y2 = quantized_linear_triton(*args)
    assert len(calls) == 1  # the failing spec is not retried
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    y_cpu = quantized_linear_cpu(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    assert torch.equal(y1.cpu(), y_cpu) and torch.equal(y2, y1)

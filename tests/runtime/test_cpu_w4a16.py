"""W4A16 on CPU: the C++ GEMV / dequantizer against the torch reference."""
import pytest
import torch
import torch.nn.functional as F

from svdq_compile.runtime import cpu_gemm, cpu_w4a16
from svdq_compile.runtime.torch_path import _NIBBLE_LUT, dequantize_weight, quantized_linear_cpu
from svdq_compile.runtime.packing import pack_int4
from svdq_compile.runtime.quantize import quantize_weight

needs_kernels = pytest.mark.skipif(
    not cpu_gemm.fast_backend_available(), reason=f"no C++ CPU kernel runs here ({cpu_gemm._unavailable})"
)


def _layer(n=48, k=256, group=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_weight(torch.randn(n, k, generator=g), 4, group)
    return pack_int4(q), s, q


def _lut_dequant(qw, s, group):
    vals = _NIBBLE_LUT[qw.view(torch.uint8).int()]  # the torch path's dequantizer
    return (vals.view(qw.shape[0], -1, group) * s.float().unsqueeze(-1)).view(qw.shape[0], -1)


@needs_kernels
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequant_bit_identical_to_torch(group):
    qw, s, q = _layer(group=group)
    w = cpu_w4a16.w4a16_dequantize(qw, s, group)
    assert torch.equal(w, _lut_dequant(qw, s, group))  # one fp32 multiply each: exact
    assert torch.equal(w, dequantize_weight(qw, s, group, 4))


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 17, 128, 129])
@pytest.mark.parametrize("group", [32, 64])
def test_gemv_matches_float64(m, group):
    qw, s, _ = _layer(n=40, k=320 if group == 32 else 256, group=group, seed=m)
    x = torch.randn(m, qw.shape[1] * 2, generator=torch.Generator().manual_seed(7))
    w = _lut_dequant(qw, s, group)
    y = cpu_w4a16.w4a16_linear(x, qw, s, group)
    ref = x.double() @ w.double().t()
    # 1e-5: only the fp32 summation order differs from the exact product (~1e-7 typical).
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5
    if m > cpu_w4a16.GEMV_MAX_M:
        assert torch.equal(y, F.linear(x, w))  # large M: dequantize + the same GEMM


@needs_kernels
def test_op_w4a16_uses_kernel_and_matches_torch_path(monkeypatch):
    qw, s, _ = _layer(n=64, k=256)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 256, generator=g)
    down, up, bias = torch.randn(8, 256, generator=g), torch.randn(64, 8, generator=g), torch.randn(64, generator=g)
    args = (x, qw, s, None, down, up, bias, None, None, 64, 4, 16, False, 0.0, "gelu")
    fast = quantized_linear_cpu(*args)
    monkeypatch.setenv(cpu_gemm.ENV_BACKEND, "torch")  # the LUT dequantizer + F.linear
    slow = quantized_linear_cpu(*args)
    assert ((fast - slow).norm() / slow.norm()) < 1e-5


def test_unsupported_group_falls_back():
    qw, s, _ = _layer(group=16, k=256)
    assert cpu_w4a16.w4a16_linear(torch.randn(2, 256), qw, s, 16) is None  # torch path handles it

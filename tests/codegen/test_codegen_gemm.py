"""Fused linear (prologue + GEMM + epilogue) == runtime.reference (float64) to fp32 rounding.

The integer parts are exact (the prologue is bit-exact, int8 dots are exact in int32,
the int32 -> fp32 conversion is exact), so with fp32 inputs/outputs the only
differences are fp32 roundings of the rescale, the low-rank branch and the epilogue:
a relative error (Frobenius) below 1e-5 leaves ample room for those (~1e-7) while any
indexing or packing bug shows up at 1e-2 or worse.
"""
import pytest
import torch

pytest.importorskip("triton")

from tests.codegen.codegen_helpers import CAN_RUN, DEVICE, make_input, make_layer, rel_err  # noqa: E402
from svdq_compile.quant.decompose import sqnr_db  # noqa: E402

from svdq_compile.codegen.linear import quantized_linear_triton  # noqa: E402
from benchmarks.suites.unfused import unfused_quantized_linear  # noqa: E402
from svdq_compile.runtime.reference import quantized_linear_reference  # noqa: E402

pytestmark = pytest.mark.skipif(not CAN_RUN, reason="needs CUDA or TRITON_INTERPRET=1")

N_ODD = 96 + 5  # not a multiple of any block size


def _run(x, layer, *, residual=None, gate=None, act_bits=4, unsigned=False, shift=0.0,
         epilogue="none", fn=quantized_linear_triton, **kw):
    args = (x, *layer.args(), residual, gate, layer.group_size, layer.weight_bits, act_bits,
            unsigned, shift, epilogue)
    y = fn(*args, **kw)
    ref = quantized_linear_reference(
        x, *layer.args(), residual, gate, group_size=layer.group_size,
        weight_bits=layer.weight_bits, act_bits=act_bits, act_unsigned=unsigned,
        act_shift=shift, epilogue=epilogue,
    )
    assert y.shape == ref.shape and y.dtype == ref.dtype
    return y, ref


@pytest.mark.parametrize("k", [64, 192, 512])
@pytest.mark.parametrize("m", [1, 17, 130])
def test_w4a4_shapes(m, k):
    layer = make_layer(N_ODD, k, rank=8)
    x = make_input(m, k)
    y, ref = _run(x, layer, lora_precision="ieee")
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize(
    "epilogue,bias,gate,residual",
    [
        ("none", False, False, False),
        ("none", True, False, False),
        ("gelu", True, False, False),
        ("gelu_tanh", True, False, False),
        ("silu", False, False, False),
        ("relu", True, False, False),
        ("none", True, True, False),
        ("none", False, False, True),
        ("gelu_tanh", True, True, True),
        ("silu", True, True, True),
    ],
)
def test_epilogues(epilogue, bias, gate, residual):
    m, k = 17, 192
    layer = make_layer(N_ODD, k, rank=8, bias=bias)
    x = make_input(m, k)
    g = torch.Generator().manual_seed(5)
    gt = torch.randn(1, N_ODD, generator=g).to(DEVICE) if gate else None  # broadcast over M
    rs = torch.randn(m, N_ODD, generator=g).to(DEVICE) if residual else None
    y, ref = _run(x, layer, gate=gt, residual=rs, epilogue=epilogue, lora_precision="ieee")
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("m", [1, 130])
@pytest.mark.parametrize("mode", ["w4a4_unsigned", "w4a8", "w8a8"])
def test_modes(mode, m):
    k = 192
    wbits, abits, unsigned, shift = {
        "w4a4_unsigned": (4, 4, True, 0.171875),
        "w4a8": (4, 8, False, 0.0),
        "w8a8": (8, 8, False, 0.0),
    }[mode]
    layer = make_layer(N_ODD, k, rank=8, weight_bits=wbits)
    x = make_input(m, k)
    if unsigned:
        x = torch.nn.functional.gelu(x)
    y, ref = _run(x, layer, act_bits=abits, unsigned=unsigned, shift=shift, epilogue="gelu",
                  lora_precision="ieee")
    assert rel_err(y, ref) < 1e-5


def test_w8a8_saturated_partials():
    """Largest group partial sums (64 * 127 * 127): the int32 -> fp32 trick stays exact."""
    k, n = 128, 33
    x = torch.ones(5, k, device=DEVICE)
    x[1] = -1.0
    layer = make_layer(n, k, rank=0, weight_bits=8, smooth=False, bias=False)
    layer.qweight = torch.full_like(layer.qweight, 127)
    layer.qweight[::2] = -127
    y, ref = _run(x, layer, act_bits=8)
    assert rel_err(y, ref) < 1e-6


def test_rank0_and_no_smooth():
    layer = make_layer(N_ODD, 192, rank=0, smooth=False)
    x = make_input(17, 192)
    y, ref = _run(x, layer)
    assert rel_err(y, ref) < 1e-5


def test_rank32_bf16_lora_weights():
    layer = make_layer(N_ODD, 192, rank=32, lora_dtype=torch.bfloat16)
    x = make_input(17, 192)
    y, ref = _run(x, layer, lora_precision="ieee")
    assert rel_err(y, ref) < 1e-5


def test_3d_input_broadcast_gate_residual():
    """FLUX-style ``x + gate * mlp(x)``: gate [B, 1, N], residual [B, T, N], non-contiguous x."""
    b, t, k = 2, 9, 128
    layer = make_layer(N_ODD, k, rank=8)
    x = make_input(b * t, 2 * k).reshape(b, t, 2 * k)[..., ::2]  # strided last dim
    g = torch.Generator().manual_seed(6)
    gate = torch.randn(b, 1, N_ODD, generator=g).to(DEVICE)
    res = torch.randn(b, t, N_ODD, generator=g).to(DEVICE)
    y, ref = _run(x, layer, gate=gate, residual=res, epilogue="gelu_tanh", lora_precision="ieee")
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_io(dtype):
    """16-bit X and Y: equal to the reference up to the final rounding (a few 16-bit ulps)."""
    layer = make_layer(N_ODD, 192, rank=8)
    x = make_input(33, 192, dtype=dtype)
    res = make_input(33, N_ODD, dtype=dtype, seed=7)
    y, ref = _run(x, layer, residual=res, epilogue="silu", lora_precision="ieee")
    # One 16-bit rounding of the output: ~2^-9 (bf16) relative; 45 dB allows occasional
    # ties rounding the other way, while real bugs give < 20 dB.
    assert sqnr_db(ref, y) > 45


def test_unfused_matches_reference():
    layer = make_layer(N_ODD, 192, rank=8)
    x = make_input(17, 192)
    res = make_input(17, N_ODD, seed=8)
    y, ref = _run(x, layer, residual=res, epilogue="gelu", fn=unfused_quantized_linear)
    assert rel_err(y, ref) < 1e-5


def test_empty_input():
    layer = make_layer(N_ODD, 64, rank=8)
    x = torch.empty(0, 64, device=DEVICE)
    y = quantized_linear_triton(x, *layer.args(), None, None, 64, 4, 4, False, 0.0, "none")
    assert y.shape == (0, N_ODD)


def test_gemm_accepts_row_major_scales():
    """run_gemm takes activation scales in any layout (the prologue writes them group-major)."""
    from svdq_compile.codegen.gemm import run_gemm
    from svdq_compile.codegen.call_spec import make_spec
    from svdq_compile.codegen.prologue import run_prologue

    layer = make_layer(N_ODD, 128, rank=8)
    x = make_input(17, 128)
    spec = make_spec(x, layer.smooth, layer.lora_down, layer.bias, None, None, 64, 4, 4, False,
                     "none", "ieee")
    qa, sa, h = run_prologue(x, layer.smooth, layer.lora_down, spec)
    assert sa.stride() == (1, 17)
    args = (layer.qweight, layer.wscales, h, layer.lora_up, layer.bias, None, None, spec, (17,))
    assert torch.equal(run_gemm(qa, sa, *args), run_gemm(qa, sa.contiguous(), *args))

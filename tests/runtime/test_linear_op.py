"""The svdq::linear op (CPU path) against an explicit integer evaluation in float64/int64."""
import pytest
import torch

from svdq_compile.runtime import (
    LinearSpec, PackedLinear, linear_from_packed, pack_int4, quantize_activation, quantize_weight,
    quantized_linear_reference,
)


def _packed(n, k, rank=8, bits=4, act_bits=4, unsigned=False, seed=0, bias=True, smooth=True):
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_weight(torch.randn(n, k, generator=g), bits, 64)
    return PackedLinear(
        LinearSpec(k, n, 64, bits, act_bits, unsigned, 0.0, rank),
        pack_int4(q) if bits == 4 else q, s,
        smooth=torch.rand(k, generator=g) + 0.5 if smooth else None,
        lora_down=torch.randn(rank, k, generator=g) if rank else None,
        lora_up=torch.randn(n, rank, generator=g) * 0.1 if rank else None,
        bias=torch.randn(n, generator=g) if bias else None,
    )


def _int_exact(x, p):
    """sum_g sa*sw*I_g with I_g from an int64 matmul: the integer GEMM, evaluated exactly."""
    xs = x.float() / p.smooth if p.smooth is not None else x.float()
    qa, sa = quantize_activation(xs, p.spec.act_bits, 64, unsigned=p.spec.act_unsigned)
    qw = p.int_weight()
    y = torch.zeros(x.shape[0], p.spec.out_features, dtype=torch.float64)
    for gi in range(qa.shape[1] // 64):
        sl = slice(gi * 64, (gi + 1) * 64)
        i_g = qa[:, sl].long() @ qw[:, sl].long().t()  # exact int64
        y += sa[:, gi:gi + 1].double() * p.wscales[:, gi].double()[None] * i_g.double()
    y += (xs.double() @ p.lora_down.double().t()) @ p.lora_up.double().t()
    return y + p.bias.double()


@pytest.mark.parametrize("m,n,k", [(1, 5, 64), (17, 96, 192), (130, 200, 512)])
@pytest.mark.parametrize("bits,act_bits,unsigned", [(4, 4, False), (4, 4, True), (4, 8, False), (8, 8, False)])
def test_cpu_op_equals_integer_gemm(m, n, k, bits, act_bits, unsigned):
    p = _packed(n, k, bits=bits, act_bits=act_bits, unsigned=unsigned)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g)
    if unsigned:
        x = x.abs()
    y = linear_from_packed(x, p)
    exact = _int_exact(x, p)
    # fp32 accumulation of K products: relative error ~ sqrt(K) * 2^-24, far below 1e-5.
    rel = (y.double() - exact).norm() / exact.norm()
    assert rel < 1e-5, rel
    ref = quantized_linear_reference(x, p.qweight, p.wscales, p.smooth, p.lora_down, p.lora_up, p.bias,
                                     group_size=64, weight_bits=bits, act_bits=act_bits, act_unsigned=unsigned)
    assert ((ref.double() - exact).norm() / exact.norm()) < 1e-6  # the float64 oracle is exact


@pytest.mark.parametrize("epilogue", ["none", "gelu", "gelu_tanh", "silu", "relu"])
def test_epilogues_gate_residual(epilogue):
    p = _packed(96, 128)
    x = torch.randn(2, 9, 128)
    gate = torch.randn(2, 1, 96)
    res = torch.randn(2, 9, 96)
    y = linear_from_packed(x, p, epilogue=epilogue, residual=res, gate=gate)
    base = linear_from_packed(x, p)
    act = {"none": lambda t: t, "gelu": torch.nn.functional.gelu, "relu": torch.relu,
           "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
           "silu": torch.nn.functional.silu}[epilogue]
    torch.testing.assert_close(y, act(base) * gate + res, rtol=1e-5, atol=1e-5)


def test_bf16_input_keeps_dtype():
    p = _packed(64, 128)
    y = linear_from_packed(torch.randn(3, 128).bfloat16(), p)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 64)


def test_traces_under_compile_and_export():
    p = _packed(64, 128)

    class L(torch.nn.Module):
        def forward(self, x):
            return linear_from_packed(x, p)

    x = torch.randn(4, 128)
    eager = L()(x)
    compiled = torch.compile(L(), fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    ep = torch.export.export(L(), (x,))
    assert any("svdq.linear" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), eager)


def test_clear_errors():
    p = _packed(64, 128)
    with pytest.raises(TypeError, match="dtype"):
        linear_from_packed(torch.randn(2, 128, dtype=torch.float64), p)
    with pytest.raises(ValueError, match="expects 128"):
        linear_from_packed(torch.randn(2, 96), p)
    with pytest.raises(ValueError, match="epilogue"):
        linear_from_packed(torch.randn(2, 128), p, epilogue="tanh")

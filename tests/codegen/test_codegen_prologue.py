"""Prologue kernel == runtime.quantize_activation + pack_int4, bit for bit; h == X' L2^T."""
import pytest
import torch

pytest.importorskip("triton")

from tests.codegen.codegen_helpers import CAN_RUN, DEVICE, make_input  # noqa: E402

from svdq_compile.codegen.call_spec import make_spec  # noqa: E402
from svdq_compile.codegen.prologue import run_prologue  # noqa: E402
from svdq_compile.runtime.packing import pack_int4  # noqa: E402
from svdq_compile.runtime.quantize import quantize_activation  # noqa: E402
from svdq_compile.runtime.reference import smooth_input  # noqa: E402

pytestmark = pytest.mark.skipif(not CAN_RUN, reason="needs CUDA or TRITON_INTERPRET=1")


def _check(x, smooth, lora_down, act_bits=4, unsigned=False, shift=0.0, group_size=64):
    spec = make_spec(x, smooth, lora_down, None, None, None, group_size, 4, act_bits, unsigned,
                     "none", "ieee")
    qa, sa, h = run_prologue(x, smooth, lora_down, spec, shift)
    xs = smooth_input(x, smooth)  # [M, K] fp32, the reference's X'
    q_ref, s_ref = quantize_activation(xs, act_bits, group_size, unsigned=unsigned, shift=shift)
    qa_ref = pack_int4(q_ref) if act_bits == 4 else q_ref
    assert qa.dtype == torch.int8 and sa.dtype == torch.float32
    assert torch.equal(sa, s_ref), "scales differ"
    assert torch.equal(qa, qa_ref), f"quantized bytes differ at {(qa != qa_ref).nonzero()[:5].tolist()}"
    if lora_down is not None:
        h_ref = xs.double() @ lora_down.double().t()
        # fp32 accumulation over K: error of order sqrt(K) * eps relative to the terms.
        scale = (xs.double().abs() @ lora_down.double().abs().t()).max()
        assert float((h.double() - h_ref).abs().max() / scale) < 1e-6
    else:
        assert h.shape == (x.shape[0], 0)


@pytest.mark.parametrize("k", [64, 192, 512])
@pytest.mark.parametrize("m", [1, 17, 130])
def test_prologue_exact_shapes(m, k):
    x = make_input(m, k)
    g = torch.Generator().manual_seed(2)
    smooth = (torch.rand(k, generator=g) + 0.5).to(DEVICE)
    lora_down = (torch.randn(8, k, generator=g) / k**0.5).to(DEVICE)
    _check(x, smooth, lora_down)


@pytest.mark.parametrize(
    "case",
    ["no_smooth", "rank0", "rank32_bf16_lora", "unsigned_shift", "unsigned_noshift", "a8",
     "bf16", "fp16", "zero_rows", "strided", "g128"],
)
def test_prologue_variants(case):
    m, k = 17, (256 if case == "g128" else 192)
    x = make_input(m, k)
    g = torch.Generator().manual_seed(3)
    smooth = (torch.rand(k, generator=g) + 0.5).to(DEVICE)
    ld = (torch.randn(8, k, generator=g) / k**0.5).to(DEVICE)
    kw = {}
    if case == "no_smooth":
        smooth = None
    elif case == "rank0":
        ld = None
    elif case == "rank32_bf16_lora":
        ld = (torch.randn(32, k, generator=g) / k**0.5).to(torch.bfloat16).to(DEVICE)
    elif case == "unsigned_shift":
        x = torch.nn.functional.gelu(x)  # GELU output: small negative lobe
        kw = dict(unsigned=True, shift=0.171875)
    elif case == "unsigned_noshift":
        kw = dict(unsigned=True)  # negative inputs clamp to 0
    elif case == "a8":
        kw = dict(act_bits=8)
    elif case in ("bf16", "fp16"):
        x = x.to(torch.bfloat16 if case == "bf16" else torch.float16)
    elif case == "zero_rows":
        x[3] = 0.0  # all-zero groups -> scale 1
        x[5, :64] = 0.0
    elif case == "strided":
        x = make_input(k, m).t()  # [M, K] with stride (1, M)
        assert not x.is_contiguous()
    elif case == "g128":
        kw = dict(group_size=128)
    _check(x, smooth, ld, **kw)


def test_prologue_rounding_ties():
    """Values exactly on .5 of the grid: floor(v + 0.5) rounds them up, like the reference."""
    k = 64
    x = torch.zeros(3, k)
    x[:, 0] = 7.0  # absmax 7 -> scale 1 exactly
    x[:, 1:15] = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 6.5, -6.5, 3.49, -3.51, 7.0, -7.0, 0.0, -0.0])
    x[1] *= -1
    x[2] = x[2] / 3.0
    _check(x.to(DEVICE), None, None)

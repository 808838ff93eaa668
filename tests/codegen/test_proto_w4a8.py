"""The W4A8 progressive-quantization prototype (benchmarks/proto_w4a8_progressive.py).

It exists to be timed on a GPU (docs/kernels.md); here its numerics are checked: the
integer weights stay inside int8, the error is that of 4-bit weights, and the kernel
(interpreter on CPU) equals the exact integer reference bit for bit.
"""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from codegen_helpers import CAN_RUN, DEVICE  # noqa: E402

from benchmarks import proto_w4a8_progressive as proto  # noqa: E402

pytestmark = pytest.mark.skipif(not CAN_RUN, reason="needs CUDA or TRITON_INTERPRET=1")


def _case(m=20, k=192, n=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, 5] *= 20  # an outlier input channel
    x = torch.randn(m, k, generator=g)
    return w, x


def test_progressive_weights_fit_int8_and_approximate_w():
    w, _ = _case()
    packed, s, z, s_c = proto.quantize_weight_progressive(w)
    w8 = proto.dequantize_w8(packed, s, z)
    assert int(w8.abs().max()) <= 127 and int(s.min()) >= 1 and int(s.max()) <= 16
    w_hat = w8.float() * s_c[:, None]
    # 4-bit groups with integer scales: error well below the weight scale (~4-bit SQNR).
    sqnr = 20 * torch.log10(w.norm() / (w - w_hat).norm())
    assert sqnr > 15, float(sqnr)


@pytest.mark.parametrize("m,n", [(20, 72), (1, 40), (130, 96)])
def test_kernel_equals_integer_reference(m, n):
    w, x = _case(m=m, n=n)
    packed, s, z, s_c = proto.quantize_weight_progressive(w)
    a, s_a = proto.quantize_activation_per_token(x)
    ref = proto.reference(a, s_a, packed, s, z, s_c)
    dev = DEVICE
    t = [v.to(dev) for v in (a, s_a, packed, s, (z * s).to(torch.int32), s_c)]
    y = proto.run(*t, cfg=(32, 32, 4, 4, 2))
    assert torch.equal(y.cpu(), ref)  # int32 accumulation is exact, the epilogue identical

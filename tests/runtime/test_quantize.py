import pytest
import torch

from svdq_compile.runtime import dequantize_groups, quantize_activation, quantize_groups, quantize_weight


@pytest.mark.parametrize("bits,unsigned", [(4, False), (4, True), (8, False)])
def test_error_bound_half_scale(bits, unsigned):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 192, generator=g) * 3
    if unsigned:
        x = x.abs()
    q, s = quantize_groups(x, bits, 64, unsigned=unsigned)
    err = (x - dequantize_groups(q, s, 64)).abs().unflatten(-1, (-1, 64))
    # Round-to-nearest on an unclipped grid: at most half a step (+ fp32 slack).
    assert (err <= s.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-7).all()


def test_zero_group_has_unit_scale():
    x = torch.zeros(2, 128)
    x[0, 64:] = 1.0
    q, s = quantize_activation(x, 4, 64)
    assert s[0, 0] == 1.0 and s[1, 1] == 1.0 and (q[:, :64] == 0).all()


def test_weight_scales_fp16_and_consistent():
    w = torch.randn(8, 128)
    q, s = quantize_weight(w, 4, 64)
    assert s.dtype == torch.float16
    assert q.min() >= -8 and q.max() <= 7
    # integers were computed with the stored fp16 scale
    ref = torch.floor(w.unflatten(-1, (-1, 64)) / s.float().unsqueeze(-1) + 0.5).clamp(-8, 7)
    assert torch.equal(q, ref.flatten(-2).to(torch.int8))


def test_rejects_bad_group():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_groups(torch.randn(2, 100), 4, 64)
    with pytest.raises(TypeError):
        quantize_groups(torch.ones(2, 64, dtype=torch.int32), 4, 64)

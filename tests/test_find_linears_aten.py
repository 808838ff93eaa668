"""Linear sites in ATen graphs (aten.addmm / aten.mm with a transposed parameter)."""
import torch
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import make_fx

from svdq_compile.passes.find_linears import find_linear_sites


def test_addmm_and_mm_sites_found():
    w1 = nn.Parameter(torch.randn(96, 64))
    b1 = nn.Parameter(torch.randn(96))
    w2 = nn.Parameter(torch.randn(32, 96))

    x = torch.randn(4, 64)
    gm = make_fx(lambda x, w1, b1, w2: torch.ops.aten.mm(
        torch.relu(torch.ops.aten.addmm(b1, x, torch.ops.aten.t(w1))), torch.ops.aten.t(w2)))(x, w1, b1, w2)
    sites = find_linear_sites(gm, [x, w1, b1, w2])
    assert [s.kind for s in sites] == ["addmm", "mm"]
    assert sites[0].weight is w1 and sites[0].bias is b1 and sites[1].bias is None


def test_activation_times_activation_is_not_a_site():
    a, b = torch.randn(4, 64), torch.randn(8, 64)
    # A computed (activation) right operand is never a weight.
    gm2 = make_fx(lambda a, b: torch.ops.aten.mm(a, torch.ops.aten.t(b * 2)))(a, b)
    assert find_linear_sites(gm2, [a, b]) == []

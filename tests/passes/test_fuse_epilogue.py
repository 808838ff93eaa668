"""fuse_epilogue: act -> gate -> residual chains move into the svdq op, in that order only."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.passes.passes_helpers import outlier_input, quantized_graph, rel_diff, run_gm, svdq_ops
from svdq_compile.passes.fuse_epilogue import fuse_epilogue
from svdq_compile.passes.op_nodes import ARG, GraphTensors

PATTERNS = {
    # name: (fn(y, g, r, fc2), expected {kind: count}, expected epilogue of the first op)
    "gelu": (lambda y, g, r, fc2: F.gelu(y), {"act": 1}, "gelu"),
    "gelu_tanh": (lambda y, g, r, fc2: F.gelu(y, approximate="tanh"), {"act": 1}, "gelu_tanh"),
    "silu": (lambda y, g, r, fc2: F.silu(y), {"act": 1}, "silu"),
    "relu": (lambda y, g, r, fc2: torch.relu(y), {"act": 1}, "relu"),
    "act_gate_residual": (lambda y, g, r, fc2: r + F.gelu(y) * g, {"act": 1, "gate": 1, "residual": 1}, "gelu"),
    "gate_residual": (lambda y, g, r, fc2: g * y + r, {"gate": 1, "residual": 1}, "none"),
    "residual": (lambda y, g, r, fc2: r + y, {"residual": 1}, "none"),
    "dropout_gate_residual": (lambda y, g, r, fc2: r + g * F.dropout(y, 0.0, False),
                              {"gate": 1, "residual": 1}, "none"),
    # out of order: only the leading part that follows bias -> act -> gate -> residual fuses
    "gate_then_act": (lambda y, g, r, fc2: F.gelu(y * g), {"gate": 1}, "none"),
    "residual_then_gate": (lambda y, g, r, fc2: (y + r) * g, {"residual": 1}, "none"),
    # linear A's GELU fused; linear B reads the fused op (B's unsigned input decided before)
    "mlp": (lambda y, g, r, fc2: fc2(F.gelu(y)), {"act": 1}, "gelu"),
}

NOT_MATCHING = {
    "two_users": lambda y, g, r, fc2: F.gelu(y) + y,  # y is also read by the add
    "gate_grows_output": lambda y, g, r, fc2: y * r[:, :1].expand(2, 16, 128).unsqueeze(0).expand(3, 2, 16, 128),
    "residual_broadcast": lambda y, g, r, fc2: y + g,  # [B, 1, N]: not the output's shape
    "dtype_change": lambda y, g, r, fc2: y * g.double(),
    "square": lambda y, g, r, fc2: y * y,
    "scalar_gate": lambda y, g, r, fc2: y * 0.5 + 1.0,
    "dropout_training": lambda y, g, r, fc2: F.dropout(y, 0.5, True),
}


class Epi(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.fc, self.fc2 = nn.Linear(128, 128), nn.Linear(128, 128)

    def forward(self, x, g, r):
        return self.fn(self.fc(x), g, r, self.fc2)


def _graph(fn):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    args = (outlier_input((2, 16, 128)), torch.randn(2, 1, 128, generator=g), torch.randn(2, 16, 128, generator=g))
    return quantized_graph(Epi(fn), args)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_fusion_counts_and_exactness(name):
    fn, expected, epilogue = PATTERNS[name]
    gm, ex = _graph(fn)
    y0 = run_gm(gm, ex)
    stats: dict = {}
    n = fuse_epilogue(gm, GraphTensors(gm, ex), stats)
    assert n == sum(expected.values())
    assert {k: v for k, v in stats.items() if v and k != "dropout"} == expected
    op = svdq_ops(gm)[0]
    assert op.args[ARG["epilogue"]] == epilogue
    assert (op.args[ARG["gate"]] is not None) == ("gate" in expected)
    assert (op.args[ARG["residual"]] is not None) == ("residual" in expected)
    # The op applies the same fp32 operations in the same order: identical results.
    assert rel_diff(run_gm(gm, ex), y0) < 1e-6
    if name == "mlp":
        a, b = svdq_ops(gm)
        assert b.args[ARG["x"]] is a and b.args[ARG["act_unsigned"]] is True
    if name.startswith("dropout"):
        assert stats["dropout"] == 1


@pytest.mark.parametrize("name", sorted(NOT_MATCHING))
def test_not_matching_is_untouched(name):
    gm, ex = _graph(NOT_MATCHING[name])
    before = str(gm.graph)
    assert fuse_epilogue(gm, GraphTensors(gm, ex)) == 0
    assert str(gm.graph) == before


def test_bf16_model_fuses_and_stays_close():
    """16-bit: the fused op rounds once (fp32 epilogue) instead of after each op."""
    m = Epi(PATTERNS["act_gate_residual"][0]).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    args = (outlier_input((2, 16, 128)).bfloat16(), torch.randn(2, 1, 128, generator=g).bfloat16(),
            torch.randn(2, 16, 128, generator=g).bfloat16())
    gm, ex = quantized_graph(m, args)
    y0 = run_gm(gm, ex)
    assert fuse_epilogue(gm, GraphTensors(gm, ex)) == 3
    y1 = run_gm(gm, ex)
    assert y1.dtype == torch.bfloat16
    assert rel_diff(y1.float(), y0.float()) < 2e-2  # a few bf16 ulps (2^-8 relative each)

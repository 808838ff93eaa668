"""One Dynamo graph, several sets of weights and inputs at other storage offsets (issue #25).

A graph break inside a loop makes Dynamo skip the loop's frame and compile the module
called in it once: the same graph then runs for every slice of a stacked tensor, each a
view at another storage offset, with each iteration's own weights. The backend builds one
quantized variant per set of weights, compiled by Inductor for the inputs Dynamo traced:
compiling with the real arguments used to fail on the second slice
(``int(sym)=0 != hint=512``), and the second slice's weights were quantized without
calibration statistics.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import svdq_compile
from svdq_compile.capture import backend
from svdq_compile.quant.stats import stats_of

DIM, SLICES = 64, 3
OPTIONS = {"rank": 4, "alpha": 0.5, "skip": (), "mode_overrides": {}}


class Proj(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Stacked(nn.Module):
    """``proj[k](stacked[k])`` for each k, as HiDream's caption projections; ``shared``: one
    Linear for every slice."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        one = Proj()
        self.proj = nn.ModuleList([one if shared else Proj() for _ in range(SLICES)])

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        outs = []
        for k in range(stacked.shape[0]):
            outs.append(self.proj[k](stacked[k]))
            torch._dynamo.graph_break()  # Dynamo skips this frame: Proj.forward is compiled alone
        return torch.stack(outs)


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SLICES, 2, 4, DIM, generator=g)
    x[..., 5] *= 20  # an outlier channel, which smoothing needs statistics to handle
    return x


class _Count:
    """The svdquant backend, keeping each graph's compiled object."""

    def __init__(self, options: dict) -> None:
        self.options = options
        self.compiled: list = []

    def __call__(self, gm, example_inputs):
        c = backend.svdquant_backend(gm, example_inputs, options=self.options)
        self.compiled.append(c)
        return c


@pytest.mark.parametrize("shared", [False, True], ids=["weights-per-slice", "one-linear"])
def test_slices_of_a_stacked_tensor_share_one_graph(shared):
    torch.manual_seed(0)
    m = Stacked(shared).eval()
    x = _data()
    assert [x[k].storage_offset() for k in range(SLICES)] == [0, 8 * DIM, 16 * DIM]
    with torch.no_grad():
        ref = m(x)
    count = _Count(OPTIONS)  # with Inductor (the default): the path that describes the inputs to it
    cm = torch.compile(m, backend=count)
    with torch.no_grad():
        outs = [cm(x) for _ in range(2)]
    assert len(count.compiled) == 1  # one graph for every slice
    assert len(count.compiled[0]._variants) == (1 if shared else SLICES)
    assert torch.equal(outs[0], outs[1])
    for k in range(SLICES):
        weight = m.proj[k].linear.weight
        assert stats_of(weight) is not None and stats_of(weight).seen > 0  # each set was calibrated
        # W4 with rank 4 and smoothing on a 64-wide layer with a x20 channel: ~30 dB; a slice
        # quantized without statistics (no smoothing) or reading another slice's weights
        # lands far lower.
        assert svdq_compile.sqnr_db(ref[k], outs[0][k]) > 25.0, k

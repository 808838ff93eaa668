"""The W4A4 Gluon prototype's activation layout (benchmarks/proto_gluon_grouped.py): per group
of 64, the 32 even-k values then the 32 odd-k values, so that low nibbles of the packed weights
(even k) pair with the first half and high nibbles with the second. Pure torch: runs on CPU."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import proto_gluon_grouped as proto  # noqa: E402

from svdq_compile.runtime.packing import pack_int4, unpack_int4  # noqa: E402


def test_even_odd_layout_gives_the_exact_group_products():
    gen = torch.Generator().manual_seed(0)
    m, n, k, g = 5, 7, 192, 64
    qa = torch.randint(-8, 8, (m, k), generator=gen).to(torch.int8)
    qw = torch.randint(-8, 8, (n, k), generator=gen).to(torch.int8)
    a_eo = proto.activations_even_odd(pack_int4(qa), g)  # [M, K] int8
    assert a_eo.dtype == torch.int8 and a_eo.shape == (m, k)
    wp = pack_int4(qw)  # [N, K/2]: low nibble = even k
    lo = unpack_int4(wp, signed=True)[:, 0::2].long()  # even k
    hi = unpack_int4(wp, signed=True)[:, 1::2].long()  # odd k
    h = g // 2
    for grp in range(k // g):
        a = a_eo[:, grp * g:(grp + 1) * g].long()
        got = a[:, :h] @ lo[:, grp * h:(grp + 1) * h].t() + a[:, h:] @ hi[:, grp * h:(grp + 1) * h].t()
        want = qa[:, grp * g:(grp + 1) * g].long() @ qw[:, grp * g:(grp + 1) * g].long().t()
        assert torch.equal(got, want), grp

"""Each un-tiling of svdq_compile/integrations/nunchaku/layout.py against deepcompressor's packer.

deepcompressor (PyPI ``deepcompressor-toolkit``, pure Python, installed with --no-deps) wrote
every published Nunchaku checkpoint; its packers are applied to random data here and our
inverses must give the data back exactly, padding included.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepcompressor.backend.nunchaku.utils")
# deepcompressor's pad() indexes with a list of slices (a torch deprecation warning, same result)
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

from deepcompressor.backend.nunchaku.utils import NunchakuWeightPacker  # noqa: E402
from deepcompressor.backend.tinychat.utils import convert_to_tinychat_w4x16y16_linear_weight  # noqa: E402

from svdq_compile.integrations.nunchaku import layout as L  # noqa: E402

SHAPES = [(128, 128), (256, 384), (96, 192)]  # the last one needs padding in N and K


@pytest.mark.parametrize("n,k", SHAPES)
def test_w4a4_weight(n, k):
    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int32)
    p = NunchakuWeightPacker(bits=4)
    packed = p.pack_weight(p.pad_weight(codes.clone()))
    got = L.unpack_w4a4_weight(packed, n, k).to(torch.int32)
    assert torch.equal(torch.where(got > 7, got - 16, got), codes)


@pytest.mark.parametrize("n,k", SHAPES)
def test_group_scales_and_vectors(n, k):
    g = torch.Generator().manual_seed(n * k)
    ng = k // 64
    scale = torch.rand(n, ng, generator=g).to(torch.float16) + 0.01
    p = NunchakuWeightPacker(bits=4)
    packed = p.pack_scale(p.pad_scale(scale.view(n, 1, ng, 1).clone(), group_size=64), group_size=64)
    assert torch.equal(L.unpack_scales(packed, n, ng), scale)
    vec = torch.randn(n, generator=g).to(torch.bfloat16)
    pv = p.pack_scale(p.pad_scale(vec.view(-1, 1).clone(), group_size=-1), group_size=-1)
    assert torch.equal(L.unpack_channel_vector(pv, n), vec)


@pytest.mark.parametrize("n,k", SHAPES)
def test_micro_scales(n, k):
    g = torch.Generator().manual_seed(n + 3 * k)
    ng = k // 16
    scale = (torch.rand(n, ng, generator=g) * 400 + 0.01).to(torch.float8_e4m3fn).to(torch.bfloat16)
    p = NunchakuWeightPacker(bits=4)
    packed = p.pack_scale(p.pad_scale(scale.view(n, 1, ng, 1).clone(), group_size=16), group_size=16)
    assert packed.dtype == torch.float8_e4m3fn
    assert torch.equal(L.unpack_micro_scales(packed, n, ng).float(), scale.float())


@pytest.mark.parametrize("n,k,r", [(128, 256, 32), (96, 192, 12)])
def test_lowrank(n, k, r):
    g = torch.Generator().manual_seed(r)
    down = torch.randn(r, k, generator=g).to(torch.bfloat16)
    up = torch.randn(n, r, generator=g).to(torch.bfloat16)
    p = NunchakuWeightPacker(bits=4)
    pd = p.pack_lowrank_weight(p.pad_lowrank_weight(down, down=True), down=True)
    pu = p.pack_lowrank_weight(p.pad_lowrank_weight(up, down=False), down=False)
    rp = L.padded(r, 16)
    assert list(pd.shape) == [L.padded(k, 128), rp] and list(pu.shape) == [L.padded(n, 128), rp]
    d = L.unpack_lowrank(pd, k, down=True).t()
    u = L.unpack_lowrank(pu, n, down=False)
    assert torch.equal(d[:r], down) and not d[r:].any()
    assert torch.equal(u[:, :r], up) and not u[:, r:].any()


@pytest.mark.parametrize("n,k", [(768, 128), (64, 192)])
def test_awq(n, k):
    g = torch.Generator().manual_seed(n)
    q = torch.randint(-7, 8, (n, k), generator=g)
    s = (torch.rand(n, k // 64, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    w = (q.view(n, -1, 64).float() * s.float()[..., None]).view(n, k).to(torch.bfloat16)
    qw, ws, wz = convert_to_tinychat_w4x16y16_linear_weight(w, s.view(n, 1, -1, 1), torch.full_like(s, 7).view(n, 1, -1, 1),
                                                            zero_pre_scaled=True)
    qw = qw.view(torch.int32)
    assert torch.equal(L.unpack_awq_weight(qw, n, k).long() - 7, q)
    assert torch.equal(L.unpack_awq_scales(ws, n, k // 64), s)
    assert torch.equal(L.unpack_awq_scales(wz, n, k // 64), (-(7 * s.float())).to(torch.bfloat16))


def test_adanorm_interleave():
    t = torch.arange(12)
    inter = t.view(3, 4).t().reshape(12)  # deepcompressor: view(splits, n/splits).transpose(0, 1)
    assert torch.equal(L.deinterleave_adanorm(inter, 3), t)

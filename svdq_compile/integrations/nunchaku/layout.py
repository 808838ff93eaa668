"""Nunchaku's tensor layouts and their inverses (un-tiling into our row-major layout).

Each function is the exact inverse of one packer of deepcompressor's Nunchaku backend
(``deepcompressor/backend/nunchaku/utils.py: NunchakuWeightPacker`` with ``bits=4``,
``warp_n=128``; ``deepcompressor/backend/tinychat/utils.py: pack_w4``), which wrote every
published svdq-int4 / svdq-fp4 file; ``tests/integrations/test_nunchaku_layout.py``
checks each against those packers on random data. Padding (N and K to multiples of 128,
ranks to multiples of 16, AWQ group counts to multiples of 16) is cropped here; callers
pass the true sizes.

W4A4 weights (``pack_weight``): the [N, K] codes viewed as
``(n_tiles, 8 n_packs, 2 n_pack, 8 n_lanes, 1, k_tiles, 1, 2 k_pack, 4 k_lanes, 8 reg_k)``
are permuted to ``(n_tiles, k_tiles, 1, n_packs, n_lanes, k_lanes, n_pack, k_pack, 1, reg_k)``
and eight nibbles (reg_k) packed per little-endian int32, element 0 in the low nibble.

Scales (``pack_scale``, per group or per channel): within each block of 128 output
channels, channel ``a*16 + b*8 + c*2 + d`` (a<8, b<2, c<4, d<2) is stored at
``a*16 + c*4 + b*2 + d``; the flat order is (n block, group, position): the [K/G, N]
shape of the file is only nominal. Bias, smooth and ``wcscales`` are per-channel scales.

NVFP4 micro-scales (``pack_micro_scale``, group 16, fp8): per block of 128 channels and
4 groups, channel ``sp*32 + a*8 + b`` (sp<4, a<4, b<8) and group ``kk*4 + j`` at flat
position (n block, kk, b, a, sp, j).

Low-rank factors (``pack_lowrank_weight``): 16 x 16 fragments; ``lora_down`` is stored
[K, r], ``lora_up`` [N, r].

AWQ W4A16 (``convert_to_tinychat_w4x16y16_linear_weight``): unsigned codes ``u = w/s + 7``
packed four per int16 (elements j, j+8, j+16, j+24 of each 32), rows interleaved by four
per 64 columns, the int16 pairs viewed as int32 [N/4, K/2]; scales and zeros [groups, N]
with the group count padded; zeros store ``-7 * s``. FLUX's AdaLN layers also interleave
their output channels across the modulation chunks (``adanorm_splits``) and add 1 to the
bias of the scale chunks (Nunchaku runs them with ``scale_shift=0``).
"""
from __future__ import annotations

import torch

__all__ = [
    "unpack_w4a4_weight", "unpack_scales", "unpack_channel_vector", "unpack_micro_scales", "unpack_lowrank",
    "unpack_awq_weight", "unpack_awq_scales", "deinterleave_adanorm", "adanorm_bias_delta", "padded",
    "LayoutError",
]

WARP_N = 128
K_UNROLL = 128  # mem_k (64) x num_k_unrolls (2)
LOWRANK_PACK = 16


class LayoutError(ValueError):
    """A tensor does not have the size its Nunchaku layout implies."""


def padded(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def _expect(t: torch.Tensor, numel: int, what: str) -> None:
    if t.numel() != numel:
        raise LayoutError(f"{what}: {t.numel()} elements, the layout needs {numel}")


def unpack_w4a4_weight(qweight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Nunchaku ``qweight`` int8 [N_pad, K_pad/2] -> [n, k] uint8 4-bit codes (0..15, raw nibbles)."""
    n_pad, k_pad = padded(n, WARP_N), padded(k, K_UNROLL)
    _expect(qweight, n_pad * k_pad // 2, f"qweight of a [{n}, {k}] layer (padded [{n_pad}, {k_pad}])")
    b = qweight.reshape(-1).view(torch.uint8).to(torch.int16)
    nib = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(-1)  # element 2i at the low nibble of byte i
    v = nib.view(n_pad // WARP_N, k_pad // 64, 1, 8, 8, 4, 2, 2, 1, 8)
    # inverse of permute(0, 5, 6, 1, 3, 8, 2, 7, 4, 9)
    v = v.permute(0, 3, 6, 4, 8, 1, 2, 7, 5, 9).reshape(n_pad, k_pad)
    return v[:n, :k].to(torch.uint8).contiguous()


def unpack_scales(wscales: torch.Tensor, n: int, groups: int, group_pad: int = 2) -> torch.Tensor:
    """Nunchaku ``wscales`` [G_pad, N_pad] -> [n, groups] (same dtype). ``group_pad``: the
    packer pads the group count to a multiple of 2 (``num_k_unrolls``)."""
    n_pad, g_pad = padded(n, WARP_N), padded(groups, group_pad)
    _expect(wscales, n_pad * g_pad, f"wscales of {n} channels x {groups} groups (padded {n_pad} x {g_pad})")
    v = wscales.reshape(-1).view(n_pad // WARP_N, g_pad, 1, 8, 4, 2, 2)
    # flat (t, g, 1, a, c, b, d) -> (t, 1, a, b, c, d, g)
    v = v.permute(0, 2, 3, 5, 4, 6, 1).reshape(n_pad, g_pad)
    return v[:n, :groups].contiguous()


def unpack_channel_vector(t: torch.Tensor, n: int) -> torch.Tensor:
    """Nunchaku bias / smooth / wcscales [N_pad] -> [n]."""
    n_pad = padded(n, WARP_N)
    _expect(t, n_pad, f"per-channel vector of {n} channels (padded {n_pad})")
    return unpack_scales(t.reshape(-1), n, 1, group_pad=1)[:, 0].contiguous()


def unpack_micro_scales(wscales: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """NVFP4 ``wscales`` fp8 [G_pad, N_pad] (group 16) -> [n, groups]."""
    n_pad, g_pad = padded(n, WARP_N), padded(groups, 4)
    _expect(wscales, n_pad * g_pad, f"NVFP4 wscales of {n} channels x {groups} groups (padded {n_pad} x {g_pad})")
    v = wscales.reshape(-1).view(torch.uint8).view(n_pad // WARP_N, g_pad // 4, 1, 8, 4, 4, 4)
    # flat (t, kk, 1, b, a, sp, j) -> (t, 1, sp, a, b, kk, j)
    v = v.permute(0, 2, 5, 4, 3, 1, 6).reshape(n_pad, g_pad)
    return v[:n, :groups].contiguous().view(wscales.dtype)


def unpack_lowrank(weight: torch.Tensor, c: int, down: bool) -> torch.Tensor:
    """Nunchaku ``lora_down`` [K_pad, r_pad] (``down``) or ``lora_up`` [N_pad, r_pad] -> [c, r_pad]
    (c = K or N, rows in natural order; the rank stays padded)."""
    if weight.dim() != 2:
        raise LayoutError(f"low-rank factor must be 2-D, got {list(weight.shape)}")
    c_pad, r_pad = weight.shape
    if c_pad != padded(c, WARP_N) or r_pad % LOWRANK_PACK:
        raise LayoutError(f"low-rank factor {list(weight.shape)}: expected [{padded(c, WARP_N)}, r] with r a "
                          f"multiple of {LOWRANK_PACK}")
    cp, rp = c_pad // LOWRANK_PACK, r_pad // LOWRANK_PACK
    # (c_packs, r_packs, 8 n_lanes, 4 k_lanes, 2 n_pack, 2 k_pack, 1, 2 reg_k) ->
    # (c_packs, r_packs, n_pack, n_lanes, 1, k_pack, k_lanes, reg_k); for down the roles of
    # (c, r) in the fragment are (k, n): its fragments are [r, c] tiles.
    if down:
        v = weight.reshape(cp, rp, 8, 4, 2, 2, 1, 2).permute(0, 1, 4, 2, 6, 5, 3, 7)
        v = v.reshape(cp, rp, LOWRANK_PACK, LOWRANK_PACK)  # [c_pack, r_pack, r16, c16]
        v = v.permute(0, 3, 1, 2).reshape(c_pad, r_pad)
    else:
        v = weight.reshape(cp, rp, 8, 4, 2, 2, 1, 2).permute(0, 1, 4, 2, 6, 5, 3, 7)
        v = v.reshape(cp, rp, LOWRANK_PACK, LOWRANK_PACK)  # [c_pack, r_pack, c16, r16]
        v = v.permute(0, 2, 1, 3).reshape(c_pad, r_pad)
    return v[:c].contiguous()


def unpack_awq_weight(qweight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """AWQ ``qweight`` int32 [N/4, K/2] -> [n, k] unsigned codes (int16, 0..15)."""
    if n % 4 or k % 64:
        raise LayoutError(f"AWQ W4A16 layers need out_features % 4 == 0 and in_features % 64 == 0, got [{n}, {k}]")
    _expect(qweight, n * k // 8, f"AWQ qweight of a [{n}, {k}] layer (int32 [{n // 4}, {k // 2}])")
    w16 = qweight.contiguous().view(torch.int16).reshape(n // 4, k // 64, 4, 16).permute(0, 2, 1, 3)
    w = w16.reshape(n, k // 32, 8).to(torch.int32) & 0xFFFF
    nib = torch.stack([(w >> (4 * i)) & 0xF for i in range(4)], dim=2)  # [n, k/32, 4, 8]: element i*8 + j
    return nib.reshape(n, k).to(torch.int16)


def unpack_awq_scales(t: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """AWQ ``wscales`` / ``wzeros`` [G_pad, N] -> [n, groups] (the padded groups are dropped)."""
    if t.dim() != 2 or t.shape[1] != n or t.shape[0] < groups:
        raise LayoutError(f"AWQ scales must be [>= {groups}, {n}], got {list(t.shape)}")
    return t[:groups].t().contiguous()


def deinterleave_adanorm(t: torch.Tensor, splits: int) -> torch.Tensor:
    """Undo the AdaLN channel interleave: row ``j * splits + s`` -> row ``s * (N / splits) + j``."""
    if splits <= 1:
        return t
    n = t.shape[0]
    return t.reshape(n // splits, splits, *t.shape[1:]).transpose(0, 1).reshape(n, *t.shape[1:]).contiguous()


def adanorm_bias_delta(n: int, splits: int) -> torch.Tensor:
    """[n] fp64: what deepcompressor added to the (de-interleaved) AdaLN bias (1 on the scale chunks)."""
    delta = [0.0] * splits
    if splits > 1:
        delta[1] = delta[-2] = 1.0
    return torch.tensor(delta, dtype=torch.float64).repeat_interleave(n // splits)

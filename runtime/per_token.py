"""Per-token 8-bit activation numerics: the ``w4a8-int8`` and ``w4a8-fp8`` schemes.

Why these exist (docs/design.md section 2.1): group-64 scales on both operands put float work
inside every K step of the GEMM, which Hopper's pipeliner serialises. With one scale
per token (activations) and one per output channel (weights) the main loop is a single
accumulator over all of K; every float op moves to the epilogue. Weights stay INT4 in
memory (same bytes as W4A4), smoothing and the 16-bit low-rank branch are unchanged.

``int8`` (QServe's progressive weights, exact integer expansion):

- level 1, per output channel n: ``c_n = absmax_n / 119`` (fp32; an all-zero row gets 1),
  ``q8 = clamp(floor(r / c_n + 0.5), -119, 119)``; 119, not 127, leaves the room that
  level 2's rounding needs so the expansion below never leaves int8;
- level 2, per group of G along K: integer scale ``s = max(1, ceil((max - min) / 15))``
  and zero point ``z = clamp(floor(-min / s + 0.5), 0, 15)`` of the group's q8 values,
  ``u = clamp(floor(q8 / s + 0.5) + z, 0, 15)`` (UINT4, stored as the signed nibble
  ``u - 8`` so the INT4 packing of every other mode applies unchanged);
- expansion ``e = (u - z) * s`` is exact integer math, |e| <= 127 (proved in
  :func:`expand_progressive`'s comment, asserted in the tests);
- activations: ``sa_m = absmax_m / 127``, ``qa = clamp(floor(x' / sa_m + 0.5), -128, 127)``
  (the rounding rule of :mod:`.quantize`, one group spanning K);
- ``Y = (qa @ e^T) * sa_m * c_n``: one exact int32 sum over K, one rescale at the end.

``fp8`` (FP8 e4m3 activations, INT4 weights with float group scales as in W4A4):

- weights: the W4A4 weight quantizer (signed INT4, fp16 group scales ``s_g``), plus a
  per-channel power of two ``c_n`` such that ``|q * s_g / c_n| <= 448``; the FP8 weight is
  ``fp8_rne(fp32(q * s_g) / c_n)``: ``q * s_g`` is exact in fp32 (4 x 11 significant bits)
  and dividing by a power of two is exact, so the only rounding is the final RNE to e4m3,
  which every implementation (torch's ``.to(float8_e4m3fn)``, Triton's ``cvt.rn``)
  reproduces bit for bit. Power-of-two *group* scales would make the expansion exact but
  cost quality (docs/design.md section 2.1: cosine 0.958 vs 0.975); a power-of-two *channel* scale costs
  nothing, since e4m3's relative precision does not depend on the exponent.
- activations: ``sa_m = absmax_m / 448``, ``qa = fp8_rne(x' / sa_m)`` (saturating);
- ``Y = (qa @ w8^T) * sa_m * c_n`` with an fp32 accumulator.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from svdq_compile.runtime.packing import pack_int4, unpack_int4
from svdq_compile.runtime.modes import QuantMode, Scheme, check_group_weights, register_handler, register_mode, register_scheme
from svdq_compile.runtime.quantize import dequantize_groups, quantize_groups, quantize_weight

__all__ = [
    "PER_TOKEN_SCHEMES", "FP8_DTYPE", "FP8_MAX", "CHANNEL_QMAX",
    "ProgressiveWeight", "Fp8Weight",
    "quantize_weight_progressive", "expand_progressive", "quantize_weight_fp8", "expand_fp8",
    "quantize_tokens", "dequantize_tokens", "expanded_weight", "dequantized_weight",
]

# The per-token schemes of this module (registered in runtime/modes.py at the bottom).
PER_TOKEN_SCHEMES = ("int8", "fp8")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
CHANNEL_QMAX = 119  # QServe's protective range for level 1 (see the module docstring)


class ProgressiveWeight(NamedTuple):
    qweight: torch.Tensor  # [N, K/2] int8: packed nibbles u - 8
    wscales: torch.Tensor  # [N, K/G] int8: integer group scale s in [1, 16]
    wzeros: torch.Tensor  # [N, K/G] int8: zero point z in [0, 15]
    wchannel: torch.Tensor  # [N] fp32: level-1 channel scale c_n


class Fp8Weight(NamedTuple):
    qweight: torch.Tensor  # [N, K/2] int8: packed signed INT4
    wscales: torch.Tensor  # [N, K/G] fp16 group scales
    wchannel: torch.Tensor  # [N] fp32 power-of-two channel scale c_n


def _round(v: torch.Tensor) -> torch.Tensor:
    """The rounding rule of :mod:`.quantize`: floor(v + 0.5)."""
    return torch.floor(v + 0.5)


def quantize_weight_progressive(r: torch.Tensor, group_size: int) -> ProgressiveWeight:
    """r: [N, K] float residual -> the two-level INT8 -> UINT4 weight (module docstring)."""
    n, k = r.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    r32 = r.float()
    amax = r32.abs().amax(dim=1)  # [N]
    c = amax / torch.full_like(amax, float(CHANNEL_QMAX))
    c = torch.where(c > 0, c, torch.ones_like(c))
    q8 = _round(r32 / c[:, None]).clamp_(-CHANNEL_QMAX, CHANNEL_QMAX)  # [N, K] integral fp32
    g = q8.view(n, k // group_size, group_size)
    mn, mx = g.amin(dim=-1), g.amax(dim=-1)  # [N, K/G]
    s = torch.clamp(torch.ceil((mx - mn) / 15.0), min=1.0)  # integers: exact in fp32
    z = _round(-mn / s).clamp_(0, 15)
    u = (_round(g / s[..., None]) + z[..., None]).clamp_(0, 15)
    packed = pack_int4((u - 8).to(torch.int8).view(n, k))
    return ProgressiveWeight(packed, s.to(torch.int8), z.to(torch.int8), c.contiguous())


def expand_progressive(qweight: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Packed UINT4 + integer group scale/zero -> [N, K] int8 ``e = (u - z) * s``.

    Bound: z = round(-min/s) gives z*s <= -min + s/2 <= 119 + 8 = 127 (s <= ceil(238/15)
    = 16), so e >= -127; u <= round(max/s) + z gives e <= round(max/s)*s <= max + s/2 <= 127.
    """
    n = qweight.shape[0]
    u = unpack_int4(qweight, signed=True).to(torch.int16) + 8  # [N, K] in [0, 15]
    k = u.shape[1]
    ug = u.view(n, k // group_size, group_size)
    e = (ug - wzeros.to(torch.int16)[..., None]) * wscales.to(torch.int16)[..., None]
    return e.view(n, k).to(torch.int8)


def _pow2_channel_scale(wscales: torch.Tensor) -> torch.Tensor:
    """[N, K/G] fp16 -> [N] fp32 power of two c with 8 * max_g s_g / c <= FP8_MAX."""
    top = wscales.float().amax(dim=1) * 8.0 / FP8_MAX  # [N]; |q| <= 8
    c = torch.exp2(torch.ceil(torch.log2(top.clamp_min(torch.finfo(torch.float32).tiny))))
    return torch.where(top > 0, c, torch.ones_like(c))


def quantize_weight_fp8(r: torch.Tensor, group_size: int) -> Fp8Weight:
    """r: [N, K] float residual -> signed INT4 + fp16 group scales + power-of-two c_n."""
    q, s = quantize_weight(r.float(), 4, group_size)
    return Fp8Weight(pack_int4(q), s, _pow2_channel_scale(s).contiguous())


def expand_fp8(qweight: torch.Tensor, wscales: torch.Tensor, wchannel: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K/2] packed INT4 + fp16 group scales + [N] c -> [N, K] e4m3 ``fp8(q * s_g / c_n)``."""
    q = unpack_int4(qweight, signed=True).float()
    v = dequantize_groups(q, wscales, group_size)  # q * s_g: exact in fp32
    return (v / wchannel.float()[:, None]).to(FP8_DTYPE)  # exact division (power of two), one RNE


def quantize_tokens(xs: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """xs: [M, K] fp32 smoothed input -> (qa [M, K] int8 or e4m3, sa [M] fp32)."""
    if scheme == "int8":
        qa, sa = quantize_groups(xs, 8, xs.shape[-1])  # one group spanning K
        return qa, sa[:, 0].contiguous()
    if scheme != "fp8":
        raise ValueError(f"unknown per-token scheme {scheme!r}; expected one of {PER_TOKEN_SCHEMES}")
    x32 = xs.float()
    amax = x32.abs().amax(dim=-1)  # [M]
    sa = amax / torch.full_like(amax, FP8_MAX)  # tensor / tensor: IEEE division (see quantize.py)
    sa = torch.where(sa > 0, sa, torch.ones_like(sa))
    return (x32 / sa[:, None]).to(FP8_DTYPE), sa


def dequantize_tokens(qa: torch.Tensor, sa: torch.Tensor) -> torch.Tensor:
    """(qa [M, K], sa [M]) -> [M, K] fp32."""
    return qa.float() * sa.float()[:, None]


def expanded_weight(
    scheme: str, qweight: torch.Tensor, wscales: torch.Tensor, wzeros: Optional[torch.Tensor],
    wchannel: torch.Tensor, group_size: int,
) -> torch.Tensor:
    """The 8-bit GEMM operand: [N, K] int8 (``int8``) or e4m3 (``fp8``)."""
    if scheme == "int8":
        if wzeros is None:
            raise ValueError("w4a8-int8 weights need their zero points (wzeros)")
        return expand_progressive(qweight, wscales, wzeros, group_size)
    if scheme == "fp8":
        return expand_fp8(qweight, wscales, wchannel, group_size)
    raise ValueError(f"unknown per-token scheme {scheme!r}; expected one of {PER_TOKEN_SCHEMES}")


def dequantized_weight(
    scheme: str, qweight: torch.Tensor, wscales: torch.Tensor, wzeros: Optional[torch.Tensor],
    wchannel: torch.Tensor, group_size: int,
) -> torch.Tensor:
    """[N, K] fp32 weight the scheme applies: the expanded operand times c_n."""
    e = expanded_weight(scheme, qweight, wscales, wzeros, wchannel, group_size)
    return e.float() * wchannel.float()[:, None]


# ------------------------------------------------------------------ registry (runtime/modes.py)
def _quantize(res: torch.Tensor, mode: QuantMode, group: int) -> dict[str, torch.Tensor]:
    if mode.scheme == "int8":
        return quantize_weight_progressive(res, group)._asdict()
    return quantize_weight_fp8(res, group)._asdict()


def _dequantize(t, mode: QuantMode, group: int) -> torch.Tensor:
    return dequantized_weight(mode.scheme, t["qweight"], t["wscales"], t.get("wzeros"), t.get("wchannel"), group)


def _check(t, mode: QuantMode, n: int, k: int, group: int, where: str = "") -> None:
    """The group checks, plus ``wchannel`` [N] (both) and int8 ``wscales``/``wzeros`` (``int8``)."""
    check_group_weights(t, mode, n, k, group, where)
    ws, wz, wc = t["wscales"], t.get("wzeros"), t.get("wchannel")
    if wc is None or tuple(wc.shape) != (n,):
        raise ValueError(f"{where}scheme {mode.scheme!r} needs wchannel [{n}], got "
                         f"{None if wc is None else list(wc.shape)}")
    if mode.scheme == "int8" and (wz is None or wz.shape != ws.shape or ws.dtype != torch.int8
                                  or wz.dtype != torch.int8):
        raise ValueError(f"{where}scheme 'int8' needs int8 wscales and wzeros [{n}, {k // group}]")


for _scheme, _mode in (
    ("int8", QuantMode("w4a8-int8", 4, 8, "int8", "int4",
                       "INT4 progressive weights, INT8 per-token activations, one int32 accumulator over K")),
    ("fp8", QuantMode("w4a8-fp8", 4, 8, "fp8", "int4",
                      "INT4 weights expanded to FP8 e4m3, FP8 per-token activations")),
):
    register_scheme(Scheme(_scheme, per_token=True, weight_tensors=("qweight", "wscales", "wzeros", "wchannel")
                           if _scheme == "int8" else ("qweight", "wscales", "wchannel")))
    register_mode(_mode)
    register_handler(_scheme, "quantize_weight", _quantize)
    register_handler(_scheme, "dequantize_weight", _dequantize)
    register_handler(_scheme, "check_weights", _check)

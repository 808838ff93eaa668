"""Nunchaku's W4A4 numerics as schemes of the mode registry (``runtime/modes.py``).

Two schemes, one mode each, for layers loaded from Nunchaku checkpoints
(``svdq_compile.integrations.nunchaku``); read from Nunchaku's CUDA kernels
(``src/kernels/zgemm/gemm_w4a4.cuh``: ``quantize_w4a4_from_fpsum_warp``,
``quantize_w4a4_fp4_from_fpsum_warp``, ``EpilogueQuantize``; ``gemm_base.cuh``:
``apply_scales``; ``gemm_w4a4_launch_impl.cuh``: ``SHIFT_GELU``):

``nunchaku`` (mode ``w4a4-nunchaku``, the svdq-int4 files):

- weights: signed INT4 codes (our packing: two nibbles per byte, low = even index) and
  16-bit group scales ``wscales`` [N, K/64] in the checkpoint's dtype (fp16 or bf16:
  Nunchaku's ``half_t``, which the activation quantizer below also computes in);
- activations, per token and group of 64, in ``half_t``: ``v = half((half(x) + shift) /
  smooth)`` (the shift only on unsigned groups, see below; the division in 16 bits, as
  Nunchaku's ``h2div``); ``scale = fp32(max|v|) * fp32(1/qmax)`` (qmax 7, or 15 for
  unsigned groups), stored as ``half(scale)``; codes ``rint(fp32(v) * (1/scale))``
  (round half to even, ``cvt.rni``), saturated to [-8, 7] / [0, 15]. Nunchaku takes
  ``1/scale`` with ``rcp.approx.ftz`` (within 1 ulp of the IEEE reciprocal used here);
- unsigned groups: FLUX's MLP ``fc2`` input is ``GELU + 0.171875`` (``act_shift``),
  quantized on [0, 15]; the shift is added **before** the smoothing division (unlike our
  ``group`` scheme, which shifts the smoothed input). ``act_unsigned`` marks the layer;
  a layer mixing signed and unsigned input groups (FLUX single blocks' ``proj_out`` =
  Nunchaku's ``out_proj`` + ``mlp_fc2`` concatenated along K) carries the per-group grid
  in ``wzeros`` [N, K/G] int8 (0 signed, 1 unsigned and shifted; every row the same);
- product: the exact int32 partial of each group, rescaled by ``fp32(ascale) *
  fp32(wscale)`` (exact in fp32) into an fp32 accumulator in ascending group order (our
  C++ grouped GEMM on CPU). Nunchaku instead converts each partial to ``half_t``, rounds
  ``ascale * wscale`` to ``half_t`` and accumulates in ``half_t`` (``__hfma2``);
  :func:`half_group_sums` emulates that, and ``docs/nunchaku.md`` gives the distance;
- low-rank branch and bias as in every scheme: ``(X/smooth) L2^T L1^T + b`` in fp32 (the
  loader converts Nunchaku's ``lora_down``, which reads the unsmoothed input, to act on
  the smoothed one).

``nvfp4`` (mode ``w4a4-nvfp4``, the svdq-fp4 files):

- weights: e2m1 codes (sign bit 3; two per byte as above), fp8 e4m3 scales ``wscales``
  [N, K/16], and ``wchannel`` [N] fp32 = per-tensor ``wtscale`` x per-channel
  ``wcscales`` (exact products of 16-bit values). A layer concatenating two Nunchaku
  layers with different channel scales (FLUX single blocks' ``proj_out``) holds
  ``e4m3 x channel scale`` in fp32 ``wscales`` instead, ``wchannel`` = 1;
- activations, per token and group of 16: ``v`` as above (no shift, signed);
  ``scale = min(fp32(max|v|) * fp32(1/6), 448)``, stored as e4m3 (RNE, saturating);
  codes ``e2m1_rne(fp32(v) * (1/scale))`` (satfinite);
- product: exact (``2 * e2m1`` values are integers in [-12, 12]: the integer grouped GEMM
  computes the exact group sums), ``* ascale * wscale`` per group in fp32, then
  ``* wchannel + bias``. No fast kernel: the torch path (with the C++ integer GEMM on
  CPU) on every device.

Neither scheme has a weight quantizer: they are formats to load, not to calibrate into.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch

from svdq_compile.runtime import cpu_gemm
from svdq_compile.runtime.modes import QuantMode, Scheme, register_handler, register_mode, register_scheme
from svdq_compile.runtime.packing import unpack_int4
from svdq_compile.runtime.reference import smooth_input

__all__ = [
    "NUNCHAKU", "NVFP4", "SHIFT_GELU", "E2M1_VALUES", "half_dtype_of", "quantize_act_nunchaku",
    "quantize_act_nvfp4", "e2m1_round", "dequantize_nvfp4", "unsigned_group_mask", "half_group_sums",
]

log = logging.getLogger(__name__)

SHIFT_GELU = 0.171875  # Nunchaku's GELU shift (gemm_w4a4_launch_impl.cuh)
# e2m1 code -> value (bit 3 = sign), the table of deepcompressor's fp_quantize.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP8_DTYPE = torch.float8_e4m3fn
_HALF = (torch.float16, torch.bfloat16)
_PREP_ATTR = "_svdq_nvfp4_prep"

NUNCHAKU = register_scheme(Scheme("nunchaku"))
NVFP4 = register_scheme(Scheme("nvfp4", weight_tensors=("qweight", "wscales", "wchannel")))
register_mode(QuantMode("w4a4-nunchaku", 4, 4, "nunchaku", "int4",
                        "Nunchaku's INT4 W4A4 numerics (loaded svdq-int4 checkpoints; torch path)"))
register_mode(QuantMode("w4a4-nvfp4", 4, 4, "nvfp4", "e2m1",
                        "NVFP4 W4A4 (loaded svdq-fp4 checkpoints; torch path only)"))


# ------------------------------------------------------------------------------- helpers
def half_dtype_of(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """Nunchaku's ``half_t`` of a layer: the first 16-bit float dtype among ``tensors``."""
    for t in tensors:
        if t is not None and t.dtype in _HALF:
            return t.dtype
    return torch.bfloat16


def unsigned_group_mask(wzeros: Optional[torch.Tensor], act_unsigned: bool, groups: int,
                        device: torch.device) -> torch.Tensor:
    """[K/G] bool: which input groups use the unsigned shifted grid."""
    if wzeros is not None:
        return wzeros[0].to(device=device, dtype=torch.bool)
    return torch.full((groups,), bool(act_unsigned), dtype=torch.bool, device=device)


def _smoothed_half(x2: torch.Tensor, smooth: Optional[torch.Tensor], half: torch.dtype, shift: float,
                   shifted: Optional[torch.Tensor]) -> torch.Tensor:
    """``half((half(x) + shift) / smooth)`` per element, shift on the ``shifted`` [K] channels."""
    v = x2.to(half)
    if shift and shifted is not None and bool(shifted.any()):
        v = torch.where(shifted, (v.float() + shift).to(half), v)
    if smooth is not None:
        v = (v.float() / smooth.float()).to(half)
    return v


def quantize_act_nunchaku(x2: torch.Tensor, smooth: Optional[torch.Tensor], half: torch.dtype, group_size: int,
                          unsigned: torch.Tensor, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x2: [M, K] -> (codes [M, K] int8, ascales [M, K/G] in ``half``): Nunchaku's INT4 rule.

    ``unsigned``: [K/G] bool, the groups quantized on [0, 15] after adding ``shift``.
    """
    m, k = x2.shape
    g = k // group_size
    shifted = unsigned.repeat_interleave(group_size)
    v = _smoothed_half(x2, smooth, half, shift, shifted).float().view(m, g, group_size)
    amax = v.abs().amax(dim=-1)  # [M, G], exact (max of 16-bit values)
    qmax = torch.where(unsigned, 15.0, 7.0).to(torch.float32)  # [G]
    recip = torch.ones((), dtype=torch.float32) / qmax  # fp32(1/qmax), as the C++ constant
    scale = amax * recip  # fp32 product
    rscale = torch.where(scale > 0, torch.ones_like(scale) / scale, torch.zeros_like(scale))
    q = torch.round(v * rscale[..., None])  # round half to even (cvt.rni)
    if bool(unsigned.all()) or not bool(unsigned.any()):
        q = q.clamp_(0.0, 15.0) if bool(unsigned[0]) else q.clamp_(-8.0, 7.0)
    else:
        lo = torch.where(unsigned, 0.0, -8.0)[None, :, None]
        hi = torch.where(unsigned, 15.0, 7.0)[None, :, None]
        q = torch.minimum(torch.maximum(q, lo), hi)
    return q.view(m, k).to(torch.int8), scale.to(half)


_E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to e2m1 (RNE, saturating at 6): returns the rounded *values* (fp32)."""
    a = v.abs()
    grid = _E2M1_GRID.to(v.device)
    # Nearest grid point; on a tie the one with an even mantissa bit (0, 1, 2, 4, 6 and, between
    # 0.5 and 1 / 1.5 and 2 / 3 and 4, the power of two).
    idx = torch.bucketize(a, grid).clamp(1, len(grid) - 1)  # grid[idx-1] <= a < grid[idx] (clamped)
    lo, hi = grid[idx - 1], grid[idx]
    dlo, dhi = a - lo, hi - a
    even_hi = (idx % 2 == 0)  # grid indices 0,2,4,6 have mantissa 0
    pick_hi = (dhi < dlo) | ((dhi == dlo) & even_hi)
    r = torch.where(pick_hi, hi, lo)
    r = torch.where(a >= 6.0, torch.full_like(r, 6.0), r)
    return torch.copysign(r, v)


def quantize_act_nvfp4(x2: torch.Tensor, smooth: Optional[torch.Tensor], half: torch.dtype,
                       group_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """x2: [M, K] -> (e2m1 values [M, K] fp32, ascales [M, K/16] e4m3): Nunchaku's NVFP4 rule."""
    m, k = x2.shape
    g = k // group_size
    v = _smoothed_half(x2, smooth, half, 0.0, None).float().view(m, g, group_size)
    amax = v.abs().amax(dim=-1)
    recip = torch.ones((), dtype=torch.float32) / torch.full((), 6.0)
    scale = torch.clamp(amax * recip, max=448.0)
    rscale = torch.where(scale > 0, torch.ones_like(scale) / scale, torch.zeros_like(scale))
    q = e2m1_round(v * rscale[..., None])
    return q.view(m, k), scale.to(FP8_DTYPE)


def _e2m1_codes_to_values(qweight: torch.Tensor) -> torch.Tensor:
    codes = unpack_int4(qweight, signed=False).long()  # [N, K] in 0..15
    return E2M1_VALUES.to(qweight.device)[codes]


def dequantize_nvfp4(qweight: torch.Tensor, wscales: torch.Tensor, wchannel: Optional[torch.Tensor],
                     group_size: int = 16) -> torch.Tensor:
    """[N, K] fp32 weight of an NVFP4 layer: e2m1 value x e4m3 group scale x channel scale."""
    w = _e2m1_codes_to_values(qweight)
    n, k = w.shape
    w = (w.view(n, k // group_size, group_size) * wscales.float()[..., None]).view(n, k)
    if wchannel is not None:
        w = w * wchannel.float()[:, None]
    return w


def half_group_sums(q: torch.Tensor, ascale: torch.Tensor, qw: torch.Tensor, wscales: torch.Tensor,
                    group_size: int, half: torch.dtype) -> torch.Tensor:
    """Nunchaku's group accumulation, emulated: ``acc = fma_half(half(I_g), half(as * ws), acc)``.

    q: [M, K] activation codes, ascale: [M, K/G] (``half``), qw: [N, K] weight codes,
    wscales: [N, K/G] -> [M, N] fp32 (holding ``half`` values). For measurements only
    (how far our exact fp32 accumulation is from Nunchaku's), not a run-time path.
    """
    m, k = q.shape
    n = qw.shape[0]
    g = k // group_size
    qa = q.double().view(m, g, group_size)
    qb = qw.double().view(n, g, group_size)
    acc = torch.zeros(m, n, dtype=torch.float64)
    for j in range(g):
        part = (qa[:, j] @ qb[:, j].t()).to(half).double()  # int2half (RN)
        prod = (ascale[:, j].double()[:, None] * wscales[:, j].double()[None, :]).to(half).double()
        acc = (part * prod + acc).to(half).double()  # one rounding: hfma
    return acc.float()


# ------------------------------------------------------------------------------ handlers
def _check_nunchaku(t: Mapping[str, Any], mode: QuantMode, n: int, k: int, group: int, where: str = "") -> None:
    qw, ws, wz = t["qweight"], t["wscales"], t.get("wzeros")
    if qw.dtype != torch.int8 or tuple(qw.shape) != (n, k // 2):
        raise ValueError(f"{where}qweight must be int8 [{n}, {k // 2}], got {qw.dtype} {list(qw.shape)}")
    if tuple(ws.shape) != (n, k // group) or ws.dtype not in _HALF + (torch.float32,):
        raise ValueError(f"{where}wscales must be 16-bit float [{n}, {k // group}], got {ws.dtype} {list(ws.shape)}")
    if wz is not None and (wz.dtype != torch.int8 or tuple(wz.shape) != (n, k // group)):
        raise ValueError(f"{where}wzeros (the per-group activation grid of scheme 'nunchaku') must be int8 "
                         f"[{n}, {k // group}], got {wz.dtype} {list(wz.shape)}")
    if t.get("wchannel") is not None:
        raise ValueError(f"{where}scheme 'nunchaku' has no wchannel")


def _check_nvfp4(t: Mapping[str, Any], mode: QuantMode, n: int, k: int, group: int, where: str = "") -> None:
    qw, ws, wc = t["qweight"], t["wscales"], t.get("wchannel")
    if group != 16:
        raise ValueError(f"{where}NVFP4 layers have group size 16, got {group}")
    if qw.dtype != torch.int8 or tuple(qw.shape) != (n, k // 2):
        raise ValueError(f"{where}qweight must be int8 [{n}, {k // 2}] (e2m1 codes), got {qw.dtype} {list(qw.shape)}")
    if ws.dtype not in (FP8_DTYPE, torch.float32) or tuple(ws.shape) != (n, k // 16):
        raise ValueError(f"{where}wscales must be float8_e4m3fn (or fp32: e4m3 x a channel scale) [{n}, {k // 16}], "
                         f"got {ws.dtype} {list(ws.shape)}")
    if wc is None or tuple(wc.shape) != (n,):
        raise ValueError(f"{where}scheme 'nvfp4' needs wchannel [{n}], got {None if wc is None else list(wc.shape)}")
    if t.get("wzeros") is not None:
        raise ValueError(f"{where}scheme 'nvfp4' has no wzeros")


def _dequantize_nunchaku(t: Mapping[str, Any], mode: QuantMode, group: int) -> torch.Tensor:
    q = unpack_int4(t["qweight"], signed=True).float()
    n, k = q.shape
    return (q.view(n, k // group, group) * t["wscales"].float()[..., None]).view(n, k)


def _dequantize_nvfp4(t: Mapping[str, Any], mode: QuantMode, group: int) -> torch.Tensor:
    return dequantize_nvfp4(t["qweight"], t["wscales"], t.get("wchannel"), group)


def _finish(a, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if a.lora_down is not None:
        xs = smooth_input(x2, a.smooth)
        y = y + (xs @ a.lora_down.float().t()) @ a.lora_up.float().t()
    if a.bias is not None:
        y = y + a.bias.float()
    return y


def _nunchaku_linear(a, x2: torch.Tensor, w4a16_product=None) -> torch.Tensor:
    """[M, N] fp32 accumulator with low-rank branch and bias (scheme ``nunchaku``)."""
    from svdq_compile.runtime.torch_path import cached_prepared_weight

    g = a.group_size
    half = half_dtype_of(a.wscales, a.smooth, a.lora_up, a.bias)
    unsigned = unsigned_group_mask(a.wzeros, a.act_unsigned, x2.shape[1] // g, x2.device)
    q, ascale = quantize_act_nunchaku(x2, a.smooth, half, g, unsigned, a.act_shift)
    prep = cached_prepared_weight(a.qweight, a.wscales, g, 4)
    y = cpu_gemm.grouped_int_gemm(q, ascale.float(), prep, None, g)
    return _finish(a, x2, y)


def _nvfp4_prepared(qweight: torch.Tensor, wscales: torch.Tensor, group: int) -> cpu_gemm.PreparedWeight:
    """The weight as exact integers ``2 * e2m1`` (int8) with scales ``wscale / 2``, cached on qweight."""
    key = (qweight.data_ptr(), qweight._version if not qweight.is_inference() else None,
           wscales.data_ptr(), None if wscales.is_inference() else wscales._version)
    hit = getattr(qweight, _PREP_ATTR, None)
    if hit is not None and hit[0] == key and not qweight.is_inference():
        return hit[1]
    qw8 = (_e2m1_codes_to_values(qweight) * 2).to(torch.int8)
    prep = cpu_gemm.prepare_weight(qw8, wscales.float() * 0.5, group, weight_bits=8)
    try:
        setattr(qweight, _PREP_ATTR, (key, prep))
    except (AttributeError, RuntimeError):
        pass
    return prep


def _nvfp4_linear(a, x2: torch.Tensor, w4a16_product=None) -> torch.Tensor:
    """[M, N] fp32 accumulator of an NVFP4 layer (exact group sums, fp32 rescale)."""
    g = a.group_size
    half = half_dtype_of(a.smooth, a.lora_up, a.bias)
    qv, ascale = quantize_act_nvfp4(x2, a.smooth, half, g)
    qa = (qv * 2).to(torch.int8)  # exact integers in [-12, 12]
    prep = _nvfp4_prepared(a.qweight, a.wscales, g)
    y = cpu_gemm.grouped_int_gemm(qa, ascale.float() * 0.5, prep, None, g)
    y = y * a.wchannel.float()[None, :]
    return _finish(a, x2, y)


register_handler("nunchaku", "check_weights", _check_nunchaku)
register_handler("nunchaku", "dequantize_weight", _dequantize_nunchaku)
register_handler("nunchaku", "torch_linear", _nunchaku_linear)
register_handler("nvfp4", "check_weights", _check_nvfp4)
register_handler("nvfp4", "dequantize_weight", _dequantize_nvfp4)
register_handler("nvfp4", "torch_linear", _nvfp4_linear)

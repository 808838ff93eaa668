"""``load_nunchaku``: install a Nunchaku checkpoint's layers into a diffusers model.

Every tensor is un-tiled into our layout (:mod:`.layout`), the fused Nunchaku layers are
mapped onto the diffusers modules (:mod:`.names`), and ``SVDQLinear`` modules are built
with the checkpoint's exact values:

- W4A4 layers (scheme ``nunchaku``, mode ``w4a4-nunchaku``; ``w4a4-nvfp4`` for svdq-fp4
  files): INT4 codes, 16-bit group scales, smoothing factors and bias as stored;
  ``lora_down`` (Nunchaku's reads the unsmoothed input) multiplied by the smoothing
  factors so it acts on the smoothed input like ours (kept in fp32: the product of two
  16-bit values is exact there); ``lora_up`` as stored;
- AWQ W4A16 AdaLN layers (our ``w4a16``): codes ``u - 7``, scales as stored, the output
  channels de-interleaved and the +1 of the scale chunks' bias taken out again;
- the unquantized tensors into the model's parameters.

Nothing is written into the model until every layer and tensor has been built and
checked: a failed load leaves the model as it was.

``mode=`` re-targets the W4A4 layers without calibration: ``w4a8-fp8`` takes the INT4
codes and group scales as they are (plus a power-of-two channel scale), ``w4a8-int8``
re-quantizes the dequantized INT4 weight into QServe's progressive form (a second
rounding: not exact), ``w4a4`` uses our own W4A4 numerics on the same codes and scales.
The fc2 inputs of these modes are signed and unshifted: Nunchaku's shift correction
``W (0.171875 / smooth)`` is moved into the bias.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from svdq_compile.integrations.nunchaku import layout as L
from svdq_compile.integrations.nunchaku.checkpoint import Checkpoint, NunchakuFormatError, read_checkpoint
from svdq_compile.integrations.nunchaku.names import ARCHS, Arch, Layer, arch_for_class_name, arch_for_model, supported
from svdq_compile.quant.modules import SVDQLinear
from svdq_compile.runtime.nunchaku_scheme import SHIFT_GELU
from svdq_compile.runtime.packed import LinearSpec, PackedLinear
from svdq_compile.runtime.packing import pack_int4

__all__ = ["load_nunchaku", "build_model", "plan_nunchaku", "RETARGET_MODES"]

log = logging.getLogger(__name__)

RETARGET_MODES = ("w4a8-fp8", "w4a8-int8", "w4a4")
_NATIVE = {"int4": "w4a4-nunchaku", "nvfp4": "w4a4-nvfp4"}
_W4A4_KEYS = {"qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up", "wcscales", "wtscale"}
_AWQ_KEYS = {"qweight", "wscales", "wzeros", "bias"}


@dataclass
class Plan:
    """What a load would write into the model (built and checked before anything is written)."""

    modules: dict[str, SVDQLinear] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter / buffer name -> value
    precision: str = "int4"
    mode: str = "w4a4-nunchaku"


# ----------------------------------------------------------------------------- helpers
def _unwrap(m: Any) -> Any:
    return getattr(m, "_orig_mod", m)


def _get(ck: Checkpoint, key: str, used: set) -> torch.Tensor:
    t = ck.tensors.get(key)
    if t is None:
        raise NunchakuFormatError(f"{ck.path}: missing tensor {key!r}")
    used.add(key)
    return t


def _opt(ck: Checkpoint, key: str, used: set) -> Optional[torch.Tensor]:
    t = ck.tensors.get(key)
    if t is not None:
        used.add(key)
    return t


def _layout(fn, key: str, ck: Checkpoint, *args):
    try:
        return fn(*args)
    except L.LayoutError as e:
        raise NunchakuFormatError(f"{ck.path}: {key}: {e}") from None


def _exact_half(t: torch.Tensor) -> torch.Tensor:
    """fp16 when ``t`` converts exactly (our kernels' usual scale dtype), else fp32."""
    h = t.to(torch.float16)
    return h if torch.equal(h.float(), t.float()) else t.float()


def _pow2_channel(ws: torch.Tensor) -> torch.Tensor:
    """Power-of-two channel scale of ``w4a8-fp8`` (runtime/per_token.py's rule): 8 max_g s / c <= 448."""
    top = ws.float().amax(dim=1) * 8.0 / 448.0
    c = torch.exp2(torch.ceil(torch.log2(top.clamp_min(torch.finfo(torch.float32).tiny))))
    return torch.where(top > 0, c, torch.ones_like(c)).contiguous()


@dataclass
class _Part:
    """One Nunchaku W4A4 layer in our layout (natural row-major order)."""

    codes: torch.Tensor  # [N, K] uint8 raw nibbles
    wscales: torch.Tensor  # [N, K/G]
    bias: Optional[torch.Tensor]  # [N]
    smooth: Optional[torch.Tensor]  # [K]
    down: Optional[torch.Tensor]  # [r, K], reads the unsmoothed input
    up: Optional[torch.Tensor]  # [N, r]
    unsigned: bool
    wchannel: Optional[torch.Tensor] = None  # NVFP4: wtscale * wcscales, fp32


def _read_w4a4(ck: Checkpoint, pre: str, n: int, k: int, unsigned: bool, used: set) -> _Part:
    g = ck.group_size
    if k % g or k % 2:
        raise NunchakuFormatError(f"{ck.path}: {pre}: in_features {k} is not a multiple of the group size {g}")
    qkey = f"{pre}.qweight"
    qw = _get(ck, qkey, used)
    if qw.dtype != torch.int8:
        raise NunchakuFormatError(f"{ck.path}: {qkey} must be int8 (packed 4-bit codes), got {qw.dtype}")
    codes = _layout(L.unpack_w4a4_weight, qkey, ck, qw, n, k)
    skey = f"{pre}.wscales"
    ws = _get(ck, skey, used)
    if ck.precision == "nvfp4":
        if ws.dtype != torch.float8_e4m3fn:
            raise NunchakuFormatError(f"{ck.path}: {skey} must be float8_e4m3fn for NVFP4, got {ws.dtype}")
        wscales = _layout(L.unpack_micro_scales, skey, ck, ws, n, k // g)
    else:
        if ws.dtype not in (torch.float16, torch.bfloat16):
            raise NunchakuFormatError(f"{ck.path}: {skey} must be fp16 / bf16, got {ws.dtype}")
        wscales = _layout(L.unpack_scales, skey, ck, ws, n, k // g)
    b = _opt(ck, f"{pre}.bias", used)
    bias = None if b is None else _layout(L.unpack_channel_vector, f"{pre}.bias", ck, b, n)
    s = _opt(ck, f"{pre}.smooth", used)
    smooth = None if s is None else _layout(L.unpack_channel_vector, f"{pre}.smooth", ck, s, k)
    _opt(ck, f"{pre}.smooth_orig", used)  # informational (the smoothing before fusion)
    d, u = _opt(ck, f"{pre}.lora_down", used), _opt(ck, f"{pre}.lora_up", used)
    down = up = None
    if (d is None) != (u is None):
        raise NunchakuFormatError(f"{ck.path}: {pre} has only one of lora_down / lora_up")
    if d is not None:
        down = _layout(L.unpack_lowrank, f"{pre}.lora_down", ck, d, k, True).t()  # [r_pad, K]
        up = _layout(L.unpack_lowrank, f"{pre}.lora_up", ck, u, n, False)  # [N, r_pad]
        if down.shape[0] != up.shape[1]:
            raise NunchakuFormatError(f"{ck.path}: {pre}: rank mismatch: lora_down has rank {d.shape[1]}, "
                                      f"lora_up {u.shape[1]}")
        r = ck.declared_rank
        if r is not None and d.shape[1] != L.padded(r, L.LOWRANK_PACK):
            raise NunchakuFormatError(f"{ck.path}: {pre}.lora_down has rank {d.shape[1]} but "
                                      f"quantization_config.rank is {r}")
    wchannel = None
    if ck.precision == "nvfp4":
        wc = _opt(ck, f"{pre}.wcscales", used)
        chan = torch.ones(n, dtype=torch.float64) if wc is None else \
            _layout(L.unpack_channel_vector, f"{pre}.wcscales", ck, wc, n).double()
        wt = _opt(ck, f"{pre}.wtscale", used)
        alpha = 1.0 if wt is None else float(wt.reshape(-1)[0])
        wchannel = (chan * alpha).float()
        unsigned = False  # Nunchaku quantizes fc2 inputs signed in NVFP4
    return _Part(codes, wscales, bias, smooth, down, up, unsigned, wchannel)


def _trim_rank(down: Optional[torch.Tensor], up: Optional[torch.Tensor]):
    """Drop rank components that contribute exactly zero (padding, other targets' blocks)."""
    if down is None:
        return None, None
    keep = (down != 0).any(dim=1) & (up != 0).any(dim=0)
    if not bool(keep.any()):
        return None, None
    if bool(keep.all()):
        return down.contiguous(), up.contiguous()
    return down[keep].contiguous(), up[:, keep].contiguous()


def _combine(parts: list[_Part], ck: Checkpoint, pre: str):
    """Sources concatenated along K -> one layer (codes, scales, smooth, block-diagonal low rank, bias sum)."""
    if len(parts) == 1:
        p = parts[0]
        groups = None
        return p.codes, p.wscales, p.bias, p.smooth, p.down, p.up, p.wchannel, groups
    codes = torch.cat([p.codes for p in parts], dim=1)
    wscales = torch.cat([p.wscales for p in parts], dim=1)
    sdtype = next((p.smooth.dtype for p in parts if p.smooth is not None), None)
    smooth = None if sdtype is None else torch.cat(
        [p.smooth if p.smooth is not None else torch.ones(p.codes.shape[1], dtype=sdtype) for p in parts])
    biases = [p.bias for p in parts if p.bias is not None and bool((p.bias != 0).any())]
    if not biases:
        bias = next((p.bias for p in parts if p.bias is not None), None)
    elif len(biases) == 1:
        bias = biases[0]
    else:
        bias = sum(b.double() for b in biases).float()
    downs = [p for p in parts if p.down is not None]
    down = up = None
    if downs:
        k_tot = codes.shape[1]
        r_tot = sum(p.down.shape[0] for p in downs)
        down = torch.zeros(r_tot, k_tot, dtype=downs[0].down.dtype)
        up = torch.cat([p.up for p in downs], dim=1)
        r0 = k0 = 0
        for p in parts:
            kk = p.codes.shape[1]
            if p.down is not None:
                r = p.down.shape[0]
                down[r0:r0 + r, k0:k0 + kk] = p.down
                r0 += r
            k0 += kk
    chans = [p.wchannel for p in parts]
    wchannel = None
    if chans[0] is not None:
        wchannel = chans[0]
        if not all(torch.equal(c, chans[0]) for c in chans):
            # Different channel scales per part (FLUX single blocks' out_proj + mlp_fc2): fold each
            # into its fp8 group scales, held in fp32 (exact: e4m3 x a 16-bit product).
            wscales = torch.cat([p.wscales.float() * p.wchannel[:, None] for p in parts], dim=1)
            wchannel = torch.ones_like(chans[0])
    groups = torch.cat([torch.full((p.codes.shape[1] // ck.group_size,), int(p.unsigned), dtype=torch.int8)
                        for p in parts])
    return codes, wscales, bias, smooth, down, up, wchannel, groups


def _signed(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.int16)
    return torch.where(c > 7, c - 16, c).to(torch.int8)


def _w4a4_modules(ck: Checkpoint, block: str, layer: Layer, model: nn.Module, mode: str, used: set) -> dict:
    targets = [f"{block}.{t}" for t in layer.targets]
    mods = []
    for t in targets:
        m = _submodule(model, t)
        if not isinstance(m, nn.Linear):
            raise NunchakuFormatError(f"the model's {t} is a {type(m).__name__}, not a Linear: the checkpoint does "
                                      "not match this architecture")
        mods.append(m)
    k = mods[0].in_features
    if any(m.in_features != k for m in mods):
        raise NunchakuFormatError(f"targets {targets} differ in in_features")
    n_tot = sum(m.out_features for m in mods)
    if len(layer.sources) == 1:
        ks = [k]
    else:
        # FLUX single blocks: proj_out reads cat([attention (= the width of to_q), mlp (proj_mlp's width)])
        first = _submodule(model, f"{block}.attn.to_q").out_features
        ks = [first, k - first]
    parts = []
    for src, kj in zip(layer.sources, ks):
        parts.append(_read_w4a4(ck, f"{block}.{src.name}", n_tot, kj, src.unsigned, used))
    pre = f"{block}.{'+'.join(s.name for s in layer.sources)}"
    codes, wscales, bias, smooth, down, up, wchannel, groups = _combine(parts, ck, pre)
    g = ck.group_size
    if down is not None:
        # Nunchaku's lora_down reads X; ours reads X' = X / smooth: D' = D * smooth (exact in fp32).
        down = (down.double() * (smooth.double()[None, :] if smooth is not None else 1.0)).float()
    unsigned_any = any(p.unsigned for p in parts)
    mixed = groups is not None and bool(groups.any()) and not bool(groups.all())
    scheme_mode = _NATIVE[ck.precision]
    target_mode = scheme_mode if mode in (None, scheme_mode) else mode
    out = {}
    n0 = 0
    for name, m in zip(targets, mods):
        n = m.out_features
        sl = slice(n0, n0 + n)
        n0 += n
        c, ws = codes[sl], wscales[sl]
        b = None if bias is None else bias[sl].contiguous()
        dn, u = _trim_rank(down, None if up is None else up[sl])
        meta = {"source": "nunchaku", "nunchaku": pre, "nunchaku_precision": ck.precision,
                "mode_reason": "Nunchaku checkpoint"}
        if target_mode == scheme_mode:
            if ck.precision == "nvfp4":
                spec = LinearSpec(k, n, group_size=g, weight_bits=4, act_bits=4, rank=0 if dn is None else dn.shape[0],
                                  scheme="nvfp4")
                p = PackedLinear(spec, pack_int4(c.to(torch.int16)), ws.contiguous(), smooth, dn, u, b,
                                 wchannel=wchannel[sl].contiguous(), meta=meta)
            else:
                spec = LinearSpec(k, n, group_size=g, weight_bits=4, act_bits=4, act_unsigned=unsigned_any,
                                  act_shift=SHIFT_GELU if unsigned_any else 0.0,
                                  rank=0 if dn is None else dn.shape[0], scheme="nunchaku")
                wz = groups[None, :].expand(n, -1).contiguous() if mixed else None
                p = PackedLinear(spec, pack_int4(_signed(c)), ws.contiguous(), smooth, dn, u, b, wzeros=wz, meta=meta)
        else:
            p = _retarget(c, ws, b, smooth, dn, u, groups if groups is not None else
                          torch.full((k // g,), int(unsigned_any), dtype=torch.int8),
                          k, n, g, target_mode, ck, pre, meta)
        out[name] = p
    return out


def _retarget(codes, ws, bias, smooth, down, up, groups, k, n, g, mode, ck, pre, meta) -> PackedLinear:
    """The same INT4 codes and scales in one of our modes (no calibration)."""
    if ck.precision != "int4":
        raise NunchakuFormatError(f"mode={mode!r}: NVFP4 checkpoints run in their own numerics only "
                                  f"(w4a4-nvfp4); re-targeting needs INT4 codes")
    q = _signed(codes)
    deq = (q.double().view(n, k // g, g) * ws.double()[..., None]).view(n, k)  # Nunchaku's INT4 weight
    b = None if bias is None else bias.double()
    shifted = groups.bool().repeat_interleave(g)
    if bool(shifted.any()):
        # Nunchaku quantizes (X + 0.171875) / smooth on these inputs and its bias holds
        # -W (0.171875 / smooth): our modes read X / smooth unshifted, so add it back.
        sv = torch.zeros(k, dtype=torch.float64)
        lam = smooth.double() if smooth is not None else torch.ones(k, dtype=torch.float64)
        sv[shifted] = SHIFT_GELU / lam[shifted]
        corr = deq @ sv
        b = corr if b is None else b + corr
    b = None if b is None else b.float()
    meta = dict(meta, retargeted_from="w4a4-nunchaku",
                mode_reason=f"Nunchaku checkpoint, INT4 codes re-targeted (mode={mode!r})")
    rank = 0 if down is None else down.shape[0]
    sm = None if smooth is None else smooth.float()
    if mode == "w4a8-fp8":
        wsf = _exact_half(ws)
        spec = LinearSpec(k, n, group_size=g, weight_bits=4, act_bits=8, rank=rank, scheme="fp8")
        return PackedLinear(spec, pack_int4(q), wsf, sm, down, up, b, wchannel=_pow2_channel(wsf), meta=meta)
    if mode == "w4a8-int8":
        from svdq_compile.runtime.per_token import quantize_weight_progressive

        pw = quantize_weight_progressive(deq.float(), g)
        spec = LinearSpec(k, n, group_size=g, weight_bits=4, act_bits=8, rank=rank, scheme="int8")
        return PackedLinear(spec, pw.qweight, pw.wscales, sm, down, up, b, wzeros=pw.wzeros, wchannel=pw.wchannel,
                            meta=meta)
    if mode == "w4a4":
        spec = LinearSpec(k, n, group_size=g, weight_bits=4, act_bits=4, rank=rank, scheme="group")
        return PackedLinear(spec, pack_int4(q), _exact_half(ws), sm, down, up, b, meta=meta)
    raise ValueError(f"load_nunchaku: mode {mode!r} is not supported; expected None, "
                     f"{_NATIVE[ck.precision]!r} or one of {RETARGET_MODES}")


def _awq_module(ck: Checkpoint, block: str, layer: Layer, model: nn.Module, used: set) -> dict:
    name = f"{block}.{layer.targets[0]}"
    m = _submodule(model, name)
    if not isinstance(m, nn.Linear):
        raise NunchakuFormatError(f"the model's {name} is a {type(m).__name__}, not a Linear")
    n, k = m.out_features, m.in_features
    pre = f"{block}.{layer.sources[0].name}"
    g, splits = 64, layer.adanorm_splits
    if n % splits:
        raise NunchakuFormatError(f"{pre}: out_features {n} is not a multiple of the {splits} modulation chunks")
    qw = _get(ck, f"{pre}.qweight", used)
    if qw.dtype != torch.int32:
        raise NunchakuFormatError(f"{ck.path}: {pre}.qweight must be int32 (AWQ W4A16), got {qw.dtype}")
    u = _layout(L.unpack_awq_weight, f"{pre}.qweight", ck, qw, n, k)
    ws = _layout(L.unpack_awq_scales, f"{pre}.wscales", ck, _get(ck, f"{pre}.wscales", used), n, k // g)
    wz = _layout(L.unpack_awq_scales, f"{pre}.wzeros", ck, _get(ck, f"{pre}.wzeros", used), n, k // g)
    if not torch.equal(wz, (-(7.0 * ws.float())).to(wz.dtype)):
        raise NunchakuFormatError(f"{ck.path}: {pre}.wzeros are not -7 x wscales (a general AWQ zero point); only "
                                  "deepcompressor's symmetric W4A16 layers are supported")
    if int(u.max()) > 14:
        raise NunchakuFormatError(f"{ck.path}: {pre}.qweight has code 15 (= +8 after the zero point): outside the "
                                  "signed INT4 range")
    q = (u - 7).to(torch.int8)
    q, ws = L.deinterleave_adanorm(q, splits), L.deinterleave_adanorm(ws, splits)
    b = _opt(ck, f"{pre}.bias", used)
    bias = None
    if b is not None:
        if tuple(b.shape) != (n,):
            raise NunchakuFormatError(f"{ck.path}: {pre}.bias must be [{n}], got {list(b.shape)}")
        bias = (L.deinterleave_adanorm(b, splits).double() - L.adanorm_bias_delta(n, splits)).float()
    spec = LinearSpec(k, n, group_size=g, weight_bits=4, act_bits=16, rank=0, scheme="group")
    meta = {"source": "nunchaku", "nunchaku": pre, "nunchaku_precision": "awq-w4a16",
            "mode_reason": "Nunchaku checkpoint (AWQ W4A16)"}
    return {name: PackedLinear(spec, pack_int4(q), ws.contiguous(), None, None, None, bias, meta=meta)}


def _float_layer(ck: Checkpoint, block: str, layer: Layer, model: nn.Module, plan: Plan, used: set) -> bool:
    """A layer the checkpoint keeps in 16 bits (``weight`` / ``bias`` instead of ``qweight``, as
    deepcompressor's converter copies unquantized layers): its float values go to the diffusers
    linear(s), split along N / concatenated along K as the quantized form would be."""
    pres = [f"{block}.{s.name}" for s in layer.sources]
    if any(f"{p}.qweight" in ck.tensors for p in pres) or not all(f"{p}.weight" in ck.tensors for p in pres):
        return False
    weight = torch.cat([_get(ck, f"{p}.weight", used) for p in pres], dim=1)
    biases = [_opt(ck, f"{p}.bias", used) for p in pres]
    biases = [b for b in biases if b is not None]
    bias = None if not biases else (biases[0] if len(biases) == 1 else sum(b.double() for b in biases).to(biases[0].dtype))
    n0 = 0
    for t in layer.targets:
        m = _submodule(model, f"{block}.{t}")
        if not isinstance(m, nn.Linear):
            raise NunchakuFormatError(f"the model's {block}.{t} is a {type(m).__name__}, not a Linear")
        n = m.out_features
        plan.tensors[f"{block}.{t}.weight"] = weight[n0:n0 + n]
        if bias is not None and m.bias is not None:
            plan.tensors[f"{block}.{t}.bias"] = bias[n0:n0 + n]
        n0 += n
    if n0 != weight.shape[0]:
        raise NunchakuFormatError(f"{ck.path}: {pres[0]}.weight has {weight.shape[0]} rows, the model's "
                                  f"{', '.join(layer.targets)} have {n0}")
    return True


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise NunchakuFormatError(f"the model has no module {name!r}: the checkpoint does not match its "
                                  "architecture / config") from None


def _resolve_arch(model: nn.Module, ck: Checkpoint) -> Arch:
    arch = arch_for_model(model)
    if arch is None:
        raise NunchakuFormatError(f"architecture {type(model).__name__} is not in the Nunchaku name-map table "
                                  f"(supported: {', '.join(supported())})")
    declared = ck.model_class or (ck.config or {}).get("_class_name")
    if declared:
        other = arch_for_class_name(declared)
        if other is None:
            raise NunchakuFormatError(f"{ck.path}: model_class {declared!r} is not in the Nunchaku name-map table "
                                      f"(supported: {', '.join(supported())})")
        if other is not arch:
            raise NunchakuFormatError(f"{ck.path}: checkpoint is for {declared}, the model is {type(model).__name__}")
    return arch


def plan_nunchaku(model: nn.Module, ck: Checkpoint, mode: Optional[str] = None, strict: bool = True) -> Plan:
    """Build (without installing) every module and tensor a load of ``ck`` into ``model`` writes."""
    arch = _resolve_arch(model, ck)
    native = _NATIVE[ck.precision]
    if mode is not None and mode != native and mode not in RETARGET_MODES:
        raise ValueError(f"load_nunchaku: mode {mode!r} is not supported; expected None, {native!r} or one of "
                         f"{RETARGET_MODES}")
    plan = Plan(precision=ck.precision, mode=native if mode is None else mode)
    used: set = set()
    for prefix, layers in arch.blocks.items():
        blocks = _submodule(model, prefix)
        count = len(blocks)
        present = {int(k.split(".")[1]) for k in ck.tensors if k.startswith(prefix + ".") and k.split(".")[1].isdigit()}
        extra = sorted(i for i in present if i >= count)
        if extra:
            raise NunchakuFormatError(f"{ck.path}: checkpoint has {prefix}.{extra[0]} but the model has {count} "
                                      f"{prefix} (config mismatch)")
        for i in range(count):
            block = f"{prefix}.{i}"
            for layer in layers:
                if _float_layer(ck, block, layer, model, plan, used):
                    continue
                if layer.kind == "awq":
                    plan.modules.update(_awq_module(ck, block, layer, model, used))
                else:
                    plan.modules.update(_w4a4_modules(ck, block, layer, model, plan.mode, used))
            for src, dst in arch.copies.get(prefix, {}).items():
                for key in [k for k in ck.tensors if k.startswith(f"{block}.{src}.")]:
                    plan.tensors[f"{block}.{dst}.{key[len(block) + len(src) + 2:]}"] = ck.tensors[key]
                    used.add(key)
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    block_prefixes = tuple(p + "." for p in arch.blocks)
    for key, t in ck.tensors.items():
        if key in used:
            continue
        if key.startswith(block_prefixes):
            if strict:
                raise NunchakuFormatError(f"{ck.path}: unexpected tensor {key!r} (not in the {arch.name} name map)")
            continue
        plan.tensors[key] = t
    replaced = tuple(n + "." for n in plan.modules)
    for key, t in plan.tensors.items():
        ref = state.get(key)
        if ref is None:
            raise NunchakuFormatError(f"{ck.path}: tensor {key!r} matches no parameter of {type(model).__name__}")
        if tuple(ref.shape) != tuple(t.shape):
            raise NunchakuFormatError(f"{ck.path}: {key!r} is {list(t.shape)}, the model's is {list(ref.shape)}")
    missing = [n for n, t in state.items() if n not in plan.tensors and not n.startswith(replaced) and t.is_meta]
    if missing:
        raise NunchakuFormatError(f"{ck.path}: no value for {len(missing)} tensors of the model (e.g. {missing[0]!r})")
    for name, p in list(plan.modules.items()):
        plan.modules[name] = SVDQLinear(p, name)
    return plan


def _install(model: nn.Module, plan: Plan) -> None:
    for name, mod in plan.modules.items():
        model.set_submodule(name, mod)
    for key, t in plan.tensors.items():
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        is_param = attr in mod._parameters
        old = mod._parameters[attr] if is_param else mod._buffers[attr]
        value = t.to(device=torch.device("cpu") if old.is_meta else old.device,
                     dtype=old.dtype if t.dtype.is_floating_point and old.dtype.is_floating_point else t.dtype)
        if is_param:
            mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            mod._buffers[attr] = value


def build_model(path: Union[str, "os.PathLike"], dtype: Optional[torch.dtype] = None):
    """A diffusers model built from a checkpoint's ``config`` on the meta device (no weights)."""
    ck = read_checkpoint(path)
    return _build_from(ck, dtype)


def _build_from(ck: Checkpoint, dtype: Optional[torch.dtype]):
    if ck.config is None:
        raise NunchakuFormatError(f"{ck.path}: the checkpoint carries no diffusers config (merged-file metadata "
                                  "'config' or config.json): pass the model (or pipeline) to load into")
    cls_name = ck.config.get("_class_name") or ""
    arch = arch_for_class_name(cls_name) or arch_for_class_name(ck.model_class or "")
    if arch is None:
        raise NunchakuFormatError(f"{ck.path}: architecture {cls_name or ck.model_class!r} is not in the Nunchaku "
                                  f"name-map table (supported: {', '.join(supported())})")
    import diffusers

    cls = getattr(diffusers, arch.model_classes[0])
    config = {k: v for k, v in ck.config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(config)
    if dtype is None:
        dtype = next((t.dtype for k, t in ck.tensors.items() if not k.startswith(tuple(arch.blocks))
                      and t.dtype.is_floating_point), torch.bfloat16)
    if any(t.dtype != dtype for t in model.parameters() if t.dtype.is_floating_point):
        model = model.to(dtype)
    return model.eval()


def load_nunchaku(model_or_pipeline: Any, path: Union[str, "os.PathLike", Checkpoint], mode: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None, strict: bool = True) -> Any:
    """Load a Nunchaku svdq-int4 / svdq-fp4 checkpoint (legacy folder or merged file).

    ``model_or_pipeline``: a diffusers model of the checkpoint's architecture (its float
    weights are not needed: a model built on the meta device is fine), a pipeline (its
    transformer is replaced; built from the checkpoint's config when the pipeline has
    none), or None (the model is built from the checkpoint's config; ``dtype`` defaults
    to the checkpoint's). ``path`` may also be a :class:`.checkpoint.Checkpoint` already read.
    ``mode``: None for Nunchaku's own numerics, or one of
    :data:`RETARGET_MODES`. Returns what was passed (the model when None was).
    On any error the model is left unchanged.
    """
    from svdq_compile.integrations.diffusers.lora import enable_peft_lora

    ck = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    pipe = None
    if model_or_pipeline is None:
        model = _build_from(ck, dtype)
    elif isinstance(_unwrap(model_or_pipeline), nn.Module):
        model = _unwrap(model_or_pipeline)
    elif hasattr(model_or_pipeline, "components"):
        pipe = model_or_pipeline
        model = _unwrap(getattr(pipe, "transformer", None))
        if model is None:
            model = _build_from(ck, dtype)
    else:
        raise TypeError(f"load_nunchaku: expected a diffusers model, a pipeline or None, got "
                        f"{type(model_or_pipeline).__name__}")
    plan = plan_nunchaku(model, ck, mode, strict)
    _install(model, plan)
    enable_peft_lora()
    model.eval()
    counts: dict[str, int] = {}
    for m in plan.modules.values():
        counts[m.spec.label] = counts.get(m.spec.label, 0) + 1
    log.info("load_nunchaku: %s: %d layers (%s), %d float tensors", ck.path, len(plan.modules),
             ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), len(plan.tensors))
    if ck.precision == "nvfp4" and plan.mode == "w4a4-nvfp4":
        log.warning("load_nunchaku: NVFP4 layers run on the torch path only (exact numerics, no fast kernel on "
                    "any device yet)")
    model.svdq_nunchaku = {"path": str(ck.path), "precision": ck.precision, "mode": plan.mode,
                           "quantization_config": ck.quantization}
    if pipe is not None:
        pipe.transformer = model
        return pipe
    return model if model_or_pipeline is None else model_or_pipeline

"""The quantization modes: one table of :class:`QuantMode` objects and their schemes' handlers.

A *mode* (``w4a4``, ``w4a8-int8``, ...) is what a user names; a *scheme* is the numerics
family that computes it (``group``: group-wise scales on both operands; ``int8`` / ``fp8``:
one activation scale per token, see :mod:`.per_token`). Everything that used to branch on
bit widths or scheme strings asks this module instead:

- :func:`get_mode` / :func:`find_mode` turn a name or a (bits, scheme) triple into the one
  :class:`QuantMode` object (and raise one clear error for anything unknown);
- :meth:`QuantMode.check_spec` is the one check of a layer's static description, used by
  ``LinearSpec``, ``KernelSpec`` and the op's argument check;
- each scheme registers its handlers once, by slot (:data:`SLOTS`): the weight quantizer,
  its inverse, the tensor checks, the torch path, the Triton path, the ONNX expansion.
  The layer that owns an implementation registers it (``runtime/torch_path.py`` the torch
  path, ``codegen`` the Triton path, ``export`` the ONNX one), so this module imports none
  of them. A slot a scheme leaves empty means "not available": callers fall back (Triton
  -> torch path) or raise :class:`ModeUnsupportedError` naming the mode and the slot.

Adding a mode is one :func:`register_mode` call, plus :func:`register_scheme` and its
handlers if it brings new numerics (``tests/test_mode_registry.py`` adds a W6A8 fake-quant
mode that way and runs a model with it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from svdq_compile.runtime.packing import pack_int4, unpack_int4
from svdq_compile.runtime.quantize import dequantize_groups, quantize_weight

__all__ = [
    "QuantMode", "Scheme", "ModeFields", "ModeUnsupportedError", "MODES", "SCHEMES", "SLOTS",
    "register_mode", "register_scheme", "register_handler", "handler", "has_handler",
    "get_mode", "find_mode", "get_scheme", "mode_names",
]

# Handler slots a scheme can fill (see the module docstring).
SLOTS = ("quantize_weight", "dequantize_weight", "check_weights", "torch_linear", "triton_linear", "onnx_linear",
         "tensorrt_linear")


class ModeUnsupportedError(ValueError):
    """A mode has no implementation for what was asked (e.g. no ONNX expansion)."""


@dataclass(frozen=True)
class Scheme:
    """Static traits of one numerics family.

    Attributes:
        name: ``"group"``, ``"int8"``, ``"fp8"``, ...
        per_token: one activation scale per token and one weight scale per output channel
            (``wchannel``), so the GEMM's K loop carries no float work.
        weight_tensors: the tensors a layer of this scheme stores besides the optional
            ``smooth``, ``lora_down``, ``lora_up`` and ``bias`` (Nunchaku-style key names).
    """

    name: str
    per_token: bool = False
    weight_tensors: tuple[str, ...] = ("qweight", "wscales")


@dataclass(frozen=True)
class QuantMode:
    """One quantization mode.

    Attributes:
        name: what users write (``mode="w4a8-int8"``).
        weight_bits: bits of the stored weight codes (4 or 8 for the built-in modes).
        act_bits: bits of the run-time activation codes; 16 = activations stay floating.
        scheme: name of its :class:`Scheme`.
        weight_format: how ``qweight`` stores the codes: ``"int4"`` (two signed nibbles per
            int8 byte, low nibble = even index), ``"int8"`` (one code per int8), ...
        doc: one line for tables and ``--help``.
    """

    name: str
    weight_bits: int
    act_bits: int
    scheme: str = "group"
    weight_format: str = "int4"
    doc: str = ""

    @property
    def weight_only(self) -> bool:
        """Activations stay floating (no activation statistics are needed)."""
        return self.act_bits >= 16

    @property
    def per_token(self) -> bool:
        return get_scheme(self.scheme).per_token

    @property
    def weight_tensors(self) -> tuple[str, ...]:
        """Tensors a layer of this mode stores besides smooth / low-rank / bias."""
        return get_scheme(self.scheme).weight_tensors

    @property
    def unsigned_capable(self) -> bool:
        """Non-negative inputs (after ReLU/GELU) may use the unsigned 4-bit grid."""
        return self.act_bits == 4 and not self.per_token

    @property
    def packed(self) -> bool:
        """Two codes per stored byte."""
        return self.weight_format == "int4"

    def qweight_cols(self, in_features: int) -> int:
        """Columns of ``qweight`` for a layer with ``in_features`` inputs."""
        return in_features // 2 if self.packed else in_features

    def label(self, act_unsigned: bool = False) -> str:
        """The mode as reports print it: the name, with ``u`` for unsigned activations."""
        return self.name + ("u" if act_unsigned else "")

    def check_spec(self, *, in_features: Optional[int] = None, group_size: int = 64,
                   act_unsigned: bool = False, act_shift: float = 0.0) -> None:
        """The one check of a layer's static description in this mode."""
        if in_features is not None and in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        if act_unsigned and self.act_bits != 4:
            raise ValueError("unsigned activations are only supported with 4-bit activations")
        if self.per_token and (act_unsigned or act_shift != 0.0):
            raise ValueError(f"scheme {self.scheme!r} ({self.name}) is w4a8 only: signed 8-bit activations, no shift")

    def quantize_weight(self, residual: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        """residual: [N, K] float -> the scheme's weight tensors (``qweight``, ``wscales``, ...)."""
        return handler(self.scheme, "quantize_weight")(residual, self, group_size)

    def dequantize_weight(self, tensors: Mapping[str, Any], group_size: int) -> torch.Tensor:
        """The weight tensors -> [N, K] fp32 weight the layer's integer part applies."""
        return handler(self.scheme, "dequantize_weight")(tensors, self, group_size)

    def check_weights(self, tensors: Mapping[str, Any], n: int, k: int, group_size: int, where: str = "") -> None:
        """Shapes / dtypes of the scheme's weight tensors for an [N, K] layer (clear errors)."""
        handler(self.scheme, "check_weights")(tensors, self, n, k, group_size, where)


class ModeFields:
    """Mix-in for frozen specs that store ``weight_bits``, ``act_bits``, ``scheme`` and
    ``act_unsigned`` (the form artifacts and kernel keys keep): the registry's view of them."""

    @property
    def qmode(self) -> QuantMode:
        """The registered mode (its name is what users call the mode)."""
        return find_mode(self.weight_bits, self.act_bits, self.scheme)

    @property
    def mode(self) -> str:
        return self.qmode.name

    @property
    def label(self) -> str:
        """The mode as reports print it (``u`` suffix for unsigned activations)."""
        return self.qmode.label(self.act_unsigned)


_SCHEMES: dict[str, Scheme] = {}
_MODES: dict[str, QuantMode] = {}
_HANDLERS: dict[tuple[str, str], Callable] = {}

# Read-only views (the registry functions below are the way to add to them).
SCHEMES: Mapping[str, Scheme] = _SCHEMES
MODES: Mapping[str, QuantMode] = _MODES


def register_scheme(scheme: Scheme) -> Scheme:
    if scheme.name in _SCHEMES and _SCHEMES[scheme.name] != scheme:
        raise ValueError(f"scheme {scheme.name!r} is already registered differently")
    _SCHEMES[scheme.name] = scheme
    return scheme


def register_mode(mode: QuantMode) -> QuantMode:
    if mode.scheme not in _SCHEMES:
        raise ValueError(f"mode {mode.name!r}: register its scheme {mode.scheme!r} first")
    if mode.name in _MODES and _MODES[mode.name] != mode:
        raise ValueError(f"mode {mode.name!r} is already registered differently")
    for m in _MODES.values():
        if m.name != mode.name and (m.weight_bits, m.act_bits, m.scheme) == (mode.weight_bits, mode.act_bits, mode.scheme):
            raise ValueError(f"mode {mode.name!r} has the bits and scheme of {m.name!r}")
    _MODES[mode.name] = mode
    return mode


def register_handler(scheme: str, slot: str, fn: Callable) -> Callable:
    """Install ``fn`` as ``scheme``'s implementation of ``slot`` (one of :data:`SLOTS`)."""
    if slot not in SLOTS:
        raise ValueError(f"unknown handler slot {slot!r}; expected one of {SLOTS}")
    get_scheme(scheme)
    _HANDLERS[(scheme, slot)] = fn
    return fn


def has_handler(scheme: str, slot: str) -> bool:
    return (scheme, slot) in _HANDLERS


def handler(scheme: str, slot: str) -> Callable:
    try:
        return _HANDLERS[(scheme, slot)]
    except KeyError:
        names = [m.name for m in _MODES.values() if m.scheme == scheme]
        raise ModeUnsupportedError(
            f"{'/'.join(names) or scheme} (scheme {scheme!r}) has no {slot.replace('_', ' ')} implementation"
        ) from None


def mode_names() -> list[str]:
    return sorted(_MODES)


def get_mode(mode: "str | QuantMode") -> QuantMode:
    """The registered mode of that name (a :class:`QuantMode` passes through)."""
    if isinstance(mode, QuantMode):
        return mode
    try:
        return _MODES[mode]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {mode_names()}") from None


def get_scheme(name: str) -> Scheme:
    try:
        return _SCHEMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown scheme {name!r}; expected one of {tuple(_SCHEMES)}") from None


def find_mode(weight_bits: int, act_bits: int, scheme: str = "group") -> QuantMode:
    """The mode with these bit widths and scheme (how a stored spec names its mode)."""
    get_scheme(scheme)
    for m in _MODES.values():
        if (m.weight_bits, m.act_bits, m.scheme) == (weight_bits, act_bits, scheme):
            return m
    same = sorted({f"w{m.weight_bits}a{m.act_bits}" for m in _MODES.values() if m.scheme == scheme})
    if scheme != "group" and same:
        raise ValueError(f"scheme {scheme!r} is {'/'.join(same)} only, got w{weight_bits}a{act_bits}")
    raise ValueError(f"unsupported mode w{weight_bits}a{act_bits} (scheme {scheme!r}); "
                     f"registered modes: {mode_names()}")


# ----------------------------------------------------------------------------- built-ins
GROUP = register_scheme(Scheme("group"))

for _m in (
    QuantMode("w4a4", 4, 4, "group", "int4", "the paper's numerics: INT4 weights and activations, groups of 64"),
    QuantMode("w4a8", 4, 8, "group", "int4", "INT4 weights, INT8 activations, group scales on both"),
    QuantMode("w8a8", 8, 8, "group", "int8", "INT8 weights and activations, group scales on both"),
    QuantMode("w8a4", 8, 4, "group", "int8", "INT8 weights, INT4 activations (torch path only)"),
    QuantMode("w4a16", 4, 16, "group", "int4", "weight-only INT4 (AdaLN modulation linears by default)"),
    QuantMode("w8a16", 8, 16, "group", "int8", "weight-only INT8"),
):
    register_mode(_m)


def _group_quantize(res: torch.Tensor, mode: QuantMode, group: int) -> dict[str, torch.Tensor]:
    q, scales = quantize_weight(res.float(), mode.weight_bits, group)
    return {"qweight": pack_int4(q) if mode.packed else q.to(torch.int8), "wscales": scales}


def _group_dequantize(t: Mapping[str, Any], mode: QuantMode, group: int) -> torch.Tensor:
    q = unpack_int4(t["qweight"], signed=True) if mode.packed else t["qweight"]
    return dequantize_groups(q, t["wscales"], group)


def check_group_weights(t: Mapping[str, Any], mode: QuantMode, n: int, k: int, group: int, where: str = "") -> None:
    """qweight int8 [N, K/2 or K] and wscales [N, K/G]; no per-token tensors."""
    qw, ws = t["qweight"], t["wscales"]
    kq = mode.qweight_cols(k)
    if qw.dtype != torch.int8 or tuple(qw.shape) != (n, kq):
        raise ValueError(f"{where}qweight must be int8 [{n}, {kq}], got {qw.dtype} {list(qw.shape)}")
    if tuple(ws.shape) != (n, k // group):
        raise ValueError(f"{where}wscales must be [{n}, {k // group}], got {list(ws.shape)}")
    if not get_scheme(mode.scheme).per_token and (t.get("wzeros") is not None or t.get("wchannel") is not None):
        raise ValueError(f"{where}wzeros/wchannel only belong to the per-token schemes, not {mode.scheme!r}")


register_handler("group", "quantize_weight", _group_quantize)
register_handler("group", "dequantize_weight", _group_dequantize)
register_handler("group", "check_weights", check_group_weights)

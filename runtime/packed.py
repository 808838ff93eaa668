"""The packed quantized-linear format: what a quantized layer *is*, independent of graphs.

Key names follow Nunchaku's layout (``qweight``, ``wscales``, ``smooth``, ``lora_down``,
``lora_up``, ``bias``) so artifacts are familiar to users of that ecosystem.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from svdq_compile.runtime.packing import pack_int4, unpack_int4
from svdq_compile.runtime.per_token import PER_TOKEN_SCHEMES, SCHEMES, dequantized_weight
from svdq_compile.runtime.quantize import dequantize_groups

__all__ = ["LinearSpec", "PackedLinear", "EPILOGUES", "MODES", "mode_bits", "mode_scheme", "spec_mode"]

# Elementwise ops the quantized linear can apply after bias, before gate/residual.
EPILOGUES = ("none", "gelu", "gelu_tanh", "silu", "relu")

# mode name -> (weight_bits, act_bits); act_bits 16 means activations stay in 16 bits.
# "w4a8" is group-wise (8-bit activations with one scale per token and group of 64);
# "w4a8-int8" / "w4a8-fp8" have one activation scale per token (runtime/per_token.py).
MODES = {"w4a4": (4, 4), "w4a8": (4, 8), "w8a8": (8, 8), "w4a16": (4, 16), "w8a16": (8, 16),
         "w4a8-int8": (4, 8), "w4a8-fp8": (4, 8)}
_MODE_SCHEMES = {"w4a8-int8": "int8", "w4a8-fp8": "fp8"}  # every other mode: "group"


def mode_bits(mode: str) -> tuple[int, int]:
    try:
        return MODES[mode]
    except KeyError:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {sorted(MODES)}") from None


def mode_scheme(mode: str) -> str:
    """``"group"``, ``"int8"`` or ``"fp8"`` (see :mod:`.per_token`)."""
    mode_bits(mode)
    return _MODE_SCHEMES.get(mode, "group")


def spec_mode(weight_bits: int, act_bits: int, scheme: str = "group") -> str:
    """Mode name of (bits, scheme): the inverse of :func:`mode_bits` + :func:`mode_scheme`."""
    for name, sch in _MODE_SCHEMES.items():
        if sch == scheme:
            return name
    return f"w{weight_bits}a{act_bits}"


@dataclass(frozen=True)
class LinearSpec:
    """Static description of one quantized linear (everything but the tensors)."""

    in_features: int
    out_features: int
    group_size: int = 64
    weight_bits: int = 4
    act_bits: int = 4
    act_unsigned: bool = False
    act_shift: float = 0.0
    rank: int = 0
    scheme: str = "group"  # "group", or a per-token scheme ("int8", "fp8")

    def __post_init__(self) -> None:
        if self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits must be 4 or 8, got {self.weight_bits}")
        if self.act_bits not in (4, 8, 16):
            raise ValueError(f"act_bits must be 4, 8 or 16, got {self.act_bits}")
        if self.in_features % self.group_size:
            raise ValueError(
                f"in_features {self.in_features} is not a multiple of group_size {self.group_size}"
            )
        if self.act_unsigned and self.act_bits != 4:
            raise ValueError("unsigned activations are only supported with 4-bit activations")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.scheme in PER_TOKEN_SCHEMES and (self.weight_bits, self.act_bits, self.act_shift) != (4, 8, 0.0):
            raise ValueError(f"scheme {self.scheme!r} needs 4-bit weights, 8-bit signed activations and no shift")

    @property
    def mode(self) -> str:
        return spec_mode(self.weight_bits, self.act_bits, self.scheme)


@dataclass(frozen=True)
class PackedLinear:
    """Tensors of one quantized linear ``Y = Q(X/smooth) Q(R)^T + (X/smooth) down^T up^T + b``."""

    spec: LinearSpec
    qweight: torch.Tensor  # [N, K // 2] int8 (4-bit, packed) or [N, K] int8 (8-bit)
    wscales: torch.Tensor  # [N, K // G] fp16 (int8 integer group scales for scheme "int8")
    smooth: Optional[torch.Tensor] = None  # [K] fp32; None when folded into the producer
    lora_down: Optional[torch.Tensor] = None  # [r, K]
    lora_up: Optional[torch.Tensor] = None  # [N, r]
    bias: Optional[torch.Tensor] = None  # [N]
    wzeros: Optional[torch.Tensor] = None  # [N, K // G] int8 zero points (scheme "int8")
    wchannel: Optional[torch.Tensor] = None  # [N] fp32 channel scales (schemes "int8", "fp8")
    meta: dict = field(default_factory=dict, compare=False)  # alpha, beta, sqnr, ... (informational)

    def __post_init__(self) -> None:
        s = self.spec
        n, k = s.out_features, s.in_features
        kq = k // 2 if s.weight_bits == 4 else k
        if tuple(self.qweight.shape) != (n, kq) or self.qweight.dtype != torch.int8:
            raise ValueError(f"qweight must be int8 [{n}, {kq}], got {self.qweight.dtype} {list(self.qweight.shape)}")
        if tuple(self.wscales.shape) != (n, k // s.group_size):
            raise ValueError(f"wscales must be [{n}, {k // s.group_size}], got {list(self.wscales.shape)}")
        if self.smooth is not None and tuple(self.smooth.shape) != (k,):
            raise ValueError(f"smooth must be [{k}], got {list(self.smooth.shape)}")
        if (self.lora_down is None) != (self.lora_up is None):
            raise ValueError("lora_down and lora_up must both be given or both be None")
        if self.lora_down is not None:
            r = self.lora_down.shape[0]
            if tuple(self.lora_down.shape) != (r, k) or tuple(self.lora_up.shape) != (n, r):
                raise ValueError(
                    f"low-rank shapes must be [r, {k}] and [{n}, r], got "
                    f"{list(self.lora_down.shape)} and {list(self.lora_up.shape)}"
                )
        if self.bias is not None and tuple(self.bias.shape) != (n,):
            raise ValueError(f"bias must be [{n}], got {list(self.bias.shape)}")
        per_token = s.scheme in PER_TOKEN_SCHEMES
        if per_token and (self.wchannel is None or tuple(self.wchannel.shape) != (n,)):
            raise ValueError(f"scheme {s.scheme!r} needs wchannel [{n}], got "
                             f"{None if self.wchannel is None else list(self.wchannel.shape)}")
        if s.scheme == "int8" and (self.wzeros is None or self.wzeros.shape != self.wscales.shape
                                   or self.wscales.dtype != torch.int8 or self.wzeros.dtype != torch.int8):
            raise ValueError(f"scheme 'int8' needs int8 wscales and wzeros [{n}, {k // s.group_size}]")
        if not per_token and (self.wzeros is not None or self.wchannel is not None):
            raise ValueError(f"wzeros/wchannel only belong to the per-token schemes, not {s.scheme!r}")

    @property
    def rank(self) -> int:
        return 0 if self.lora_down is None else int(self.lora_down.shape[0])

    def int_weight(self) -> torch.Tensor:
        """[N, K] int8 residual integers (unpacked; group scheme only)."""
        if self.spec.scheme != "group":
            raise ValueError(f"int_weight: scheme {self.spec.scheme!r} has no group-scaled integers")
        if self.spec.weight_bits == 4:
            return unpack_int4(self.qweight, signed=True)
        return self.qweight

    def dequantized_residual(self) -> torch.Tensor:
        """[N, K] fp32 dequantized residual ``dq(Q(R))``."""
        s = self.spec
        if s.scheme != "group":
            return dequantized_weight(s.scheme, self.qweight, self.wscales, self.wzeros, self.wchannel, s.group_size)
        return dequantize_groups(self.int_weight(), self.wscales, s.group_size)

    def effective_weight(self) -> torch.Tensor:
        """[N, K] fp32 weight the layer applies to the *original* input (smoothing undone)."""
        w = self.dequantized_residual()
        if self.lora_down is not None:
            w = w + self.lora_up.float() @ self.lora_down.float()
        if self.smooth is not None:
            w = w / self.smooth.float()
        return w

    def tensors(self) -> dict[str, torch.Tensor]:
        """Non-None tensors by Nunchaku-style key name."""
        out = {"qweight": self.qweight, "wscales": self.wscales}
        for name in ("smooth", "lora_down", "lora_up", "bias", "wzeros", "wchannel"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def with_(self, **changes) -> "PackedLinear":
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> "PackedLinear":
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return replace(self, **moved)

    @staticmethod
    def pack_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
        return pack_int4(q) if bits == 4 else q.to(torch.int8)

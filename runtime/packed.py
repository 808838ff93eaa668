"""The packed quantized-linear format: what a quantized layer *is*, independent of graphs.

Key names follow Nunchaku's layout (``qweight``, ``wscales``, ``smooth``, ``lora_down``,
``lora_up``, ``bias``) so artifacts are familiar to users of that ecosystem.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from svdq_compile.runtime.epilogue import EPILOGUES
from svdq_compile.runtime.modes import ModeFields
from svdq_compile.runtime.packing import unpack_int4

__all__ = ["LinearSpec", "PackedLinear", "EPILOGUES"]


@dataclass(frozen=True)
class LinearSpec(ModeFields):
    """Static description of one quantized linear (everything but the tensors)."""

    in_features: int
    out_features: int
    group_size: int = 64
    weight_bits: int = 4
    act_bits: int = 4
    act_unsigned: bool = False
    act_shift: float = 0.0
    rank: int = 0  # rows of lora_down (PackedLinear checks they agree)
    scheme: str = "group"  # "group", or a per-token scheme ("int8", "fp8")

    def __post_init__(self) -> None:
        # The registry knows which (bits, scheme) combinations exist and what each allows.
        self.qmode.check_spec(in_features=self.in_features, group_size=self.group_size,
                              act_unsigned=self.act_unsigned, act_shift=self.act_shift)


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
        s.qmode.check_weights(self.tensors(), n, k, s.group_size)
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
        # The low-rank tensors are the rank's one source of truth; the spec repeats it for
        # the manifest and must agree.
        if s.rank != self.rank:
            raise ValueError(f"spec.rank {s.rank} does not match lora_down's {self.rank} rows")

    @property
    def rank(self) -> int:
        return 0 if self.lora_down is None else int(self.lora_down.shape[0])

    def int_weight(self) -> torch.Tensor:
        """[N, K] int8 residual integers (unpacked; group scheme only)."""
        if self.spec.scheme != "group":
            raise ValueError(f"int_weight: scheme {self.spec.scheme!r} has no group-scaled integers")
        return unpack_int4(self.qweight, signed=True) if self.spec.qmode.packed else self.qweight

    def dequantized_residual(self) -> torch.Tensor:
        """[N, K] fp32 dequantized residual ``dq(Q(R))``."""
        return self.spec.qmode.dequantize_weight(self.tensors(), self.spec.group_size)

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

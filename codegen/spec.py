"""KernelSpec: everything static about one generated quantized-linear kernel.

A spec fixes the compile-time (``tl.constexpr``) shape of the kernels: which integer
mode, group size, low-rank rank, epilogue ops and dtypes. Triton compiles (and caches)
one binary per distinct set of constexprs, so a spec is also the key of our
specialisation / autotuning cache (:mod:`.cache`). Run-time sizes (M, N, K) are *not*
part of a spec: token counts change between calls and must not trigger recompiles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from svdq_compile.runtime.epilogue import EPILOGUE_TABLE
from svdq_compile.runtime.modes import ModeFields

__all__ = ["KernelSpec", "ACTIVATIONS", "LORA_PRECISIONS", "rank_pad"]

# Epilogue activation name -> integer code used as a constexpr inside the kernels.
ACTIVATIONS: dict[str, int] = {name: e.code for name, e in EPILOGUE_TABLE.items()}

# ``tl.dot`` input precisions allowed for the fp32 low-rank branch. "ieee" is exact fp32
# (CUDA-core FMAs on GPU: slow for the rank-32 down projection); "tf32x3" splits each
# operand into two tf32 parts and runs 3 tensor-core MMAs (close to fp32 accuracy);
# "tf32" is one MMA on truncated 10-bit mantissas (~1e-3 relative, biased toward 0).
LORA_PRECISIONS = ("ieee", "tf32x3", "tf32")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rank_pad(rank: int) -> int:
    """Padded rank used for the low-rank ``tl.dot`` (a power of two >= 16, as tl.dot needs)."""
    if rank <= 0:
        return 16  # unused (HAS_LORA is False) but must be a valid block size
    p = 16
    while p < rank:
        p *= 2
    return p


@dataclass(frozen=True)
class KernelSpec(ModeFields):
    """Static description of one fused quantized linear (prologue + GEMM).

    Attributes:
        weight_bits: 4 (packed two per int8 byte) or 8 (one int8 per value).
        act_bits: 4 (packed) or 8; 16 means "no activation quantization" (torch fallback).
        act_unsigned: 4-bit activations on the unsigned grid [0, 15] (non-negative inputs).
        group_size: quantization group along K; one group is one K step of the GEMM.
        rank: rank of the low-rank branch, 0 for none.
        epilogue: activation name, one of :data:`ACTIVATIONS`.
        has_smooth: divide X by a per-channel smoothing vector in the prologue.
        has_bias / has_gate / has_residual: fused epilogue operands.
        in_dtype: dtype of X; out_dtype: dtype of Y (the op keeps X's dtype).
        lora_precision: ``tl.dot`` input precision of the two low-rank products.
        scheme: ``"group"`` (group scales on both operands: :mod:`.gemm`) or a per-token
            scheme ``"int8"`` / ``"fp8"`` (runtime/per_token.py: :mod:`.gemm_per_token`).
    """

    weight_bits: int = 4
    act_bits: int = 4
    act_unsigned: bool = False
    group_size: int = 64
    rank: int = 0
    epilogue: str = "none"
    has_smooth: bool = False
    has_bias: bool = False
    has_gate: bool = False
    has_residual: bool = False
    in_dtype: torch.dtype = torch.bfloat16
    out_dtype: torch.dtype = torch.bfloat16
    lora_precision: str = "ieee"
    scheme: str = "group"

    def __post_init__(self) -> None:
        self.qmode.check_spec(group_size=self.group_size, act_unsigned=self.act_unsigned)
        if self.epilogue not in ACTIVATIONS:
            raise ValueError(f"unknown epilogue {self.epilogue!r}; expected one of {tuple(ACTIVATIONS)}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.lora_precision not in LORA_PRECISIONS:
            raise ValueError(f"lora_precision must be one of {LORA_PRECISIONS}, got {self.lora_precision!r}")
        for name in ("in_dtype", "out_dtype"):
            if getattr(self, name) not in _FLOAT_DTYPES:
                raise TypeError(f"{name} must be float32, float16 or bfloat16, got {getattr(self, name)}")

    # ----------------------------------------------------------------- properties
    @property
    def has_lora(self) -> bool:
        return self.rank > 0

    @property
    def rank_pad(self) -> int:
        return rank_pad(self.rank)

    @property
    def act_code(self) -> int:
        return ACTIVATIONS[self.epilogue]

    def supports_triton(self) -> Optional[str]:
        """None when the fused kernels cover this spec, else the reason for the fallback."""
        if self.qmode.weight_only:
            return "16-bit activations (weight-only modes) use codegen/w4a16.py + torch ops"
        if not self.qmode.packed and self.qmode.act_bits < self.qmode.weight_bits:
            return f"{self.qmode.name} has no Triton kernel (8-bit weights need 8-bit activations)"
        gs = self.group_size
        # One group is one K step: both packed halves (gs // 2) must be valid tl.dot K dims
        # (>= 16, power of two) and gs itself a power of two for tl.arange.
        if gs < 32 or gs & (gs - 1):
            return f"group_size {gs} is not a power of two >= 32"
        return None

    def key(self) -> str:
        """Stable string for caches (independent of Python's hash seed)."""
        return (
            # bit widths, not the mode name: group-scheme keys stay what they were
            f"w{self.weight_bits}a{self.act_bits}{'u' if self.act_unsigned else 's'}_g{self.group_size}_r{self.rank}"
            f"_{self.epilogue}_sm{int(self.has_smooth)}b{int(self.has_bias)}g{int(self.has_gate)}"
            f"r{int(self.has_residual)}_{str(self.in_dtype)[6:]}-{str(self.out_dtype)[6:]}"
            f"_{self.lora_precision}"
            + ("" if self.scheme == "group" else f"_pt-{self.scheme}")  # group keys unchanged
        )

    def without_lora(self) -> "KernelSpec":
        """The same spec with rank 0 (the rank-0 GEMM variant used in benchmarks)."""
        from dataclasses import replace

        return replace(self, rank=0)

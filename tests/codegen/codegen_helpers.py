"""Shared helpers for the codegen tests: device choice, random layers, error metrics."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from svdq_compile.runtime.packing import pack_int4
from svdq_compile.runtime.quantize import quantize_weight

# Kernels run on CUDA when present, else on CPU tensors in the Triton interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The kernels can run here at all (GPU, or the interpreter on CPU).
CAN_RUN = DEVICE.type == "cuda" or INTERPRET


@dataclass
class Layer:
    """Tensors of one random quantized linear (same roles as runtime.packed.PackedLinear)."""

    qweight: torch.Tensor
    wscales: torch.Tensor
    smooth: Optional[torch.Tensor]
    lora_down: Optional[torch.Tensor]
    lora_up: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    weight_bits: int
    group_size: int

    def args(self) -> tuple:
        """Positional tensor args of svdq.linear up to bias (residual/gate added by callers)."""
        return (self.qweight, self.wscales, self.smooth, self.lora_down, self.lora_up, self.bias)


def make_layer(
    n: int,
    k: int,
    *,
    weight_bits: int = 4,
    rank: int = 8,
    smooth: bool = True,
    bias: bool = True,
    group_size: int = 64,
    lora_dtype: torch.dtype = torch.float32,
    device: torch.device = DEVICE,
    seed: int = 0,
) -> Layer:
    """A random layer with realistic magnitudes (weights ~ 1/sqrt(K), outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    w[:, :: max(1, k // 7)] *= 8.0  # a few outlier input channels
    q, s = quantize_weight(w, weight_bits, group_size)
    qweight = pack_int4(q) if weight_bits == 4 else q
    sm = (torch.rand(k, generator=g) + 0.5) if smooth else None
    ld = (torch.randn(rank, k, generator=g) / k**0.5).to(lora_dtype) if rank else None
    lu = (torch.randn(n, rank, generator=g) / rank**0.5).to(lora_dtype) if rank else None
    b = torch.randn(n, generator=g) * 0.1 if bias else None

    def mv(t):
        return None if t is None else t.to(device)

    return Layer(mv(qweight), mv(s), mv(sm), mv(ld), mv(lu), mv(b), weight_bits, group_size)


def make_input(m: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 1,
               device: torch.device = DEVICE) -> torch.Tensor:
    """Activations with a few large channels, like transformer hidden states."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 3::17] *= 10.0
    return x.to(dtype).to(device)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64."""
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-300))

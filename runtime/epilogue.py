"""Elementwise epilogues the quantized linear can fuse (shared by every backend)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["apply_epilogue", "finish_output"]


def apply_epilogue(y: torch.Tensor, epilogue: str) -> torch.Tensor:
    if epilogue == "none":
        return y
    if epilogue == "gelu":
        return F.gelu(y)
    if epilogue == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if epilogue == "silu":
        return F.silu(y)
    if epilogue == "relu":
        return F.relu(y)
    raise ValueError(f"unknown epilogue {epilogue!r}")


def finish_output(
    y: torch.Tensor,
    bias: Optional[torch.Tensor],
    epilogue: str,
    gate: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
) -> torch.Tensor:
    """y: [M, N] accumulator -> act(y + bias) * gate + residual, in y's dtype.

    The order (bias, activation, gate, residual) is the order a transformer block
    applies them: ``x + gate * mlp(x)`` becomes ``epilogue=..., gate=g, residual=x``.
    """
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = apply_epilogue(y, epilogue)
    if gate is not None:
        y = y * gate.to(y.dtype)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return y

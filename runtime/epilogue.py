"""Elementwise epilogues the quantized linear can fuse (shared by every backend)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["Epilogue", "EPILOGUE_TABLE", "EPILOGUES", "apply_epilogue", "finish_output"]


@dataclass(frozen=True)
class Epilogue:
    """One elementwise op the quantized linear can fuse after the bias.

    ``code`` is the ``ACT`` constexpr the Triton kernels branch on (codegen/epilogue.py);
    the exporter keeps its ONNX form of each name (export/onnx_linear.py, checked to cover
    this table).
    """

    name: str
    code: int
    torch_fn: Callable[[torch.Tensor], torch.Tensor]


# The one table of epilogues: every backend reads its names, codes and functions here.
EPILOGUE_TABLE: dict[str, Epilogue] = {e.name: e for e in (
    Epilogue("none", 0, lambda y: y),
    Epilogue("gelu", 1, F.gelu),
    Epilogue("gelu_tanh", 2, lambda y: F.gelu(y, approximate="tanh")),
    Epilogue("silu", 3, F.silu),
    Epilogue("relu", 4, F.relu),
)}
EPILOGUES: tuple[str, ...] = tuple(EPILOGUE_TABLE)


def apply_epilogue(y: torch.Tensor, epilogue: str) -> torch.Tensor:
    try:
        return EPILOGUE_TABLE[epilogue].torch_fn(y)
    except KeyError:
        raise ValueError(f"unknown epilogue {epilogue!r}; expected one of {EPILOGUES}") from None


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

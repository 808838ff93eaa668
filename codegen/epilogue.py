"""Triton device functions of the GEMM epilogue (activations), matching runtime/epilogue.py.

The codes are :data:`.spec.ACTIVATIONS`. Everything is computed in fp32 on the
accumulator tile. Only functions available in both Triton 3.6 and 3.9 are used
(``tl.math.erf``, ``tl.exp``, ``tl.sigmoid``); ``tanh`` is written with ``exp`` because
``tl.math.tanh`` is not in every Triton release.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["apply_activation"]


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (exp(2u) + 1). |u| is clamped to 20 (tanh(20) == 1 in fp32) so
    # exp never overflows.
    u = tl.minimum(tl.maximum(u, -20.0), 20.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def apply_activation(y, ACT: tl.constexpr):
    """y: [BLOCK_M, BLOCK_N] fp32 -> act(y) fp32 (0 none, 1 gelu, 2 gelu_tanh, 3 silu, 4 relu)."""
    if ACT == 1:  # exact GELU, as F.gelu(approximate="none")
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 2:  # F.gelu(approximate="tanh")
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + _tanh(inner))
    elif ACT == 3:  # SiLU
        y = y * tl.sigmoid(y)
    elif ACT == 4:  # ReLU
        y = tl.maximum(y, 0.0)
    return y

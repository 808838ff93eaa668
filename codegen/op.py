"""``svdq::triton_linear``: the Triton quantized linear as a ``torch.library.triton_op``.

Unlike the opaque ``svdq::linear`` custom op, a ``triton_op`` lets ``torch.compile``
(Inductor) and ``torch.export`` trace *into* the Python body: the kernels, launched via
``wrap_triton``, become graph nodes Inductor schedules with the rest of the model, and
the fake (meta) implementation is derived from the same body. Passes may emit this op
directly on CUDA; its eager behaviour equals ``svdq::linear``'s Triton path.

While traced, the body sees fake tensors and symbolic M: the autotuner then uses cached
or default configs only (see :func:`.autotune.choose_config`).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .linear import quantized_linear_triton

__all__ = ["TRITON_OP_AVAILABLE", "triton_linear"]

log = logging.getLogger(__name__)

TRITON_OP_AVAILABLE = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def _triton_linear_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    smooth: Optional[torch.Tensor],
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    group_size: int,
    weight_bits: int,
    act_bits: int,
    act_unsigned: bool,
    act_shift: float,
    epilogue: str,
) -> torch.Tensor:
    return quantized_linear_triton(
        x, qweight, wscales, smooth, lora_down, lora_up, bias, residual, gate,
        group_size, weight_bits, act_bits, act_unsigned, act_shift, epilogue, wrap=True,
    )


triton_linear = None
if TRITON_OP_AVAILABLE:
    try:
        triton_linear = torch.library.triton_op("svdq::triton_linear", mutates_args=())(_triton_linear_impl)
    except Exception as e:  # noqa: BLE001 - e.g. registered twice on module reload
        log.debug("svdq::triton_linear not registered: %s", e)

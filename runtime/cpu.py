"""CPU implementation of the quantized linear (the no-GPU path).

Same numerics as :mod:`.reference`, evaluated in fp32 with vectorised torch ops.
The grouped integer GEMM lives in :mod:`.cpu_gemm` so it can be optimised alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .cpu_gemm import grouped_int_gemm
from .epilogue import finish_output
from .quantize import dequantize_groups, quantize_activation
from .reference import int_weight, smooth_input

__all__ = ["quantized_linear_cpu"]


def quantized_linear_cpu(
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
    lead = x.shape[:-1]
    k = x.shape[-1]
    n = wscales.shape[0]
    xs = smooth_input(x.reshape(-1, k), smooth)  # [M, K] fp32
    qw = int_weight(qweight, weight_bits)  # [N, K] int8
    if act_bits == 16:
        y = F.linear(xs, dequantize_groups(qw, wscales, group_size))
    else:
        qa, sa = quantize_activation(xs, act_bits, group_size, unsigned=act_unsigned, shift=act_shift)
        y = grouped_int_gemm(qa, sa, qw, wscales.float(), group_size)  # [M, N] fp32
    if lora_down is not None:
        y = y + (xs @ lora_down.float().t()) @ lora_up.float().t()
    res2 = None if residual is None else residual.expand(*lead, n).reshape(-1, n)
    gate2 = None if gate is None else gate.expand(*lead, n).reshape(-1, n)
    y = finish_output(y, bias, epilogue, gate2, res2)
    return y.to(x.dtype).reshape(*lead, n)

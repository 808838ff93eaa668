"""Unfused baseline: quantize kernel, rank-0 GEMM, then the low-rank branch and epilogue in torch.

This is what running SVDQuant without the two fusions costs: the low-rank branch
re-reads X (two small GEMMs in X's dtype) and the output Y is written, re-read and
re-written in 16 bits for the add and each epilogue op. Used by benchmarks to measure
what fusion buys; numerically it is the same method (not bit-identical: the low-rank
branch and epilogue run in X's dtype).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from svdq_compile.runtime.epilogue import finish_output
from svdq_compile.runtime.op_args import bind
from svdq_compile.codegen.gemm import run_gemm
from svdq_compile.codegen.call_spec import make_spec
from svdq_compile.codegen.prologue import run_prologue

__all__ = ["unfused_quantized_linear"]


def unfused_quantized_linear(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Same arguments and math as ``quantized_linear_triton``, without the fusions
    (group scheme only: the per-token schemes' unfused form is the library composition)."""
    a = bind(*args, **kwargs)
    if a.per_token:
        raise ValueError("unfused_quantized_linear: per-token schemes are not supported")
    x, qweight, wscales, smooth = a.x, a.qweight, a.wscales, a.smooth
    lora_down, lora_up, bias, residual, gate = a.lora_down, a.lora_up, a.bias, a.residual, a.gate
    group_size, weight_bits, act_bits = a.group_size, a.weight_bits, a.act_bits
    act_unsigned, act_shift, epilogue = a.act_unsigned, a.act_shift, a.epilogue
    lead = tuple(x.shape[:-1])
    k = x.shape[-1]
    n = wscales.shape[0]
    x2d = x.reshape(-1, k)  # [M, K]
    full = make_spec(
        x, smooth, lora_down, bias, residual, gate, group_size, weight_bits, act_bits,
        act_unsigned, epilogue, "ieee",
    )
    # Prologue without the down projection, GEMM without any epilogue op.
    spec = replace(full, rank=0, epilogue="none", has_bias=False, has_gate=False, has_residual=False)
    qa, sa, _ = run_prologue(x2d, smooth, None, spec, act_shift)
    y = run_gemm(qa, sa, qweight, wscales, None, None, None, None, None, spec, lead)  # [M, N] x.dtype
    if lora_down is not None:
        xs = x2d if smooth is None else x2d / smooth.to(x.dtype)  # second read of X
        y = y + F.linear(F.linear(xs, lora_down.to(x.dtype)), lora_up.to(x.dtype))
    res2 = None if residual is None else residual.expand(*lead, n).reshape(-1, n)
    gate2 = None if gate is None else gate.expand(*lead, n).reshape(-1, n)
    y = finish_output(y, bias, epilogue, gate2, res2)
    return y.reshape(*lead, n)

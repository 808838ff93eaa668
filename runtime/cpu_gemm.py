"""Grouped integer GEMM on CPU: ``Y[m, n] = sum_g sa[m, g] * sw[n, g] * (qa_g @ qw_g^T)[m, n]``.

Baseline: dequantize both operands and run one fp32 GEMM (exact integer products;
fp32 accumulation).
"""
from __future__ import annotations

import torch

__all__ = ["grouped_int_gemm"]


def grouped_int_gemm(
    qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, group_size: int
) -> torch.Tensor:
    """qa: [M, K] int8, sa: [M, K//G] fp32, qw: [N, K] int8, sw: [N, K//G] fp32 -> [M, N] fp32."""
    m, k = qa.shape
    n = qw.shape[0]
    a = (qa.view(m, -1, group_size).float() * sa.unsqueeze(-1)).view(m, k)
    w = (qw.view(n, -1, group_size).float() * sw.unsqueeze(-1)).view(n, k)
    return a @ w.t()

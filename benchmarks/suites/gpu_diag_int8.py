"""The plain Triton int8 GEMM of the ``gpu_diag`` suite (the int8 ceiling without group rescale).

A module of its own, imported only when the suite runs: defining a Triton kernel fixes
whether it is interpreted (``TRITON_INTERPRET``), so importing the suites must define none.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from svdq_compile.codegen.tiling import grouped_tile

__all__ = ["int8_gemm", "run_int8"]


@triton.jit
def int8_gemm(a_ptr, w_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """A plain Triton int8 GEMM: int32 accumulator over all of K, no per-group rescale.

    Not a usable SVDQuant kernel (no scales at all): it measures what Triton's int8
    ``tl.dot`` reaches on this GPU, i.e. the ceiling our per-group rescaled GEMM is
    compared against (docs/kernels.md).
    """
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for _ in range(0, K // BLOCK_K):
        acc = tl.dot(tl.load(a_ptrs), tl.load(w_ptrs), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + om[:, None] * N + on[None, :], acc, mask=(om[:, None] < M) & (on[None, :] < N))


def run_int8(a: torch.Tensor, w: torch.Tensor, cfg: tuple) -> torch.Tensor:
    """``a`` [M, K] int8 x ``w`` [N, K] int8 -> [M, N] int32 with launch config ``cfg``."""
    m, k = a.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=torch.int32, device=a.device)
    bm, bn, bk, gm, warps, stages = cfg
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    int8_gemm[grid](a, w, y, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
                    num_warps=warps, num_stages=stages)
    return y

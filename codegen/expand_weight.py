"""INT4 weights -> the 8-bit GEMM operand of the per-token schemes, in one pass over the weight.

Bit for bit :func:`runtime.per_token.expanded_weight`:

- int8 (progressive): ``e = (u - z) * s`` with ``u = signed nibble + 8`` (exact integers);
- fp8: ``e4m3_rne(fp32(q * s_g) / c_n)``: ``q * s_g`` is exact in fp32 and ``c_n`` is a
  power of two, so ``div_rn`` is exact too and the only rounding is the final RNE.

Why a separate pass instead of expanding inside the GEMM (docs/design.md section 2.1, issue 16): on
Hopper the fused GEMM keeps a wgmma in flight only when BOTH operands come from memory
(an offline sm_90 compile of in-register expansion as the B operand gets ``pendings = 0``
after every dot; as the A operand of the transposed product ptxas serialises the wgmmas,
C7515). So each call expands the weight into a fresh ``[N, K]`` buffer (the caching
allocator hands back the same block every call: a reused workspace in practice) and the
GEMM reads it. The trade-off:

- default, per call: weights stay 4-bit in memory (the 3.5x saving of the method); the
  pass reads N*K/2 bytes and writes N*K (~14 MB for 3072x3072, a few percent of the
  GEMM at M = 4608, more at small M where the GEMM itself reads ~N*K bytes);
- ``SVDQ_KEEP_EXPANDED=1``: one expanded copy per layer, kept on the ``qweight`` tensor and
  validated on every call by the weight tensors' versions (runtime/torch_path.py
  ``cached_expanded_weight``): no expansion pass, but 2x the INT4 bytes per layer (still
  ~1.9x smaller than bf16). Eager only: while ``torch.compile`` traces the op the
  expansion is always part of the graph.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from svdq_compile.runtime.torch_path import cached_expanded_weight
from svdq_compile.runtime.op_args import LinearArgs
from svdq_compile.runtime.per_token import FP8_DTYPE
from svdq_compile.codegen.launch import interpreting, launch
from svdq_compile.codegen.prologue_per_token import to_e4m3

__all__ = ["expand_kernel", "run_expand", "expanded_operand", "keep_expanded"]

KEEP_ENV = "SVDQ_KEEP_EXPANDED"


@triton.jit
def expand_kernel(
    qw_ptr,  # [N, K/2] int8: two signed nibbles per byte, low nibble = even k
    s_ptr,  # [N, K/G] group scales: int8 integers (INT8) or fp16 (fp8)
    z_ptr,  # [N, K/G] int8 zero points (INT8 only)
    c_ptr,  # [N] fp32 power-of-two channel scales (fp8 only)
    out_ptr,  # [N, K] int8 or float8e4nv
    N,
    K,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_on,
    INT8: tl.constexpr,
    SOFT_FP8: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # output columns per program (even)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n.to(tl.int64)
    mask_n = offs_n < N
    offs_j = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)  # packed byte index
    b = tl.load(qw_ptr + rows[:, None] * stride_qn + offs_j[None, :],
                mask=mask_n[:, None] & (offs_j[None, :] < K // 2), other=0).to(tl.int32)
    lo = (b << 28) >> 28  # even k, [-8, 7] (sign-extended in int32, as the group GEMM does)
    hi = b >> 4  # odd k
    q = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # column 2j <- lo[j], 2j+1 <- hi[j]
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = mask_n[:, None] & (offs_k[None, :] < K)
    grp = offs_k // GROUP
    s = tl.load(s_ptr + rows[:, None] * stride_sn + grp[None, :], mask=mask, other=1)
    if INT8:
        z = tl.load(z_ptr + rows[:, None] * stride_zn + grp[None, :], mask=mask, other=0).to(tl.int32)
        e = ((q + 8 - z) * s.to(tl.int32)).to(tl.int8)  # |e| <= 127 (runtime.per_token)
    else:
        c = tl.load(c_ptr + rows, mask=mask_n, other=1.0).to(tl.float32)
        v = q.to(tl.float32) * s.to(tl.float32)  # exact: 4 x 11 significant bits
        v = tl.math.div_rn(v, tl.broadcast_to(c[:, None], (BLOCK_N, BLOCK_K)))  # exact: power of two
        e = to_e4m3(v, SOFT_FP8)
    tl.store(out_ptr + rows[:, None] * stride_on + offs_k[None, :], e, mask=mask)


def run_expand(a: LinearArgs, *, wrap: bool = False, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The per-token scheme's [N, K] 8-bit weight (int8 or e4m3) from ``a``'s INT4 weight."""
    qweight, wscales = a.qweight, a.wscales
    n = qweight.shape[0]
    k = qweight.shape[1] * 2
    int8 = a.scheme == "int8"
    dev = qweight.device
    if out is None:
        out = torch.empty((n, k), dtype=torch.int8 if int8 else FP8_DTYPE, device=dev)
    if n == 0 or k == 0:
        return out
    qweight = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    wscales = wscales if wscales.stride(-1) == 1 else wscales.contiguous()
    z = a.wzeros if int8 else wscales
    z = z if z.stride(-1) == 1 else z.contiguous()
    c = a.wchannel.contiguous()
    block_n, block_k, warps = (32, 256, 1) if interpreting() else (16, 256, 4)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    args = (qweight, wscales, z, c, out, n, k, qweight.stride(0), wscales.stride(0), z.stride(0), out.stride(0))
    kwargs = dict(INT8=int8, SOFT_FP8=interpreting(), GROUP=a.group_size, BLOCK_N=block_n, BLOCK_K=block_k,
                  num_warps=warps, num_stages=1)
    launch(expand_kernel, grid, args, kwargs, wrap=wrap, device=dev)
    return out


def keep_expanded() -> bool:
    """``SVDQ_KEEP_EXPANDED=1``: keep one expanded copy per layer (module docstring)."""
    return os.environ.get(KEEP_ENV, "0") == "1"


def expanded_operand(a: LinearArgs, *, wrap: bool, eager: bool) -> torch.Tensor:
    """The GEMM's 8-bit weight: the per-layer cached copy (eager, ``SVDQ_KEEP_EXPANDED=1``)
    or a fresh expansion by :func:`run_expand`."""
    if eager and keep_expanded():
        w8, _ = cached_expanded_weight(a, False)  # built once (torch ops, same bytes), then reused
        return w8
    return run_expand(a, wrap=wrap)

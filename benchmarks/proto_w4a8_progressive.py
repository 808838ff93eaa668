"""Prototype for a design decision (docs/kernels.md): a W4A8 GEMM with no float op in its K loop.

Not used by the library. It answers, in one GPU run, whether the numerics that avoid the
per-group float rescale reach the speed targets on Hopper before anyone builds the mode.

Numerics (QServe-style progressive group quantization):
- weights: per-channel symmetric INT8 ``W ~ s_c[n] * W8`` with ``|W8| <= 119``, then W8 per
  group of 64 as UINT4 with an *integer* scale and zero: ``W8 ~ (q - z) * s``; s in 1..16,
  so ``(q - z) * s`` stays inside int8 (119 + 16 / 2 = 127);
- activations: per-token symmetric INT8 ``X ~ s_a[m] * A``;
- ``Y = s_a[m] * s_c[n] * sum_k A[m, k] * ((q - z) * s)[n, k]``: the int32 accumulator runs
  over all of K, the group dequantization is integer arithmetic on the weight tile (shared
  by BLOCK_M rows), and the only float math is the epilogue.

    python benchmarks/proto_w4a8_progressive.py [--out DIR]   # GPU: timing vs bf16
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from svdq_compile.codegen.tiling import grouped_tile

W8_MAX = 119  # leaves room for half a group step inside int8 (QServe's protective range)


def quantize_weight_progressive(w: torch.Tensor, group: int = 64):
    """w: [N, K] float -> (packed [N, K/2] uint8 nibbles, s [N, K/G] int32, z [N, K/G] int32, s_c [N] fp32)."""
    n, k = w.shape
    w = w.float()
    s_c = (w.abs().amax(dim=1) / W8_MAX).clamp_min(1e-12)  # [N]
    w8 = torch.round(w / s_c[:, None]).clamp(-W8_MAX, W8_MAX)  # [N, K] integer-valued
    g = w8.view(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)  # [N, K/G]
    s = torch.ceil((hi - lo) / 15).clamp(1, 16)  # integer group scale
    z = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(g / s[..., None]) + z[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()  # low nibble = even k
    return packed, s.to(torch.int32), z.to(torch.int32), s_c


def dequantize_w8(packed: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int = 64) -> torch.Tensor:
    """[N, K] int16 values of ``(q - z) * s`` (each within int8)."""
    n = packed.shape[0]
    q = torch.stack([packed & 15, packed >> 4], dim=-1).view(n, -1).to(torch.int32)  # [N, K]
    w8 = (q.view(n, -1, group) - z[..., None]) * s[..., None]
    return w8.view(n, -1).to(torch.int16)


def quantize_activation_per_token(x: torch.Tensor):
    """x: [M, K] -> (A int8 [M, K], s_a fp32 [M])."""
    xf = x.float()
    s_a = (xf.abs().amax(dim=1) / 127).clamp_min(1e-12)
    return torch.round(xf / s_a[:, None]).clamp(-127, 127).to(torch.int8), s_a


def reference(a, s_a, packed, s, z, s_c, group: int = 64) -> torch.Tensor:
    """fp32 [M, N]: exact int64 products, then the same two fp32 multiplies as the kernel."""
    acc = (a.long() @ dequantize_w8(packed, s, z, group).long().t())  # [M, N] exact
    return (acc.to(torch.int32).float() * s_a[:, None]) * s_c[None, :]


@triton.jit
def w4a8p_kernel(a_ptr, sa_ptr, w_ptr, s_ptr, zs_ptr, sc_ptr, y_ptr, M, N, K,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_h = tl.arange(0, GROUP // 2)
    a_ptrs = a_ptr + rm[:, None] * K + tl.arange(0, GROUP)[None, :]  # [BM, G]
    w_ptrs = w_ptr + rn[None, :] * (K // 2) + offs_h[:, None]  # [G/2, BN]
    groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # one accumulator over all of K
    for g in range(0, groups):
        a = tl.load(a_ptrs)  # [BM, G] int8
        a_lo, a_hi = tl.split(tl.reshape(a, (BLOCK_M, GROUP // 2, 2)))  # even / odd k
        w = tl.load(w_ptrs).to(tl.int32) & 0xFF  # [G/2, BN] unsigned bytes
        s = tl.load(s_ptr + rn * groups + g)  # [BN] int32
        zs = tl.load(zs_ptr + rn * groups + g)  # [BN] int32: z * s
        w_lo = ((w & 0xF) * s[None, :] - zs[None, :]).to(tl.int8)  # (q - z) * s, in int8
        w_hi = ((w >> 4) * s[None, :] - zs[None, :]).to(tl.int8)
        acc = tl.dot(a_lo, w_lo, acc, out_dtype=tl.int32)
        acc = tl.dot(a_hi, w_hi, acc, out_dtype=tl.int32)
        a_ptrs += GROUP
        w_ptrs += GROUP // 2
    sa = tl.load(sa_ptr + rm)  # [BM] fp32
    sc = tl.load(sc_ptr + rn)  # [BN] fp32
    y = (acc.to(tl.float32) * sa[:, None]) * sc[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def run(a, s_a, packed, s, zs, s_c, out_dtype=torch.float32, cfg=(128, 128, 8, 8, 3), group: int = 64):
    m, k = a.shape
    n = packed.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=a.device)
    bm, bn, gm, warps, stages = cfg
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    w4a8p_kernel[grid](a, s_a, packed.view(torch.int8), s, zs, s_c, y, m, n, k, GROUP=group,
                       BLOCK_M=bm, BLOCK_N=bn, GROUP_M=gm, num_warps=warps, num_stages=stages)
    return y


CONFIGS = [(128, 128, 8, 8, 3), (128, 256, 8, 8, 3), (128, 64, 8, 4, 4), (64, 128, 8, 4, 4)]


def bench_rows(m: int = 4608, k: int = 3072, n: int = 3072) -> list[dict]:
    """GPU timings vs bf16 F.linear (median of do_bench), plus exactness of each config."""
    from triton.testing import do_bench

    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g)
    packed, s, z, s_c = quantize_weight_progressive(w)
    a, s_a = quantize_activation_per_token(x)
    dev = "cuda"
    a, s_a, packed, s, zs, s_c = (t.to(dev) for t in (a, s_a, packed, s, (z * s).to(torch.int32), s_c))
    ref = reference(a.cpu(), s_a.cpu(), packed.cpu(), s.cpu(), (zs // s).cpu(), s_c.cpu())
    xb, wb = x.to(dev, torch.bfloat16), w.to(dev, torch.bfloat16)
    ms_bf16 = do_bench(lambda: torch.nn.functional.linear(xb, wb), warmup=10, rep=50, return_mode="median")
    rows = [{"variant": "bf16 F.linear", "ms": ms_bf16, "tops": 2 * m * n * k / ms_bf16 / 1e9}]
    for cfg in CONFIGS:
        try:
            y = run(a, s_a, packed, s, zs, s_c, cfg=cfg)
            exact = bool(torch.equal(y.cpu(), ref))
            ms = do_bench(lambda: run(a, s_a, packed, s, zs, s_c, out_dtype=torch.bfloat16, cfg=cfg),
                          warmup=5, rep=30, return_mode="median")
            rows.append({"variant": "proto W4A8 progressive (no float op in the K loop)", "config": str(cfg),
                         "ms": ms, "tops": 2 * m * n * k / ms / 1e9, "vs_bf16": ms_bf16 / ms, "exact": exact})
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
            rows.append({"variant": "proto W4A8 progressive", "config": str(cfg), "error": repr(e)[:300]})
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    import argparse
    import json
    import os

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="directory for proto_w4a8.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("proto_w4a8_progressive: no CUDA; the numerics are checked by tests/codegen/test_proto_w4a8.py")
        sys.exit(0)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "shape_mkn": [4608, 3072, 3072], "rows": bench_rows(),
              "triton_env": {k: os.environ[k] for k in ("DISABLE_MMA_V3",) if k in os.environ}}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(f"{args.out}/proto_w4a8.json", "w") as f:
            json.dump(result, f, indent=1)

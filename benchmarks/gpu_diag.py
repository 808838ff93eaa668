"""GPU diagnosis of the W4A4 GEMM: every launch config, W4A4 vs W8A8, vs bf16 (one shape).

Answers where the time goes (nibble unpacking vs the per-group rescale vs tiling):
W8A8 feeds tl.dot straight from memory, W4A4 unpacks nibbles in registers first, and the
int8 ceilings (cuBLAS ``torch._int_mm`` and a plain Triton int8 GEMM, both without the
per-group rescale) show what the rescale costs.
    python benchmarks/gpu_diag.py --out DIR
"""
from __future__ import annotations

import argparse
import os
import json
import sys

import torch
import triton
import triton.language as tl

from svdq_compile.codegen.tiling import grouped_tile


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


def _run_int8(a, w, cfg):
    m, k = a.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=torch.int32, device=a.device)
    bm, bn, bk, gm, warps, stages = cfg
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    int8_gemm[grid](a, w, y, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
                    num_warps=warps, num_stages=stages)
    return y


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages): the Triton matmul tutorial's
# int8-friendly Hopper configs.
_CEILING_CONFIGS = [(128, 256, 128, 8, 8, 3), (128, 128, 128, 8, 8, 4), (128, 128, 64, 8, 4, 4),
                    (64, 128, 128, 8, 4, 4)]


def ceiling_rows(m: int, k: int, n: int, dev: str, bench) -> list[dict]:
    """int8 GEMM ceilings without per-group rescale: cuBLAS (torch._int_mm) and Triton."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int8).to(dev)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8).to(dev)
    flops = 2 * m * n * k
    rows = []
    ref = torch._int_mm(a, w.t())
    try:
        ms = bench(lambda: torch._int_mm(a, w.t()))
        rows.append({"variant": "int8 torch._int_mm (cuBLAS), no group rescale", "ms": ms, "tops": flops / ms / 1e9})
    except Exception as e:  # noqa: BLE001
        rows.append({"variant": "int8 torch._int_mm", "error": repr(e)[:300]})
    run = _run_int8
    for cfg in _CEILING_CONFIGS:
        try:
            y = run(a, w, cfg)
            exact = bool(torch.equal(y, ref))
            ms = bench(lambda: run(a, w, cfg))
            rows.append({"variant": "int8 Triton, no group rescale", "config": str(cfg), "ms": ms,
                         "tops": flops / ms / 1e9, "exact_vs_int_mm": exact})
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
            rows.append({"variant": "int8 Triton, no group rescale", "config": str(cfg), "error": repr(e)[:300]})
    return rows


def w4a16_rows(dev: str, bench) -> list[dict]:
    """AdaLN-shaped weight-only layer (M=2, K=3072, N=18432): Triton W4A16 vs the old
    dequantize + matmul fallback vs bf16 F.linear."""
    from svdq_compile.codegen.w4a16 import run_w4a16
    from svdq_compile.runtime import pack_int4, quantize_weight
    from svdq_compile.runtime.torch_path import dequantize_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(18432, 3072, generator=g) * 0.02
    q, s = quantize_weight(w, 4, 64)
    qw, s = pack_int4(q).to(dev), s.to(dev)
    x = torch.randn(2, 3072, generator=g).to(dev, torch.bfloat16)
    wb = w.to(dev, torch.bfloat16)
    rows = []
    for name, fn in (("w4a16 bf16 F.linear", lambda: torch.nn.functional.linear(x, wb)),
                     ("w4a16 Triton (codegen/w4a16.py)", lambda: run_w4a16(x, qw, s, 64)),
                     ("w4a16 dequantize + fp32 matmul (old fallback)",
                      lambda: torch.nn.functional.linear(x.float(), dequantize_weight(qw, s, 64, 4)))):
        try:
            rows.append({"variant": name, "shape": [2, 3072, 18432], "ms": bench(fn)})
        except Exception as e:  # noqa: BLE001
            rows.append({"variant": name, "error": repr(e)[:300]})
        print(rows[-1], flush=True)
    return rows


def triton_env() -> dict:
    """Compiler switches set for this run (``DISABLE_MMA_V3=1``: Triton lowers tl.dot to
    Ampere-style mma.sync instead of Hopper wgmma; see docs/kernels.md)."""
    return {k: os.environ[k] for k in ("DISABLE_MMA_V3",) if k in os.environ}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--m", type=int, default=4608)
    ap.add_argument("--k", type=int, default=3072)
    ap.add_argument("--n", type=int, default=3072)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_diag: needs CUDA")
        return 0
    from triton.testing import do_bench

    from svdq_compile.codegen.autotune import gemm_candidates
    from svdq_compile.codegen.gemm import run_gemm
    from svdq_compile.codegen.call_spec import make_spec
    from svdq_compile.codegen.prologue import run_prologue
    from svdq_compile.runtime import pack_int4, quantize_weight

    m, k, n = args.m, args.k, args.n
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
    w = torch.randn(n, k, generator=g)
    flops = 2 * m * n * k
    rows = []
    wb = w.to(dev, torch.bfloat16)
    ms = do_bench(lambda: torch.nn.functional.linear(x, wb), warmup=10, rep=50, return_mode="median")
    rows.append({"variant": "bf16 F.linear", "ms": ms, "tops": flops / ms / 1e9})
    rows += w4a16_rows(dev, lambda fn: do_bench(fn, warmup=5, rep=30, return_mode="median"))
    for r in ceiling_rows(m, k, n, dev, lambda fn: do_bench(fn, warmup=5, rep=30, return_mode="median")):
        rows.append(r)
        print(r, flush=True)
    for wbits, abits in ((4, 4), (8, 8), (4, 8)):
        q, s = quantize_weight(w, wbits, 64)
        qw = (pack_int4(q) if wbits == 4 else q).to(dev)
        s = s.to(dev)
        spec = make_spec(x, None, None, None, None, None, 64, wbits, abits, False, "none", "ieee")
        qa, sa, h = run_prologue(x, None, None, spec, 0.0)
        for cfg in gemm_candidates(m, n, k):
            try:
                run_gemm(qa, sa, qw, s, None, None, None, None, None, spec, (m,), config=cfg)
                torch.cuda.synchronize()
                ms = do_bench(lambda: run_gemm(qa, sa, qw, s, None, None, None, None, None, spec, (m,), config=cfg),
                              warmup=5, rep=30, return_mode="median")
                rows.append({"variant": f"gemm w{wbits}a{abits}", "config": str(cfg), "ms": ms, "tops": flops / ms / 1e9})
            except Exception as e:  # record, keep going
                rows.append({"variant": f"gemm w{wbits}a{abits}", "config": str(cfg), "error": repr(e)[:300]})
            print(rows[-1], flush=True)
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "shape": [m, k, n], "triton_env": triton_env(), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(f"{args.out}/gpu_diag.json", "w") as f:
        json.dump(info, f, indent=1)
    for r in rows:
        print(f"{r['variant']:16s} {r.get('config', ''):60s} {r.get('ms', float('nan')):8.3f} ms {r.get('tops', 0):8.1f} TOPS {r.get('error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU diagnosis of the W4A4 GEMM: every launch config, W4A4 vs W8A8, vs bf16 (one shape).

Answers where the time goes (nibble unpacking vs the per-group rescale vs tiling):
W8A8 feeds tl.dot straight from memory, W4A4 unpacks nibbles in registers first.
    python benchmarks/gpu_diag.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


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
    import triton
    from triton.testing import do_bench

    from svdq_compile.codegen.autotune import gemm_candidates
    from svdq_compile.codegen.gemm import run_gemm
    from svdq_compile.codegen.linear import make_spec
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
            "shape": [m, k, n], "rows": rows}
    with open(f"{args.out}/gpu_diag.json", "w") as f:
        json.dump(info, f, indent=1)
    for r in rows:
        print(f"{r['variant']:16s} {r.get('config', ''):60s} {r.get('ms', float('nan')):8.3f} ms {r.get('tops', 0):8.1f} TOPS {r.get('error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

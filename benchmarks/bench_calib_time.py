"""Calibration (decomposition) time of FLUX-shaped linears on CPU, extrapolated to FLUX.1.

Issue 5 target: <= 60 s per (K=3072, N=12288) layer with 4096 calibration tokens on the
2-core CPU. Measures the full default pipeline for one layer group: statistics update,
(alpha, beta) search (39 candidates), final decomposition with refinement.

    python -m benchmarks.bench_calib_time [--quick]
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from svdq_compile import SVDQuantConfig
from svdq_compile.quant.stats import LayerStats
from svdq_compile.quant.decompose import LayerTarget, quantized_output, sqnr_db
from svdq_compile.quant.search import quantize_group

from .common import RESULTS, machine_info, write_json

# FLUX.1 linears per block as (N, K, count, siblings-share-one-search); AdaLN modulation
# (W4A16 by default) has no activation search: timed as a decomposition without search.
FLUX_DOUBLE = [  # x19
    ("qkv (img)", 3072, 3072, 3), ("to_out", 3072, 3072, 1), ("ff up", 12288, 3072, 1), ("ff down", 3072, 12288, 1),
    ("qkv (txt)", 3072, 3072, 3), ("to_add_out", 3072, 3072, 1), ("ff_context up", 12288, 3072, 1),
    ("ff_context down", 3072, 12288, 1),
]
FLUX_SINGLE = [  # x38: q, k, v and proj_mlp read the same norm output
    ("qkv+proj_mlp", 3072, 3072, 3), ("proj_mlp", 12288, 3072, 1), ("proj_out", 3072, 15360, 1),
]


def _layer(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = 64
    w = (torch.randn(n, r, generator=g) @ torch.randn(r, k, generator=g)) / math.sqrt(k * r) * 3
    return w + torch.randn(n, k, generator=g) * 0.02


def time_layer(n: int, k: int, tokens: int, cfg: SVDQuantConfig, siblings: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, k, generator=g)
    x[:, torch.randperm(k, generator=g)[: k // 100]] *= 30.0
    ws = [_layer(n, k, s) for s in range(siblings)]
    t0 = time.perf_counter()
    st = LayerStats(k, cfg.calib_tokens)
    for chunk in x.split(1024):  # e.g. 4 denoising steps of 1024 tokens
        st.update(chunk)
    t_stats = time.perf_counter() - t0
    packs = quantize_group(ws, [None] * siblings, st, LayerTarget(rank=cfg.rank, refine_iters=cfg.refine_iters), cfg)
    total = time.perf_counter() - t0
    xs = x[:512]
    sq = sqnr_db(xs.double() @ ws[0].double().t(), quantized_output(packs[0], xs))
    return {"N": n, "K": k, "siblings": siblings, "tokens": tokens, "seconds": total, "stats_s": t_stats,
            "alpha": packs[0].meta.get("alpha"), "sqnr_db": sq}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the K=3072, N=12288 layer")
    args = ap.parse_args(argv)
    cfg = SVDQuantConfig(calib_tokens=4096)
    shapes = [(12288, 3072, 1)] if args.quick else [(12288, 3072, 1), (3072, 3072, 3), (3072, 12288, 1), (3072, 15360, 1)]
    rows = []
    for n, k, sib in shapes:
        r = time_layer(n, k, 4096, cfg, sib)
        rows.append(r)
        print(f"N={n:6d} K={k:6d} siblings={sib}: {r['seconds']:7.1f} s  (alpha={r['alpha']}, SQNR {r['sqnr_db']:.1f} dB)",
              flush=True)
    by_shape = {(r["N"], r["K"], r["siblings"]): r["seconds"] for r in rows}

    def est(n, k, sib):
        if (n, k, sib) in by_shape:
            return by_shape[(n, k, sib)]
        ref = by_shape[(12288, 3072, 1)]  # scale by weight elements from the measured layer
        return ref * (n * k * sib) / (12288 * 3072)

    total = 19 * sum(est(n, k, s) for _, n, k, s in FLUX_DOUBLE) + 38 * sum(est(n, k, s) for _, n, k, s in FLUX_SINGLE)
    out = {"machine": machine_info(), "config": cfg.to_dict(), "rows": rows,
           "flux1_extrapolated_seconds": total,
           "note": "FLUX.1 transformer = 19 double + 38 single blocks; AdaLN modulation linears (W4A16, no "
                   "search) not included; unmeasured shapes scaled by weight elements from the 12288x3072 layer"}
    write_json("calib_time.json", out)
    print(f"extrapolated FLUX.1 transformer (19 double + 38 single blocks): {total / 60:.1f} min on this CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())

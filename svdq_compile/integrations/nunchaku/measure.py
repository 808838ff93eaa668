"""CPU timings of one imported layer at FLUX.1 width (the numbers of docs/nunchaku.md).

    python -m svdq_compile.integrations.nunchaku.measure [--k 3072] [--n 3072] [--m 256 1024]

A random W4A4 layer in Nunchaku's layout terms (INT4 codes, bf16 group scales, bf16
smoothing, rank 32) is run as the imported ``w4a4-nunchaku`` layer, re-targeted to our
``w4a4`` / ``w4a8-int8`` / ``w4a8-fp8``, and against fp32 ``F.linear``: the fastest of
``--repeat`` interleaved rounds after three warm-up rounds (the machine may be shared).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from svdq_compile.runtime import nunchaku_scheme as _scheme  # noqa: F401  (registers the schemes)
from svdq_compile.runtime.ops import linear_from_packed
from svdq_compile.runtime.packed import LinearSpec, PackedLinear
from svdq_compile.runtime.packing import pack_int4


def layers(n: int, k: int, rank: int = 32, seed: int = 0) -> dict[str, PackedLinear]:
    from svdq_compile.integrations.nunchaku.loader import _retarget
    from svdq_compile.integrations.nunchaku.checkpoint import Checkpoint

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    ws = (torch.rand(n, k // 64, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    smooth = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16)
    down = torch.randn(rank, k, generator=g) * 0.02
    up = (torch.randn(n, rank, generator=g) * 0.02).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    q = torch.where(codes > 7, codes.to(torch.int16) - 16, codes.to(torch.int16)).to(torch.int8)
    spec = LinearSpec(k, n, rank=rank, scheme="nunchaku")
    out = {"w4a4-nunchaku": PackedLinear(spec, pack_int4(q), ws, smooth, down, up, bias)}
    ck = Checkpoint(path=None, tensors={})  # type: ignore[arg-type]
    groups = torch.zeros(k // 64, dtype=torch.int8)
    for mode in ("w4a4", "w4a8-int8", "w4a8-fp8"):
        out[mode] = _retarget(codes, ws, bias, smooth, down, up, groups, k, n, 64, mode, ck, "bench", {})
    return out


def _interleaved(fns: dict, repeat: int, warmup: int = 3) -> dict[str, float]:
    """Fastest of ``repeat`` rounds, each round calling every variant once (after ``warmup``
    rounds: glibc serves the first large allocations from fresh pages, several times slower)."""
    best = {k: float("inf") for k in fns}
    for r in range(warmup + repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=3072)
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--m", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args(argv)
    ls = layers(args.n, args.k)
    w = ls["w4a4"].effective_weight()
    print(f"K={args.k} N={args.n}, torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call (x fp32)")
    for m in args.m:
        x = torch.randn(m, args.k)
        fns = {"fp32": lambda: F.linear(x, w)}
        fns.update({name: (lambda p=p: linear_from_packed(x, p)) for name, p in ls.items()})
        with torch.no_grad():
            t = _interleaved(fns, args.repeat)
        base = t.pop("fp32")
        print(f"  M={m}: fp32 {base * 1e3:.1f}, " + ", ".join(f"{k} {v * 1e3:.1f} ({base / v:.2f}x)" for k, v in t.items()))


if __name__ == "__main__":
    main()

"""The demo's sampling speed, steady state: fp32 vs the quantized rows, interleaved.

``svdq demo`` times each row's 20 sampling steps one row after another, so on a shared
machine a load change between rows moves the ratio. This script compiles every variant
first (same calibration and options as the demo), then times one model call at the
sampling batch shape (``2B`` = both CFG branches) round-robin over the variants, and
reports each variant's median s/step and its ratio to eager fp32 from the same rounds.

    python -m benchmarks.bench_demo_speed [--isa avx2] [--repeats 9] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

DEFAULT_VARIANTS = (
    "fp32",
    "SVDQuant W4A4 (rank 32)",
    "SVDQuant W4A4 (rank 4)",
    "SVDQuant W4A8-INT8 (rank 32)",
    "SVDQuant W4A8-INT8 (rank 4)",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isa", default=None, help="force the CPU kernels' ISA (sets $SVDQ_CPU_ISA)")
    ap.add_argument("--repeats", type=int, default=9, help="rounds over all variants (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo's default is 1)")
    ap.add_argument("--inductor-fp32", action="store_true", help="also time fp32 under torch.compile (Inductor)")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args()
    if args.isa:
        os.environ["SVDQ_CPU_ISA"] = args.isa

    from svdq_compile.demo.run import VARIANTS, DemoOptions, _record_calibration_inputs, compile_variant
    from svdq_compile.demo.model import NULL_LABEL, load_pretrained
    from svdq_compile.runtime import cpu_gemm

    torch.set_num_threads(args.threads)
    opts = DemoOptions(progress=False)
    labels = torch.arange(10).repeat_interleave(opts.samples_per_class)  # [B]
    both = torch.cat([torch.full_like(labels, NULL_LABEL), labels])  # [2B]
    x = torch.randn(len(both), 16, 4, generator=torch.Generator().manual_seed(0))  # [2B, 16, 4]
    t = torch.full((len(both),), 0.5)  # [2B]
    calib = _record_calibration_inputs(load_pretrained(), opts)

    fns = {}
    for name in DEFAULT_VARIANTS:
        model = load_pretrained()
        options = VARIANTS[name]
        if options is None:
            fns[name] = model
            if args.inductor_fp32:
                fns["fp32 (Inductor)"] = torch.compile(load_pretrained())
            continue
        fns[name] = compile_variant(model, options, calib, opts)

    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():  # compile / quantize, then one warm call
            fn(x, t, both)
            fn(x, t, both)
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x, t, both)
                times[name].append(time.perf_counter() - t0)

    base = statistics.median(times["fp32"])
    rows = {}
    print(f"CPU kernels: {cpu_gemm.active_isa()}; threads {args.threads}; batch {len(both)}; "
          f"median of {args.repeats} interleaved rounds")
    print(f"{'variant':30s} {'s/step':>8s} {'min':>8s} {'vs fp32':>8s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"s_per_step": med, "min": min(ts), "max": max(ts), "speedup_vs_fp32": base / med}
        print(f"{name:30s} {med:8.3f} {min(ts):8.3f} {base / med:7.2f}x")
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": platform.processor() or platform.machine(),
                "isa": cpu_gemm.active_isa(), "threads": args.threads, "batch": len(both),
                "repeats": args.repeats, "torch": torch.__version__, "load_avg": os.getloadavg()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

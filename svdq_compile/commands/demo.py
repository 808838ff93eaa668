"""``svdq demo``: quantize the bundled digits diffusion model and compare the images."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="quantize the bundled digits model, write grid.png / report.md / metrics.json")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--samples-per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-inductor", action="store_true", help="run the rewritten graph eagerly")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: this model's ops are tiny, and extra threads "
                        "only add synchronisation cost)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from svdq_compile.demo.run import DemoOptions, run_demo

    torch.set_num_threads(max(1, args.threads))
    opts = DemoOptions(samples_per_class=args.samples_per_class, steps=args.steps, guidance=args.guidance,
                       seed=args.seed, use_inductor=not args.no_inductor)
    m = run_demo(args.out, opts)
    print(f"classifier held-out accuracy on real digits: {m['classifier_heldout_accuracy']:.3f}")
    print(f"{'variant':30s} {'accuracy':>8s} {'PSNR dB':>8s} {'SSIM':>6s} {'bytes':>10s} {'s/step':>7s}")
    for name, r in m["variants"].items():
        ps = "-" if r.get("psnr_db") is None else f"{r['psnr_db']:.2f}"
        ss = "-" if r.get("ssim") is None else f"{r['ssim']:.3f}"
        print(f"{name:30s} {r['accuracy']:8.3f} {ps:>8s} {ss:>6s} {r['total_bytes']:10,d} {r['s_per_step']:7.3f}")
    print(f"wrote {args.out}/grid.png, {args.out}/report.md, {args.out}/metrics.json")
    return 0

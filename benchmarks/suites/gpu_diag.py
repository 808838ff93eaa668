"""Suite ``gpu_diag``: GPU diagnosis of the W4A4 GEMM: every launch config, W4A4 vs W8A8 vs
W4A8, vs bf16 (one shape).

Answers where the time goes (nibble unpacking vs the per-group rescale vs tiling):
W8A8 feeds tl.dot straight from memory, W4A4 unpacks nibbles in registers first, and the
int8 ceilings (cuBLAS ``torch._int_mm`` and a plain Triton int8 GEMM, both without the
per-group rescale) show what the rescale costs. Also the AdaLN-shaped weight-only layer
(Triton W4A16 vs the old dequantize + matmul fallback vs bf16). ``DISABLE_MMA_V3=1`` in the
environment is recorded (``triton_env``): Triton then lowers tl.dot to mma.sync.

    svdq bench --suite gpu_diag --device cuda [--param m=4608 --param k=3072 --param n=3072]
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from .baselines import Unavailable
from .harness import Context
from .timing import time_kernel

__all__ = ["run", "to_markdown", "plot", "PARAMS", "ceiling_rows", "w4a16_rows", "triton_env"]

PARAMS = {"m": 4608, "k": 3072, "n": 3072}


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
    from .gpu_diag_int8 import run_int8 as run

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
    return rows


def triton_env() -> dict:
    """Compiler switches set for this run (``DISABLE_MMA_V3=1``: Triton lowers tl.dot to
    Ampere-style mma.sync instead of Hopper wgmma; see docs/kernels.md)."""
    return {k: os.environ[k] for k in ("DISABLE_MMA_V3",) if k in os.environ}


def _bench(device: str, warmup_ms: int = 5, rep_ms: int = 30) -> Callable[[Callable[[], Any]], float]:
    return lambda fn: time_kernel(fn, device, rep_ms=rep_ms, warmup_ms=warmup_ms)


def run(ctx: Context, tqdm: Any) -> None:
    if ctx.device != "cuda":
        raise Unavailable("needs a CUDA GPU")
    from svdq_compile.codegen.autotune import gemm_candidates
    from svdq_compile.codegen.call_spec import make_spec
    from svdq_compile.codegen.gemm import run_gemm
    from svdq_compile.codegen.prologue import run_prologue
    from svdq_compile.runtime import pack_int4, quantize_weight

    m, k, n = ctx.params["m"], ctx.params["k"], ctx.params["n"]
    dev = "cuda"
    ctx.extra.update(gpu=torch.cuda.get_device_name(), shape=[m, k, n], triton_env=triton_env())
    bar = tqdm(desc="bench gpu_diag", disable=not ctx.progress)

    def record(row: dict) -> None:
        ctx.record({"case": f"{row['variant']} {row.get('config', '')}".strip(), **row})
        bar.update(1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
    w = torch.randn(n, k, generator=g)
    flops = 2 * m * n * k
    wb = w.to(dev, torch.bfloat16)
    ms = _bench(dev, 10, 50)(lambda: torch.nn.functional.linear(x, wb))
    record({"variant": "bf16 F.linear", "ms": ms, "tops": flops / ms / 1e9})
    for r in w4a16_rows(dev, _bench(dev)) + ceiling_rows(m, k, n, dev, _bench(dev)):
        record(r)
    for wbits, abits in ((4, 4), (8, 8), (4, 8)):
        q, s = quantize_weight(w, wbits, 64)
        qw = (pack_int4(q) if wbits == 4 else q).to(dev)
        s = s.to(dev)
        spec = make_spec(x, None, None, None, None, None, 64, wbits, abits, False, "none", "ieee")
        qa, sa, h = run_prologue(x, None, None, spec, 0.0)
        for cfg in gemm_candidates(m, n, k):
            if ctx.out_of_time():
                record({"variant": f"gemm w{wbits}a{abits}", "config": str(cfg), "error": "n/a (skipped: time budget)"})
                continue
            try:
                run_gemm(qa, sa, qw, s, None, None, None, None, None, spec, (m,), config=cfg)
                torch.cuda.synchronize()
                ms = _bench(dev)(lambda: run_gemm(qa, sa, qw, s, None, None, None, None, None, spec, (m,), config=cfg))
                record({"variant": f"gemm w{wbits}a{abits}", "config": str(cfg), "ms": ms, "tops": flops / ms / 1e9})
            except Exception as e:  # record, keep going
                record({"variant": f"gemm w{wbits}a{abits}", "config": str(cfg), "error": repr(e)[:300]})
    bar.close()


def _rows(p: dict) -> list[dict]:
    return p.get("rows", [])


def to_markdown(p: dict) -> str:
    from .report import footer, header

    env = p.get("triton_env") or {}
    lines = header(p, f"GPU GEMM diagnosis: {p.get('gpu')}, M/K/N = {'/'.join(map(str, p.get('shape', [])))}"
                      + (f" ({', '.join(f'{k}={v}' for k, v in env.items())})" if env else ""))
    lines += ["Median ms (do_bench); TOPS = 2 M N K / t.", "", "| variant | config | ms | TOPS | note |",
              "|---|---|---|---|---|"]
    for r in _rows(p):
        ms = "-" if r.get("ms") is None else f"{r['ms']:.3f}"
        tops = "-" if r.get("tops") is None else f"{r['tops']:.1f}"
        note = r.get("error", "")[:120] or ("" if r.get("exact_vs_int_mm") in (None, True) else "NOT exact vs _int_mm")
        lines.append(f"| {r['variant']} | {r.get('config', '')} | {ms} | {tops} | {note} |")
    return "\n".join(lines + footer(p)) + "\n"


def plot(p: dict, path: Path) -> bool:
    from .report import pyplot, save_figure

    plt = pyplot()
    rows = [r for r in _rows(p) if r.get("tops")]
    if plt is None or not rows:
        return False
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.25 * len(rows))))
    ax.barh(range(len(rows)), [r["tops"] for r in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['variant']} {r.get('config', '')}"[:70] for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set(xlabel="TOPS", title=f"{p.get('gpu')}: GEMM variants and launch configs")
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)

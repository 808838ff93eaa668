"""Kernel benchmark: fused W4A4 SVDQuant linear vs BF16, INT8 ``_int_mm`` and unfused variants.

    python benchmarks/bench_kernels.py --out benchmarks/results

GPU only (exits with a message on CPU). FLUX.1 linear shapes: M (tokens) in
{4608, 1024, 256} x (K, N) in {(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)},
bf16 input/output, group 64, rank 32, bias; smoothing folded into the producer (as in
deployment), so the prologue does not divide by lambda.

Variants (all time the whole call, median of ``triton.testing.do_bench``):
  bf16          F.linear(x, W, b) in bf16 (cuBLAS)
  int8_gemm     torch._int_mm alone on pre-quantized operands (per-row/col scales)
  int8_e2e      eager per-token int8 quantization + _int_mm + rescale + bias
  fused         our prologue + W4A4 GEMM with the rank-32 branch and bias fused
  fused_ieee    same, low-rank branch in exact fp32 (CUDA cores) instead of tf32x3
  rank0         our W4A4 prologue + GEMM without the low-rank branch (and no bias)
  unfused       rank0 + the low-rank branch, bias as separate torch ops (re-reads X, Y)
  prologue      the fused prologue kernel alone; gemm: the fused GEMM kernel alone
TFLOP/s is 2*M*N*K / t for every variant (the low-rank flops are not counted).
bf16, fused and rank0 are also timed replayed from a CUDA graph ("ms_cudagraph"): at
small M the eager time is dominated by Python and kernel-launch overhead.

Robustness: every (shape, variant) is timed inside try/except and failures are recorded;
results are written after each shape, and a time budget (``--budget-s``) stops starting
new shapes so a single GPU session always ends with a JSON file.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

M_LIST = (4608, 1024, 256)
KN_LIST = ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072))
RANK = 32
GROUP = 64
# Variants also timed as CUDA-graph replays (isolates GPU time from launch overhead).
GRAPH_VARIANTS = ("bf16", "fused", "rank0")

# Dense (no sparsity) peaks in TOP/s (int8) and TFLOP/s (bf16), by GPU name fragment.
PEAKS = (
    ("H100 PCIe", 1513.0, 756.0),
    ("H100 NVL", 1671.0, 835.0),
    ("H100", 1979.0, 989.0),  # SXM ("H100 80GB HBM3")
    ("H800", 1979.0, 989.0),
    ("H200", 1979.0, 989.0),
    ("H20", 296.0, 148.0),
    ("A100", 624.0, 312.0),
    ("L40S", 733.0, 362.0),
    ("4090", 660.6, 165.2),
)


def peaks_for(name: str) -> tuple[Optional[float], Optional[float]]:
    for frag, i8, bf in PEAKS:
        if frag in name:
            return i8, bf
    return None, None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    err = (y - ref).norm()
    return float("inf") if err == 0 else float(20 * torch.log10(ref.norm() / err))


# ----------------------------------------------------------------------------- layers
class Layer:
    """Random FLUX-like layer with its bf16, int8 and W4A4 forms (built once per (K, N))."""

    def __init__(self, k: int, n: int, dev: torch.device) -> None:
        from svdq_compile.runtime.packing import pack_int4
        from svdq_compile.runtime.quantize import quantize_weight

        g = torch.Generator(device="cpu").manual_seed(k * 7 + n)
        w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dev)  # [N, K] fp32
        self.w_bf16 = w.to(torch.bfloat16)
        self.bias = (torch.randn(n, generator=g) * 0.02).to(dev, torch.bfloat16)
        # SVDQuant parts: rank-32 branch (randomised SVD: a full SVD of 3072 x 15360 takes
        # seconds and the timings do not depend on it), residual in int4 groups of 64.
        u, s, v = torch.svd_lowrank(w, q=RANK + 8, niter=2)
        self.lora_up = (u[:, :RANK] * s[:RANK]).to(torch.bfloat16).contiguous()  # [N, r]
        self.lora_down = v[:, :RANK].t().to(torch.bfloat16).contiguous()  # [r, K]
        resid = w - self.lora_up.float() @ self.lora_down.float()
        q, ws = quantize_weight(resid, 4, GROUP)
        self.qweight = pack_int4(q).contiguous()  # [N, K/2] int8
        self.wscales = ws.contiguous()  # [N, K/G] fp16
        # int8 per-output-channel weights for the _int_mm baseline: B = Wq^T, column-major.
        w_s = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0  # [N]
        self.w_i8_t = torch.round(w / w_s[:, None]).clamp(-128, 127).to(torch.int8).t()  # [K, N]
        self.w_i8_scale = w_s.float()
        del u, s, v, resid, q, w


def int8_quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (int8 [M, K], fp32 per-row scale [M, 1]): the int8 baseline's quantizer."""
    xf = x.float()
    s = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
    return torch.round(xf / s).clamp_(-128, 127).to(torch.int8), s


# ------------------------------------------------------------------------- variants
def _tuned(spec, m: int, n: int, k: int, dev: torch.device):
    """The (prologue, GEMM) configs autotuning chose for ``spec`` at this shape (or defaults)."""
    from svdq_compile.codegen.autotune import (
        GemmConfig, PrologueConfig, device_name, gemm_candidates, m_bucket, prologue_candidates,
    )
    from svdq_compile.codegen.cache import make_key, tune_cache

    c = tune_cache()
    p = c.get(make_key("prologue", spec.key(), m_bucket(m), 0, k, device_name(dev)))
    g = c.get(make_key("gemm", spec.key(), m_bucket(m), n, k, device_name(dev)))
    return (PrologueConfig(**p) if p else prologue_candidates(m, k)[0],
            GemmConfig(**g) if g else gemm_candidates(m, n, k)[0])


def make_variants(x: torch.Tensor, L: Layer) -> dict[str, Callable[[], Any]]:
    """name -> zero-arg callable computing the layer output (or the timed sub-step)."""
    from dataclasses import replace

    from svdq_compile.codegen.gemm import run_gemm
    from svdq_compile.codegen.call_spec import make_spec
    from svdq_compile.codegen.linear import quantized_linear_triton
    from svdq_compile.codegen.prologue import run_prologue
    from benchmarks.suites.unfused import unfused_quantized_linear

    m, k = x.shape
    n = L.qweight.shape[0]
    dev = x.device
    qx, _ = int8_quant_rows(x)
    spec = make_spec(x, None, L.lora_down, L.bias, None, None, GROUP, 4, 4, False, "none")
    spec_ieee = replace(spec, lora_precision="ieee")
    state: dict[str, Any] = {}

    def fused():
        return quantized_linear_triton(
            x, L.qweight, L.wscales, None, L.lora_down, L.lora_up, L.bias, None, None,
            GROUP, 4, 4, False, 0.0, "none",
        )

    def fused_ieee():
        # Same tile configs as "fused" (no separate tuning: isolates the precision cost).
        if "cfg" not in state:
            state["cfg"] = _tuned(spec, m, n, k, dev)
        pc, gc = state["cfg"]
        qa, sa, h = run_prologue(x, None, L.lora_down, spec_ieee, config=pc)
        return run_gemm(qa, sa, L.qweight, L.wscales, h, L.lora_up, L.bias, None, None,
                        spec_ieee, (m,), config=gc)

    def gemm_only():
        if "pro" not in state:  # prologue outputs, computed once (tuned like "fused")
            state["pro"] = run_prologue(x, None, L.lora_down, spec)
        qa, sa, h = state["pro"]
        return run_gemm(qa, sa, L.qweight, L.wscales, h, L.lora_up, L.bias, None, None, spec, (m,))

    return {
        "bf16": lambda: F.linear(x, L.w_bf16, L.bias),
        "int8_gemm": lambda: torch._int_mm(qx, L.w_i8_t),
        "int8_e2e": lambda: _int8_e2e(x, L),
        "fused": fused,
        "fused_ieee": fused_ieee,
        "rank0": lambda: quantized_linear_triton(
            x, L.qweight, L.wscales, None, None, None, None, None, None,
            GROUP, 4, 4, False, 0.0, "none",
        ),
        "unfused": lambda: unfused_quantized_linear(
            x, L.qweight, L.wscales, None, L.lora_down, L.lora_up, L.bias, None, None,
            GROUP, 4, 4, False, 0.0, "none",
        ),
        "prologue": lambda: run_prologue(x, None, L.lora_down, spec),
        "gemm": gemm_only,
    }


def _int8_e2e(x: torch.Tensor, L: Layer) -> torch.Tensor:
    q, s = int8_quant_rows(x)
    acc = torch._int_mm(q, L.w_i8_t)  # [M, N] int32
    return (acc.float() * s * L.w_i8_scale[None, :] + L.bias.float()).to(torch.bfloat16)


# ------------------------------------------------------------------------------ main
def correctness(dev: torch.device, shape: tuple[int, int, int] = (1024, 3072, 3072)) -> dict[str, Any]:
    """One shape against the float64 reference (the spec that is timed: bias, no activation)."""
    from svdq_compile.codegen.linear import quantized_linear_triton
    from benchmarks.suites.unfused import unfused_quantized_linear
    from svdq_compile.runtime.reference import quantized_linear_reference

    m, k, n = shape
    L = Layer(k, n, dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
    args = (x, L.qweight, L.wscales, None, L.lora_down, L.lora_up, L.bias, None, None,
            GROUP, 4, 4, False, 0.0, "none")
    ref = quantized_linear_reference(*args[:9], group_size=GROUP)
    out: dict[str, Any] = {"shape": [m, k, n]}
    out["sqnr_fused_vs_reference_db"] = sqnr_db(quantized_linear_triton(*args), ref)
    out["sqnr_unfused_vs_reference_db"] = sqnr_db(unfused_quantized_linear(*args), ref)
    # fp32 in/out with exact fp32 low-rank: everything but fp32 summation order is exact.
    old = os.environ.get("SVDQ_AUTOTUNE")
    os.environ["SVDQ_AUTOTUNE"] = "0"  # a one-off spec: skip tuning (compile time)
    try:
        ref32 = quantized_linear_reference(x.float(), *args[1:9], group_size=GROUP)
        y32 = quantized_linear_triton(x.float(), *args[1:], lora_precision="ieee")
        out["rel_err_fp32_io_vs_reference"] = float((y32.double() - ref32.double()).norm() / ref32.double().norm())
    finally:
        if old is None:
            os.environ.pop("SVDQ_AUTOTUNE", None)
        else:
            os.environ["SVDQ_AUTOTUNE"] = old
    # Quantization error of W4A4 SVDQuant itself on this random layer (vs the bf16 layer).
    out["sqnr_w4a4_vs_bf16_layer_db"] = sqnr_db(ref, F.linear(x, L.w_bf16, L.bias))
    out["ok"] = bool(out["sqnr_fused_vs_reference_db"] > 40 and out["rel_err_fp32_io_vs_reference"] < 1e-5)
    return out


def _wall_clock_once(fn: Callable[[], Any], warmup: int = 0, rep: int = 0,
                     return_mode: str = "median") -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="directory for the JSON result")
    ap.add_argument("--budget-s", type=float, default=210.0,
                    help="stop starting new shapes after this many seconds (default 210)")
    ap.add_argument("--m", type=int, nargs="*", default=list(M_LIST), help="token counts")
    ap.add_argument("--variants", nargs="*", default=None, help="subset of variants to time")
    ap.add_argument("--rep-ms", type=int, default=50, help="do_bench rep (ms) per variant")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="check this script's logic without a GPU: tiny shapes, Triton interpreter")
    args = ap.parse_args()

    smoke = args.smoke_cpu
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        os.environ.setdefault("SVDQ_CACHE_DIR", "")
        args.no_graphs = True
    elif not torch.cuda.is_available():
        print("bench_kernels.py: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "nothing to benchmark on CPU.", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_INTERPRET", "0")
    t_start = time.time()
    import triton
    from triton.testing import do_bench_cudagraph

    if smoke:
        do_bench = _wall_clock_once  # no CUDA events on CPU: one timed call
    else:
        from triton.testing import do_bench

    import svdq_compile.codegen as codegen
    from svdq_compile.codegen.cache import tune_cache

    codegen.install()
    dev = torch.device("cpu" if smoke else "cuda")
    name = "cpu-smoke (Triton interpreter)" if smoke else torch.cuda.get_device_name(dev)
    m_list = [32] if smoke else args.m
    kn_list = ((128, 96),) if smoke else KN_LIST
    peak_i8, peak_bf16 = peaks_for(name)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"kernels_{slug(name)}.json"
    report: dict[str, Any] = {
        "gpu": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "peak_int8_tops": peak_i8,
        "peak_bf16_tflops": peak_bf16,
        "setup": {"rank": RANK, "group_size": GROUP, "dtype": "bfloat16", "bias": True,
                  "smooth": "folded (none in kernel)", "lora_precision_default": "tf32x3",
                  "timing": "triton.testing.do_bench median, autotune + compile excluded"},
        "results": [],
        "errors": [],
    }

    def save() -> None:
        report["elapsed_s"] = round(time.time() - t_start, 1)
        report["autotune"] = tune_cache().entries()
        out_path.write_text(json.dumps(report, indent=1, default=str))

    print(f"[bench] {name} torch {torch.__version__} triton {triton.__version__}", flush=True)
    try:
        report["correctness"] = correctness(dev, (24, 128, 96) if smoke else (1024, 3072, 3072))
        print(f"[bench] correctness: {report['correctness']}", flush=True)
    except Exception as e:  # noqa: BLE001
        report["correctness"] = {"ok": False, "error": repr(e), "trace": traceback.format_exc()[-2000:]}
        print(f"[bench] correctness check FAILED: {e!r}", flush=True)
    save()

    layers: dict[tuple[int, int], Layer] = {}
    stopped = False
    for m in m_list:
        for k, n in kn_list:
            if time.time() - t_start > args.budget_s:
                report["errors"].append({"shape": [m, k, n], "error": "skipped: time budget"})
                stopped = True
                continue
            t_shape = time.time()
            try:
                if (k, n) not in layers:
                    layers[(k, n)] = Layer(k, n, dev)
                L = layers[(k, n)]
                g = torch.Generator(device="cpu").manual_seed(m)
                x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
                variants = make_variants(x, L)
            except Exception as e:  # noqa: BLE001
                report["errors"].append({"shape": [m, k, n], "error": repr(e)})
                print(f"[bench] setup {m}x{k}x{n} failed: {e!r}", flush=True)
                continue
            names = args.variants or list(variants)
            row: dict[str, Any] = {"M": m, "K": k, "N": n, "variants": {}}
            outputs: dict[str, torch.Tensor] = {}
            for vname in names:
                fn = variants[vname]
                try:
                    # Warm-up: compiles and autotunes (excluded from timing).
                    res = fn()
                    if vname in ("fused", "unfused", "rank0", "bf16", "fused_ieee"):
                        outputs[vname] = res
                    if not smoke:
                        torch.cuda.synchronize()
                    ms = float(do_bench(fn, warmup=10, rep=args.rep_ms, return_mode="median"))
                    tflops = 2.0 * m * n * k / (ms * 1e-3) / 1e12
                    row["variants"][vname] = {
                        "ms": ms,
                        "tflops": tflops,
                        "frac_int8_peak": (tflops / peak_i8) if peak_i8 else None,
                    }
                    if vname in GRAPH_VARIANTS and not args.no_graphs:
                        # Same call replayed from a CUDA graph: GPU time without the
                        # Python/launch overhead that dominates small M.
                        try:
                            row["variants"][vname]["ms_cudagraph"] = float(
                                do_bench_cudagraph(fn, rep=20, return_mode="median"))
                        except Exception as e:  # noqa: BLE001
                            row["variants"][vname]["cudagraph_error"] = repr(e)[:300]
                except Exception as e:  # noqa: BLE001
                    row["variants"][vname] = {"error": repr(e)[:500]}
                    print(f"[bench] {m}x{k}x{n} {vname} failed: {e!r}", flush=True)
            t_bf16 = row["variants"].get("bf16", {}).get("ms")
            for v in row["variants"].values():
                if "ms" in v and t_bf16:
                    v["speedup_vs_bf16"] = t_bf16 / v["ms"]
            # Cheap per-shape consistency checks at the tuned configs.
            try:
                if "fused" in outputs and "unfused" in outputs:
                    row["sqnr_fused_vs_unfused_db"] = sqnr_db(outputs["fused"], outputs["unfused"])
                if "fused" in outputs and "bf16" in outputs:
                    row["sqnr_fused_vs_bf16_db"] = sqnr_db(outputs["fused"], outputs["bf16"])
            except Exception as e:  # noqa: BLE001
                row["check_error"] = repr(e)
            row["seconds"] = round(time.time() - t_shape, 1)
            report["results"].append(row)
            save()
            v = row["variants"]
            print(f"[bench] M={m} K={k} N={n}: " + " ".join(
                f"{kname}={vv['ms']:.3f}ms" for kname, vv in v.items() if "ms" in vv)
                + f" ({row['seconds']}s)", flush=True)
            del outputs, variants
    if stopped:
        print(f"[bench] time budget of {args.budget_s}s reached; some shapes skipped", flush=True)
    save()
    print_table(report)
    print(f"[bench] wrote {out_path} in {report['elapsed_s']}s", flush=True)
    return 0


def print_table(report: dict[str, Any]) -> None:
    cols = ("bf16", "int8_e2e", "fused", "rank0", "unfused", "prologue", "gemm")
    print()
    print(f"{report['gpu']}  (ms; fused: TFLOP/s, % of INT8 peak, speedup vs bf16)")
    hdr = f"{'M':>5} {'K':>6} {'N':>6} " + " ".join(f"{c:>9}" for c in cols) + "   fused TF/s  %i8pk  x bf16"
    print(hdr)
    print("-" * len(hdr))
    for r in report["results"]:
        v = r["variants"]
        cells = []
        for c in cols:
            ms = v.get(c, {}).get("ms")
            cells.append(f"{ms:9.3f}" if ms is not None else f"{'err' if c in v else '-':>9}")
        f = v.get("fused", {})
        extra = ""
        if "ms" in f:
            frac = f.get("frac_int8_peak")
            extra = (f"   {f['tflops']:10.1f}  {100 * frac:5.1f}" if frac else f"   {f['tflops']:10.1f}      -")
            extra += f"  {f.get('speedup_vs_bf16', float('nan')):6.2f}"
        print(f"{r['M']:>5} {r['K']:>6} {r['N']:>6} " + " ".join(cells) + extra)
    c = report.get("correctness", {})
    print(f"correctness ({c.get('shape')}): fused vs reference "
          f"{c.get('sqnr_fused_vs_reference_db', float('nan')):.1f} dB (bf16 io), "
          f"rel. err {c.get('rel_err_fp32_io_vs_reference', float('nan')):.2e} (fp32 io), ok={c.get('ok')}")
    if report["errors"]:
        print(f"{len(report['errors'])} shape errors/skips: see JSON")


if __name__ == "__main__":
    sys.exit(main())

"""Suite ``kernels``: fused W4A4 SVDQuant linear vs BF16, INT8 ``_int_mm`` and unfused variants (GPU).

    svdq bench --suite kernels --device cuda [--budget-s 150] [--param m=4608,1024]

GPU only (reported as not run without CUDA; ``--smoke`` on CPU checks the suite's logic
with tiny shapes under the Triton interpreter). FLUX.1 linear shapes: M (tokens) in
{4608, 1024, 256} x (K, N) in {(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)},
bf16 input/output, group 64, rank 32, bias; smoothing folded into the producer (as in
deployment), so the prologue does not divide by lambda.

Variants (all time the whole call, median of ``triton.testing.do_bench`` through
:func:`.timing.time_kernel`):
  bf16          F.linear(x, W, b) in bf16 (cuBLAS)
  int8_gemm     torch._int_mm alone on pre-quantized operands (per-row/col scales)
  int8_e2e      eager per-token int8 quantization + _int_mm + rescale + bias
  fused         our prologue + W4A4 GEMM with the rank-32 branch and bias fused
  fused_ieee    same, low-rank branch in exact fp32 (CUDA cores) instead of tf32x3
  rank0         our W4A4 prologue + GEMM without the low-rank branch (and no bias)
  unfused       rank0 + the low-rank branch, bias as separate torch ops (re-reads X, Y;
                benchmarks/suites/unfused.py)
  prologue      the fused prologue kernel alone; gemm: the fused GEMM kernel alone
TFLOP/s is 2*M*N*K / t for every variant (the low-rank flops are not counted).
bf16, fused and rank0 are also timed replayed from a CUDA graph ("ms_cudagraph"): at
small M the eager time is dominated by Python and kernel-launch overhead.

Robustness: every (shape, variant) is timed inside try/except and failures are recorded;
results are written after each shape, and once the suite's time budget is spent no new
shape is started (``n/a (skipped: time budget)``), so a single GPU session always ends
with a JSON file.
"""
from __future__ import annotations

import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from svdq_compile.quant.decompose import sqnr_db
import torch.nn.functional as F

from .baselines import Unavailable
from .harness import Context, env
from .timing import time_kernel

__all__ = ["run", "to_markdown", "plot", "PARAMS", "correctness", "make_variants", "peaks_for"]

M_LIST = (4608, 1024, 256)
PARAMS = {"m": M_LIST, "variants": ("all",), "rep_ms": 50, "graphs": True}
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
    from .unfused import unfused_quantized_linear

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
    from .unfused import unfused_quantized_linear
    from svdq_compile.runtime.reference import quantized_linear_reference

    m, k, n = shape
    L = Layer(k, n, dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
    args = (x, L.qweight, L.wscales, None, L.lora_down, L.lora_up, L.bias, None, None,
            GROUP, 4, 4, False, 0.0, "none")
    ref = quantized_linear_reference(*args[:9], group_size=GROUP)
    out: dict[str, Any] = {"shape": [m, k, n]}
    out["sqnr_fused_vs_reference_db"] = sqnr_db(ref, quantized_linear_triton(*args))
    out["sqnr_unfused_vs_reference_db"] = sqnr_db(ref, unfused_quantized_linear(*args))
    # fp32 in/out with exact fp32 low-rank: everything but fp32 summation order is exact.
    with env("SVDQ_AUTOTUNE", "0"):  # a one-off spec: skip tuning (compile time)
        ref32 = quantized_linear_reference(x.float(), *args[1:9], group_size=GROUP)
        y32 = quantized_linear_triton(x.float(), *args[1:], lora_precision="ieee")
        out["rel_err_fp32_io_vs_reference"] = float((y32.double() - ref32.double()).norm() / ref32.double().norm())
    # Quantization error of W4A4 SVDQuant itself on this random layer (vs the bf16 layer).
    out["sqnr_w4a4_vs_bf16_layer_db"] = sqnr_db(F.linear(x, L.w_bf16, L.bias), ref)
    out["ok"] = bool(out["sqnr_fused_vs_reference_db"] > 40 and out["rel_err_fp32_io_vs_reference"] < 1e-5)
    return out


def prepare(device: str, smoke: bool) -> None:
    """Called by the runner before anything else is imported: the CPU smoke run needs Triton's
    interpreter, which must be on before the first kernel is defined, and before
    ``torch._inductor`` is imported (its Triton helpers, defined compiled, break the interpreter)."""
    if device != "cuda" and smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("SVDQ_CACHE_DIR", "")


def run(ctx: Context, tqdm: Any) -> None:
    smoke = ctx.device != "cuda"
    if smoke and not ctx.smoke:
        raise Unavailable("needs a CUDA GPU (--smoke on CPU: the Triton interpreter on tiny shapes)")
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise Unavailable("the CPU smoke run needs TRITON_INTERPRET=1 from the start (svdq bench sets it)")
    import triton  # noqa: F401 - a clear error here when Triton is missing

    import svdq_compile.codegen as codegen
    from svdq_compile.codegen.cache import tune_cache

    codegen.install()
    dev = torch.device(ctx.device)
    name = "cpu-smoke (Triton interpreter)" if smoke else torch.cuda.get_device_name(dev)
    m_list = [32] if smoke else list(ctx.params["m"])
    kn_list = ((128, 96),) if smoke else KN_LIST
    graphs = ctx.params["graphs"] and not smoke
    peak_i8, peak_bf16 = peaks_for(name)
    ctx.extra.update({
        "gpu": name, "cuda": torch.version.cuda, "peak_int8_tops": peak_i8, "peak_bf16_tflops": peak_bf16,
        "setup": {"rank": RANK, "group_size": GROUP, "dtype": "bfloat16", "bias": True,
                  "smooth": "folded (none in kernel)", "lora_precision_default": "tf32x3",
                  "timing": "triton.testing.do_bench median, autotune + compile excluded"},
        "errors": [],
    })
    try:
        ctx.extra["correctness"] = correctness(dev, (24, 128, 96) if smoke else (1024, 3072, 3072))
    except Exception as e:  # noqa: BLE001
        ctx.extra["correctness"] = {"ok": False, "error": repr(e), "trace": traceback.format_exc()[-2000:]}
    ctx.extra["autotune"] = tune_cache().entries()
    ctx.save()

    layers: dict[tuple[int, int], Layer] = {}
    bar = tqdm(total=len(m_list) * len(kn_list), desc=f"bench kernels ({ctx.device})", disable=not ctx.progress)
    for m in m_list:
        for k, n in kn_list:
            bar.update(1)
            if ctx.out_of_time():
                ctx.extra["errors"].append({"shape": [m, k, n], "error": "n/a (skipped: time budget)"})
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
                ctx.extra["errors"].append({"shape": [m, k, n], "error": repr(e)})
                continue
            names = list(variants) if "all" in ctx.params["variants"] else list(ctx.params["variants"])
            row: dict[str, Any] = {"case": f"M={m} K={k} N={n}", "M": m, "K": k, "N": n, "variants": {}}
            outputs: dict[str, torch.Tensor] = {}
            for vname in names:
                bar.set_postfix_str(f"M={m} K={k} N={n} {vname}")
                try:
                    fn = variants[vname]
                    # Warm-up: compiles and autotunes (excluded from timing).
                    res = fn()
                    if vname in ("fused", "unfused", "rank0", "bf16", "fused_ieee"):
                        outputs[vname] = res
                    if not smoke:
                        torch.cuda.synchronize()
                    ms = time_kernel(fn, ctx.device, rep_ms=ctx.params["rep_ms"])
                    tflops = 2.0 * m * n * k / (ms * 1e-3) / 1e12
                    row["variants"][vname] = {"ms": ms, "tflops": tflops,
                                              "frac_int8_peak": (tflops / peak_i8) if peak_i8 else None}
                    if vname in GRAPH_VARIANTS and graphs:
                        # Same call replayed from a CUDA graph: GPU time without the
                        # Python/launch overhead that dominates small M.
                        try:
                            row["variants"][vname]["ms_cudagraph"] = time_kernel(fn, ctx.device, rep_ms=20,
                                                                                 cudagraph=True)
                        except Exception as e:  # noqa: BLE001
                            row["variants"][vname]["cudagraph_error"] = repr(e)[:300]
                except Exception as e:  # noqa: BLE001
                    row["variants"][vname] = {"error": repr(e)[:500]}
            t_bf16 = row["variants"].get("bf16", {}).get("ms")
            for v in row["variants"].values():
                if "ms" in v and t_bf16:
                    v["speedup_vs_bf16"] = t_bf16 / v["ms"]
            # Cheap per-shape consistency checks at the tuned configs.
            try:
                if "fused" in outputs and "unfused" in outputs:
                    row["sqnr_fused_vs_unfused_db"] = sqnr_db(outputs["unfused"], outputs["fused"])
                if "fused" in outputs and "bf16" in outputs:
                    row["sqnr_fused_vs_bf16_db"] = sqnr_db(outputs["bf16"], outputs["fused"])
            except Exception as e:  # noqa: BLE001
                row["check_error"] = repr(e)
            row["seconds"] = round(time.time() - t_shape, 1)
            ctx.extra["autotune"] = tune_cache().entries()
            ctx.record(row)
            del outputs, variants
    bar.close()
    if any("time budget" in e["error"] for e in ctx.extra["errors"]):
        ctx.note("time budget reached: some shapes skipped (see errors)")


_COLS = ("bf16", "int8_e2e", "fused", "rank0", "unfused", "prologue", "gemm")


def to_markdown(p: dict) -> str:
    from .report import footer, header, rows_of

    rows = rows_of(p, "results")  # "results": the file of benchmarks/bench_kernels.py
    lines = header(p, f"GPU kernels: {p.get('gpu')}")
    lines += [f"Median ms (do_bench); fused: TFLOP/s, % of the INT8 peak ({p.get('peak_int8_tops')} TOPS), speedup "
              "vs bf16; CUDA-graph replays in parentheses.", "",
              "| M | K | N | " + " | ".join(_COLS) + " | fused TFLOP/s | % int8 peak | fused x bf16 |",
              "|---|---|---|" + "---|" * (len(_COLS) + 3)]
    for r in rows:
        v = r["variants"]
        cells = []
        for c in _COLS:
            e = v.get(c, {})
            if "ms" in e:
                graph = f" ({e['ms_cudagraph']:.3f})" if e.get("ms_cudagraph") is not None else ""
                cells.append(f"{e['ms']:.3f}{graph}")
            else:
                cells.append("err" if c in v else "-")
        f = v.get("fused", {})
        frac = f.get("frac_int8_peak")
        extra = (f"{f['tflops']:.1f} | {100 * frac:.1f} | {f.get('speedup_vs_bf16', float('nan')):.2f}"
                 if "ms" in f and frac else (f"{f['tflops']:.1f} | - | {f.get('speedup_vs_bf16', float('nan')):.2f}"
                                             if "ms" in f else "- | - | -"))
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | " + " | ".join(cells) + f" | {extra} |")
    c = p.get("correctness", {})
    lines += ["", f"Correctness ({c.get('shape')}): fused vs reference "
                  f"{c.get('sqnr_fused_vs_reference_db', float('nan')):.1f} dB (bf16 io), rel. err "
                  f"{c.get('rel_err_fp32_io_vs_reference', float('nan')):.2e} (fp32 io), ok={c.get('ok')}"]
    if p.get("errors"):
        lines += ["", f"{len(p['errors'])} shape errors/skips: " + "; ".join(
            f"{e['shape']}: {e['error'][:80]}" for e in p["errors"])]
    return "\n".join(lines + footer(p)) + "\n"


def plot(p: dict, path: Path) -> bool:
    from .report import bar_chart, rows_of

    rows = rows_of(p, "results")
    series = {c: [r["variants"].get(c, {}).get("speedup_vs_bf16") for r in rows]
              for c in ("int8_e2e", "fused", "rank0", "unfused")}
    return bar_chart(path, [r.get("case") or f"M={r['M']} K={r['K']} N={r['N']}" for r in rows],
                     {k: v for k, v in series.items() if any(x is not None for x in v)},
                     title=f"{p.get('gpu')}: speedup vs bf16 F.linear", ylabel="x bf16")

"""Suite ``cpu_linear``: the CPU kernels' quantized linear (W4A4, rank-32 low-rank branch,
G=64) vs fp32 ``F.linear``, K = N = 3072, and the parts of the layer.

    svdq bench --suite cpu_linear [--isa avx2] [--param m=256,1024]

``--isa`` (or ``$SVDQ_CPU_ISA``) forces the kernels' ISA (amx, avx512_vnni, avx_vnni, avx2,
torch); the ISA of the run is in every row (``isa``) and in ``machine``.

"W4A4" is the whole layer (smoothing, W4A4 GEMM, rank-32 low-rank branch, bias) through
``quantized_linear_cpu``: fused C++ quantizer (+ low-rank down projection), cached prepared
weight, VNNI GEMM with the low-rank-up/bias epilogue. "W4A8pt" is the per-token
``w4a8-int8`` layer (8-bit per-token activations, one group spanning K; progressive
weights: UINT4 groups of 64 with integer scale / zero and a channel scale; the same rank-32
branch and bias): the fused quantizer with bits=8, group_size=K, then the grouped GEMM with
G == K (``prepare_weight_progressive``) and the fused epilogue, composed here from the
cpu_gemm calls that mode makes. fp32, W4A4 and W4A8pt are timed interleaved (the machine
may be shared: compare the ratios). The first call (which packs the weight, and builds the
C++ kernel if needed) is reported as ``first_call_ms``. "torch path" is the same call with
``SVDQ_CPU_GEMM=torch`` (the pure-torch fallback).

Parts (ms): fused_q = the fused quantizer (quantize_activation_fused incl. h = X' L2^T);
gemm/prep = the VNNI GEMM with a PreparedWeight (int8 activations); quant_act = the torch
quantize_activation; prep_i4 = prepare_weight from the packed int4 bytes (what the weight
cache saves per call). wbytes = fp32 weight bytes / packed bytes (int4 qweight + fp16 scales
+ fp32 low-rank + fp32 smooth).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .harness import Context, env
from .timing import time_interleaved, timed

__all__ = ["run", "to_markdown", "plot", "PARAMS", "DEVICE"]

DEVICE = "cpu"
DEFAULT_REPEATS = (3, 7)
PARAMS = {"m": (256, 1024, 4096), "k": 3072, "n": 3072}
QUICK_PARAMS = {"m": (256,)}
G, RANK = 64, 32


def _make_layer(n: int, k: int, gen: torch.Generator):
    from svdq_compile.runtime.packing import pack_int4
    from svdq_compile.runtime.quantize import quantize_weight

    w = torch.randn(n, k, generator=gen) / k**0.5
    smooth = torch.rand(k, generator=gen) + 0.5
    lora_down = torch.randn(RANK, k, generator=gen) / k**0.5
    lora_up = torch.randn(n, RANK, generator=gen) / RANK**0.5
    qw, wscales = quantize_weight(w * smooth, 4, G)  # [N, K] int8, [N, K/G] fp16
    qweight = pack_int4(qw)  # [N, K/2] int8
    packed_bytes = sum(t.numel() * t.element_size() for t in (qweight, wscales, lora_down, lora_up, smooth))
    return w, dict(qweight=qweight, wscales=wscales, smooth=smooth, lora_down=lora_down, lora_up=lora_up), packed_bytes


def _progressive(w_s: torch.Tensor, n: int, k: int):
    """The per-token INT8 mode's progressive weights (runtime/per_token.py's algorithm, restated:
    channel scale c = absmax / 119, UINT4 groups of G with integer scale s and zero z)."""
    from svdq_compile.runtime.packing import pack_int4

    c_pt = (w_s.abs().amax(dim=1) / 119).clamp_min(1e-12)
    q8 = torch.floor(w_s / c_pt[:, None] + 0.5).clamp_(-119, 119).view(n, k // G, G)
    mn, mx = q8.amin(dim=-1), q8.amax(dim=-1)
    s_pt = torch.clamp(torch.ceil((mx - mn) / 15.0), min=1.0)
    z_pt = torch.floor(-mn / s_pt + 0.5).clamp_(0, 15)
    u_pt = (torch.floor(q8 / s_pt[..., None] + 0.5) + z_pt[..., None]).clamp_(0, 15).view(n, k)
    return pack_int4((u_pt - 8).to(torch.int8)), s_pt.to(torch.int8), z_pt.to(torch.int8), c_pt


def _median(fn, repeats: int, warmup: int = 1) -> float:
    t = time_interleaved({"fn": fn}, "cpu", repeats=repeats, warmup=warmup)["fn"]
    if "error" in t:
        raise RuntimeError(t["error"])
    return t["median_ms"]


def run(ctx: Context, tqdm: Any) -> None:
    from svdq_compile.runtime import cpu_gemm
    from svdq_compile.runtime.quantize import quantize_activation
    from svdq_compile.runtime.torch_path import quantized_linear_cpu

    k, n = ctx.params["k"], ctx.params["n"]
    repeats = ctx.repeats
    gen = torch.Generator().manual_seed(0)
    w, layer, packed_bytes = _make_layer(n, k, gen)
    weight_ratio = w.numel() * 4 / packed_bytes
    fast, build_s = timed(cpu_gemm.fast_backend_available)  # builds / loads the kernel once
    isa = cpu_gemm.active_isa()
    kernel = isa if fast else "torch fallback"
    ctx.extra.update(backend=kernel, isa=isa, kernel_load_s=round(build_s, 3), group_size=G, rank=RANK)
    ctx.note(f"CPU kernels: {kernel} (load/build {build_s:.1f} s); threads {torch.get_num_threads()}; "
             f"median of {repeats} interleaved repeats")
    bias = torch.randn(n, generator=gen) * 0.1

    def qlinear(x):
        return quantized_linear_cpu(
            x, layer["qweight"], layer["wscales"], layer["smooth"], layer["lora_down"], layer["lora_up"],
            bias, None, None, G, 4, 4, False, 0.0, "none",
        )

    def qlinear_torch(x):
        with env(cpu_gemm.ENV_BACKEND, "torch"):
            return qlinear(x)

    qweight_pt, s_pt, z_pt, c_pt = _progressive(w * layer["smooth"], n, k)
    prep_pt = cpu_gemm.prepare_weight_progressive(qweight_pt, s_pt, z_pt, c_pt, G) if fast else None

    def qlinear_pt(x):
        q, sa, _, h = cpu_gemm.quantize_activation_fused(x, layer["smooth"], 8, k, biased=True,
                                                         lora_down=layer["lora_down"])
        return cpu_gemm.gemm_prepared_u8(q, sa, prep_pt.packed, n, k, h, layer["lora_up"], bias)

    bar = tqdm(total=len(ctx.params["m"]), desc="bench cpu_linear", disable=not ctx.progress)
    for m in ctx.params["m"]:
        x = torch.randn(m, k, generator=gen)
        first_ms = timed(lambda: qlinear(x))[1] * 1e3  # packs the weight (then cached on the qweight tensor)
        fns = {"fp32": lambda: F.linear(x, w, bias), "w4a4": lambda: qlinear(x)}
        if prep_pt is not None and prep_pt.packed is not None:
            fns["w4a8pt"] = lambda: qlinear_pt(x)
        t = time_interleaved(fns, "cpu", repeats=repeats, warmup=1)
        for name, v in t.items():
            if "error" in v:
                raise RuntimeError(f"{name}: {v['error']}")
        fp, q = t["fp32"]["median_ms"], t["w4a4"]["median_ms"]
        pt = t["w4a8pt"]["median_ms"] if "w4a8pt" in t else float("nan")
        sw = layer["wscales"].float()
        xs = x / layer["smooth"]
        qa, sa = quantize_activation(xs, 4, G)
        prep = cpu_gemm.prepare_weight(layer["qweight"], sw, G, weight_bits=4)
        ctx.record(dict(
            case=f"M={m}", M=m, K=k, N=n, isa=isa, fp32_linear_ms=fp, quantized_linear_ms=q, speedup=fp / q,
            per_token_linear_ms=pt, per_token_speedup=fp / pt,
            fp32_linear_min_ms=t["fp32"]["min_ms"], quantized_linear_min_ms=t["w4a4"]["min_ms"],
            fp32_linear_max_ms=t["fp32"]["max_ms"], quantized_linear_max_ms=t["w4a4"]["max_ms"],
            speedup_of_mins=t["fp32"]["min_ms"] / t["w4a4"]["min_ms"], first_call_ms=first_ms,
            torch_path_ms=_median(lambda: qlinear_torch(x), max(1, repeats // 3), warmup=0),
            fused_quantizer_ms=_median(lambda: cpu_gemm.quantize_activation_fused(
                x, layer["smooth"], 4, G, biased=True, lora_down=layer["lora_down"]), repeats),
            gemm_prepared_ms=_median(lambda: cpu_gemm.grouped_int_gemm(qa, sa, prep, None, G), repeats),
            quantize_activation_ms=_median(lambda: quantize_activation(xs, 4, G), max(1, repeats // 3)),
            prepare_from_int4_ms=_median(lambda: cpu_gemm.prepare_weight(layer["qweight"], sw, G, weight_bits=4),
                                         repeats),
            weight_bytes_ratio=weight_ratio,
        ))
        bar.update(1)
    bar.close()


_COLS = (("fp32 ms", "fp32_linear_ms", "{:.1f}"), ("W4A4 ms", "quantized_linear_ms", "{:.1f}"),
         ("ratio", "speedup", "{:.2f}"), ("ratio of mins", "speedup_of_mins", "{:.2f}"),
         ("W4A8pt ms", "per_token_linear_ms", "{:.1f}"), ("ratio", "per_token_speedup", "{:.2f}"),
         ("torch path ms", "torch_path_ms", "{:.1f}"), ("wbytes", "weight_bytes_ratio", "{:.2f}x"),
         ("fused_q", "fused_quantizer_ms", "{:.1f}"), ("gemm/prep", "gemm_prepared_ms", "{:.1f}"),
         ("quant_act", "quantize_activation_ms", "{:.1f}"), ("prep_i4", "prepare_from_int4_ms", "{:.1f}"))


def _cell(r: dict, key: str, fmt: str) -> str:
    v = r.get(key)
    return "-" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)


def to_markdown(p: dict) -> str:
    from .report import footer, header, rows_of

    rows = rows_of(p, "results")  # "results": the file of benchmarks/bench_cpu_linear.py
    m = p.get("machine", {})
    isa = p.get("isa") or m.get("isa") or m.get("backend") or m.get("cpu_isa")
    lines = header(p, f"CPU quantized linear vs fp32 F.linear (CPU kernels: {isa}"
                      f"{', --quick' if p.get('quick') else ''})")
    lines += ["Median ms per call; fp32 / W4A4 / W4A8pt interleaved in one loop; ratio = fp32 median / median. "
              "Parts after the first columns: see the suite's docstring (benchmarks/suites/cpu_linear.py).", "",
              "| M | K x N | isa | " + " | ".join(c for c, *_ in _COLS) + " |",
              "|---|---|---|" + "---|" * len(_COLS)]
    for r in rows:
        lines.append(f"| {r['M']} | {r['K']}x{r['N']} | {r.get('isa') or isa} | "
                     + " | ".join(_cell(r, key, fmt) for _, key, fmt in _COLS) + " |")
    return "\n".join(lines + footer(p)) + "\n"


def plot(p: dict, path: Path) -> bool:
    from .report import bar_chart, rows_of

    rows = rows_of(p, "results")
    cases = [f"M={r['M']}" for r in rows]
    return bar_chart(path, cases, {"W4A4": [r.get("speedup") for r in rows],
                                   "W4A8-INT8 per token": [r.get("per_token_speedup") for r in rows]},
                     title="CPU quantized linear: speedup vs fp32 F.linear, same run", ylabel="x fp32",
                     figsize=(7, 4), rotation=0)

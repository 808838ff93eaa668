"""CPU benchmark: quantized_linear_cpu (W4A4, rank-32 low-rank branch, G=64) vs fp32 F.linear.

Usage: python benchmarks/bench_cpu_linear.py [--quick] [--repeats N] [--isa ISA] [--out PATH]

``--isa`` (or ``$SVDQ_CPU_ISA``) forces the kernels' ISA (amx, avx512_vnni, avx_vnni, avx2,
torch); the ISA each run used is printed and recorded (``isa`` per row and in ``machine``).

Times are medians over repeats after a warm-up (the first call also builds the C++
kernel if needed; that is reported separately as ``first_call_ms``). Also reports the
grouped GEMM alone (VNNI kernel and the torch fallback) and the weight-bytes ratio
(fp32 weight bytes / packed bytes: int4 qweight + fp16 scales + fp32 low-rank + fp32 smooth).

"W4A8pt ms" is the per-token ``w4a8-int8`` layer (8-bit per-token activations, one group
spanning K; progressive weights: UINT4 groups of 64 with integer scale / zero and a channel
scale; the same rank-32 branch and bias): the fused quantizer with bits=8, group_size=K,
then the grouped GEMM with G == K (``prepare_weight_progressive``) and the fused epilogue,
composed here from the cpu_gemm calls that mode makes.

"W4A4 ms" is the whole layer (smoothing, W4A4 GEMM, rank-32 low-rank branch, bias)
through ``quantized_linear_cpu``: fused C++ quantizer (+ low-rank down projection),
cached prepared weight, VNNI GEMM with the low-rank-up/bias epilogue. "torch path" is
the same call with ``SVDQ_CPU_GEMM=torch`` (the pure-torch fallback). fp32 and W4A4 are
timed interleaved in the same loop (the machine may be shared: compare the ratio).

Columns after "|" (ms): fused_q = the fused quantizer (quantize_activation_fused incl.
h = X' L2^T); gemm/prep = the VNNI GEMM with a PreparedWeight (int8 activations);
quant_act = the torch quantize_activation; prep_i4 = prepare_weight from the packed
int4 bytes (what the weight cache saves per call).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from svdq_compile.runtime import cpu_gemm
from svdq_compile.runtime.torch_path import quantized_linear_cpu
from svdq_compile.runtime.packing import pack_int4
from svdq_compile.runtime.quantize import quantize_activation, quantize_weight

try:  # python -m benchmarks.bench_cpu_linear
    from .common import median_time
except ImportError:  # python benchmarks/bench_cpu_linear.py
    from common import median_time

G, RANK = 64, 32


def _median_ms(fn, repeats: int, warmup: int = 1) -> float:
    return median_time(fn, repeats=repeats, warmup=warmup)[0] * 1e3


def _interleaved_ms(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Time several callables round-robin (so load changes on a shared machine hit all of them)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append((time.perf_counter() - t0) * 1e3)
    return {name: dict(median=statistics.median(v), min=min(v)) for name, v in ts.items()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _make_layer(n: int, k: int, gen: torch.Generator):
    w = torch.randn(n, k, generator=gen) / k**0.5
    smooth = torch.rand(k, generator=gen) + 0.5
    lora_down = torch.randn(RANK, k, generator=gen) / k**0.5
    lora_up = torch.randn(n, RANK, generator=gen) / RANK**0.5
    qw, wscales = quantize_weight(w * smooth, 4, G)  # [N, K] int8, [N, K/G] fp16
    qweight = pack_int4(qw)  # [N, K/2] int8
    packed_bytes = sum(t.numel() * t.element_size() for t in (qweight, wscales, lora_down, lora_up, smooth))
    return w, dict(qweight=qweight, wscales=wscales, smooth=smooth, lora_down=lora_down, lora_up=lora_up), packed_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="M in {256} only, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--isa", default=None, help="force the CPU kernels' ISA (sets $SVDQ_CPU_ISA)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_linear.json"))
    args = ap.parse_args()
    if args.isa:
        os.environ[cpu_gemm.ENV_ISA] = args.isa
    ms = [256] if args.quick else [256, 1024, 4096]
    repeats = args.repeats or (3 if args.quick else 7)
    k = n = 3072
    gen = torch.Generator().manual_seed(0)
    w, layer, packed_bytes = _make_layer(n, k, gen)
    fp32_bytes = w.numel() * 4
    weight_ratio = fp32_bytes / packed_bytes

    t0 = time.perf_counter()
    fast = cpu_gemm.fast_backend_available()  # builds / loads the kernel once
    build_s = time.perf_counter() - t0
    isa = cpu_gemm.active_isa()

    bias = torch.randn(n, generator=gen) * 0.1

    def qlinear(x):
        return quantized_linear_cpu(
            x, layer["qweight"], layer["wscales"], layer["smooth"], layer["lora_down"], layer["lora_up"],
            bias, None, None, G, 4, 4, False, 0.0, "none",
        )

    def qlinear_torch(x):
        old = os.environ.get(cpu_gemm.ENV_BACKEND)
        os.environ[cpu_gemm.ENV_BACKEND] = "torch"
        try:
            return qlinear(x)
        finally:
            if old is None:
                del os.environ[cpu_gemm.ENV_BACKEND]
            else:
                os.environ[cpu_gemm.ENV_BACKEND] = old

    # Per-token INT8 layer with the mode's progressive weights (runtime/per_token.py's
    # algorithm, restated here: channel scale c = absmax / 119, UINT4 groups of G with
    # integer scale s and zero z), prepared directly (prepare_weight_progressive).
    w_s = w * layer["smooth"]
    c_pt = (w_s.abs().amax(dim=1) / 119).clamp_min(1e-12)
    q8 = torch.floor(w_s / c_pt[:, None] + 0.5).clamp_(-119, 119).view(n, k // G, G)
    mn, mx = q8.amin(dim=-1), q8.amax(dim=-1)
    s_pt = torch.clamp(torch.ceil((mx - mn) / 15.0), min=1.0)
    z_pt = torch.floor(-mn / s_pt + 0.5).clamp_(0, 15)
    u_pt = (torch.floor(q8 / s_pt[..., None] + 0.5) + z_pt[..., None]).clamp_(0, 15).view(n, k)
    qweight_pt = pack_int4((u_pt - 8).to(torch.int8))
    s_pt, z_pt = s_pt.to(torch.int8), z_pt.to(torch.int8)
    prep_pt = cpu_gemm.prepare_weight_progressive(qweight_pt, s_pt, z_pt, c_pt, G) if fast else None

    def qlinear_pt(x):
        q, sa, _, h = cpu_gemm.quantize_activation_fused(x, layer["smooth"], 8, k, biased=True,
                                                         lora_down=layer["lora_down"])
        return cpu_gemm.gemm_prepared_u8(q, sa, prep_pt.packed, n, k, h, layer["lora_up"], bias)

    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen)
        t_first = time.perf_counter()
        qlinear(x)  # first call: packs the weight (then cached on the qweight tensor)
        first_ms = (time.perf_counter() - t_first) * 1e3
        fns = {"fp32": lambda: F.linear(x, w, bias), "w4a4": lambda: qlinear(x)}
        if prep_pt is not None and prep_pt.packed is not None:
            fns["w4a8pt"] = lambda: qlinear_pt(x)
        t = _interleaved_ms(fns, repeats)
        fp, q = t["fp32"]["median"], t["w4a4"]["median"]
        pt = t["w4a8pt"]["median"] if "w4a8pt" in t else float("nan")
        torch_path = _median_ms(lambda: qlinear_torch(x), max(1, repeats // 3), warmup=0)
        # components
        sw = layer["wscales"].float()
        fused_q = _median_ms(lambda: cpu_gemm.quantize_activation_fused(
            x, layer["smooth"], 4, G, biased=True, lora_down=layer["lora_down"]), repeats)
        xs = x / layer["smooth"]
        qa, sa = quantize_activation(xs, 4, G)
        prep = cpu_gemm.prepare_weight(layer["qweight"], sw, G, weight_bits=4)
        gemm_prep = _median_ms(lambda: cpu_gemm.grouped_int_gemm(qa, sa, prep, None, G), repeats)
        prep4 = _median_ms(lambda: cpu_gemm.prepare_weight(layer["qweight"], sw, G, weight_bits=4), repeats)
        quant_act = _median_ms(lambda: quantize_activation(xs, 4, G), max(1, repeats // 3))
        rows.append(dict(
            M=m, K=k, N=n, isa=isa, fp32_linear_ms=fp, quantized_linear_ms=q, speedup=fp / q,
            per_token_linear_ms=pt, per_token_speedup=fp / pt,
            fp32_linear_min_ms=t["fp32"]["min"], quantized_linear_min_ms=t["w4a4"]["min"],
            speedup_of_mins=t["fp32"]["min"] / t["w4a4"]["min"], first_call_ms=first_ms,
            torch_path_ms=torch_path, fused_quantizer_ms=fused_q, gemm_prepared_ms=gemm_prep,
            quantize_activation_ms=quant_act, prepare_from_int4_ms=prep4, weight_bytes_ratio=weight_ratio,
        ))

    kernel = isa if fast else "torch fallback"
    print(f"isa: {kernel} (kernel load/build {build_s:.1f} s); threads={torch.get_num_threads()}; median of {repeats}")
    hdr = (f"{'M':>5} {'isa':>11} {'fp32 ms':>9} {'W4A4 ms':>9} {'ratio':>6} {'ratio/min':>9} {'W4A8pt ms':>9} "
           f"{'ratio':>6} {'torch path':>10} {'wbytes':>7} | {'fused_q':>7} {'gemm/prep':>9} {'quant_act':>9} "
           f"{'prep_i4':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['M']:>5} {r['isa']:>11} {r['fp32_linear_ms']:>9.1f} {r['quantized_linear_ms']:>9.1f} "
              f"{r['speedup']:>6.2f} {r['speedup_of_mins']:>9.2f} {r['per_token_linear_ms']:>9.1f} "
              f"{r['per_token_speedup']:>6.2f} {r['torch_path_ms']:>10.1f} {r['weight_bytes_ratio']:>6.2f}x | "
              f"{r['fused_quantizer_ms']:>7.1f} {r['gemm_prepared_ms']:>9.1f} {r['quantize_activation_ms']:>9.1f} "
              f"{r['prepare_from_int4_ms']:>7.1f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = dict(
        cpu=_cpu_model(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
        python=platform.python_version(), date=_dt.datetime.now().isoformat(timespec="seconds"),
        backend=kernel, isa=isa, kernel_load_s=build_s, repeats=repeats, quick=args.quick,
        group_size=G, rank=RANK, load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )
    out.write_text(json.dumps(dict(machine=info, results=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

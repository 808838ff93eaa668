"""Suite ``export``: ONNX Runtime (CPU EP, default threads) latency of the exported files.

Per model: the float model exported to ONNX (``float``), our quantized model exported with
``flavor="exact"`` (float ops reproducing our numerics) and ``flavor="deploy"`` (ONNX
Runtime's integer GEMMs; ``int8_kernel`` u8u8 = exact default, and the measured
alternatives u8s8 and ``dynamic`` = DynamicQuantizeMatMul), and a reference that is not ours,
``ort_int8_ref``: ONNX Runtime's ``quantize_dynamic`` of the float file (one fused int8 node per
linear, no smoothing, no low-rank branch: the least work an int8 file can do with ORT's own
kernels, so its speedup bounds the deploy file's on this CPU). All sessions of one model are
timed interleaved (median of repeats, same run); speedup = float file / file. Output SQNR
is against the torch quantized model (and the torch float model); file size against the
model's parameters at 16 bits (bf16). The ops ONNX Runtime runs after its graph
optimizations (``ort_optimized_op_types``) are recorded for the deploy files.

Models: the trained demo (``svdq_compile.demo``, batch 200 = 100 samples with guidance, at
rank 32 and, without ``--quick``, at the proportional rank 4), and a FLUX.1 single-stream
block at FLUX.1 width (hidden 3072, MLP 12288, 512 image + 64 text tokens; ``--quick``: the
reduced 768-wide block, 128 + 32 tokens). Quantization: ``mode="w4a8-int8"`` (the deploy
flavour's integer path; ``"auto"`` picks W4A4 on AVX2 CPUs since the torch kernels' ISA dispatch;
AdaLN modulation W4A16), alpha 0.5, no refinement (speed does not depend on them).

Profile (``ort_profile``): one extra ORT session per float / deploy file with
``SessionOptions.enable_profiling``, kernel time per category over a few runs: for the float
file, the MatMul/Gemm nodes of the layers we quantize (found by the exporter's module scopes)
vs the rest; for the deploy file, the int8 GEMMs, the low-rank MatMuls, the activation
quantizer's ops and the rest. That is the Amdahl bound of the quantized file.
"""
from __future__ import annotations

import copy
import gc
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from svdq_compile.quant.decompose import sqnr_db

from .harness import Context, flat_output
from .timing import time_interleaved

__all__ = ["run", "to_markdown", "plot", "FILES"]

DEVICE = "cpu"  # ONNX Runtime's CPU execution provider, whatever --device says
QUANT_MODE = "w4a8-int8"
PROFILE_RUNS = 3

# (key, flavor, int8 kernel, ORT exact session)
FILES = (
    ("float", None, None, False),
    ("exact", "exact", "u8u8", True),
    ("deploy", "deploy", "u8u8", False),
    ("deploy_fp32", "deploy", "u8u8", False),
    ("deploy_u8s8", "deploy", "u8s8", False),
    ("deploy_dynamic", "deploy", "dynamic", False),
    ("ort_int8_ref", None, None, False),
)
FILE_DOCS = {
    "float": "the float model, torch.onnx.export (dynamo), ORT default session",
    "exact": "export_onnx(flavor='exact'): float ops reproducing our numerics, session with "
             "qdq_matmulnbits_accuracy_level=1 (ort_session(exact=True))",
    "deploy": "export_onnx(flavor='deploy'): w4a8-int8 layers as per-token uint8 (QuantizeLinear, zero point "
              "128) x in-graph expanded INT4->INT8 weights, com.microsoft.MatMulIntegerToFloat (MLAS U8U8, exact "
              "int32); ORT default session",
    "deploy_u8s8": "deploy with int8_kernel='u8s8': INT8 weights, MLAS U8S8 (vpmaddubsw: int16 pair sums "
                   "saturate without AVX-VNNI)",
    "deploy_dynamic": "deploy with int8_kernel='dynamic': com.microsoft.DynamicQuantizeMatMul (ORT's per-tensor "
                      "asymmetric uint8 activations, not our per-token numerics)",
    "ort_int8_ref": "reference, not ours: onnxruntime.quantization.quantize_dynamic of the float file with its "
                    "defaults (every MatMul/Gemm with a constant weight -> INT8 weights x per-tensor dynamic UINT8 "
                    "activations, one fused int8 node per layer, no low-rank branch). Any standard-op int8 file "
                    "does at least this much work per layer, so its speedup bounds what a deploy file can reach "
                    "with ONNX Runtime's own kernels on this CPU",
}


def _leaves(x: Any) -> list:
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def _feeds(sess: Any, inputs: tuple) -> dict:
    leaves = _leaves(inputs)
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(leaves):
        raise RuntimeError(f"ORT inputs {names} do not match the {len(leaves)} example tensors")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, leaves)}


def _ort_flat(outs: list) -> torch.Tensor:
    return torch.cat([torch.from_numpy(o).reshape(-1).double() for o in outs])


def _case(ctx: Context, name: str, float_model: torch.nn.Module, quant_model: torch.nn.Module, example: tuple,
          info: dict, tmp: Path, bar: Any) -> None:
    import onnxruntime as ort

    from svdq_compile import SVDQLinear
    from svdq_compile.export import (bf16_parameter_bytes, export_onnx, export_onnx_variants,
                                     ort_optimized_op_types, ort_session)

    bf16 = bf16_parameter_bytes(quant_model)
    with torch.no_grad():
        ref_q = flat_output(quant_model(*example))
        ref_f = flat_output(float_model(*example))
    ctx.note(f"{name}: torch quantized vs torch float {sqnr_db(ref_f, ref_q):.1f} dB")
    files: dict[str, tuple[Path, int]] = {}
    t0 = time.perf_counter()
    res = export_onnx(float_model, example, tmp / "float.onnx", debug_info=True)
    qscopes = _strip_scopes(res.path, {n for n, m in quant_model.named_modules() if isinstance(m, SVDQLinear)})
    files["float"] = (res.path, res.path.stat().st_size)
    export_s = {"float": round(time.perf_counter() - t0, 1)}
    ref = _ort_int8_reference(res.path, tmp / "ort_int8_ref.onnx")
    files["ort_int8_ref"] = (ref, ref.stat().st_size)
    keys = [k for k, fl, *_ in FILES if fl is not None]
    t0 = time.perf_counter()
    variants = {tmp / f"{k}.onnx": (fl, kern, k != "deploy_fp32") for k, fl, kern, _ in FILES if k in keys}
    written = export_onnx_variants(quant_model, example, variants)
    for k in keys:
        r = written[tmp / f"{k}.onnx"]
        files[k] = (r.path, r.file_bytes)
    export_s["quantized (all flavours)"] = round(time.perf_counter() - t0, 1)
    bar.update(1)
    sessions, rows = {}, {}
    for key, flavor, _, exact in FILES:
        if key not in files:
            continue
        path, nbytes = files[key]
        row = {"case": name, **info, "file": key, "file_bytes": nbytes, "file_vs_bf16": round(nbytes / bf16, 4)}
        try:
            # Our exports get ort_session's options; the float file and ORT's own reference a default session.
            sess = ort_session(path, exact=exact) if flavor is not None else ort.InferenceSession(
                str(path), providers=["CPUExecutionProvider"])
            feeds = _feeds(sess, example)
            out = _ort_flat(sess.run(None, feeds))
            row["sqnr_vs_torch_quant_db"] = round(sqnr_db(ref_q, out), 2)
            row["sqnr_vs_torch_float_db"] = round(sqnr_db(ref_f, out), 2)
            if key.startswith("deploy"):
                ops = ort_optimized_op_types(path, exact=False)
                row["ort_ops"] = {(f"{d}." if d else "") + op: c for (d, op), c in sorted(ops.items())}
            sessions[key] = (sess, feeds)
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded, the other files go on
            row["status"] = f"n/a (error: {type(e).__name__}: {str(e)[:200]})"
        rows[key] = row
        bar.update(1)
    timed = time_interleaved({k: (lambda s=s, f=f: s.run(None, f)) for k, (s, f) in sessions.items()}, "cpu",
                             repeats=ctx.repeats, warmup=ctx.warmup)
    base = timed.get("float", {}).get("median_ms")
    for key, t in timed.items():
        if "error" in t:
            rows[key]["status"] = f"n/a (error while timing: {t['error'][:80]})"
            continue
        rows[key].update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in t.items()})
        if base:
            rows[key]["speedup_vs_float"] = round(base / t["median_ms"], 3)
    for key in ("float", "deploy"):
        if rows.get(key, {}).get("status") == "ok":
            try:
                rows[key]["ort_profile"] = _profile(files[key][0], sessions[key][1], qscopes, key == "float")
            except Exception as e:  # noqa: BLE001 - the profile is extra information
                ctx.note(f"{name}: ORT profile of {key} failed: {type(e).__name__}: {e}")
    ctx.extra.setdefault("export_s", {})[name] = export_s
    ctx.extra.setdefault("bf16_bytes", {})[name] = bf16
    for key in rows:
        ctx.record(rows[key])
    sessions.clear()
    gc.collect()


def _ort_int8_reference(float_path: Path, out: Path) -> Path:
    """ONNX Runtime's own dynamic int8 quantization of the float file (its defaults): the lightest
    standard-op int8 graph, used as the bound on what a deploy file can gain on this CPU."""
    import logging

    from onnxruntime.quantization import quantize_dynamic

    # quantize_dynamic logs a "consider pre-processing" warning through the root logger: quiet it.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(float_path), str(out), op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)
    return out


def _strip_scopes(path: Path, quantized: set) -> set:
    """Names of the float file's MatMul/Gemm nodes inside the layers we quantize (from the exporter's
    module scopes); then the file is saved without that metadata (as export_onnx writes it by default)."""
    import ast

    import onnx

    model = onnx.load(str(path))
    found = set()
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            scopes = []
        if node.op_type in ("MatMul", "Gemm") and any(sc in quantized for sc in scopes):
            found.add(node.name)
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        del v.metadata_props[:]
    onnx.save(model, str(path))
    return found


# the per-token quantizer (smoothing Div, absmax, scale, QuantizeLinear, the * s after the GEMM) and the
# layer's elementwise epilogue (activation, gate, output Cast)
_QUANTIZER_OPS = {"Abs", "ReduceMax", "Div", "Max", "QuantizeLinear", "Mul", "Shape", "Expand", "Greater", "Where",
                  "Gelu", "FastGelu", "BiasGelu", "Sigmoid", "Relu", "Cast"}


def _profile(path: Path, feeds: dict, qscopes: set, is_float: bool) -> dict:
    """ms per run by category (see the module docstring), from ORT's own profiler."""
    import json
    import os

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(path.with_suffix("")) + "_prof"
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(PROFILE_RUNS + 1):
        sess.run(None, feeds)
    prof = sess.end_profiling()
    with open(prof) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    os.remove(prof)
    events = events[len(events) // (PROFILE_RUNS + 1):]  # the first run: warm-up
    cats: dict[str, float] = {}
    for e in events:
        node, op = e["name"][: -len("_kernel_time")], e["args"].get("op_name", "")
        if is_float:
            cat = "quantized-layer GEMMs" if node.split("/")[0] in qscopes else "rest"
        elif "/" not in node or node.startswith("svdq_export"):
            cat = "rest"  # the quantized layers' nodes are named <layer>/<op>
        elif op in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
            cat = "int8 GEMMs"
        elif op == "MatMulNBits":
            cat = "MatMulNBits (W4A16)"
        elif op in ("Gemm", "MatMul", "FusedMatMul", "Add", "Reshape"):
            cat = "low-rank GEMMs + adds"
        elif op in _QUANTIZER_OPS:
            cat = "quantizer + elementwise epilogue"
        else:
            cat = "rest"
        cats[cat] = cats.get(cat, 0.0) + e["dur"] / 1e3 / PROFILE_RUNS
    return {k: round(v, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}


def _quantize(model: torch.nn.Module, example: tuple, calib: list, **overrides: Any) -> torch.nn.Module:
    import svdq_compile

    from .baselines import bench_svdq_config

    q = copy.deepcopy(model)
    svdq_compile.quantize(q, list(example), calib, bench_svdq_config(QUANT_MODE, **overrides), progress=False)
    return q


def _demo_case(ctx: Context, tmp: Path, bar: Any, batch: int, rank: int) -> None:
    from svdq_compile.demo.model import load_pretrained

    from .model import demo_inputs

    demo = load_pretrained()
    ex = demo_inputs(batch, "cpu", 0)
    q = _quantize(demo, ex, [demo_inputs(batch, "cpu", s) for s in (1, 2)], rank=rank)
    sub = tmp / f"demo_r{rank}"
    sub.mkdir()
    _case(ctx, f"demo digits B={batch} rank {rank}", demo, q, ex,
          {"model": "demo (digits FLUX, 2.3M)", "batch": batch, "tokens": 17, "rank": rank}, sub, bar)
    del demo, q
    gc.collect()


def run(ctx: Context, tqdm: Any) -> None:
    from svdq_compile.demo.model import CHECKPOINT_PATH

    from .flux import FULL, REDUCED, block_inputs, fast_svd, make_block

    n_files = len(FILES) + 1
    bar = tqdm(total=3 * n_files, desc="bench export (ORT CPU)", disable=not ctx.progress)
    with tempfile.TemporaryDirectory(prefix="svdq_bench_export_") as d:
        tmp = Path(d)
        # Demo: batch 200 = 100 samples with classifier-free guidance (docs/design.md section 6).
        batch = 16 if ctx.smoke else (64 if ctx.quick else 200)
        has_demo = CHECKPOINT_PATH.is_file()
        if has_demo:
            _demo_case(ctx, tmp, bar, batch, rank=32)
        else:
            ctx.note(f"demo checkpoint {CHECKPOINT_PATH.name} not present: demo case skipped")
        if ctx.smoke:
            bar.close()
            return
        dims, (img, txt) = (REDUCED, (128, 32)) if ctx.quick else (FULL, (512, 64))
        block = make_block("single", dims, "cpu", torch.float32, seed=1)
        ex = block_inputs(dims, img, txt, "cpu", torch.float32, seed=0)
        with fast_svd():
            q = _quantize(block, ex, [block_inputs(dims, img, txt, "cpu", torch.float32, seed=s) for s in (1, 2)])
        (tmp / "flux").mkdir()
        _case(ctx, f"FLUX.1 single block {img}+{txt} tok", block, q, ex,
              {"model": f"FluxSingleTransformerBlock, {dims.label}", "batch": 1, "tokens": img + txt},
              tmp / "flux", bar)
        del block, q
        gc.collect()
        if has_demo and not ctx.quick:
            # docs/design.md section 6: rank 32 is a quarter of the demo's 128-wide layers (~1% in FLUX);
            # rank 4 is the proportional one.
            _demo_case(ctx, tmp, bar, batch, rank=4)
    bar.close()


def to_markdown(p: dict) -> str:
    from .report import footer, header

    lines = header(p, f"ONNX export: ONNX Runtime CPU latency{' (--quick)' if p.get('quick') else ''}")
    lines += [f"Median ms per session.run (min-max over {p.get('settings', {}).get('repeats')} interleaved repeats); "
              "speedup = float ONNX median / median, same run; SQNR of the ORT output vs the torch quantized "
              "model (and vs the torch float model); file size / the model's parameters at 16 bits.", "",
              "| case | file | median ms | speedup vs float | SQNR vs torch quant | SQNR vs torch float | file MB "
              "| file / bf16 |", "|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        if r.get("status") != "ok" or "median_ms" not in r:
            lines.append(f"| {r['case']} | {r['file']} | {r.get('status')} | | | | {r['file_bytes'] / 1e6:.1f} "
                         f"| {r['file_vs_bf16']:.3f} |")
            continue
        sp = r.get("speedup_vs_float")
        sp_s = "-" if sp is None else (f"**{sp:.2f}x**" if r["file"] == "deploy" else f"{sp:.2f}x")
        lines.append(f"| {r['case']} | {r['file']} | {r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f}) "
                     f"| {sp_s} | {_db(r.get('sqnr_vs_torch_quant_db'))} | {_db(r.get('sqnr_vs_torch_float_db'))} "
                     f"| {r['file_bytes'] / 1e6:.1f} | {r['file_vs_bf16']:.3f} |")
    bound = _reference_lines(p["rows"])
    if bound:
        lines += ["", "ONNX Runtime's own int8 (`ort_int8_ref`, one fused int8 node per layer, 8-bit weights, no "
                  "low-rank branch) in the same run, against our deploy file:", ""] + bound
    ops = [(r["case"], r["file"], r["ort_ops"]) for r in p["rows"] if r.get("ort_ops")]
    if ops:
        lines += ["", "Ops ONNX Runtime runs (its optimized model; the INT4 -> INT8 weight expansion is folded at "
                  "session creation):", ""]
        for case, f, o in ops:
            lines.append(f"- {case} / {f}: " + ", ".join(f"{k} {v}" for k, v in sorted(o.items(), key=lambda kv: -kv[1])))
    lines += _profile_markdown(p["rows"])
    notes, error = footer({"notes": p.get("notes")}), footer({"error": p.get("error")})
    lines += notes + ["", "Files:"] + [f"- **{k}**: {v}" for k, v in FILE_DOCS.items()] + error
    return "\n".join(lines) + "\n"


def _reference_lines(rows: list) -> list:
    """Per case: the ORT reference's speedup next to the deploy file's (the bound on standard ops)."""
    cell = {(r["case"], r["file"]): r for r in rows if r.get("speedup_vs_float") is not None}
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        ref, dep = cell.get((case, "ort_int8_ref")), cell.get((case, "deploy"))
        if ref and dep:
            out.append(f"- {case}: ort_int8_ref {ref['speedup_vs_float']:.2f}x "
                       f"({_db(ref.get('sqnr_vs_torch_float_db'))} vs torch float), deploy "
                       f"{dep['speedup_vs_float']:.2f}x")
    return out


def _profile_markdown(rows: list) -> list:
    """Kernel time by category (ORT profiler, same process, after the timed runs) and the Amdahl bound."""
    by_case: dict = {}
    for r in rows:
        if r.get("ort_profile"):
            by_case.setdefault(r["case"], {})[r["file"]] = r["ort_profile"]
    if not by_case:
        return []
    out = ["", f"Where the time goes (ORT profiler, kernel ms per run, mean of {PROFILE_RUNS} runs; the float "
           "file's MatMul/Gemm nodes of the layers we quantize vs the rest):", ""]
    for case, prof in by_case.items():
        fl, dep = prof.get("float"), prof.get("deploy")
        if fl:
            tot = sum(fl.values())
            q = fl.get("quantized-layer GEMMs", 0.0)
            bound = tot / (tot - q) if tot > q else float("inf")
            out.append(f"- {case} / float: {tot:.1f} ms; quantized-layer GEMMs {q:.1f} ms = {100 * q / tot:.1f}% "
                       f"-> even free GEMMs give at most **{bound:.2f}x**")
            if dep:
                dt = sum(dep.values())
                parts = ", ".join(f"{k} {v:.1f} ms ({100 * v / tot:.1f}% of float)" for k, v in dep.items())
                out.append(f"- {case} / deploy: {dt:.1f} ms ({tot / dt:.2f}x): {parts}")
    return out


def _db(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.1f} dB"


def plot(p: dict, path: Path) -> bool:
    from .report import bar_chart

    rows = [r for r in p["rows"] if r.get("speedup_vs_float") is not None]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    keys = [k for k, *_ in FILES if any(r["file"] == k for r in rows)]
    cell = {(r["case"], r["file"]): r["speedup_vs_float"] for r in rows}
    return bar_chart(path, cases, {k: [cell.get((c, k), 0) for c in cases] for k in keys},
                     title="ONNX Runtime CPU: speedup vs the float ONNX file, same run",
                     ylabel="speedup vs float ONNX (x)", figsize=(8, 4.5), rotation=0, ncol=1,
                     hlines=((1.0, {}), (1.3, {"color": "r", "ls": "--", "label": "1.3x target"})))

"""Markdown tables and PNG plots of one suite's JSON payload."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .baselines import METHODS

__all__ = ["to_markdown", "plot"]

GB = 1e9


def _num(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return fmt.format(v)


def _machine_line(p: dict) -> str:
    m, v = p.get("machine", {}), p.get("versions", {})
    hw = m.get("gpu") or (f"{m.get('cpu')} ({m.get('cores')} cores, {m.get('torch_threads')} threads"
                          f"{', CPU kernels: ' + m['cpu_isa'] if m.get('cpu_isa') else ''})")
    sw = ", ".join(f"{k} {val}" for k, val in [("torch", m.get("torch")), *v.items()] if val)
    load = m.get("loadavg")
    load_s = f"; load average {load[0]:.1f}" if load else ""
    return f"{hw}; {sw}; {m.get('date')}{load_s}"


def _cases(rows: list[dict]) -> list[str]:
    out: list[str] = []
    for r in rows:
        if r.get("case") not in out:
            out.append(r["case"])
    return out


def _timing_tables(p: dict) -> list[str]:
    rows = [r for r in p["rows"] if "method" in r]
    keys_present = {r["key"] for r in rows}
    methods = [m for m in METHODS if m.key in keys_present]
    cases = _cases(rows)
    cell = {(r["case"], r["key"]): r for r in rows}
    base = "eager " + ("bf16" if p["device"] == "cuda" else "fp32")
    out = [f"Median time per call (min-max over {p['settings'].get('repeats')} interleaved repeats), "
           f"speedup = {base} median / median, same run.", "",
           "| case | " + " | ".join(m.name for m in methods) + " |",
           "|---|" + "---|" * len(methods)]
    for c in cases:
        cells = []
        for m in methods:
            r = cell.get((c, m.key))
            if r is None:
                cells.append("-")
            elif r.get("status") != "ok" or "median_ms" not in r:
                cells.append(r.get("status", "n/a (not timed)"))
            else:
                sp = f", **{r['speedup']:.2f}x**" if "speedup" in r else ""
                cells.append(f"{_ms(r['median_ms'])} ({_ms(r['min_ms'], False)}-{_ms(r['max_ms'], False)}){sp}")
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    if any("sqnr_db" in r for r in rows if r["key"] != "eager"):
        out += ["", "Output SQNR vs eager (dB; higher is closer) / setup time in s (compile + first call; "
                "+ quantization for ours):", "",
                "| case | " + " | ".join(m.name for m in methods) + " |", "|---|" + "---|" * len(methods)]
        for c in cases:
            cells = []
            for m in methods:
                r = cell.get((c, m.key))
                if r is None or r.get("status") != "ok":
                    cells.append("-")
                else:
                    q = f" + {r['quantize_s']:.1f}" if r.get("quantize_s") is not None else ""
                    cells.append(f"{_num(r.get('sqnr_db'), '{:.1f}')} / {_num(r.get('setup_s'), '{:.1f}')}{q} s")
            out.append(f"| {c} | " + " | ".join(cells) + " |")
    return out


def _ms(v: float, unit: bool = True) -> str:
    s = f"{v:.3g}" if v < 100 else f"{v:.0f}"
    return f"{s} ms" if unit else s


def _memory_tables(p: dict) -> list[str]:
    rows = p["rows"]
    s = p.get("summary")
    out = []
    if s:
        verdict = "meets" if s["meets_target"] else "misses"
        out += [f"**FLUX.1 [dev] transformer ({s['params'] / 1e9:.2f} B params): bf16 {s['bf16_GB']:.2f} GB -> "
                f"ours {s['ours_GB']:.2f} GB = {s['ratio']:.2f}x smaller** ({verdict} the {s['target_ratio']}x target; "
                f"byte formula checked on the quantized sample blocks: {s['formula_checked_on_samples']}).", ""]
    parts = [r for r in rows if r.get("kind") in ("FLUX.1 part", "FLUX.1 total")]
    if parts:
        out += ["| part (FLUX.1, extrapolated) | bf16 GB | ours GB |", "|---|---|---|"]
        for r in parts:
            bold = "**" if r["part"] == "total" else ""
            out.append(f"| {bold}{r['part']}{bold} | {r['bf16_bytes'] / GB:.3f} | {r['ours_bytes'] / GB:.3f} |")
    cats = [r for r in rows if r.get("kind") == "FLUX.1 category"]
    if cats:
        out += ["", "| quantized linears by kind | bf16 GB | ours GB | ratio |", "|---|---|---|---|"]
        for r in cats:
            out.append(f"| {r['part']} | {r['bf16_bytes'] / GB:.3f} | {r['ours_bytes'] / GB:.3f} | {r['ratio']:.2f}x |")
    blocks = [r for r in rows if r.get("kind") == "sample block"]
    if blocks:
        out += ["", "| sample block (measured) | hidden | bf16 MB | ours MB | ratio "
                "| forward peak extra bf16 / ours MB | CPU kernels' prepared copy MB |",
                "|---|---|---|---|---|---|---|"]
        for r in blocks:
            pb, po = r.get("bf16_forward_peak_extra_bytes"), r.get("ours_forward_peak_extra_bytes")
            peak = "n/a" if pb is None or po is None else f"{pb / 1e6:.0f} / {po / 1e6:.0f}"
            prep = r.get("ours_cpu_prepared_bytes")
            prep_s = "-" if prep is None else f"{prep / 1e6:.1f}"
            out.append(f"| {r['scope']} ({r['tokens']} tok) | {r['hidden']} | {r['bf16_bytes'] / 1e6:.1f} | "
                       f"{r['ours_bytes'] / 1e6:.1f} | {r['ratio']:.2f}x | {peak} | {prep_s} |")
        out.append("")
        out.append(f"Peak: extra memory over the resident model during one forward ({blocks[0]['peak_method']}). "
                   "Prepared copy (CPU only): the weights in the VNNI kernel's layout, cached after the first "
                   "call next to the packed ones (W4A16 layers need none).")
    return out


def to_markdown(p: dict) -> str:
    title = {"linear": "Linear layers", "block": "FLUX.1 blocks", "model": "Whole models",
             "memory": "Weight memory"}.get(p["suite"], p["suite"])
    lines = [f"## {title} ({p['device']}{', --quick' if p.get('quick') else ''}{', smoke' if p.get('smoke') else ''})",
             "", f"Machine: {_machine_line(p)}.", ""]
    if not p.get("complete"):
        lines += ["**Incomplete run** (stopped early: time budget or error); rows below are what finished.", ""]
    lines += _memory_tables(p) if p["suite"] == "memory" else _timing_tables(p)
    if p.get("in_progress"):
        done = [f"{r['method']}: {r.get('status', 'building')}"
                + (f" (SQNR {r['sqnr_db']:.1f} dB, setup {r['setup_s']:.1f} s)" if r.get("setup_s") is not None
                   and isinstance(r.get("sqnr_db"), float) else "")
                for r in p["in_progress"]]
        lines += ["", f"Case in progress when the run stopped ({p['in_progress'][0].get('case')}; built, not timed): "
                  + "; ".join(done)]
    if p.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in p["notes"]]
    if p["suite"] != "memory":
        keys = {r.get("key") for r in p["rows"]}
        docs = p.get("method_docs", {})
        lines += ["", "Methods:"] + [f"- **{m.name}**: {docs.get(m.key, m.doc)}" for m in METHODS if m.key in keys]
    if p.get("error"):
        lines += ["", f"Suite error: `{p['error']}`"]
    return "\n".join(lines) + "\n"


def plot(p: dict, path: Path) -> bool:
    """Write a PNG; False when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if p["suite"] == "memory":
        parts = [r for r in p["rows"] if r.get("kind") == "FLUX.1 part"]
        if not parts:
            return False
        fig, ax = plt.subplots(figsize=(7, 4))
        bottoms = [0.0, 0.0]
        for r in parts:
            vals = [r["bf16_bytes"] / GB, r["ours_bytes"] / GB]
            if sum(vals) == 0:
                continue
            ax.bar(["bf16", "ours (W4A4)"], vals, bottom=bottoms, label=r["part"])
            bottoms = [b + v for b, v in zip(bottoms, vals)]
        s = p.get("summary", {})
        ax.set(ylabel="GB", title=f"FLUX.1 [dev] transformer weights: {s.get('ratio', float('nan')):.2f}x smaller")
        ax.legend(fontsize=7)
    else:
        rows = [r for r in p["rows"] if r.get("speedup") is not None]
        if not rows:
            return False
        cases = _cases(rows)
        methods = [m for m in METHODS if any(r["key"] == m.key for r in rows)]
        fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(cases) * max(1, len(methods)) / 3), 4.5))
        width = 0.8 / len(methods)
        cell = {(r["case"], r["key"]): r["speedup"] for r in rows}
        for i, m in enumerate(methods):
            xs = [j + i * width for j in range(len(cases))]
            ax.bar(xs, [cell.get((c, m.key), 0) for c in cases], width, label=m.name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set(ylabel="speedup vs eager (x)", title=f"{p['suite']} ({p['device']}): speedup vs eager, same run")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: "list[str] | None" = None) -> int:
    """Re-render ``.md`` / ``.png`` next to result JSON files (e.g. JSON fetched from a GPU run):

        python -m benchmarks.suites.report benchmarks/results/bench_block_cuda.json ...
    """
    import json
    import sys

    paths = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(main.__doc__)
        return 2
    for path in paths:
        payload = json.loads(path.read_text())
        payload.setdefault("settings", {})
        payload.setdefault("notes", [])
        md = path.with_suffix(".md")
        md.write_text(to_markdown(payload))
        made = plot(payload, path.with_suffix(".png"))
        print(f"wrote {md}" + (f", {path.with_suffix('.png')}" if made else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

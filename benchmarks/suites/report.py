"""Markdown tables and PNG plots of the result files, and the helpers every suite's report uses.

One result format for every suite: ``<out>/bench_<suite>_<device>.json`` (suite, device,
machine, versions, settings, notes, rows and the suite's own entries), the ``.md`` its
``to_markdown`` writes (title, machine line, tables, notes) and the ``.png`` its ``plot``
writes. ``python -m benchmarks.suites.report FILE.json ...`` (or ``svdq bench --render``)
re-renders the markdown and plot of saved files, including the files written by the
benchmark scripts these suites replaced (the suite is read from the file, or from its
name: ``ablation.json`` -> ``ablation``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from .baselines import METHODS

__all__ = ["to_markdown", "plot", "machine_line", "header", "footer", "bar_chart", "pyplot", "save_figure",
           "render_file", "rows_of"]

GB = 1e9


def _num(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return fmt.format(v)


def machine_line(p: dict) -> str:
    """CPU (cores, threads, CPU kernels' ISA) / GPU; torch, python and package versions; date; load."""
    # Files of the replaced scripts: "meta" (demo speed) or the top level (GPU kernels) held it.
    m, v = p.get("machine") or p.get("meta") or p, p.get("versions", {})
    if isinstance(m, str):  # files written before the common format: a free-text line
        return m + (f"; {p['date']}" if p.get("date") else "")
    cpu = (f"{m.get('cpu')} ({m.get('cores')} cores, {m.get('torch_threads')} threads"
           f"{', CPU kernels: ' + m['cpu_isa'] if m.get('cpu_isa') else ''})") if m.get("cpu") else None
    hw = "; ".join(h for h in (m.get("gpu"), cpu) if h) or "?"
    sw = ", ".join(f"{k} {val}" for k, val in [("torch", m.get("torch")), ("python", m.get("python")),
                                              *([("triton", m.get("triton"))] if "triton" not in v else []),
                                              *v.items()] if val)
    load = m.get("loadavg")
    load_s = f"; load average {load[0]:.1f}" if load else ""
    return f"{hw}; {sw}; {m.get('date')}{load_s}"


def header(p: dict, title: str) -> list[str]:
    """Title, machine line and the incomplete-run warning: the top of every suite's markdown."""
    lines = [f"## {title}", "", f"Machine: {machine_line(p)}.", ""]
    if not p.get("complete", True):
        lines += ["**Incomplete run** (stopped early: time budget or error); rows below are what finished.", ""]
    return lines


def footer(p: dict) -> list[str]:
    """Notes and the suite's error: the bottom of every suite's markdown."""
    lines = []
    if p.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in p["notes"]]
    if p.get("error"):
        lines += ["", f"Suite error: `{p['error']}`"]
    return lines


def rows_of(p: dict, *old_keys: str) -> list:
    """The payload's rows; files from the replaced scripts kept them under other keys."""
    for key in ("rows", *old_keys):
        if isinstance(p.get(key), list):
            return p[key]
    return []


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return True


def bar_chart(path: Path, cases: Sequence[str], series: dict[str, Sequence[float]], title: str, ylabel: str,
              hlines: Sequence[tuple[float, dict]] = ((1.0, {}),), figsize: Optional[tuple[float, float]] = None,
              rotation: int = 30, ncol: int = 2) -> bool:
    """Grouped bars, one group per case and one bar per series; False without matplotlib or data."""
    plt = pyplot()
    if plt is None or not cases or not series:
        return False
    fig, ax = plt.subplots(figsize=figsize or (max(7, 0.9 * len(cases) * max(1, len(series)) / 3), 4.5))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(cases))], [0 if v is None else v for v in vals], width, label=label)
    for y, style in hlines:
        ax.axhline(y, **{"color": "k", "lw": 0.8, **style})
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=rotation, ha="right" if rotation else "center", fontsize=7 if rotation else 8)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=7, ncol=ncol)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


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
    lines = header(p, f"{title} ({p['device']}{', --quick' if p.get('quick') else ''}"
                      f"{', smoke' if p.get('smoke') else ''})")
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
    if p["suite"] == "memory":
        plt = pyplot()
        parts = [r for r in p["rows"] if r.get("kind") == "FLUX.1 part"]
        if plt is None or not parts:
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
        return save_figure(fig, path)
    rows = [r for r in p["rows"] if r.get("speedup") is not None]
    cases = _cases(rows)
    methods = [m for m in METHODS if any(r["key"] == m.key for r in rows)]
    cell = {(r["case"], r["key"]): r["speedup"] for r in rows}
    return bar_chart(path, cases, {m.name: [cell.get((c, m.key), 0) for c in cases] for m in methods},
                     title=f"{p['suite']} ({p['device']}): speedup vs eager, same run", ylabel="speedup vs eager (x)")


def _suite_of(path: Path, payload: dict, suite: Optional[str]) -> str:
    from . import NAMES

    name = suite or payload.get("suite")
    if name is None:  # a file of the replaced scripts: ablation.json, modes_quality.json, passes.json, ...
        stem = path.stem
        name = next((n for n in NAMES if stem == n or stem.startswith(n + "_")), None)
    if name not in NAMES:
        raise SystemExit(f"{path}: which suite wrote it? (pass --suite; one of {', '.join(NAMES)})")
    return name


def render_file(path: Path, suite: Optional[str] = None) -> list[Path]:
    """Re-render ``.md`` / ``.png`` next to a result JSON file (e.g. JSON fetched from a GPU run)."""
    from . import get

    path = Path(path)
    payload = json.loads(path.read_text())
    name = _suite_of(path, payload, suite)
    payload.setdefault("suite", name)
    payload.setdefault("settings", {})
    payload.setdefault("notes", [])
    mod = get(name)
    md = path.with_suffix(".md")
    md.write_text(getattr(mod, "to_markdown", to_markdown)(payload))
    png = path.with_suffix(".png")
    return [md] + ([png] if getattr(mod, "plot", plot)(payload, png) else [])


def main(argv: "list[str] | None" = None) -> int:
    """Re-render ``.md`` / ``.png`` next to result JSON files (e.g. JSON fetched from a GPU run):

        python -m benchmarks.suites.report benchmarks/results/bench_block_cuda.json ...
    """
    import sys

    paths = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(main.__doc__)
        return 2
    for path in paths:
        print("wrote " + ", ".join(str(w) for w in render_file(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

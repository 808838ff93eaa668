"""``svdq_compile.explain(model)``: what was quantized, how, and how well."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from svdq_compile.export.artifacts import collect_packed

__all__ = ["explain"]


def explain(model: nn.Module, as_dict: bool = False) -> Any:
    """Per-layer table (name, shape, mode, alpha, rank, output SQNR, bytes) and pass counts.

    Returns the text table, or with ``as_dict=True`` a dict
    ``{"layers": [...], "passes": {...}, "skipped": [...], "totals": {...}}``.
    Pass counts and the layers kept in float come from the graphs compiled with this
    model's own tensors (:func:`~svdq_compile.capture.backend.reports_for`), whatever
    else was compiled in the process; each float layer is listed once.
    """
    from svdq_compile.capture.backend import reports_for

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the model's own layer names
    rows = []
    for name, p in collect_packed(model).items():
        s = p.spec
        rows.append({
            "name": name, "shape": [s.out_features, s.in_features],
            "mode": s.label,
            "alpha": p.meta.get("alpha"), "beta": p.meta.get("beta"), "rank": p.rank,
            "sqnr_db": p.meta.get("sqnr_db"), "bytes": p.nbytes(), "mode_reason": p.meta.get("mode_reason"),
            "fp16_bytes": 2 * s.in_features * s.out_features + (2 * s.out_features if p.bias is not None else 0),
        })
    own = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    passes: dict[str, int] = {}
    skipped: list = []
    seen: set[int] = set()
    for r in reports_for(model):
        for k, v in r.passes.items():
            passes[k] = passes.get(k, 0) + v
        for entry, ref in zip(r.skipped, r.skipped_refs):
            w = ref()
            # A graph may also read another model's layers (one compiled function calling
            # two models): only this model's, once each.
            if w is not None and own.get(id(w)) is w and id(w) not in seen:
                seen.add(id(w))
                skipped.append(entry)
    q_bytes = sum(r["bytes"] for r in rows)
    fp_bytes = sum(r["fp16_bytes"] for r in rows)
    info = {"layers": rows, "passes": passes, "skipped": skipped,
            "totals": {"layers": len(rows), "bytes": q_bytes, "fp16_bytes": fp_bytes,
                       "ratio_vs_fp16": fp_bytes / q_bytes if q_bytes else None}}
    if as_dict:
        return info
    lines = [f"{'layer':40s} {'shape':>13s} {'mode':9s} {'alpha':>5s} {'rank':>4s} {'SQNR dB':>8s} {'bytes':>10s}"]
    for r in rows:
        a = "-" if r["alpha"] is None else f"{r['alpha']:.2f}"
        q = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        lines.append(f"{r['name'][:40]:40s} {'x'.join(map(str, r['shape'])):>13s} {r['mode']:9s} {a:>5s} "
                     f"{r['rank']:>4d} {q:>8s} {r['bytes']:>10d}")
    # Why each mode: one line per distinct reason (auto's device rule, an override, the option).
    reasons: dict[str, list[str]] = {}
    for r in rows:
        reasons.setdefault(f"{r['mode']} <- {r['mode_reason'] or 'mode option'}", []).append(r["name"])
    for why, names in reasons.items():
        lines.append(f"mode {why} ({len(names)} layers)")
    t = info["totals"]
    if rows:
        lines.append(f"{len(rows)} layers, {q_bytes} bytes quantized vs {fp_bytes} in 16-bit "
                     f"({t['ratio_vs_fp16']:.2f}x smaller)")
    if passes:
        lines.append("passes fired: " + ", ".join(f"{k}={v}" for k, v in passes.items()))
    if skipped:
        lines.append(f"kept in floating point: {len(skipped)} (" + "; ".join(f"{n}: {r}" for n, r in skipped[:5]) + ")")
    return "\n".join(lines)

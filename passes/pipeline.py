"""The ordered pass pipeline: plan -> decompose (cached) -> rewrite -> graph passes."""
from __future__ import annotations

import copy
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from svdq_compile.quant.stats import stats_of
from svdq_compile.quant.config import SVDQuantConfig
from svdq_compile.quant.search import quantize_group
from svdq_compile.runtime.packed import PackedLinear

__all__ = ["CompileReport", "quantize_graph", "packed_for"]

log = logging.getLogger(__name__)

# (weight ids, target, config) -> (weakrefs to the weights, their versions, packs).
# The weakrefs guard against a new tensor reusing a freed tensor's id.
_PACK_CACHE: dict[tuple, tuple[tuple, tuple[int, ...], list[PackedLinear]]] = {}


@dataclass
class CompileReport:
    """What one graph compilation did (counts are asserted by tests; shown by explain())."""

    sites_found: int = 0
    rewritten: int = 0
    ops_inserted: int = 0
    fused_groups: int = 0
    skipped: list = field(default_factory=list)  # [(name, reason)]
    layers: list = field(default_factory=list)  # per-layer dicts
    passes: dict = field(default_factory=dict)  # pass name -> sites it rewrote
    seconds: float = 0.0
    # Weak references (never keeping a model alive): the weight of each ``skipped`` entry,
    # in the same order, and every tensor the graph was compiled with (set by the backend).
    # They tie the report to its model for explain(model).
    skipped_refs: list = field(default_factory=list, repr=False)
    tensor_refs: list = field(default_factory=list, repr=False)

    def summary(self) -> str:
        fired = ", ".join(f"{k}={v}" for k, v in self.passes.items())
        return (
            f"{self.rewritten}/{self.sites_found} linears quantized into {self.ops_inserted} ops "
            f"({self.fused_groups} fused groups, {len(self.skipped)} kept in float; passes: {fired}) "
            f"in {self.seconds:.1f}s"
        )


def _drop_entry(key: tuple) -> None:
    _PACK_CACHE.pop(key, None)


def packed_for(weights: Sequence[torch.Tensor], biases, stats, target, config: SVDQuantConfig) -> list[PackedLinear]:
    """Quantize a sibling group once per (weights, target, config); reuse on recompiles."""
    key = (tuple(id(w) for w in weights), target, config.cache_key())
    versions = tuple(w._version for w in weights)
    hit = _PACK_CACHE.get(key)
    if hit is not None and all(r() is w for r, w in zip(hit[0], weights)) and hit[1] == versions:
        return hit[2]
    packs = quantize_group(weights, biases, stats, target, config)
    _PACK_CACHE[key] = (tuple(weakref.ref(w) for w in weights), versions, packs)
    for w in weights:
        weakref.finalize(w, _drop_entry, key)
    return packs


def _dump(gm: fx.GraphModule, config: SVDQuantConfig, tag: str) -> None:
    out = config.dump_graphs or os.environ.get("SVDQ_DUMP_GRAPHS")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    idx = len([f for f in os.listdir(out) if f.endswith(".txt")])
    with open(os.path.join(out, f"{idx:03d}_{tag}.txt"), "w") as f:
        f.write(str(gm.graph))


def quantize_graph(
    gm: fx.GraphModule, example_inputs: Sequence[Any], sites: Sequence, config: SVDQuantConfig
) -> tuple[fx.GraphModule, CompileReport]:
    """Return a rewritten copy of ``gm`` (the input graph is not modified) and a report."""
    from tqdm.auto import tqdm

    from svdq_compile.passes.find_linears import find_linear_sites
    from svdq_compile.passes.graph_passes import run_graph_passes
    from svdq_compile.passes.plan import plan_sites
    from svdq_compile.passes.op_nodes import SVDQ_OP, is_svdq
    from svdq_compile.passes.quantize_linears import rewrite_linears

    report = CompileReport(sites_found=len(sites))
    qgm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    _dump(qgm, config, "input")
    qsites = find_linear_sites(qgm, example_inputs)  # same sites, nodes of the copy
    groups, skipped = plan_sites(qsites, config)
    report.skipped = skipped
    planned = {id(s) for g in groups for s in g.sites}
    # plan_sites lists the skipped sites in site order: pair each entry with its weight.
    report.skipped_refs = [weakref.ref(s.weight) for s in qsites if id(s) not in planned]
    assert len(report.skipped_refs) == len(skipped)
    if not groups:
        report.passes["quantize_linears"] = 0
        if not any(is_svdq(n) for n in qgm.graph.nodes):
            return gm, report
        # Already-quantized ops (SVDQLinear modules from quantize()/load()): still fuse them.
        report.passes.update(run_graph_passes(qgm, config, example_inputs, lambda g, tag: _dump(g, config, tag)))
        report.fused_groups = report.passes.get("fuse_siblings", 0)
        report.ops_inserted = sum(1 for n in qgm.graph.nodes if is_svdq(n))
        _dump(qgm, config, "final")
        return qgm, report
    all_packs = []
    bar = tqdm(groups, desc="svdq quantize", leave=False, disable=len(groups) < 8)
    for g in bar:
        weights = [s.weight for s in g.sites]
        biases = [s.bias for s in g.sites]
        stats = stats_of(weights[0])
        packs = packed_for(weights, biases, stats, g.target, config)
        all_packs.append(packs)
        for s, p in zip(g.sites, packs):
            report.layers.append({
                "name": s.name,
                "shape": [s.out_features, s.in_features],
                "mode": p.spec.label,
                "alpha": p.meta.get("alpha"),
                "beta": p.meta.get("beta"),
                "rank": p.rank,
                "sqnr_db": p.meta.get("sqnr_db"),
                "bytes": p.nbytes(),
                "fp_bytes": s.weight.numel() * s.weight.element_size()
                + (0 if s.bias is None else s.bias.numel() * s.bias.element_size()),
                "siblings": len(g.sites),
            })
            s.weight._svdq_packed = p  # for explain() / save()
            s.weight._svdq_name = s.name
    res = rewrite_linears(qgm, groups, all_packs)
    report.rewritten = res.sites_rewritten
    report.passes["quantize_linears"] = res.sites_rewritten
    _dump(qgm, config, "quantized")
    report.passes.update(run_graph_passes(qgm, config, example_inputs, lambda g, tag: _dump(g, config, tag)))
    report.fused_groups = report.passes.get("fuse_siblings", 0)
    report.ops_inserted = sum(1 for n in qgm.graph.nodes if n.op == "call_function" and n.target is SVDQ_OP)
    _dump(qgm, config, "final")
    return qgm, report

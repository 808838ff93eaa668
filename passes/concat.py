"""Concatenate sibling quantized linears along N (exact horizontal fusion).

Sibling layers share lambda (and so the quantized activations); their residuals and
scales concatenate along N, and their low-rank branches stack into one branch of rank
sum(r_i) whose up projection is block-diagonal, so the fused layer computes exactly
what the separate layers computed.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from svdq_compile.runtime.packed import PackedLinear

__all__ = ["concat_packed"]


def concat_packed(packs: Sequence[PackedLinear]) -> PackedLinear:
    first = packs[0]
    if len(packs) == 1:
        return first
    s0 = first.spec
    for p in packs[1:]:
        s = p.spec
        # Everything but the output width and the rank must match (the shared input quantization).
        if replace(s, out_features=s0.out_features, rank=s0.rank) != s0:
            raise ValueError("concat_packed: sibling layers differ in input quantization")
        if (p.smooth is None) != (first.smooth is None) or (
            p.smooth is not None and not torch.equal(p.smooth, first.smooth)
        ):
            raise ValueError("concat_packed: sibling layers must share one smoothing vector")
    ns = [p.spec.out_features for p in packs]
    ranks = [p.rank for p in packs]
    n_tot, r_tot = sum(ns), sum(ranks)
    down = up = None
    if r_tot:
        ref = next(p.lora_down for p in packs if p.lora_down is not None)
        down = torch.cat([p.lora_down for p in packs if p.lora_down is not None], dim=0)  # [sum r, K]
        up = ref.new_zeros(n_tot, r_tot)  # [sum N, sum r] block-diagonal
        n0 = r0 = 0
        for p, n, r in zip(packs, ns, ranks):
            if r:
                up[n0:n0 + n, r0:r0 + r] = p.lora_up
            n0, r0 = n0 + n, r0 + r
    bias = None
    if any(p.bias is not None for p in packs):
        ref_b = next(p.bias for p in packs if p.bias is not None)
        bias = torch.cat([p.bias if p.bias is not None else ref_b.new_zeros(n) for p, n in zip(packs, ns)])
    spec = replace(s0, out_features=n_tot, rank=r_tot)
    # Per-token schemes: zero points and channel scales are per output row, like qweight.
    extra = {name: torch.cat([getattr(p, name) for p in packs])
             for name in s0.qmode.weight_tensors if name not in ("qweight", "wscales")}
    return PackedLinear(
        spec=spec,
        qweight=torch.cat([p.qweight for p in packs]),
        wscales=torch.cat([p.wscales for p in packs]),
        smooth=first.smooth,
        lora_down=down,
        lora_up=up,
        bias=bias,
        meta={"fused": len(packs)},
        **extra,
    )

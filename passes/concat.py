"""Concatenate sibling quantized linears along N (exact horizontal fusion).

Sibling layers share lambda (and so the quantized activations); their residuals and
scales concatenate along N, and their low-rank branches stack into one branch of rank
sum(r_i) whose up projection is block-diagonal, so the fused layer computes exactly
what the separate layers computed.
"""
from __future__ import annotations

from typing import Sequence

import torch

from svdq_compile.runtime.packed import LinearSpec, PackedLinear

__all__ = ["concat_packed"]


def concat_packed(packs: Sequence[PackedLinear]) -> PackedLinear:
    first = packs[0]
    if len(packs) == 1:
        return first
    s0 = first.spec
    for p in packs[1:]:
        s = p.spec
        same = (s.in_features, s.group_size, s.weight_bits, s.act_bits, s.act_unsigned, s.act_shift, s.scheme)
        if same != (s0.in_features, s0.group_size, s0.weight_bits, s0.act_bits, s0.act_unsigned, s0.act_shift,
                    s0.scheme):
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
    spec = LinearSpec(
        in_features=s0.in_features, out_features=n_tot, group_size=s0.group_size,
        weight_bits=s0.weight_bits, act_bits=s0.act_bits, act_unsigned=s0.act_unsigned,
        act_shift=s0.act_shift, rank=r_tot, scheme=s0.scheme,
    )
    # Per-token schemes: zero points and channel scales are per output row, like qweight.
    extra = {name: torch.cat([getattr(p, name) for p in packs])
             for name in ("wzeros", "wchannel") if getattr(first, name) is not None}
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

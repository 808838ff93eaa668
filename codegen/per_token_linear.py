"""Per-token schemes (``w4a8-int8``, ``w4a8-fp8``) on the Triton side: check -> allocate -> launch.

Three launches (numerics: runtime/per_token.py; oracle: runtime/reference.py):

1. :mod:`.prologue_per_token`: X -> 8-bit activations, per-token scales, ``X' L2^T``;
2. :mod:`.expand_weight`: INT4 weight -> [N, K] 8-bit operand (per call, or a per-layer
   copy with ``SVDQ_KEEP_EXPANDED=1``);
3. :mod:`.gemm_per_token`: one accumulator over K, rescale + low-rank + epilogue after the loop;
   or the library composition (:mod:`.library_per_token`), whichever tuning found faster.

Failures: in eager mode any compile/launch error of these kernels (including "every
config failed" from the autotuner) falls back to the torch implementation, logged once
(:func:`.fallback.run_or_fallback`).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import torch

from svdq_compile.runtime.torch_path import quantized_linear_cpu
from svdq_compile.runtime.op_args import LinearArgs
from svdq_compile.codegen.expand_weight import expanded_operand
from svdq_compile.codegen.fallback import run_or_fallback
from svdq_compile.codegen.gemm import EpilogueInputs
from svdq_compile.codegen.call_spec import inner_contiguous, is_tracing, make_spec
from svdq_compile.codegen.gemm_per_token import run_gemm_pt
from svdq_compile.codegen.prologue_per_token import run_prologue_pt
from svdq_compile.codegen.spec import KernelSpec

__all__ = ["per_token_linear", "check_per_token_args", "unsupported_reason"]

log = logging.getLogger(__name__)


def check_per_token_args(a: LinearArgs) -> None:
    """What ``check_args`` leaves to the per-token kernels (dtypes of the scale tensors)."""
    if not a.wchannel.dtype.is_floating_point:
        raise TypeError(f"svdq.linear: wchannel must be a floating tensor, got {a.wchannel.dtype}")
    if a.scheme == "fp8" and not a.wscales.dtype.is_floating_point:
        raise TypeError(f"svdq.linear: scheme 'fp8' needs floating group scales (wscales), got {a.wscales.dtype}")


def unsupported_reason(a: LinearArgs) -> Optional[str]:
    """None when the kernels cover this call, else why the torch path runs instead."""
    if a.x.is_cuda and a.scheme == "fp8" and torch.cuda.get_device_capability(a.x.device) < (8, 9):
        return "FP8 tensor cores need sm_89+"
    return None


def _spec(a: LinearArgs, lora_precision: Optional[str]) -> KernelSpec:
    spec = make_spec(a.x, a.smooth, a.lora_down, a.bias, a.residual, a.gate, a.group_size, a.weight_bits,
                     a.act_bits, a.act_unsigned, a.epilogue, lora_precision)
    return replace(spec, scheme=a.scheme)


def _run(a: LinearArgs, spec: KernelSpec, *, wrap: bool, eager: bool) -> torch.Tensor:
    x = a.x
    lead = tuple(x.shape[:-1])
    k = x.shape[-1]
    x2d = x.reshape(-1, k)  # a view whenever possible (strides go to the kernel)
    smooth = None if a.smooth is None else a.smooth.contiguous()
    qa, sa, h = run_prologue_pt(x2d, smooth, a.lora_down, spec, wrap=wrap, tune=eager)
    w8 = expanded_operand(a, wrap=wrap, eager=eager)
    inputs = EpilogueInputs(h if spec.has_lora else None, inner_contiguous(a.lora_up),
                            None if a.bias is None else a.bias.contiguous(), a.gate, a.residual)
    y = run_gemm_pt(qa, sa, w8, a.wchannel.contiguous(), inputs, spec, lead, wrap=wrap, tune=eager)
    return y.reshape(*lead, a.n)


def per_token_linear(a: LinearArgs, *, lora_precision: Optional[str] = None, wrap: bool = False) -> torch.Tensor:
    """x: [..., K] -> [..., N] for a per-token scheme (arguments already checked by the caller)."""
    check_per_token_args(a)
    reason = unsupported_reason(a)
    if reason is not None:
        log.debug("svdq.linear: torch path for scheme %r (%s)", a.scheme, reason)
        return quantized_linear_cpu(a)
    spec = _spec(a, lora_precision)
    if is_tracing(a.x):
        return _run(a, spec, wrap=wrap, eager=False)
    return run_or_fallback(a, spec, lambda: _run(a, spec, wrap=wrap, eager=True))

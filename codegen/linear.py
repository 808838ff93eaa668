"""The Triton quantized linear: check -> allocate -> launch (prologue, then GEMM).

:func:`quantized_linear_triton` has exactly the signature of
:func:`runtime.cpu.quantized_linear_cpu`, so it can be installed as the CUDA (and,
under the interpreter, CPU) implementation of the ``svdq::linear`` custom op.
Weight-only modes (16-bit activations) and specs the kernels do not cover fall back to
the torch implementation, which runs on any device.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from svdq_compile.runtime.torch_path import quantized_linear_cpu
from svdq_compile.runtime.modes import handler, has_handler, register_handler
from svdq_compile.runtime.op_args import LinearArgs, bind
from svdq_compile.runtime.per_token import PER_TOKEN_SCHEMES
from svdq_compile.runtime.ops import check_args
from svdq_compile.codegen.fallback import run_or_fallback
from svdq_compile.codegen.gemm import run_gemm
from svdq_compile.codegen.launch import interpreting
from svdq_compile.codegen.prologue import run_prologue
from svdq_compile.codegen.w4a16 import run_w4a16, try_run_w4a16, w4a16_supported
from svdq_compile.codegen.per_token_linear import per_token_linear
from svdq_compile.codegen.call_spec import inner_contiguous, is_tracing, make_spec

__all__ = ["quantized_linear_triton"]

log = logging.getLogger(__name__)


def quantized_linear_triton(
    *args: Any,
    lora_precision: Optional[str] = None,
    wrap: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x.dtype: fused prologue + grouped int GEMM + epilogue.

    Arguments: those of ``svdq::linear`` (:class:`runtime.op_args.LinearArgs`), positional
    or by name, or one ``LinearArgs``.
    Same numerics as :func:`runtime.reference.quantized_linear_reference` (bit-exact
    quantized integers, fp32 accumulation). ``wrap`` launches through ``wrap_triton``
    (used by the ``svdq::triton_linear`` triton_op so tracing sees the kernels).
    """
    a = bind(*args, **kwargs)
    check_args(a)
    if not has_handler(a.scheme, "triton_linear"):
        log.debug("svdq.linear: torch path for scheme %r (no Triton kernels registered)", a.scheme)
        return quantized_linear_cpu(a)
    if interpreting() and a.x.is_cuda:
        raise RuntimeError("svdq_compile.codegen: TRITON_INTERPRET=1 cannot run CUDA tensors")
    return handler(a.scheme, "triton_linear")(a, lora_precision=lora_precision, wrap=wrap)


def _group_linear(a: LinearArgs, *, lora_precision: Optional[str] = None, wrap: bool = False) -> torch.Tensor:
    """The group scheme: fused prologue + grouped int GEMM + epilogue (arguments checked)."""
    x, qweight, wscales, smooth = a.x, a.qweight, a.wscales, a.smooth
    lora_down, lora_up, bias, residual, gate = a.lora_down, a.lora_up, a.bias, a.residual, a.gate
    group_size, weight_bits, act_bits, act_shift = a.group_size, a.weight_bits, a.act_bits, a.act_shift
    n = a.n
    spec = make_spec(
        x, smooth, lora_down, bias, residual, gate, group_size, weight_bits, act_bits,
        a.act_unsigned, a.epilogue, lora_precision,
    )
    # Weight-only layers (e.g. AdaLN modulation, a few rows) keep the torch path for the
    # low-rank branch and epilogue, with the Triton INT4 product for the matmul.
    w4a16 = spec.qmode.weight_only and spec.qmode.packed and w4a16_supported(group_size)
    reason = None if w4a16 else spec.supports_triton()
    if reason is not None or w4a16:
        if reason is not None:
            log.debug("svdq.linear: torch fallback (%s)", reason)
        # Traced (wrap): no fallback inside a graph; eager: fall back once on a kernel error.
        product = None if not w4a16 else (
            (lambda x2, qw, sw, g: run_w4a16(x2, qw, sw, g, wrap=True)) if wrap else try_run_w4a16)
        return quantized_linear_cpu(a, w4a16_product=product)

    # ---- allocate / lay out
    lead = tuple(x.shape[:-1])
    k = x.shape[-1]
    x2d = x.reshape(-1, k)  # [M, K], a view whenever possible (strides go to the kernel)
    qweight = inner_contiguous(qweight)
    wscales = inner_contiguous(wscales)
    smooth = None if smooth is None else smooth.contiguous()
    lora_up = inner_contiguous(lora_up)
    bias = None if bias is None else bias.contiguous()
    tune = not is_tracing(x)

    # ---- launch
    def launch_all() -> torch.Tensor:
        qa, sa, h = run_prologue(x2d, smooth, lora_down, spec, act_shift, wrap=wrap, tune=tune)
        y = run_gemm(
            qa, sa, qweight, wscales, h if spec.has_lora else None, lora_up, bias, gate, residual,
            spec, lead, wrap=wrap, tune=tune,
        )
        return y.reshape(*lead, n)

    if wrap or not tune:  # traced: nothing runs now, so there is nothing to catch
        return launch_all()
    # Eager: a kernel/autotune failure (e.g. "every gemm config failed") falls back to the
    # torch path, logged once, instead of raising out of the model.
    return run_or_fallback(a, spec, launch_all)


register_handler("group", "triton_linear", _group_linear)
for _scheme in PER_TOKEN_SCHEMES:
    register_handler(_scheme, "triton_linear", per_token_linear)

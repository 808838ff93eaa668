"""The Triton quantized linear: check -> allocate -> launch (prologue, then GEMM).

:func:`quantized_linear_triton` has exactly the signature of
:func:`runtime.cpu.quantized_linear_cpu`, so it can be installed as the CUDA (and,
under the interpreter, CPU) implementation of the ``svdq::linear`` custom op.
Weight-only modes (16-bit activations) and specs the kernels do not cover fall back to
the torch implementation, which runs on any device.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from svdq_compile.runtime.torch_path import quantized_linear_cpu
from svdq_compile.runtime.op_args import bind
from svdq_compile.runtime.ops import check_args
from svdq_compile.codegen.fallback import run_or_fallback
from svdq_compile.codegen.gemm import run_gemm
from svdq_compile.codegen.launch import interpreting
from svdq_compile.codegen.prologue import run_prologue
from svdq_compile.codegen.w4a16 import run_w4a16, try_run_w4a16, w4a16_supported
from svdq_compile.codegen.spec import LORA_PRECISIONS, KernelSpec
from svdq_compile.codegen.per_token_linear import per_token_linear
from svdq_compile.codegen.call_spec import default_lora_precision, inner_contiguous, is_tracing, make_spec

__all__ = ["quantized_linear_triton"]

log = logging.getLogger(__name__)


def _check_operands(
    x: torch.Tensor,
    n: int,
    smooth: Optional[torch.Tensor],
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
) -> None:
    """Shape/device checks for the operands :func:`check_linear_args` does not cover."""
    k = x.shape[-1]
    dev = x.device
    if (lora_down is None) != (lora_up is None):
        raise ValueError("svdq.linear: lora_down and lora_up must both be given or both be None")
    if lora_down is not None:
        r = lora_down.shape[0]
        if lora_down.dim() != 2 or lora_down.shape[1] != k or tuple(lora_up.shape) != (n, r):
            raise ValueError(
                f"svdq.linear: low-rank shapes must be [r, {k}] and [{n}, r], got "
                f"{list(lora_down.shape)} and {list(lora_up.shape)}"
            )
    if smooth is not None and tuple(smooth.shape) != (k,):
        raise ValueError(f"svdq.linear: smooth must be [{k}], got {list(smooth.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"svdq.linear: bias must be [{n}], got {list(bias.shape)}")
    for name, t in (("gate", gate), ("residual", residual)):
        if t is None:
            continue
        try:
            torch.broadcast_shapes(tuple(t.shape), (*x.shape[:-1], n))
        except RuntimeError:
            raise ValueError(
                f"svdq.linear: {name} of shape {list(t.shape)} does not broadcast to "
                f"{[*x.shape[:-1], n]}"
            ) from None
    for name, t in (("smooth", smooth), ("lora_down", lora_down), ("lora_up", lora_up),
                    ("bias", bias), ("gate", gate), ("residual", residual)):
        if t is not None and t.device != dev:
            raise ValueError(f"svdq.linear: {name} is on {t.device} but the input is on {dev}")
        if t is not None and not t.dtype.is_floating_point:
            raise TypeError(f"svdq.linear: {name} must be a floating tensor, got {t.dtype}")


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
    # ---- check
    check_args(a)
    x, qweight, wscales, smooth = a.x, a.qweight, a.wscales, a.smooth
    lora_down, lora_up, bias, residual, gate = a.lora_down, a.lora_up, a.bias, a.residual, a.gate
    group_size, weight_bits, act_bits, act_shift = a.group_size, a.weight_bits, a.act_bits, a.act_shift
    n = wscales.shape[0]
    _check_operands(x, n, smooth, lora_down, lora_up, bias, residual, gate)
    if a.per_token:
        if interpreting() and x.is_cuda:
            raise RuntimeError("svdq_compile.codegen: TRITON_INTERPRET=1 cannot run CUDA tensors")
        return per_token_linear(a, lora_precision=lora_precision, wrap=wrap)
    spec = make_spec(
        x, smooth, lora_down, bias, residual, gate, group_size, weight_bits, act_bits,
        a.act_unsigned, a.epilogue, lora_precision,
    )
    # Weight-only layers (e.g. AdaLN modulation, a few rows) keep the torch path for the
    # low-rank branch and epilogue, with the Triton INT4 product for the matmul.
    w4a16 = act_bits == 16 and weight_bits == 4 and w4a16_supported(group_size)
    reason = None if w4a16 else spec.supports_triton()
    if reason is None and interpreting() and x.is_cuda:
        raise RuntimeError("svdq_compile.codegen: TRITON_INTERPRET=1 cannot run CUDA tensors")
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

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

from ..runtime.cpu import quantized_linear_cpu
from ..runtime.op_args import bind
from ..runtime.ops import check_args
from .fallback import run_or_fallback
from .gemm import run_gemm
from .launch import interpreting
from .prologue import run_prologue
from .w4a16 import run_w4a16, try_run_w4a16, w4a16_supported
from .spec import LORA_PRECISIONS, KernelSpec
from .per_token_linear import per_token_linear

__all__ = ["quantized_linear_triton", "make_spec", "default_lora_precision", "is_tracing"]

log = logging.getLogger(__name__)


def default_lora_precision(device: torch.device) -> str:
    """``tl.dot`` precision of the low-rank branch: ``$SVDQ_LORA_PRECISION`` or a default.

    On GPU the default is "tf32x3" (three tensor-core MMAs, near-fp32 accuracy: the
    low-rank branch carries most of the output's energy, so its error should stay far
    below the bf16 output rounding). "ieee" is exact fp32 but runs on CUDA cores (a
    slower prologue); the interpreter computes every precision exactly.
    """
    env = os.environ.get("SVDQ_LORA_PRECISION")
    if env:
        if env not in LORA_PRECISIONS:
            raise ValueError(f"SVDQ_LORA_PRECISION must be one of {LORA_PRECISIONS}, got {env!r}")
        return env
    return "tf32x3" if device.type == "cuda" else "ieee"


def is_tracing(x: torch.Tensor) -> bool:
    """True while torch.compile / export traces us (fake tensors): never benchmark then."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(x) or torch.compiler.is_compiling()


def make_spec(
    x: torch.Tensor,
    smooth: Optional[torch.Tensor],
    lora_down: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    group_size: int,
    weight_bits: int,
    act_bits: int,
    act_unsigned: bool,
    epilogue: str,
    lora_precision: Optional[str] = None,
) -> KernelSpec:
    """The :class:`KernelSpec` of one call (dtype of Y = dtype of X, as the op defines)."""
    rank = 0 if lora_down is None else int(lora_down.shape[0])
    if rank == 0:
        lora_precision = "ieee"  # unused without a low-rank branch: one canonical spec
    return KernelSpec(
        weight_bits=weight_bits,
        act_bits=act_bits,
        act_unsigned=act_unsigned,
        group_size=group_size,
        rank=rank,
        epilogue=epilogue,
        has_smooth=smooth is not None,
        has_bias=bias is not None,
        has_gate=gate is not None,
        has_residual=residual is not None,
        in_dtype=x.dtype,
        out_dtype=x.dtype,
        lora_precision=lora_precision or default_lora_precision(x.device),
    )


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


def _inner_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels index the last dim with unit stride; copy only when that is not so."""
    if t is None or t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


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
    qweight = _inner_contiguous(qweight)
    wscales = _inner_contiguous(wscales)
    smooth = None if smooth is None else smooth.contiguous()
    lora_up = _inner_contiguous(lora_up)
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

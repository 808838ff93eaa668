"""``svdq::linear``: the quantized linear as a torch.library custom op.

A custom op (with a fake implementation) keeps quantized models traceable by
``torch.compile`` and ``torch.export``. Device dispatch:
CPU -> :func:`.cpu.quantized_linear_cpu` (vectorised torch);
CUDA -> the generated Triton kernels of ``svdq_compile.codegen`` when Triton can run,
otherwise the same torch code as the CPU path (logged once).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping, Optional

import torch

from svdq_compile.runtime.torch_path import quantized_linear_cpu
from svdq_compile.runtime.op_args import SCHEMA, LinearArgs, bind
from svdq_compile.runtime.packed import EPILOGUES, LinearSpec, PackedLinear
from svdq_compile.runtime.modes import find_mode

__all__ = ["svdq_linear", "linear_from_packed", "check_linear_args", "check_operands", "check_args", "register_triton_impl",
           "triton_on_cpu", "packed_args", "spec_args"]

log = logging.getLogger(__name__)

_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def check_linear_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    group_size: int,
    weight_bits: int,
    act_bits: int,
    epilogue: str,
    scheme: str = "group",
    wzeros: Optional[torch.Tensor] = None,
    wchannel: Optional[torch.Tensor] = None,
) -> None:
    """Raise a clear error for inputs the kernels would otherwise mis-handle."""
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(
            f"svdq.linear: input dtype {x.dtype} is not supported; use float32, float16 or bfloat16"
        )
    if x.dim() < 1:
        raise ValueError("svdq.linear: input must have at least one dimension")
    if wscales.dim() != 2:
        raise ValueError(f"svdq.linear: wscales must be [N, K/G], got {list(wscales.shape)}")
    n, groups = wscales.shape
    k = groups * group_size
    if x.shape[-1] != k:
        raise ValueError(f"svdq.linear: input has {x.shape[-1]} features, the layer expects {k}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"svdq.linear: unknown epilogue {epilogue!r}; expected one of {EPILOGUES}")
    try:
        mode = find_mode(weight_bits, act_bits, scheme)
    except ValueError as e:
        raise ValueError(f"svdq.linear: {e}") from None
    mode.check_weights({"qweight": qweight, "wscales": wscales, "wzeros": wzeros, "wchannel": wchannel},
                       n, k, group_size, where="svdq.linear: ")
    for name, t in (("qweight", qweight), ("wscales", wscales), ("wzeros", wzeros), ("wchannel", wchannel)):
        if t is not None and x.device != t.device:
            what = "the quantized weights are" if name == "qweight" else f"{name} is"
            raise ValueError(f"svdq.linear: input is on {x.device} but {what} on {t.device}")


def check_operands(
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



def check_args(a: LinearArgs) -> None:
    """Every check of one call: :func:`check_linear_args` and :func:`check_operands`."""
    check_linear_args(a.x, a.qweight, a.wscales, a.group_size, a.weight_bits, a.act_bits, a.epilogue,
                      a.scheme, a.wzeros, a.wchannel)
    check_operands(a.x, a.n, a.smooth, a.lora_down, a.lora_up, a.bias, a.residual, a.gate)


def _svdq_linear_impl(*args: Any, **kwargs: Any) -> torch.Tensor:
    a = bind(*args, **kwargs)
    check_args(a)
    if _TRITON_IMPL is not None and (a.x.is_cuda or _TRITON_ON_CPU):
        return _TRITON_IMPL(a)
    if a.x.is_cuda:
        _warn_no_triton()
    return quantized_linear_cpu(a)


def _svdq_linear_fake(*args: Any, **kwargs: Any) -> torch.Tensor:
    a = bind(*args, **kwargs)
    return a.x.new_empty((*a.x.shape[:-1], a.n))


# The schema comes from LinearArgs (runtime/op_args.py), the one place the arguments are listed.
svdq_linear = torch.library.custom_op("svdq::linear", _svdq_linear_impl, mutates_args=(), schema=SCHEMA)
svdq_linear.register_fake(_svdq_linear_fake)


_TRITON_IMPL = None
# Route CPU tensors through the Triton kernels too; only meaningful under
# TRITON_INTERPRET=1 (tests and debugging of the generated kernels without a GPU).
_TRITON_ON_CPU = False
_warned = False


def register_triton_impl(fn) -> None:
    """Install the Triton implementation ``fn(a: LinearArgs) -> Tensor`` (called by ``svdq_compile.codegen``)."""
    global _TRITON_IMPL
    _TRITON_IMPL = fn


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True):
    """Run ``svdq::linear`` on CPU tensors through the Triton kernels (interpreter)."""
    global _TRITON_ON_CPU
    old, _TRITON_ON_CPU = _TRITON_ON_CPU, enabled
    try:
        yield
    finally:
        _TRITON_ON_CPU = old


def _warn_no_triton() -> None:
    global _warned
    if not _warned:
        log.warning("svdq.linear: no Triton CUDA kernels available; running the torch fallback on CUDA")
        _warned = True


def linear_from_packed(
    x: torch.Tensor,
    p: PackedLinear,
    epilogue: str = "none",
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Convenience eager call of the op with a :class:`PackedLinear`."""
    return torch.ops.svdq.linear(*packed_args(x, p, epilogue, residual, gate))


def packed_args(
    x: Any, p: PackedLinear, epilogue: str = "none", residual: Any = None, gate: Any = None,
) -> LinearArgs:
    """The op's argument list for ``p`` applied to ``x``."""
    return spec_args(x, p.spec, p.tensors(), epilogue, residual, gate)


def spec_args(
    x: Any, spec: LinearSpec, t: Mapping[str, Any], epilogue: str = "none", residual: Any = None, gate: Any = None,
) -> LinearArgs:
    """The op's argument list from a spec and its tensors by :meth:`PackedLinear.tensors` key
    (tensors, or the graph nodes standing for them)."""
    return LinearArgs(
        x, t["qweight"], t["wscales"], t.get("smooth"), t.get("lora_down"), t.get("lora_up"), t.get("bias"),
        residual, gate, spec.group_size, spec.weight_bits, spec.act_bits, spec.act_unsigned, spec.act_shift,
        epilogue, t.get("wzeros"), t.get("wchannel"), spec.scheme,
    )

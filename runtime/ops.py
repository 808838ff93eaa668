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
from svdq_compile.runtime.per_token import PER_TOKEN_SCHEMES, SCHEMES

__all__ = ["svdq_linear", "linear_from_packed", "check_linear_args", "check_args", "register_triton_impl",
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
    kq = k // 2 if weight_bits == 4 else k
    if qweight.dtype != torch.int8 or tuple(qweight.shape) != (n, kq):
        raise ValueError(
            f"svdq.linear: qweight must be int8 [{n}, {kq}], got {qweight.dtype} {list(qweight.shape)}"
        )
    if act_bits not in (4, 8, 16) or weight_bits not in (4, 8):
        raise ValueError(f"svdq.linear: unsupported mode w{weight_bits}a{act_bits}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"svdq.linear: unknown epilogue {epilogue!r}; expected one of {EPILOGUES}")
    if scheme not in SCHEMES:
        raise ValueError(f"svdq.linear: unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if scheme in PER_TOKEN_SCHEMES:
        if (weight_bits, act_bits) != (4, 8):
            raise ValueError(f"svdq.linear: scheme {scheme!r} is w4a8 only, got w{weight_bits}a{act_bits}")
        if wchannel is None or tuple(wchannel.shape) != (n,):
            raise ValueError(f"svdq.linear: scheme {scheme!r} needs wchannel [{n}]")
        if scheme == "int8" and (wzeros is None or wzeros.shape != wscales.shape or wzeros.dtype != torch.int8
                                 or wscales.dtype != torch.int8):
            raise ValueError(f"svdq.linear: scheme 'int8' needs int8 wscales and wzeros [{n}, {groups}]")
    for name, t in (("qweight", qweight), ("wscales", wscales), ("wzeros", wzeros), ("wchannel", wchannel)):
        if t is not None and x.device != t.device:
            what = "the quantized weights are" if name == "qweight" else f"{name} is"
            raise ValueError(f"svdq.linear: input is on {x.device} but {what} on {t.device}")


def check_args(a: LinearArgs) -> None:
    """:func:`check_linear_args` on a bound argument list."""
    check_linear_args(a.x, a.qweight, a.wscales, a.group_size, a.weight_bits, a.act_bits, a.epilogue,
                      a.scheme, a.wzeros, a.wchannel)


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

"""The torch path of the quantized linear: every device, and the C++ kernels on CPU.

Same numerics as :mod:`.reference`, evaluated in fp32.

Fast path (x86-64, the C++ kernels of :mod:`.cpu_gemm` built for the CPU's best ISA):

1. the weight-side work (int4 unpack, kernel re-layout, per-group sums, transposed
   scales) is done once per weight and cached *on the qweight tensor object* (the
   op receives the same buffer tensor on every call), validated on every call by the
   tensor's version counter (in-place writes bump it), its data pointer/shape and an
   exact comparison of ``wscales`` (a few hundred KiB); inference tensors have no
   version counter, so for them a private copy of ``qweight`` is compared instead;
2. one fused C++ pass computes ``X' = X / smooth``, the per-token-group scales and the
   int activations (bit-identical to :func:`.quantize.quantize_activation`), already
   biased to uint8 for ``VPDPBUSD``,
   and the low-rank down projection ``h = X' L2^T`` (rank R) while each row is in L1;
3. the C++ grouped GEMM with a fused epilogue ``Y += h L1^T`` then ``Y += bias``;
   activation/gate/residual follow in place in :func:`.epilogue.finish_output`'s order.

The integer part is exact (bit-identical q/scales, exact int32 group sums); the fp32
low-rank/bias sums differ from the torch path only by fp32 rounding order.

Fallback (``SVDQ_CPU_GEMM=torch``, no C++ compiler or a CPU below AVX2, group size not a multiple
of 4, empty input): the original vectorised-torch path.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from svdq_compile.runtime import cpu_gemm
from svdq_compile.runtime.cpu_gemm import grouped_int_gemm
from svdq_compile.runtime.cpu_w4a16 import w4a16_dequantize, w4a16_linear
from svdq_compile.runtime.epilogue import apply_epilogue
from svdq_compile.runtime.op_args import LinearArgs, bind
from svdq_compile.runtime.modes import find_mode, handler, register_handler
from svdq_compile.runtime.per_token import PER_TOKEN_SCHEMES, expanded_weight, quantize_tokens
from svdq_compile.runtime.quantize import dequantize_groups, quantize_activation
from svdq_compile.runtime.reference import int_weight, smooth_input

__all__ = ["quantized_linear_cpu", "cached_prepared_weight", "cached_expanded_weight", "CACHE_ATTR"]

CACHE_ATTR = "_svdq_cpu_prep"  # attribute set on the qweight tensor
PT_CACHE_ATTR = "_svdq_cpu_pt"  # per-token schemes: expanded / prepared weight, also on qweight


class _CacheEntry(NamedTuple):
    group_size: int
    weight_bits: int
    qversion: Optional[int]  # qweight._version (None for inference tensors)
    qsnapshot: Optional[torch.Tensor]  # private copy of qweight (inference tensors only)
    qmeta: tuple  # (data_ptr, shape, stride): extra guards, never the key alone
    wscales: torch.Tensor  # inference tensors: a private copy, compared exactly; else the tensor itself
    sversion: Optional[int]  # wscales._version (None for inference tensors)
    prep: cpu_gemm.PreparedWeight


def _qmeta(qweight: torch.Tensor) -> tuple:
    return (qweight.data_ptr(), tuple(qweight.shape), qweight.stride())


def _entry_valid(e: _CacheEntry, qweight: torch.Tensor, wscales: torch.Tensor, group_size: int, weight_bits: int) -> bool:
    if e.group_size != group_size or e.weight_bits != weight_bits or e.qmeta != _qmeta(qweight):
        return False
    if e.qsnapshot is not None:
        if not torch.equal(e.qsnapshot, qweight):
            return False
    elif qweight.is_inference() or e.qversion != qweight._version:
        return False
    if e.sversion is None:
        return e.wscales.dtype == wscales.dtype and e.wscales.shape == wscales.shape and torch.equal(e.wscales, wscales)
    # The very tensor the weight was prepared with (held by the entry, so its id cannot be
    # reused) with no in-place write since: no need to compare values on every call.
    return e.wscales is wscales and not wscales.is_inference() and e.sversion == wscales._version


def cached_prepared_weight(
    qweight: torch.Tensor, wscales: torch.Tensor, group_size: int, weight_bits: int
) -> cpu_gemm.PreparedWeight:
    """PreparedWeight for (qweight, wscales), cached on ``qweight`` and rebuilt when either
    changed (in-place writes, ``set_``, new scales). ``prep.packed`` is None when the
    C++ kernels cannot take this weight."""
    e = getattr(qweight, CACHE_ATTR, None)
    if isinstance(e, _CacheEntry) and _entry_valid(e, qweight, wscales, group_size, weight_bits):
        return e.prep
    inference = qweight.is_inference()
    prep = cpu_gemm.prepare_weight(qweight, wscales, group_size, weight_bits=weight_bits, backend="auto")
    snap = qweight.clone() if inference else None  # (the qweight -> entry -> qweight cycle is gc-collectable)
    s_inf = wscales.is_inference()
    entry = _CacheEntry(group_size, weight_bits, None if inference else qweight._version, snap, _qmeta(qweight),
                        wscales.clone() if s_inf else wscales, None if s_inf else wscales._version, prep)
    try:
        setattr(qweight, CACHE_ATTR, entry)
    except (AttributeError, RuntimeError):  # exotic tensor subclasses: just don't cache
        pass
    return prep


def _finish_inplace(
    y: torch.Tensor, lead: torch.Size, n: int, bias: Optional[torch.Tensor], epilogue: str,
    gate: Optional[torch.Tensor], residual: Optional[torch.Tensor],
) -> torch.Tensor:
    """finish_output on a fresh fp32 [M, N] y, in place where possible (same fp32 ops:
    in-place add/mul with a lower-precision operand compute in fp32 like ``.to(fp32)``)."""
    if bias is not None:
        y.add_(bias)
    y = apply_epilogue(y, epilogue)
    yv = y.view(*lead, n)
    if gate is not None:
        yv.mul_(gate)
    if residual is not None:
        yv.add_(residual)
    return yv


def _fast_path(
    x2: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, smooth: Optional[torch.Tensor],
    lora_down: Optional[torch.Tensor], lora_up: Optional[torch.Tensor], group_size: int, weight_bits: int,
    act_bits: int, act_unsigned: bool, act_shift: float, bias: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """[M, N] fp32 ``X'W^T + (X' L2^T) L1^T + bias``, or None to use the torch path."""
    if x2.shape[0] == 0 or act_bits == 16 or group_size % 4 or x2.device.type != "cpu":
        return None
    if not cpu_gemm.fast_backend_available() or cpu_gemm._backend(None) == "torch":
        return None
    prep = cached_prepared_weight(qweight, wscales, group_size, weight_bits)
    if prep.packed is None:
        return None
    # One pass over x: X', its quantization (u8-biased for VPDPBUSD) and h = X' L2^T
    # (rank R, computed while the rows are in L1: X' is never written out).
    res = cpu_gemm.quantize_activation_fused(
        x2, smooth, act_bits, group_size, unsigned=act_unsigned, shift=act_shift, biased=True, lora_down=lora_down
    )
    if res is None:
        return None
    qa, sa, _, h = res
    # GEMM with the fused epilogue Y += h L1^T + bias (same order as the reference).
    return cpu_gemm.gemm_prepared_u8(qa, sa, prep.packed, wscales.shape[0], group_size, h, lora_up, bias)


class _Guard(NamedTuple):
    """Detects any change of one tensor since the guard was taken (see :func:`_entry_valid`)."""

    tensor: torch.Tensor  # the tensor itself, or a private copy for inference tensors
    version: Optional[int]
    meta: tuple

    @staticmethod
    def take(t: torch.Tensor) -> "_Guard":
        inf = t.is_inference()
        return _Guard(t.clone() if inf else t, None if inf else t._version, _qmeta(t))

    def holds(self, t: torch.Tensor) -> bool:
        if self.meta != _qmeta(t):
            return False
        if self.version is None:
            return torch.equal(self.tensor, t)
        return self.tensor is t and not t.is_inference() and self.version == t._version


def cached_expanded_weight(a: LinearArgs, fast: bool) -> tuple[torch.Tensor, Optional[cpu_gemm.PreparedWeight]]:
    """(w8, prep) of a per-token layer, cached on ``qweight`` and rebuilt when any of the
    weight tensors changed: with ``fast`` (int8 scheme), the C++ kernels' prepared copy
    (one group spanning K, ``wchannel`` as the per-column scale) and ``w8 = None``;
    otherwise (or if the kernels cannot take it) the [N, K] 8-bit operand and ``prep = None``
    or an unusable one."""
    key = (a.scheme, a.group_size, fast)
    watched = tuple(t for t in (a.qweight, a.wscales, a.wzeros, a.wchannel) if t is not None)
    e = getattr(a.qweight, PT_CACHE_ATTR, None)
    if e is not None and e[0] == key and len(e[1]) == len(watched) and all(g.holds(t) for g, t in zip(e[1], watched)):
        return e[2], e[3]
    prep = None
    if fast:  # (int8 scheme only) the kernels' layout; on AVX2 it stays 4-bit (cpu_gemm docs)
        prep = cpu_gemm.prepare_weight_progressive(a.qweight, a.wscales, a.wzeros, a.wchannel, a.group_size,
                                                   backend="auto")
    if prep is not None and prep.packed is not None:
        w8 = None
        prep = prep._replace(qw=prep.qw[:, :0])  # the kernel's copy is all it needs: drop the [N, K] int8
    else:
        w8 = expanded_weight(a.scheme, a.qweight, a.wscales, a.wzeros, a.wchannel, a.group_size)  # [N, K]
    try:
        setattr(a.qweight, PT_CACHE_ATTR, (key, tuple(_Guard.take(t) for t in watched), w8, prep))
    except (AttributeError, RuntimeError):
        pass
    return w8, prep


def _per_token_linear(a: LinearArgs, x2: torch.Tensor) -> torch.Tensor:
    """[M, N] fp32 ``(qa @ w8^T) * sa * c + (X' L2^T) L1^T + bias`` of a per-token scheme."""
    k = x2.shape[1]
    n = a.n
    fast = (a.scheme == "int8" and x2.shape[0] > 0 and cpu_gemm.fast_backend_available()
            and cpu_gemm._backend(None) != "torch" and k % 4 == 0)
    w8, prep = cached_expanded_weight(a, fast)
    if prep is not None and prep.packed is not None:
        # The C++ grouped GEMM with one group spanning K is exactly the per-token GEMM: one
        # exact int32 sum over K, then y = I * sa[m] * c[n], then the low-rank/bias epilogue.
        res = cpu_gemm.quantize_activation_fused(x2, a.smooth, 8, k, biased=True, lora_down=a.lora_down)
        if res is not None:
            qa, sa, _, h = res
            return cpu_gemm.gemm_prepared_u8(qa, sa, prep.packed, n, k, h, a.lora_up, a.bias)
    if w8 is None:  # the kernel's copy exists but the fused quantizer declined this input
        w8 = expanded_weight(a.scheme, a.qweight, a.wscales, a.wzeros, a.wchannel, a.group_size)
    xs = smooth_input(x2, a.smooth)  # [M, K] fp32
    qa, sa = quantize_tokens(xs, a.scheme)
    # fp32 GEMM of the 8-bit values (products exact, fp32 accumulation), rescale at the end.
    y = (qa.float() @ w8.float().t()) * sa[:, None] * a.wchannel.float()[None, :]
    if a.lora_down is not None:
        y = y + (xs @ a.lora_down.float().t()) @ a.lora_up.float().t()
    if a.bias is not None:
        y = y + a.bias.float()
    return y


# Packed byte -> (even, odd) signed nibble values: one gather replaces the shifts,
# masks, sign fixes and interleave of unpack_int4 (weight-only layers dequantize per call).
_NIBBLE_LUT = torch.tensor(
    [[((b & 15) ^ 8) - 8, (((b >> 4) & 15) ^ 8) - 8] for b in range(256)], dtype=torch.float32
)


def dequantize_weight(qweight: torch.Tensor, wscales: torch.Tensor, group_size: int, weight_bits: int) -> torch.Tensor:
    """[N, K/2] packed int4 (or [N, K] int8) + [N, K/G] scales -> [N, K] fp32 weight."""
    if weight_bits != 4:
        return dequantize_groups(qweight, wscales, group_size)
    w = w4a16_dequantize(qweight, wscales, group_size)  # C++, same values
    if w is not None:
        return w
    n = qweight.shape[0]
    lut = _NIBBLE_LUT.to(qweight.device)
    vals = lut[qweight.view(torch.uint8).int()]  # [N, K/2, 2] fp32: even, odd
    return (vals.view(n, -1, group_size) * wscales.float().unsqueeze(-1)).view(n, -1)


def _group_linear(
    a: LinearArgs, x2: torch.Tensor,
    w4a16_product: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]] = None,
) -> torch.Tensor:
    """[M, N] fp32 ``Q(X') Q(R)^T + (X' L2^T) L1^T + bias`` of the group scheme."""
    qweight, wscales, smooth, group_size = a.qweight, a.wscales, a.smooth, a.group_size
    mode = find_mode(a.weight_bits, a.act_bits, a.scheme)
    y = _fast_path(x2, qweight, wscales, smooth, a.lora_down, a.lora_up, group_size, a.weight_bits,
                   a.act_bits, a.act_unsigned, a.act_shift, a.bias)
    if y is not None:  # bias already added
        return y
    # torch path (reference numerics in fp32)
    xs = smooth_input(x2, smooth)  # [M, K] fp32
    if mode.weight_only:
        y = None
        if mode.packed and w4a16_product is not None:
            y = w4a16_product(x2 if smooth is None else xs, qweight, wscales, group_size)
        elif mode.packed:
            y = w4a16_linear(xs, qweight, wscales, group_size)  # C++ on CPU, else None
        if y is None:
            y = F.linear(xs, dequantize_weight(qweight, wscales, group_size, a.weight_bits))
    else:
        qw = int_weight(qweight, a.weight_bits)  # [N, K] int8
        qa, sa = quantize_activation(xs, a.act_bits, group_size, unsigned=a.act_unsigned, shift=a.act_shift)
        y = grouped_int_gemm(qa, sa, qw, wscales.float(), group_size)  # [M, N] fp32
    if a.lora_down is not None:
        y = y + (xs @ a.lora_down.float().t()) @ a.lora_up.float().t()
    if a.bias is not None:
        y = y + a.bias.to(y.dtype)
    return y


def quantized_linear_cpu(
    *args: Any,
    w4a16_product: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]] = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The quantized linear in torch (and the C++ kernels on CPU).

    Arguments: those of ``svdq::linear`` (:class:`.op_args.LinearArgs`), positional or by
    name, or one ``LinearArgs``. Each scheme's ``torch_linear`` handler (runtime/modes.py)
    computes the [M, N] fp32 accumulator with bias; the epilogue, gate and residual follow
    here, in :func:`.epilogue.finish_output`'s order, for every scheme.
    ``w4a16_product(x2d, qweight, wscales, group_size) -> [M, N] fp32`` replaces the
    dequantize + matmul of weight-only layers (the GPU path passes its Triton kernel);
    it receives the input in its own dtype when there is no smoothing.
    """
    a = bind(*args, **kwargs)
    x = a.x
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = handler(a.scheme, "torch_linear")(a, x2, w4a16_product=w4a16_product)
    return _finish_inplace(y, lead, a.n, None, a.epilogue, a.gate, a.residual).to(x.dtype)


register_handler("group", "torch_linear", _group_linear)
for _scheme in PER_TOKEN_SCHEMES:
    register_handler(_scheme, "torch_linear", lambda a, x2, w4a16_product=None: _per_token_linear(a, x2))

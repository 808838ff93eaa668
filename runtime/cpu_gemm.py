"""Grouped integer GEMM on CPU: ``Y[m, n] = sum_g sa[m, g] * sw[n, g] * (qa_g @ qw_g^T)[m, n]``.

Two implementations with the same contract (exact int32 partial sums per group,
fp32 rescale/accumulation, no bf16 anywhere):

- ``"vnni"``: a small C++ kernel (``cpu_kernels/grouped_gemm_vnni.cpp``) using
  AVX512-VNNI ``VPDPBUSD``. Activations are biased into u8 with ``^ 0x80`` and the
  bias is removed exactly through a per-(group, column) weight sum, so every
  int4/int8 range works. Each group's int32 partial is folded into the fp32 output
  with one FMA (``y = fma(float(I_g), sa * sw, y)``, groups in ascending order).
  Built lazily on the first call with ``torch.utils.cpp_extension.load`` (cached in
  the torch extensions dir, ``$TORCH_EXTENSIONS_DIR``); OpenMP threads come from
  torch's intra-op pool.
- ``"torch"``: the pure-PyTorch baseline (dequantize both operands to fp32, one fp32
  GEMM). Used when the CPU lacks AVX512-VNNI, no C++ compiler is found, the build
  fails (logged once), for shapes the kernel does not take (group size not a
  multiple of 4, empty tensors, non-CPU tensors), or when forced with
  ``backend="torch"`` / ``SVDQ_CPU_GEMM=torch``.

The weight-side work (VNNI re-layout, per-group sums, transposed scales) can be done
once with :func:`prepare_weight`; :func:`grouped_int_gemm` accepts either that
object or raw tensors (then it packs on every call: one cheap pass over the weight).
There is deliberately no cache keyed on ``data_ptr``: a fresh tensor reusing a freed
address would silently hit a stale entry.
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch

__all__ = [
    "grouped_int_gemm",
    "grouped_int_gemm_torch",
    "prepare_weight",
    "PreparedWeight",
    "fast_backend_available",
]

_log = logging.getLogger(__name__)

ENV_BACKEND = "SVDQ_CPU_GEMM"  # "auto" (default), "torch" (force fallback), "vnni" (fail loudly)
_SRC = Path(__file__).with_name("cpu_kernels") / "grouped_gemm_vnni.cpp"
_CFLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-fopenmp"]
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")

_lock = threading.Lock()
_ops = None  # torch.ops.svdq_cpu_gemm once built
_unavailable: Optional[str] = None  # reason the fast path is off (logged once)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _why_no_fast_path() -> Optional[str]:
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not x86-64 Linux ({platform.system()} {platform.machine()})"
    missing = [f for f in _REQUIRED_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"CPU lacks {', '.join(missing)}"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    if not _SRC.is_file():
        return f"kernel source missing: {_SRC}"
    return None


def _load_ops():
    """Build/load the VNNI kernel once per process; None (logged once) if impossible."""
    global _ops, _unavailable
    if _ops is not None or _unavailable is not None:
        return _ops
    with _lock:
        if _ops is not None or _unavailable is not None:
            return _ops
        reason = _why_no_fast_path()
        if reason is None:
            try:
                from torch.utils.cpp_extension import load  # slow import: keep it lazy

                load(
                    name="svdq_cpu_gemm_vnni",
                    sources=[str(_SRC)],
                    extra_cflags=_CFLAGS,
                    extra_ldflags=["-fopenmp"],
                    is_python_module=False,
                    verbose=False,
                )
                _ops = torch.ops.svdq_cpu_gemm
                return _ops
            except Exception as e:  # compiler error, missing headers, ...
                reason = f"building the C++ kernel failed: {type(e).__name__}: {e}"
        _unavailable = reason
        _log.warning("svdq_compile: fast CPU grouped GEMM unavailable (%s); using the torch fallback", reason)
        return None


def fast_backend_available() -> bool:
    """True if the VNNI kernel is (or can be) loaded; builds it on first call."""
    return _load_ops() is not None


def _backend(backend: Optional[str]) -> str:
    b = (backend or os.environ.get(ENV_BACKEND) or "auto").lower()
    if b not in ("auto", "torch", "vnni"):
        raise ValueError(f"unknown CPU GEMM backend {b!r} (auto, torch, vnni)")
    return b


class PreparedWeight(NamedTuple):
    """A weight ready for :func:`grouped_int_gemm` (``packed`` is None on the torch path)."""

    qw: torch.Tensor  # [N, K] int8 (kept for the fallback)
    sw: torch.Tensor  # [N, K // G] fp32
    group_size: int
    packed: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (Bp, -128*sums, sw^T)

    @property
    def shape(self) -> torch.Size:
        return self.qw.shape


def _kernel_ok(qw: torch.Tensor, group_size: int) -> bool:
    n, k = qw.shape
    return (
        qw.device.type == "cpu"
        and qw.dtype == torch.int8
        and group_size > 0
        and group_size % 4 == 0
        and k % group_size == 0
        and n > 0
        and k > 0
    )


def prepare_weight(
    qw: torch.Tensor, sw: torch.Tensor, group_size: int, *, backend: Optional[str] = None
) -> PreparedWeight:
    """qw: [N, K] int8, sw: [N, K//G] -> a reusable :class:`PreparedWeight`."""
    sw = sw.float()
    b = _backend(backend)
    packed = None
    if b != "torch" and _kernel_ok(qw, group_size):
        ops = _load_ops()
        if ops is None and b == "vnni":
            raise RuntimeError(f"VNNI CPU GEMM requested but unavailable: {_unavailable}")
        if ops is not None:
            packed = tuple(ops.pack_weight(qw, sw, group_size))
    elif b == "vnni":
        raise RuntimeError(f"VNNI CPU GEMM cannot take qw {tuple(qw.shape)} {qw.dtype} with G={group_size}")
    return PreparedWeight(qw, sw, group_size, packed)


def grouped_int_gemm_torch(
    qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Pure-torch fallback: dequantize both operands to fp32 and run one fp32 GEMM."""
    m, k = qa.shape
    n = qw.shape[0]
    a = (qa.view(m, -1, group_size).float() * sa.float().unsqueeze(-1)).view(m, k)
    w = (qw.view(n, -1, group_size).float() * sw.float().unsqueeze(-1)).view(n, k)
    return a @ w.t()


def grouped_int_gemm(
    qa: torch.Tensor,
    sa: torch.Tensor,
    qw: Union[torch.Tensor, PreparedWeight],
    sw: Optional[torch.Tensor],
    group_size: int,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """qa: [M, K] int8, sa: [M, K//G] fp32, qw: [N, K] int8 (or a PreparedWeight, then sw
    may be None), sw: [N, K//G] fp32 -> [M, N] fp32.

    ``backend``: None/"auto" (VNNI kernel when possible), "torch" (force the fallback),
    "vnni" (raise instead of falling back); default from ``$SVDQ_CPU_GEMM``.
    """
    b = _backend(backend)
    if isinstance(qw, PreparedWeight):
        prep = qw
        if prep.group_size != group_size:
            raise ValueError(f"weight prepared for G={prep.group_size}, called with G={group_size}")
        qw, sw = prep.qw, prep.sw
    else:
        prep = None
    m, k = qa.shape
    if qw.shape[1] != k:
        raise ValueError(f"K mismatch: qa {tuple(qa.shape)} vs qw {tuple(qw.shape)}")
    fast = (
        b != "torch"
        and m > 0
        and qa.dtype == torch.int8
        and qa.device.type == "cpu"
        and _kernel_ok(qw, group_size)
    )
    if fast:
        if prep is None or prep.packed is None:
            ops = _load_ops()
            if ops is not None:
                packed = ops.pack_weight(qw, sw.float(), group_size)
            else:
                packed = None
        else:
            ops, packed = _ops, prep.packed
        if packed is not None:
            bp, bias, swt = packed
            return ops.gemm_packed(qa, sa.float(), bp, bias, swt, qw.shape[0], group_size)
        if b == "vnni":
            raise RuntimeError(f"VNNI CPU GEMM requested but unavailable: {_unavailable}")
    elif b == "vnni":
        raise RuntimeError("VNNI CPU GEMM cannot take these inputs (dtype/device/group size/empty)")
    return grouped_int_gemm_torch(qa, sa, qw, sw, group_size)

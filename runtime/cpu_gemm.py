"""Grouped integer GEMM on CPU: ``Y[m, n] = sum_g sa[m, g] * sw[n, g] * (qa_g @ qw_g^T)[m, n]``.

Two implementations with the same contract (exact int32 partial sums per group,
fp32 rescale/accumulation, no bf16 anywhere):

- ``"cpp"``: the C++ kernels of the active ISA, one extension per ISA family, chosen by
  CPU flags at first use (amx > avx512_vnni > avx_vnni > avx2, logged once;
  ``$SVDQ_CPU_ISA`` forces one, see :func:`active_isa`, :func:`set_isa` and docs/cpu.md),
  all bit-identical. The AVX2 / AVX-VNNI kernels are in ``cpu_kernels/*_avx2.cpp``; the
  AVX-512 one, described here, is ``cpu_kernels/grouped_gemm_avx512.cpp``, using
  AVX512-VNNI ``VPDPBUSD`` (the ISA-independent glue of all of them is
  ``cpu_kernels/op_glue.h``). Activations are biased into u8 with ``^ 0x80`` and the
  bias is removed exactly through a per-(group, column) weight sum, so every
  int4/int8 range works. Each group's int32 partial is folded into the fp32 output
  with one FMA (``y = fma(float(I_g), sa * sw, y)``, groups in ascending order).
  Where the CPU has AMX-INT8 and Linux grants the tile state (Sapphire Rapids and
  later), full 32-row blocks run on AMX tiles instead (``cpu_kernels/grouped_gemm_amx.cpp``,
  one ``TDPBUSD`` per 16x16 block and group of 64): same integer partials, same fold
  order, bit-identical output, 1.3-1.7x the AVX512-VNNI GEMM's speed on the 2-core dev VM.
  ``SVDQ_CPU_AMX=0`` or :func:`set_amx` turns it off.
  Built lazily on the first call with ``torch.utils.cpp_extension.load`` (cached in
  the torch extensions dir, ``$TORCH_EXTENSIONS_DIR``); OpenMP threads come from
  torch's intra-op pool.
- ``"torch"``: the pure-PyTorch baseline (dequantize both operands to fp32, one fp32
  GEMM). Used when the CPU lacks AVX2 (and AVX-512), no C++ compiler is found, the build
  fails (logged once), for shapes the kernel does not take (group size not a
  multiple of 4, empty tensors, non-CPU tensors), or when forced with
  ``backend="torch"`` / ``SVDQ_CPU_GEMM=torch``.

``backend=`` / ``$SVDQ_CPU_GEMM`` choose: ``"auto"`` (the default: ``"cpp"`` where it can
run, else ``"torch"``), ``"torch"``, or ``"cpp"`` (an error where the C++ kernels cannot
take the call); any other value is a ValueError listing these names.

The weight-side work (VNNI re-layout, per-group sums, transposed scales) can be done
once with :func:`prepare_weight`; :func:`grouped_int_gemm` accepts either that
object or raw tensors (then it packs on every call: one cheap pass over the weight).
There is deliberately no cache keyed on ``data_ptr``: a fresh tensor reusing a freed
address would silently hit a stale entry.
"""
from __future__ import annotations

import contextlib
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
    "prepare_weight_progressive",
    "expand_progressive_weight",
    "PreparedWeight",
    "active_isa",
    "available_isas",
    "set_isa",
    "use_isa",
    "fast_backend_available",
    "quantize_activation_fused",
    "gemm_prepared_u8",
    "set_amx",
    "amx_enabled",
]

_log = logging.getLogger(__name__)

ENV_BACKEND = "SVDQ_CPU_GEMM"  # "auto" (default), "torch" (force fallback), "cpp" (a C++ kernel or fail loudly)
BACKENDS = ("auto", "torch", "cpp")  # values of $SVDQ_CPU_GEMM and of the backend= arguments
ENV_ISA = "SVDQ_CPU_ISA"  # force one ISA: amx | avx512_vnni | avx_vnni | avx2 | neon | torch
ENV_AMX = "SVDQ_CPU_AMX"  # "0" keeps the GEMM on AVX512-VNNI even where AMX is available
_KDIR = Path(__file__).with_name("cpu_kernels")
_SRC = _KDIR / "grouped_gemm_avx512.cpp"
_SRC_QUANT = _KDIR / "quantize_act.cpp"  # fused activation quantizer
_SRC_W4A16 = _KDIR / "w4a16.cpp"  # weight-only INT4 (see cpu_w4a16.py)
_SRC_AMX = _KDIR / "grouped_gemm_amx.cpp"  # AMX blocks of the same GEMM
_SOURCES = (_SRC, _SRC_QUANT, _SRC_W4A16, _SRC_AMX)
# The AVX2 / AVX-VNNI kernels (same ops, same bits; no AVX-512 instruction anywhere).
_SOURCES_AVX2 = (_KDIR / "grouped_gemm_avx2.cpp", _KDIR / "quantize_act_avx2.cpp", _KDIR / "w4a16_avx2.cpp")
# -ffp-contract=off: the quantizer must reproduce torch's separately rounded fp32 ops.
_COMMON = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
_CFLAGS = _COMMON + ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni"]
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")


class _Ext(NamedTuple):
    """One C++ extension: its own translation units and -m flags, so an extension for a
    smaller ISA builds and loads on CPUs (and compilers) without the bigger ones."""

    name: str  # torch extension (build directory) name
    namespace: str  # torch.ops.<namespace>
    sources: tuple
    cflags: tuple


_EXTS = {
    "avx512": _Ext("svdq_cpu_gemm_avx512", "svdq_cpu_avx512", _SOURCES,
                   tuple(_CFLAGS + ["-DSVDQ_NS=svdq_cpu_avx512"])),
    "avx_vnni": _Ext("svdq_cpu_gemm_avxvnni", "svdq_cpu_avxvnni", _SOURCES_AVX2,
                     tuple(_COMMON + ["-mavx2", "-mfma", "-mf16c", "-mavxvnni", "-DSVDQ_AVXVNNI=1",
                                      "-DSVDQ_NS=svdq_cpu_avxvnni"])),
    "avx2": _Ext("svdq_cpu_gemm_avx2", "svdq_cpu_avx2", _SOURCES_AVX2,
                 tuple(_COMMON + ["-mavx2", "-mfma", "-mf16c", "-DSVDQ_NS=svdq_cpu_avx2"])),
}
# Preference order of the automatic choice, with the extension and the /proc/cpuinfo flags
# (CPUID bits the kernel also saw enabled in XCR0) each ISA needs.
ISAS = ("amx", "avx512_vnni", "avx_vnni", "avx2", "neon", "torch")
_ISA_EXT = {"amx": "avx512", "avx512_vnni": "avx512", "avx_vnni": "avx_vnni", "avx2": "avx2"}
_ISA_FLAGS = {
    "amx": _REQUIRED_FLAGS + ("amx_tile", "amx_int8"),
    "avx512_vnni": _REQUIRED_FLAGS,
    "avx_vnni": ("avx2", "fma", "f16c", "avx_vnni"),
    "avx2": ("avx2", "fma", "f16c"),
}

_lock = threading.RLock()
_ops = None  # torch.ops.<namespace> of the active ISA once built
_isa: Optional[str] = None  # the active ISA (None until chosen; "torch" for the fallback)
_unavailable: Optional[str] = None  # reason the fast path is off (logged once)
_ext_ops: dict = {}  # extension key -> its loaded ops


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _is_x86_linux() -> bool:
    return platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")


def isa_missing(isa: str) -> Optional[str]:
    """None if this machine can run ``isa``'s kernels, else what it lacks (for messages)."""
    if isa == "torch":
        return None
    if isa == "neon":
        if platform.machine().lower() not in ("aarch64", "arm64"):
            return f"not an ARM64 CPU ({platform.machine()})"
        return "no NEON torch extension in this version (the NEON kernels are a standalone harness)"
    if isa not in _ISA_FLAGS:
        raise ValueError(f"unknown CPU ISA {isa!r} (one of {', '.join(ISAS)})")
    if not _is_x86_linux():
        return f"not x86-64 Linux ({platform.system()} {platform.machine()})"
    flags = _cpu_flags()
    missing = [f for f in _ISA_FLAGS[isa] if f not in flags]
    if missing:
        return f"CPU lacks {', '.join(missing)}"
    return None


def available_isas() -> list[str]:
    """The ISAs this CPU can run, best first (always ends with "torch"); no build needed."""
    return [isa for isa in ISAS if isa_missing(isa) is None]


def _forced_isa() -> Optional[str]:
    v = os.environ.get(ENV_ISA, "").strip().lower()
    if not v or v == "auto":
        return None
    if v not in ISAS:
        raise ValueError(f"{ENV_ISA}={v!r} is not one of {', '.join(ISAS)} (or auto)")
    return v


def _why_no_fast_path() -> Optional[str]:
    """Why no C++ kernel can run here (None when at least one ISA can)."""
    if not _is_x86_linux():
        return f"not x86-64 Linux ({platform.system()} {platform.machine()})"
    if not any(isa_missing(i) is None for i in _ISA_EXT):
        return f"CPU lacks AVX2/FMA/F16C (for the AVX2 kernels: {isa_missing('avx2')})"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    for src in _SOURCES + _SOURCES_AVX2:
        if not src.is_file():
            return f"kernel source missing: {src}"
    return None


def _load_ext(key: str):
    """Build (first use) or load one extension; returns its torch.ops namespace."""
    ops = _ext_ops.get(key)
    if ops is not None:
        return ops
    import time

    from torch.utils.cpp_extension import load  # slow import: keep it lazy

    ext = _EXTS[key]
    # First use compiles the C++ kernels (~20-60 s on 2 cores), later processes load
    # the cached build: say so, or the first quantized call looks hung.
    _log.info("svdq_compile: loading the C++ CPU kernels for %s (the first use compiles them, ~20-60 s; "
              "cached under $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)", key)
    t0 = time.perf_counter()
    load(name=ext.name, sources=[str(p) for p in ext.sources], extra_cflags=list(ext.cflags),
         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    ops = getattr(torch.ops, ext.namespace)
    _ext_ops[key] = ops
    _log.info("svdq_compile: C++ CPU kernels (%s) ready in %.1f s", key, time.perf_counter() - t0)
    return ops


def _activate(isa: str):
    """Load ``isa``'s extension and make it the active one (raises if impossible)."""
    global _ops, _isa, _unavailable
    ops = _load_ext(_ISA_EXT[isa])
    if _ISA_EXT[isa] == "avx512":
        want_amx = isa == "amx"
        if ops.set_amx(want_amx) != want_amx:
            raise RuntimeError("SVDQ_CPU_ISA=amx but Linux did not grant the AMX tile state (arch_prctl)")
    _ops, _isa, _unavailable = ops, isa, None
    return ops


def _load_ops():
    """Choose and build/load the ISA's kernels once per process; None (logged once) if impossible.

    Automatic order: amx > avx512_vnni > avx_vnni > avx2 > torch ($SVDQ_CPU_ISA forces one;
    a forced ISA this CPU cannot run is an error naming what it lacks)."""
    global _ops, _unavailable, _isa
    if _ops is not None or _unavailable is not None:
        return _ops
    with _lock:
        if _ops is not None or _unavailable is not None:
            return _ops
        forced = _forced_isa()
        if forced == "torch":
            _unavailable, _isa = f"forced by {ENV_ISA}=torch", "torch"
            _log.info("svdq_compile: CPU kernels: torch fallback (%s)", _unavailable)
            return None
        if forced is not None:
            missing = isa_missing(forced)
            if missing:
                raise RuntimeError(f"{ENV_ISA}={forced} cannot run here: {missing}")
        reason = _why_no_fast_path()
        if reason is None:
            if forced is not None:
                candidates = [forced]
            else:
                candidates = [i for i in _ISA_EXT if isa_missing(i) is None]
                if "amx" in candidates and os.environ.get(ENV_AMX, "1") == "0":
                    candidates.remove("amx")
            for isa in candidates:
                try:
                    ops = _activate(isa)
                except Exception as e:  # compiler error, missing headers, no AMX permission, ...
                    if forced is not None:
                        raise RuntimeError(f"{ENV_ISA}={forced}: building/loading its kernels failed: "
                                           f"{type(e).__name__}: {e}") from e
                    reason = f"building the {isa} kernels failed: {type(e).__name__}: {e}"
                    _log.warning("svdq_compile: %s; trying the next ISA", reason)
                    continue
                _log.info("svdq_compile: CPU kernels: %s%s", isa, f" (forced by {ENV_ISA})" if forced else "")
                return ops
        _unavailable, _isa = reason, "torch"
        _log.warning("svdq_compile: fast CPU grouped GEMM unavailable (%s); using the torch fallback", reason)
        return None


def active_isa() -> str:
    """The ISA the CPU kernels run on ("amx", "avx512_vnni", "avx_vnni", "avx2" or "torch");
    chooses (and builds) on first call."""
    ops = _load_ops()
    if ops is None:
        return "torch"
    ext = _active_ext()
    if ext == "avx512":  # set_amx() may have switched between the two
        return "amx" if ops.amx_enabled() else "avx512_vnni"
    return ext or "torch"  # the other extensions are named after their ISA


def set_isa(isa: str) -> str:
    """Switch this process to ``isa`` (for tests and benchmarks); returns the previous one.
    Weights prepared before keep working (each remembers the kernels it was packed for).
    Raises if this CPU cannot run ``isa``."""
    global _ops, _isa, _unavailable
    with _lock:
        prev = active_isa()
        if isa == "torch":
            _ops, _isa, _unavailable = None, "torch", f"set_isa('torch')"
            return prev
        missing = isa_missing(isa)
        if missing:
            raise RuntimeError(f"cannot use the {isa} kernels here: {missing}")
        _activate(isa)
        return prev


@contextlib.contextmanager
def use_isa(isa: str):
    """``with use_isa("avx2"): ...`` runs the block on that ISA's kernels."""
    prev = set_isa(isa)
    try:
        yield
    finally:
        set_isa(prev)


def fast_backend_available() -> bool:
    """True if a C++ kernel (any ISA) is (or can be) loaded; builds it on first call."""
    return _load_ops() is not None


def set_amx(on: bool) -> bool:
    """Use AMX tiles for the grouped GEMM where the CPU and OS allow it (the default; the
    results are bit-identical to the AVX512-VNNI kernel). Returns whether AMX is now on
    (always False on the AVX2 / AVX-VNNI kernels)."""
    ops = _load_ops()
    return bool(ops.set_amx(bool(on))) if ops is not None else False


def amx_enabled() -> bool:
    """Whether the grouped GEMM currently runs its 32-row blocks on AMX tiles."""
    ops = _load_ops()
    return bool(ops.amx_enabled()) if ops is not None else False


class _Packed(tuple):
    """(Bp, bias, swt) of one extension's packing; ``.ext`` names that extension (the
    layouts differ between the AVX-512, AVX-VNNI and AVX2 kernels)."""

    ext: str = ""

    def __new__(cls, items, ext: str):
        obj = super().__new__(cls, items)
        obj.ext = ext
        return obj

    def __getnewargs__(self):  # copy.deepcopy / pickle (a deep-copied model copies its weight caches)
        return (tuple(self), self.ext)


def _packed_ops(packed):
    """The ops that can run a packed weight (the extension it was packed by)."""
    ext = getattr(packed, "ext", "")
    if ext:
        return _load_ext(ext)
    return _load_ops()


def _active_ext() -> str:
    """The extension key of the active ops (derived from the ops themselves: tests swap
    ``_ops`` in and out)."""
    return next((key for key, ops in _ext_ops.items() if ops is _ops and _ops is not None), "")


def _backend(backend: Optional[str]) -> str:
    """``backend`` (or ``$SVDQ_CPU_GEMM`` when None, default "auto"), checked: one of BACKENDS."""
    source = "backend=" if backend else f"${ENV_BACKEND}"
    b = (backend or os.environ.get(ENV_BACKEND) or "auto").strip().lower()
    if b not in BACKENDS:
        raise ValueError(f"unknown CPU GEMM backend {b!r} (from {source}); valid names: {', '.join(BACKENDS)} "
                         "(cpp: the C++ kernels of the active ISA, or an error where they cannot run)")
    return b


class PreparedWeight(NamedTuple):
    """A weight ready for :func:`grouped_int_gemm` (``packed`` is None on the torch path)."""

    qw: torch.Tensor  # [N, K] int8, or [N, K/2] packed int4 if weight_bits == 4 (for the fallback)
    sw: torch.Tensor  # [N, K // G] fp32
    group_size: int
    packed: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (Bp, -128*sums, sw^T)
    weight_bits: int = 8

    def int_weight(self) -> torch.Tensor:
        """[N, K] int8 (unpacks int4 weights; only the fallback needs this)."""
        if self.weight_bits == 4:
            from .packing import unpack_int4

            return unpack_int4(self.qw, signed=True)
        return self.qw


def _kernel_ok(qw: torch.Tensor, group_size: int, weight_bits: int = 8) -> bool:
    n, k = qw.shape
    if weight_bits == 4:
        k *= 2
    return (
        weight_bits in (4, 8)
        and (weight_bits == 8 or k >= 8)
        and
        qw.device.type == "cpu"
        and qw.dtype == torch.int8
        and group_size > 0
        and group_size % 4 == 0
        and k % group_size == 0
        and n > 0
        and k > 0
    )


def prepare_weight(
    qw: torch.Tensor,
    sw: torch.Tensor,
    group_size: int,
    *,
    weight_bits: int = 8,
    backend: Optional[str] = None,
) -> PreparedWeight:
    """qw: [N, K] int8 (``weight_bits=8``, any int8 values) or the [N, K/2] packed int4
    bytes of :func:`.packing.pack_int4` (``weight_bits=4``, unpacked inside the kernel's
    packing pass: no [N, K] intermediate), sw: [N, K//G] -> a reusable :class:`PreparedWeight`.

    Packing costs one pass over the weight (~5-10 ms for 3072x3072 on 1-2 cores), so
    callers that run a layer repeatedly should keep the result.
    """
    sw = sw.float()
    b = _backend(backend)
    packed = None
    if b != "torch" and _kernel_ok(qw, group_size, weight_bits):
        ops = _load_ops()
        if ops is None and b == "cpp":
            raise RuntimeError(f"C++ CPU GEMM requested (backend 'cpp') but unavailable: {_unavailable}")
        if ops is not None:
            packed = _Packed(ops.pack_weight(qw, sw, group_size, weight_bits == 4), _active_ext())
    elif b == "cpp":
        raise RuntimeError(f"C++ CPU GEMM cannot take qw {tuple(qw.shape)} {qw.dtype} with G={group_size}")
    return PreparedWeight(qw, sw, group_size, packed, weight_bits)


def expand_progressive_weight(qweight: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor,
                              group_size: int) -> torch.Tensor:
    """QServe-style progressive weight -> [N, K] int8 ``e = (u - z) * s`` (u = nibble + 8)."""
    from .packing import unpack_int4

    n = qweight.shape[0]
    u = unpack_int4(qweight, signed=True).to(torch.int32) + 8
    k = u.shape[1]
    e = (u.view(n, k // group_size, group_size) - wzeros.to(torch.int32)[..., None]) * wscales.to(torch.int32)[..., None]
    return e.view(n, k).to(torch.int8)


def prepare_weight_progressive(
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wzeros: torch.Tensor,
    wchannel: torch.Tensor,
    group_size: int,
    *,
    backend: Optional[str] = None,
) -> PreparedWeight:
    """The per-token ``w4a8-int8`` weight (``runtime/per_token.py``'s ProgressiveWeight: packed
    nibbles ``u - 8`` [N, K/2], integer group scales ``s`` and zeros ``z`` [N, K/G], channel
    scales ``c`` [N]) prepared for :func:`grouped_int_gemm` / :func:`gemm_prepared_u8` with
    ``group_size = K`` (activation scales ``sa`` [M, 1]).

    The result equals that of the expanded int8 weight ``e = (u - z) * s`` with ``sw = c``
    bit for bit on every ISA. On AVX2 the GEMM runs on ``u`` directly (the 4-bit layout, half
    the instructions of an int8 x int8 product there) and applies ``s`` / ``z`` per weight
    group in exact int32; the other ISAs pack the expanded int8 weight.
    """
    k = qweight.shape[1] * 2
    e = expand_progressive_weight(qweight, wscales, wzeros, group_size)
    sw = wchannel.float().reshape(-1, 1)
    b = _backend(backend)
    if b != "torch" and qweight.device.type == "cpu" and group_size % 4 == 0 and k % group_size == 0:
        ops = _load_ops()
        if ops is not None and _active_ext() == "avx2":
            packed = _Packed(ops.pack_weight_progressive(qweight.contiguous(), wscales, wzeros, wchannel.float(),
                                                         group_size), "avx2")
            return PreparedWeight(e, sw, k, packed, 8)
    return prepare_weight(e, sw, k, backend=backend)


def grouped_int_gemm_torch(
    qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Pure-torch fallback: dequantize both operands to fp32 and run one fp32 GEMM."""
    m, k = qa.shape
    n = qw.shape[0]
    ng = k // group_size
    a = (qa.reshape(m, ng, group_size).float() * sa.float().unsqueeze(-1)).view(m, k)
    w = (qw.reshape(n, ng, group_size).float() * sw.float().unsqueeze(-1)).view(n, k)
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

    ``backend``: None/"auto" (the C++ kernels when possible), "torch" (force the fallback),
    "cpp" (the C++ kernels, raise instead of falling back); default from ``$SVDQ_CPU_GEMM``.
    """
    b = _backend(backend)
    m, k = qa.shape
    if isinstance(qw, PreparedWeight):
        prep = qw
        if prep.group_size != group_size:
            raise ValueError(f"weight prepared for G={prep.group_size}, called with G={group_size}")
        kw = prep.qw.shape[1] * (2 if prep.weight_bits == 4 else 1)
        if kw != k:
            raise ValueError(f"K mismatch: qa {tuple(qa.shape)} vs prepared weight with K={kw}")
        usable = prep.packed is not None and b != "torch" and m > 0 and qa.dtype == torch.int8
        if usable and qa.device.type == "cpu":
            bp, bias, swt = prep.packed
            return _packed_ops(prep.packed).gemm_packed(qa, sa.float(), bp, bias, swt, prep.qw.shape[0], group_size)
        if b == "cpp":
            raise RuntimeError("C++ CPU GEMM cannot take these inputs (unprepared weight, dtype, device or empty)")
        return grouped_int_gemm_torch(qa, sa, prep.int_weight(), prep.sw, group_size)

    if qw.shape[1] != k:
        raise ValueError(f"K mismatch: qa {tuple(qa.shape)} vs qw {tuple(qw.shape)}")
    fast = b != "torch" and m > 0 and qa.dtype == torch.int8 and qa.device.type == "cpu" and _kernel_ok(qw, group_size)
    ops = _load_ops() if fast else None
    if ops is not None:
        bp, bias, swt = ops.pack_weight(qw, sw.float(), group_size, False)
        return ops.gemm_packed(qa, sa.float(), bp, bias, swt, qw.shape[0], group_size)
    if b == "cpp":
        reason = _unavailable if fast else "dtype/device/group size/empty input"
        raise RuntimeError(f"C++ CPU GEMM requested (backend 'cpp') but unusable here: {reason}")
    return grouped_int_gemm_torch(qa, sa, qw, sw, group_size)


def quantize_activation_fused(
    x: torch.Tensor,
    smooth: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    *,
    unsigned: bool = False,
    shift: float = 0.0,
    emit_xs: bool = False,
    biased: bool = False,
    lora_down: Optional[torch.Tensor] = None,
) -> Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """One-pass C++ equivalent of ``quantize_activation(smooth_input(x, smooth), ...)``.

    x: [M, K] fp32/bf16/fp16 on the CPU -> (q, sa, xs): q [M, K] int8 bit-identical to
    ``quantize_activation`` (or, with ``biased=True``, uint8 ``q ^ 0x80``: the operand of
    :func:`gemm_prepared_u8`), sa [M, K//G] fp32 bit-identical, xs = X' = x / smooth in
    fp32 (only with ``emit_xs``, else None), h = X' @ lora_down^T [M, R] fp32 (only with
    ``lora_down`` [R, K], else None; fp32 dot products, not bit-matched to torch's matmul).
    Returns None when the C++ kernels are
    unavailable or forced off (``SVDQ_CPU_GEMM=torch``); the caller then uses the torch path.
    """
    from .quantize import qrange

    qmin, qmax = qrange(bits, unsigned)
    if _backend(None) == "torch" or x.device.type != "cpu" or x.dim() != 2:
        return None
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if group_size <= 0 or x.shape[1] % group_size:
        raise ValueError(f"last dim {x.shape[1]} is not a multiple of the group size {group_size}")
    ops = _load_ops()
    if ops is None:
        return None
    if lora_down is not None and (lora_down.dim() != 2 or lora_down.shape[1] != x.shape[1] or lora_down.shape[0] == 0):
        raise ValueError(f"lora_down must be [R, {x.shape[1]}], got {list(lora_down.shape)}")
    q, sa, xs, h = ops.quantize_act(x, smooth, group_size, qmin, qmax, unsigned, float(shift), emit_xs, biased,
                                    lora_down)
    return q, sa, (xs if emit_xs else None), (h if lora_down is not None else None)


def gemm_prepared_u8(
    qa_u8: torch.Tensor,
    sa: torch.Tensor,
    packed: tuple,
    n: int,
    group_size: int,
    h: Optional[torch.Tensor] = None,
    lora_up: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The C++ GEMM on an already biased activation (uint8 ``qa ^ 0x80`` from
    :func:`quantize_activation_fused`) and the ``packed`` tuple of a :class:`PreparedWeight`,
    with an optional fused epilogue ``Y += h @ lora_up^T`` (h [M, R], lora_up [N, R];
    fp32 FMAs in ascending rank order) then ``Y += bias`` ([N])."""
    bp, wsum, swt = packed
    if h is not None:
        if lora_up is None or lora_up.dim() != 2 or lora_up.shape != (n, h.shape[1]):
            raise ValueError(f"lora_up must be [{n}, {h.shape[1]}]")
    else:
        lora_up = None
    # lora_up goes in as [N, R] (the kernel transposes one 64-column panel at a time).
    return _packed_ops(packed).gemm_packed_u8(qa_u8, sa, bp, wsum, swt, n, group_size, h, lora_up, bias)

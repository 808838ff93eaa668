"""Launch configs for the prologue and GEMM kernels, and picking the fastest one.

Configs are keyed by (kernel spec, M bucket, N, K, GPU name). M is bucketed to the next
power of two because the token count changes between calls (dynamic shapes) and
re-tuning for each value would cost seconds per step; N and K are fixed per layer.

The lists are deliberately short (tuning compiles every candidate once). The GPU
lists target Hopper (H100/H200): 128x128 tiles with 8 warps, 128x64 / 64x128 with 4, and 4
pipeline stages for the INT8 ``tl.dot`` (wgmma), smaller tiles for few tokens. Under
``TRITON_INTERPRET=1`` tiny blocks keep the CPU interpreter fast and exercise the
boundary masks on small test shapes.

Set ``SVDQ_AUTOTUNE=0`` to skip benchmarking and take the first (heuristic) candidate.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, TypeVar, Union

import torch

from svdq_compile.codegen.cache import make_key, tune_cache
from svdq_compile.codegen.launch import interpreting
from svdq_compile.codegen.spec import KernelSpec

__all__ = [
    "GemmConfig",
    "PrologueConfig",
    "PtGemmConfig",
    "AutotuneError",
    "pt_gemm_candidates",
    "m_bucket",
    "gemm_candidates",
    "prologue_candidates",
    "choose_config",
    "device_name",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape of the GEMM kernel. One K step is always one quantization group."""

    block_m: int
    block_n: int
    group_m: int  # programs along M sharing a W panel in L2 (grouped launch order)
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class PrologueConfig:
    """Rows per program of the prologue kernel (each program walks all of K)."""

    block_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class PtGemmConfig:
    """Per-token GEMM (:mod:`.gemm_per_token`): the fused kernel's tile (one accumulator over K in
    BLOCK_K steps), or with ``library`` the library composition (``torch._scaled_mm`` /
    ``torch._int_mm``, then the epilogue kernel on this tile; block_k unused)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    library: bool = False


class AutotuneError(RuntimeError):
    """Every candidate config failed to compile or launch (callers fall back to torch)."""


Config = TypeVar("Config", GemmConfig, PrologueConfig, PtGemmConfig)


def m_bucket(m: int) -> int:
    """Next power of two of M, clamped to [16, 16384] (the tuning key for the token count)."""
    return min(16384, max(16, 1 << max(0, int(m) - 1).bit_length()))


# ------------------------------------------------------------------ candidate lists
_INTERP_GEMM = [GemmConfig(32, 32, 2, 1, 1)]
_INTERP_PROLOGUE = [PrologueConfig(32, 1, 1)]

_GPU_GEMM_SMALL_M = [  # M <= 64: few tokens (modulation linears, small batches)
    GemmConfig(64, 64, 1, 4, 4),
    GemmConfig(64, 128, 1, 4, 4),
    GemmConfig(16, 128, 1, 4, 4),
]
# Register budget: besides the fp32 accumulator, each K step holds the group's int32
# partial product tile, so a tile needs ~2 x BLOCK_M x BLOCK_N / threads registers for
# those two alone; 128x256 therefore gets 16 warps (64 + 64 per thread) instead of 8.
_GPU_GEMM_LARGE_M = [  # image tokens: FLUX has 4096 + 512 per image
    GemmConfig(128, 128, 8, 8, 4),
    # 128x256 with 16 warps was measured 16-18x slower on an H200 (spills): not tried.
    GemmConfig(64, 128, 8, 4, 4),
    GemmConfig(128, 64, 8, 4, 4),
]
_GPU_PROLOGUE = [
    PrologueConfig(16, 4, 3),
    PrologueConfig(32, 4, 3),
    PrologueConfig(64, 8, 3),
]


# Per-token GEMM (8-bit x 8-bit, no float work in the K loop). Hopper: 128x128x128 with
# 8 warps (two consumer warpgroups, m64n128k32 wgmma) and 3-4 stages of A and B tiles
# (32 KiB per stage); the fp32 accumulator takes 64 registers per thread at 128x128x8 warps,
# 128 at 128x256. Few tokens: 64-row tiles (one wgmma M) and more programs along N.
_INTERP_PT_GEMM = [PtGemmConfig(64, 64, 64, 2, 1, 1)]  # large tiles: fewer interpreted programs
_GPU_PT_GEMM_LARGE_M = [
    PtGemmConfig(128, 128, 128, 8, 8, 4),
    PtGemmConfig(128, 128, 128, 8, 8, 3),
    PtGemmConfig(128, 128, 64, 8, 8, 4),
    PtGemmConfig(128, 64, 128, 8, 4, 4),
    PtGemmConfig(64, 128, 128, 8, 4, 4),
]
_GPU_PT_GEMM_SMALL_M = [
    PtGemmConfig(64, 64, 128, 1, 4, 4),
    PtGemmConfig(64, 128, 128, 1, 4, 4),
    PtGemmConfig(16, 64, 128, 1, 4, 4),
]
# GPUs whose tl.dot is mma.sync (sm_80/86/89/120): operands pass through registers, and the
# epilogue's tf32x3 low-rank dot on a 128x128 tile spills there (offline, Triton 3.9: sm_120
# 40 B of stack at 128x128x128/8 warps, 16 B at 128x128x64), so at most 64x128 / 128x64
# per 8 warps (no spills on sm_89 or sm_120).
_MMA_SYNC_PT_GEMM_LARGE_M = [
    PtGemmConfig(128, 64, 64, 8, 8, 3),
    PtGemmConfig(64, 128, 64, 8, 8, 3),
    PtGemmConfig(64, 64, 64, 8, 4, 3),
]
_MMA_SYNC_PT_GEMM_SMALL_M = [
    PtGemmConfig(64, 64, 64, 1, 4, 3),
    PtGemmConfig(64, 128, 64, 1, 8, 3),
]
# The composition's epilogue pass is memory-bound: one tile shape per M range.
_PT_LIBRARY = {False: PtGemmConfig(64, 128, 32, 8, 4, 1, True), True: PtGemmConfig(16, 128, 32, 1, 4, 1, True)}
_MMA_SYNC_PT_LIBRARY = PtGemmConfig(64, 128, 32, 8, 8, 1, True)


def pt_gemm_candidates(
    m: int, n: int, k: int, scheme: str, library: bool, capability: Optional[tuple[int, int]] = None
) -> list[PtGemmConfig]:
    """Configs for the per-token GEMM (first = heuristic default); ``library``: the library
    composition can run this shape here (it joins the candidates, so tuning picks the faster
    of fused kernel and composition per shape bucket and the mode is never slower than it).
    ``capability``: the GPU's (major, minor); None or sm_90/sm_100 (wgmma, tcgen05): the
    Hopper lists; other GPUs (mma.sync) get smaller tiles.

    INT8 on a GPU puts the composition first: Triton's Hopper pipeliner serialises every
    wgmma of a non-fp32 accumulator (docs/design.md section 2.1), ``torch._int_mm`` (cuBLASLt) does not; on
    wgmma GPUs (sm_90, sm_100) the composition is the only candidate.
    """
    small = m <= 64
    if interpreting():
        fused = list(_INTERP_PT_GEMM)
        lib = [PtGemmConfig(64, 64, 64, 2, 1, 1, True)]
    elif capability is None or capability[0] in (9, 10):
        fused = list(_GPU_PT_GEMM_SMALL_M if small else _GPU_PT_GEMM_LARGE_M)
        lib = [_PT_LIBRARY[small]]
    else:
        fused = list(_MMA_SYNC_PT_GEMM_SMALL_M if small else _MMA_SYNC_PT_GEMM_LARGE_M)
        lib = [_MMA_SYNC_PT_LIBRARY]
    if not library:
        return fused
    if scheme == "int8" and not interpreting():
        # wgmma GPUs: the fused int8 loop is serialised (no MMA in flight), never a candidate.
        return lib if capability is None or capability[0] in (9, 10) else lib + fused
    return fused + lib


def gemm_candidates(m: int, n: int, k: int) -> list[GemmConfig]:
    """Configs to try for an [M, K] x [N, K]^T GEMM (first = heuristic default)."""
    if interpreting():
        return list(_INTERP_GEMM)
    return list(_GPU_GEMM_SMALL_M if m <= 64 else _GPU_GEMM_LARGE_M)


def prologue_candidates(m: int, k: int) -> list[PrologueConfig]:
    """Configs to try for the prologue over an [M, K] input (first = heuristic default)."""
    if interpreting():
        return list(_INTERP_PROLOGUE)
    if m <= 64:
        return [PrologueConfig(16, 4, 3)]  # one or a few programs: nothing to tune
    return list(_GPU_PROLOGUE)


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_")


def device_name(device: torch.device) -> str:
    """GPU model name (configs are tuned per chip); cached: this runs on every call."""
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


def _tuning_enabled() -> bool:
    return os.environ.get("SVDQ_AUTOTUNE", "1") != "0" and not interpreting()


def choose_config(
    kind: str,
    spec: KernelSpec,
    m: Union[int, torch.SymInt],
    n: int,
    k: int,
    candidates: Sequence[Config],
    bench: Optional[Callable[[Config], None]],
    device: torch.device,
) -> Config:
    """Return the fastest candidate for this (spec, shape), benchmarking once per key.

    ``bench(cfg)`` launches the kernel once with ``cfg`` on real tensors; pass None while
    tracing (fake tensors / symbolic M), where only cached or default configs are used.
    A candidate that fails to compile or launch (e.g. out of shared memory) is skipped.
    """
    if len(candidates) == 1 or not isinstance(m, int):
        return candidates[0]
    # Fast path: a decision already made in this process (no string keys, no I/O).
    memo_key = (kind, spec, m_bucket(m), int(n), int(k), device, _tuning_enabled())
    cfg = _MEMO.get(memo_key)
    if cfg is not None:
        return cfg
    # One tuner per key: threads whose first call hits the same shape wait for the first
    # one's answer instead of benchmarking concurrently (timings on a GPU another thread
    # is loading are noise, and they could pick different configs).
    with _key_lock(memo_key):
        cfg = _MEMO.get(memo_key)
        if cfg is not None:
            return cfg
        cfg = _choose_uncached(kind, spec, m, n, k, candidates, bench, device)
        if bench is not None or not _tuning_enabled():
            _MEMO[memo_key] = cfg  # final; without bench a later real call may still tune
    return cfg


# (kind, spec, M bucket, N, K, device) -> config chosen in this process.
_MEMO: dict = {}
_LOCKS: dict = {}
_LOCKS_GUARD = threading.Lock()


def _key_lock(key) -> threading.Lock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.Lock()
        return lock


def _choose_uncached(
    kind: str,
    spec: KernelSpec,
    m: int,
    n: int,
    k: int,
    candidates: Sequence[Config],
    bench: Optional[Callable[[Config], None]],
    device: torch.device,
) -> Config:
    cls = type(candidates[0])
    key = make_key(kind, spec.key(), m_bucket(m), int(n), int(k), device_name(device))
    cache = tune_cache()
    hit = cache.get(key)
    if hit is not None:
        try:
            cfg = cls(**hit)
            if cfg in candidates or not _tuning_enabled():
                return cfg
        except TypeError:
            pass  # stale entry from an older config layout: re-tune
    if bench is None or not _tuning_enabled():
        return candidates[0]

    from triton.testing import do_bench

    best, best_ms = candidates[0], math.inf
    timings = []
    for cfg in candidates:
        try:
            bench(cfg)  # compile + first launch outside the timed region
            ms = do_bench(lambda: bench(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a failing candidate must not kill the call
            log.debug("svdq autotune: %s %s failed: %s", kind, cfg, e)
            ms = math.inf
        timings.append((cfg, ms))
        if ms < best_ms:
            best, best_ms = cfg, ms
    if not math.isfinite(best_ms):
        raise AutotuneError(f"svdq autotune: every {kind} config failed for {key}")
    log.info("svdq autotune %s: %s (%.4f ms)", key, best, best_ms)
    log.debug("svdq autotune %s timings: %s", key, timings)
    cache.put(key, asdict(best))
    return best

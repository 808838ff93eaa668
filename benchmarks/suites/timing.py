"""The one timing harness of every benchmark: interleaved repeats (CPU perf_counter or CUDA
events), Triton's ``do_bench`` for single GPU kernels, and a stopwatch for one long call.

Every method of one case is timed round-robin in the same loop (:func:`time_interleaved`),
so a load change on a shared machine hits all of them alike; compare the ratios, not the
absolute times. :func:`time_kernel` is for one GPU kernel alone (L2 flushed between calls,
optionally replayed from a CUDA graph). :func:`timed` times a call that runs once (a
quantization, a calibration).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["time_interleaved", "time_kernel", "timed", "sync"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _stats(ms: list[float], keep: bool = False) -> dict[str, Any]:
    out = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "repeats": len(ms)}
    if keep:
        out["samples_ms"] = list(ms)
    return out


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: str, repeats: int, warmup: int = 1, min_sample_ms: float = 1.0,
    keep_samples: bool = False,
) -> dict[str, dict[str, Any]]:
    """{name: {median_ms, min_ms, max_ms, repeats}} of each ``fn()`` (or {error} if it failed).

    CPU: one ``time.perf_counter`` sample per call. CUDA: CUDA events around a batch of
    ``inner`` calls (chosen so a sample lasts >= ``min_sample_ms``; reported per call),
    synchronised after every round; the first ``warmup`` rounds are not recorded. The
    order of the methods rotates from round to round. ``keep_samples``: also
    ``samples_ms``, one per round (sample ``i`` of every method comes from round ``i``).
    """
    out: dict[str, dict[str, Any]] = {}
    live = dict(fns)
    inner = {name: 1 for name in live}
    for _ in range(max(warmup, 0)):
        for name, fn in list(live.items()):
            try:
                t0 = time.perf_counter()
                fn()
                sync(device)
                dt_ms = (time.perf_counter() - t0) * 1e3
            except Exception as e:  # noqa: BLE001 - recorded, the other methods go on
                out[name] = {"error": f"{type(e).__name__}: {e}"}
                del live[name]
                continue
            if device == "cuda" and dt_ms > 0:
                inner[name] = max(1, min(100, math.ceil(min_sample_ms / dt_ms)))
    samples: dict[str, list[float]] = {name: [] for name in live}
    for rnd in range(max(repeats, 1)):
        events = []
        names = list(live)
        names = names[rnd % len(names):] + names[: rnd % len(names)] if names else names  # rotate the order
        if device == "cuda":
            # Queue ~1 ms of GPU work first, so the CPU runs ahead and the first method of
            # the round is not charged for launching into an idle GPU.
            torch.cuda._sleep(2_000_000)
        for name in names:
            fn = live[name]
            try:
                if device == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(inner[name]):
                        fn()
                    end.record()
                    events.append((name, start, end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - t0) * 1e3)
            except Exception as e:  # noqa: BLE001
                out[name] = {"error": f"{type(e).__name__}: {e}"}
                del live[name]
        if device == "cuda":
            torch.cuda.synchronize()
            for name, start, end in events:
                samples[name].append(start.elapsed_time(end) / inner[name])
    for name in live:
        out[name] = _stats(samples[name], keep_samples)
    return out


def time_kernel(fn: Callable[[], Any], device: str, rep_ms: int = 50, warmup_ms: int = 10,
                cudagraph: bool = False) -> float:
    """Median ms of one GPU call: ``triton.testing.do_bench`` (L2 flushed between calls), or
    ``do_bench_cudagraph`` (replayed from a CUDA graph: GPU time without Python/launch
    overhead). Off CUDA (the Triton interpreter's smoke runs): one wall-clock call."""
    if device != "cuda":
        return timed(fn)[1] * 1e3
    from triton.testing import do_bench, do_bench_cudagraph

    if cudagraph:
        return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(``fn()``, seconds it took): for calls that run once (quantization, calibration)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0

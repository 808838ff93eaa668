"""Timing: interleaved repeats, medians and spread, on CPU (perf_counter) or CUDA (events).

Every method of one case is timed round-robin in the same loop, so a load change on a
shared machine hits all of them alike; compare the ratios, not the absolute times.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["time_interleaved", "sync"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _stats(ms: list[float]) -> dict[str, Any]:
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "repeats": len(ms)}


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: str, repeats: int, warmup: int = 1, min_sample_ms: float = 1.0
) -> dict[str, dict[str, Any]]:
    """{name: {median_ms, min_ms, max_ms, repeats}} of each ``fn()`` (or {error} if it failed).

    CPU: one ``time.perf_counter`` sample per call. CUDA: CUDA events around a batch of
    ``inner`` calls (chosen so a sample lasts >= ``min_sample_ms``; reported per call),
    synchronised after every round; the first ``warmup`` rounds are not recorded. The
    order of the methods rotates from round to round.
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
        out[name] = _stats(samples[name])
    return out

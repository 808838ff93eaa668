"""Shared helpers for the benchmarks: machine info, timing, result files."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:  # which C++ CPU kernels ran (amx, avx512_vnni, avx_vnni, avx2, or torch)
        from svdq_compile.runtime import cpu_gemm

        info["cpu_isa"] = cpu_gemm.active_isa()
    except Exception as e:  # noqa: BLE001 - reported, never fatal for a benchmark
        info["cpu_isa"] = f"unknown ({type(e).__name__})"
    if hasattr(os, "getloadavg"):
        # CPU timings on a shared 2-core machine depend on other jobs: record the load.
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``fn()`` after ``warmup`` untimed calls (CPU)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), max(ts)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path

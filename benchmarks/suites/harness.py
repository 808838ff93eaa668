"""What every suite shares: the run context (options, deadline, incremental JSON), the
machine description every result file carries (:func:`machine_info`) and ``run_case``,
which builds each method, checks its output against eager, and times all methods of one
case interleaved (timing itself: :mod:`.timing`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from svdq_compile.quant.decompose import sqnr_db

from .baselines import METHOD_BY_KEY, PRIORITY, Method, Unavailable, reason, wrap
from .timing import sync, time_interleaved

__all__ = ["Context", "run_case", "na", "flat_output", "reset_compiler", "machine_info", "env"]

log = logging.getLogger(__name__)


def na(why: str) -> str:
    return f"n/a ({why})"


@contextlib.contextmanager
def env(name: str, value: str) -> Iterator[None]:
    """Set environment variable ``name`` for the duration of the block (restored after)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, threads, the CPU kernels' ISA, torch / triton /
    python versions, GPU, load, date (the ``machine`` entry of every result file)."""
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


@dataclass
class Context:
    """One suite's run: options, where results go, and the time budget."""

    suite: str
    device: str
    out_dir: Path
    quick: bool = False
    smoke: bool = False
    repeats: int = 5
    warmup: int = 1
    methods: Optional[Sequence[str]] = None  # keys to run (None: all)
    params: dict = field(default_factory=dict)  # the suite's PARAMS with the --param overrides
    deadline: float = math.inf  # time.monotonic() after which no new method is built
    progress: bool = True
    header: dict = field(default_factory=dict)  # machine, versions, settings
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # suite-specific top-level JSON entries
    started: float = field(default_factory=time.monotonic)
    complete: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """Baseline dtype: fp32 on CPU, bf16 on GPU."""
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    @property
    def json_path(self) -> Path:
        return self.out_dir / f"bench_{self.suite}_{self.device}.json"

    def wants(self, key: str) -> bool:
        return self.methods is None or key in self.methods

    def method_keys(self, available: Sequence[str]) -> list[str]:
        """Keys to build for a case, highest priority first."""
        keys = [k for k in PRIORITY if k in available and self.wants(k)]
        return keys + [k for k in available if k not in keys and self.wants(k)]

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def record(self, row: dict) -> None:
        row = {"suite": self.suite, "device": self.device, **row}
        self.rows.append(row)
        self.save()

    def payload(self) -> dict:
        return {
            "suite": self.suite,
            "device": self.device,
            "quick": self.quick,
            "smoke": self.smoke,
            "complete": self.complete,
            "elapsed_s": round(time.monotonic() - self.started, 2),
            **self.header,
            "notes": self.notes,
            **self.extra,
            "rows": self.rows,
        }

    def save(self) -> Path:
        """Write the JSON now (called after every row: a timeout still leaves results)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.payload(), indent=1, default=_json_default))
        tmp.replace(self.json_path)
        return self.json_path


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    return str(o)


def reset_compiler() -> None:
    """Forget compiled code between cases (Dynamo caches per code object are limited)."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def flat_output(out: Any) -> torch.Tensor:
    """One flat fp64 CPU tensor from a tensor or a (nested) tuple of tensors."""
    if isinstance(out, torch.Tensor):
        return out.detach().reshape(-1).to("cpu", torch.float64)
    if isinstance(out, (tuple, list)):
        return torch.cat([flat_output(o) for o in out])
    if hasattr(out, "sample"):  # diffusers output dataclasses
        return flat_output(out.sample)
    raise TypeError(f"cannot compare outputs of type {type(out).__name__}")


def run_case(
    ctx: Context,
    case: dict,
    builders: dict[str, Callable[[], Any]],
    call: Callable[[Any], Any],
    baseline: str = "eager",
    bar: Any = None,
    extra: Optional[dict[str, dict]] = None,
    min_time_left: Optional[dict[str, float]] = None,
) -> list[dict]:
    """Build, check and time every method of one case; record one row per method.

    ``builders[key]()`` returns the module/callable for a method (the harness adds
    ``torch.compile`` for compiled methods) or raises :class:`Unavailable`;
    ``call(fn)`` runs it once on the case's inputs. A failing method is recorded as
    ``n/a (...)`` with its traceback; the others go on. ``extra[key]`` is merged into
    that method's row (e.g. ``quantize_s``; "ours_w4a4" also applies to "ours_w4a4_eager").
    ``min_time_left[key]``: seconds of budget a slow-to-build method needs to be started.
    Rows built so far are saved as ``in_progress`` before each build, so a hard stop
    in a long compilation still leaves them in the JSON.
    """
    keys = ctx.method_keys(list(builders))
    rows: dict[str, dict] = {}
    fns: dict[str, Any] = {}
    ref: Optional[torch.Tensor] = None
    for key in keys:
        method: Method = METHOD_BY_KEY[key]
        row = {**case, "method": method.name, "key": key}
        for k in (key, key.removesuffix("_eager")):
            row.update((extra or {}).get(k, {}))
        rows[key] = row
        if bar is not None:
            bar.set_postfix_str(f"{case.get('case', '')} {method.name}"[:60])
        if ctx.out_of_time() and key != baseline:  # the baseline is cheap and anchors the ratios
            row["status"] = na("skipped: time budget")
            _tick(bar)
            continue
        need = (min_time_left or {}).get(key)
        if need is not None and ctx.time_left() < need:
            row["status"] = na(f"skipped: needs ~{need:.0f} s of time budget to compile")
            _tick(bar)
            continue
        ctx.extra["in_progress"] = [dict(r) for r in rows.values()]
        ctx.save()
        t0 = time.perf_counter()
        try:
            fn = wrap(method, builders[key]())
            with torch.no_grad():
                out = call(fn)  # first call: quantization / compilation / autotuning
            sync(ctx.device)
            row["setup_s"] = round(time.perf_counter() - t0, 3)
            flat = flat_output(out)
            del out
            if key == baseline:
                ref = flat
            if ref is not None:
                row["sqnr_db"] = sqnr_db(ref, flat) if ref.shape == flat.shape else float("nan")
            if not torch.isfinite(flat).all():
                raise RuntimeError("non-finite output")
            fns[key] = fn
            row["status"] = "ok"
        except Unavailable as e:
            row["status"] = na(reason(e))
        except Exception as e:  # noqa: BLE001 - recorded per case, never fatal
            row["status"] = na(f"error: {reason(e)}")
            row["error_detail"] = traceback.format_exc(limit=6)[-2000:]
            log.warning("%s / %s failed: %s", case.get("case"), method.name, e)
        _tick(bar)
    if fns:
        with torch.no_grad():
            timed = time_interleaved({k: (lambda f=f: call(f)) for k, f in fns.items()}, ctx.device,
                                     repeats=ctx.repeats, warmup=ctx.warmup)
        for key, t in timed.items():
            if "error" in t:
                rows[key]["status"] = na(f"error while timing: {t['error'][:80]}")
            else:
                rows[key].update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()})
        base = timed.get(baseline, {}).get("median_ms")
        for key, t in timed.items():
            if base and "median_ms" in t:
                rows[key]["speedup"] = round(base / t["median_ms"], 3)
    ctx.extra.pop("in_progress", None)
    for key in keys:
        ctx.record(rows[key])
    fns.clear()
    return [rows[k] for k in keys]


def _tick(bar: Any) -> None:
    if bar is not None:
        bar.update(1)

"""The benchmark runner behind ``svdq bench`` and ``python -m benchmarks`` (same code).

    svdq bench [--suite linear,block,model,memory,export] [--quick] [--device cpu|cuda] [--out DIR]

Every suite compares eager (fp32 on CPU, bf16 on GPU), ``torch.compile`` (Inductor),
torchao int8 dynamic (W8A8) and int4 weight-only, bitsandbytes NF4 (GPU) and our W4A4,
W4A8 and W8A8; a method that cannot run is reported as ``n/a (reason)``. All methods of
one case are timed interleaved (median, min, max of repeats after a warm-up), so the
speedups are ratios measured within one run. Results: ``<out>/bench_<suite>_<device>.json``
(written after every case), ``.md`` and ``.png``; without ``--out`` they go to
``./svdq_bench_results`` under the current directory (never into the installed package or
the checkout's committed ``benchmarks/results``).

``--suite export`` (not in the default set: minutes of ONNX export on CPU): ONNX Runtime
latency of the float, exact and deploy ONNX files of the same model (benchmarks/suites/export.py).

Suites run in the order memory, linear, block, model. On CUDA a time budget
(``--budget-s``, default 180 s, for one short GPU session) is shared among them: once a
suite's share is spent, the methods not yet built are reported as
``n/a (skipped: time budget)`` (eager always runs), so the session ends with results.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["add_arguments", "run", "main", "DEFAULT_OUT", "EXTRA_SUITES", "output_dir"]

# Relative: resolved against the current directory when the run starts.
DEFAULT_OUT = Path("svdq_bench_results")
# Suites run only when named with --suite (their own markdown/plot: ``to_markdown`` / ``plot``
# in the suite module).
EXTRA_SUITES = ("export",)
DEFAULT_CUDA_BUDGET_S = 180.0
# A compilation cannot be stopped halfway: past budget + this, the run is interrupted
# (SIGALRM), the results so far are written and the process exits with code 3.
HARD_GRACE_S = 30.0
# Share of the time budget per suite (renormalised over the suites that run).
BUDGET_WEIGHTS = {"memory": 0.15, "linear": 0.35, "block": 0.5, "model": 0.25, "export": 0.5}


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .suites import SUITES

    p.add_argument("--suite", default=",".join(SUITES),
                   help=f"comma-separated suites to run (default: all of {','.join(SUITES)}; "
                        f"also: {','.join(EXTRA_SUITES)})")
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few repeats (CPU: under ~2 minutes on 2 idle cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: ./{DEFAULT_OUT} under the current directory)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per method (default: CPU 5, --quick 3; CUDA 20, --quick 10)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method keys to run (default: all): eager, inductor, torchao_int8, "
                        "torchao_int4, bnb_nf4, ours_w4a4, ours_w4a4_eager, ours_w4a8-int8, ours_w4a8-fp8, ours_w4a8, ours_w8a8")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"time budget for all suites (default: {DEFAULT_CUDA_BUDGET_S:.0f} s on CUDA, "
                        "none on CPU; 0 = none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's default); 1 is steadier on a busy shared machine")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    # Tiny mode for the tests: one small linear shape, 1 repeat.
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return p


def _parse_list(text: Optional[str], valid: Sequence[str], what: str) -> Optional[list[str]]:
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in valid]
    if bad or not items:
        raise SystemExit(f"svdq bench: unknown {what} {bad or text!r}; choose from {', '.join(valid)}")
    return items


class BudgetExceeded(BaseException):
    """Raised by the watchdog (a BaseException: the per-method ``except Exception`` lets it through)."""


def _arm_watchdog(seconds: float) -> bool:
    if seconds <= 0 or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False

    def _on_alarm(signum, frame):  # noqa: ARG001
        raise BudgetExceeded(f"hard time limit reached ({seconds:.0f} s)")

    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return True


def _disarm_watchdog() -> None:
    if hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, 0)


def _configure_dynamo() -> None:
    import torch

    # One case compiles up to ~6 variants of the same forward; cases reset Dynamo.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from .common import machine_info
    from .suites import RUN_ORDER, SUITES
    from .suites.baselines import METHODS, package_versions
    from .suites.harness import Context
    from .suites.report import plot, to_markdown

    wanted = _parse_list(args.suite, SUITES + EXTRA_SUITES, "suite") or list(SUITES)
    suites = [s for s in RUN_ORDER + EXTRA_SUITES if s in wanted]
    methods = _parse_list(args.methods, [m.key for m in METHODS], "method")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("svdq bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    quick = args.quick or args.smoke
    if args.repeats is not None:
        repeats = max(1, args.repeats)
    elif args.smoke:
        repeats = 1
    elif device == "cuda":
        repeats = 10 if quick else 20
    else:
        repeats = 3 if quick else 5
    budget = args.budget_s if args.budget_s is not None else (DEFAULT_CUDA_BUDGET_S if device == "cuda" else 0.0)
    out_dir = output_dir(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
    warnings.filterwarnings("ignore", message=".*register_constant.*")
    _configure_dynamo()
    if args.threads:
        torch.set_num_threads(max(1, args.threads))
    if device == "cuda":
        import svdq_compile  # noqa: F401 - installs the Triton kernels into svdq::linear

    t_start = time.monotonic()
    t_end = t_start + budget if budget > 0 else float("inf")
    header = {
        "machine": machine_info(),
        "versions": package_versions(),
        "settings": {"repeats": repeats, "warmup": 1, "quick": quick, "smoke": args.smoke, "methods": methods,
                     "budget_s": budget or None, "command": " ".join(sys.argv),
                     "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
    }
    failed = 0
    hard_stop = False
    written: list[Path] = []
    armed = _arm_watchdog(budget + HARD_GRACE_S if budget > 0 else 0.0)
    for i, name in enumerate(suites):
        now = time.monotonic()
        deadline = float("inf")
        if budget > 0:
            rest = suites[i:]
            share = BUDGET_WEIGHTS[name] / sum(BUDGET_WEIGHTS[s] for s in rest)
            deadline = now + max(0.0, t_end - now) * share
        ctx = Context(suite=name, device=device, out_dir=out_dir, quick=quick, smoke=args.smoke, repeats=repeats,
                      warmup=1, methods=methods, deadline=deadline, progress=not args.no_progress,
                      header=header)
        if device == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            ctx.note("OMP_WAIT_POLICY is not PASSIVE: on a busy machine OpenMP spin-waiting can inflate CPU "
                     "timings 10x (run through `svdq bench` / `python -m benchmarks`, which set it)")
        if budget > 0:
            ctx.note(f"time budget for this suite: {deadline - now:.0f} s of {budget:.0f} s "
                     f"(hard stop at {budget + HARD_GRACE_S:.0f} s)")
        try:
            if hard_stop:
                ctx.note("not run: the time budget was used up by the suites before")
            else:
                _suite(name).run(ctx, tqdm)
                ctx.complete = True
        except BudgetExceeded as e:
            _disarm_watchdog()
            hard_stop = True
            ctx.extra["error"] = f"interrupted: {e} (rows of the case in progress are lost)"
            print(f"svdq bench: {name}: {e}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - one suite failing must not lose the others
            failed += 1
            ctx.extra["error"] = f"{type(e).__name__}: {e}"
            ctx.extra["traceback"] = traceback.format_exc()[-4000:]
            print(f"svdq bench: suite {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            mod = _suite(name)
            md_fn, plot_fn = getattr(mod, "to_markdown", to_markdown), getattr(mod, "plot", plot)
            try:
                written += _write_outputs(ctx, md_fn, plot_fn)
            except BudgetExceeded:  # the alarm fired while writing: write again, then stop
                _disarm_watchdog()
                hard_stop = True
                written += _write_outputs(ctx, md_fn, plot_fn)
            if not hard_stop:
                from .suites.harness import reset_compiler

                reset_compiler()
    if armed:
        _disarm_watchdog()
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"total {time.monotonic() - t_start:.0f} s")
    if hard_stop:
        # Compile workers may still be busy with the abandoned compilation: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
    return 1 if failed else 0


def output_dir(out: Optional[str]) -> Path:
    """``--out`` as given, or ``./svdq_bench_results`` under the current directory."""
    return Path(out) if out else Path.cwd() / DEFAULT_OUT


def _suite(name: str):
    import importlib

    from .suites import get

    if name in EXTRA_SUITES:
        return importlib.import_module(f"{__package__}.suites.{name}")
    return get(name)


def _write_outputs(ctx, to_markdown, plot) -> list[Path]:
    path = ctx.save()
    payload = ctx.payload()
    md = to_markdown(payload)
    md_path = path.with_suffix(".md")
    md_path.write_text(md)
    print(md)
    png = path.with_suffix(".png")
    try:
        made = plot(payload, png)
    except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the tables
        print(f"svdq bench: plot failed: {e}", file=sys.stderr)
        made = False
    return [path, md_path] + ([png] if made else [])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)

"""The benchmark runner behind ``svdq bench`` and ``python -m benchmarks`` (same code).

    svdq bench [--suite linear,block,model,memory] [--quick] [--device cpu|cuda] [--out DIR]
    svdq bench --list                      # every suite, one line each
    svdq bench --suite passes --param dim=512 --param decompose=full
    svdq bench --render FILE.json ...      # re-render the .md / .png of saved results

The default suites compare eager (fp32 on CPU, bf16 on GPU), ``torch.compile`` (Inductor),
torchao int8 dynamic (W8A8) and int4 weight-only, bitsandbytes NF4 (GPU) and our W4A4,
W4A8 and W8A8; a method that cannot run is reported as ``n/a (reason)``. All methods of
one case are timed interleaved (median, min, max of repeats after a warm-up), so the
speedups are ratios measured within one run. Results: ``<out>/bench_<suite>_<device>.json``
(written after every case), ``.md`` and ``.png``; every file carries the machine, the CPU
kernels' ISA, torch / triton / python versions and the date. Without ``--out`` they go to
``./svdq_bench_results`` under the current directory (never into the installed package or
the checkout's committed ``benchmarks/results``).

Suites named only with ``--suite`` (``--list``): ``export`` (ONNX Runtime latency of the
exported files; minutes of ONNX export), ``cpu_linear``, ``demo_speed``, ``passes``,
``calib_time`` (CPU), ``kernels``, ``gpu_diag`` (GPU), and the analyses of
``benchmarks/analysis/`` (``ablation``, ``modes_quality``, ``lora_margin``: quality, not
timing). A suite's own settings are its ``PARAMS``, changed with ``--param KEY=VALUE``.

Suites run in the order memory, linear, block, model, then the named ones. On CUDA a time
budget (``--budget-s``, default 180 s, for one short GPU session) is shared among them:
once a suite's share is spent, the methods not yet built are reported as
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
from typing import Any, Optional, Sequence

from . import suites as _suites

__all__ = ["add_arguments", "run", "main", "DEFAULT_OUT", "EXTRA_SUITES", "output_dir", "parse_params"]

# Relative: resolved against the current directory when the run starts.
DEFAULT_OUT = Path("svdq_bench_results")
# Suites run only when named with --suite (their own markdown/plot: ``to_markdown`` / ``plot``
# in the suite module): the extra timing suites, then the analyses.
EXTRA_SUITES = _suites.EXTRA + _suites.ANALYSES
DEFAULT_CUDA_BUDGET_S = 180.0
# A compilation cannot be stopped halfway: past budget + this, the run is interrupted
# (SIGALRM), the results so far are written and the process exits with code 3.
HARD_GRACE_S = 30.0
# Share of the time budget per suite (renormalised over the suites that run).
BUDGET_WEIGHTS = {"memory": 0.15, "linear": 0.35, "block": 0.5, "model": 0.25}  # other suites: 0.5


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .suites import SUITES

    p.add_argument("--suite", default=None,
                   help=f"comma-separated suites to run (default: {','.join(SUITES)}; "
                        f"also: {','.join(EXTRA_SUITES)}; see --list)")
    p.add_argument("--list", action="store_true", help="list the suites and their --param settings, then exit")
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few repeats (CPU: under ~2 minutes on 2 idle cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: ./{DEFAULT_OUT} under the current directory)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per method (default: CPU 5, --quick 3; CUDA 20, --quick 10; "
                        "some suites have their own defaults)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method keys to run (default: all): eager, inductor, torchao_int8, "
                        "torchao_int4, bnb_nf4, ours_w4a4, ours_w4a4_eager, ours_w4a8-int8, ours_w4a8-fp8, ours_w4a8, ours_w8a8")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"time budget for all suites (default: {DEFAULT_CUDA_BUDGET_S:.0f} s on CUDA, "
                        "none on CPU; 0 = none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's default); 1 is steadier on a busy shared machine")
    p.add_argument("--isa", default=None,
                   help="force the CPU kernels' ISA (sets SVDQ_CPU_ISA: amx, avx512_vnni, avx_vnni, avx2, torch)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a suite setting (its PARAMS, see --list); repeatable")
    p.add_argument("--render", nargs="+", default=None, metavar="JSON",
                   help="only re-render the .md / .png next to these result files (suite: from the file or --suite)")
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


def _coerce(text: str, default: Any, what: str) -> Any:
    try:
        if isinstance(default, bool):
            low = text.strip().lower()
            if low not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(text)
            return low in ("1", "true", "yes", "on")
        if isinstance(default, (tuple, list)):
            kind = type(default[0]) if default else str
            return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        if default is None:
            return text
        return type(default)(text)
    except ValueError:
        raise SystemExit(f"svdq bench: --param {what}={text!r}: expected {type(default).__name__}") from None


def parse_params(items: Sequence[str], modules: dict[str, Any], quick: bool) -> dict[str, dict[str, Any]]:
    """{suite: its PARAMS (the QUICK_PARAMS on top with --quick) with the ``KEY=VALUE`` overrides};
    a key no selected suite has is an error that lists the valid ones."""
    out = {name: {**getattr(mod, "PARAMS", {}), **(getattr(mod, "QUICK_PARAMS", {}) if quick else {})}
           for name, mod in modules.items()}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        owners = [name for name, mod in modules.items() if key in getattr(mod, "PARAMS", {})]
        if not sep or not owners:
            valid = sorted({k for mod in modules.values() for k in getattr(mod, "PARAMS", {})})
            raise SystemExit(f"svdq bench: --param {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(valid) or '(none: the selected suites have no settings)'}")
        for name in owners:
            out[name][key] = _coerce(value, modules[name].PARAMS[key], key)
    return out


def _list_suites() -> int:
    from .suites import DESCRIPTIONS, NAMES, SUITES, get

    for name in NAMES:
        tag = "default" if name in SUITES else ("analysis" if name in _suites.ANALYSES else "named")
        print(f"{name:14s} [{tag}] {DESCRIPTIONS[name]}")
        try:
            params = getattr(get(name), "PARAMS", {})
        except Exception as e:  # noqa: BLE001 - listing must not need every optional package
            params = {"(cannot import)": f"{type(e).__name__}: {e}"}
        if params:
            print(" " * 15 + "params: " + ", ".join(
                f"{k}={','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in params.items()))
    return 0


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


def _repeats(args: argparse.Namespace, mod: Any, device: str, quick: bool) -> int:
    if args.repeats is not None:
        return max(1, args.repeats)
    if args.smoke:
        return 1
    if device == "cuda":
        return 10 if quick else 20
    own = getattr(mod, "DEFAULT_REPEATS", None)
    return own[0 if quick else 1] if own else (3 if quick else 5)


def run(args: argparse.Namespace) -> int:
    from .suites import NAMES, RUN_ORDER, SUITES, get
    from .suites.report import render_file

    if args.list:
        return _list_suites()
    wanted = _parse_list(args.suite, NAMES, "suite")
    if args.render:
        for path in args.render:
            print("wrote " + ", ".join(str(p) for p in render_file(Path(path), wanted[0] if wanted else None)))
        return 0
    wanted = wanted or list(SUITES)
    suites = [s for s in RUN_ORDER + EXTRA_SUITES if s in wanted]
    if args.isa:  # before the CPU kernels load (machine_info asks them for their ISA)
        os.environ["SVDQ_CPU_ISA"] = args.isa

    import torch
    from tqdm.auto import tqdm

    from .suites.baselines import METHODS, Unavailable, package_versions, reason
    from .suites.harness import Context, machine_info
    from .suites.report import plot, to_markdown

    methods = _parse_list(args.methods, [m.key for m in METHODS], "method")
    modules = {name: get(name) for name in suites}
    params = parse_params(args.param, modules, args.quick or args.smoke)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("svdq bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    for name, mod in modules.items():  # before the header imports the CPU kernels and torch._dynamo
        if hasattr(mod, "prepare"):
            mod.prepare(getattr(mod, "DEVICE", device), args.smoke)
    quick = args.quick or args.smoke
    budget = args.budget_s if args.budget_s is not None else (DEFAULT_CUDA_BUDGET_S if device == "cuda" else 0.0)
    out_dir = output_dir(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    # diffusers imports torchao, which warns about each CUDA-only extension a CPU torch cannot load
    logging.getLogger("torchao").setLevel(logging.ERROR)
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
        "settings": {"warmup": 1, "quick": quick, "smoke": args.smoke, "methods": methods,
                     "budget_s": budget or None, "command": " ".join(sys.argv),
                     "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                     "SVDQ_CPU_ISA": os.environ.get("SVDQ_CPU_ISA")},
    }
    failed = 0
    hard_stop = False
    written: list[Path] = []
    armed = _arm_watchdog(budget + HARD_GRACE_S if budget > 0 else 0.0)
    for i, name in enumerate(suites):
        mod = modules[name]
        suite_device = getattr(mod, "DEVICE", device)
        repeats = _repeats(args, mod, suite_device, quick)
        now = time.monotonic()
        deadline = float("inf")
        if budget > 0:
            rest = suites[i:]
            share = BUDGET_WEIGHTS.get(name, 0.5) / sum(BUDGET_WEIGHTS.get(s, 0.5) for s in rest)
            deadline = now + max(0.0, t_end - now) * share
        suite_header = {**header, "settings": {**header["settings"], "repeats": repeats, "params": params[name]}}
        ctx = Context(suite=name, device=suite_device, out_dir=out_dir, quick=quick, smoke=args.smoke,
                      repeats=repeats, warmup=1, methods=methods, params=params[name], deadline=deadline,
                      progress=not args.no_progress, header=suite_header)
        if suite_device != device:
            ctx.note(f"this suite runs on {suite_device}; --device {device} is ignored")
        if suite_device == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            ctx.note("OMP_WAIT_POLICY is not PASSIVE: on a busy machine OpenMP spin-waiting can inflate CPU "
                     "timings 10x (run through `svdq bench` / `python -m benchmarks`, which set it)")
        if budget > 0:
            ctx.note(f"time budget for this suite: {deadline - now:.0f} s of {budget:.0f} s "
                     f"(hard stop at {budget + HARD_GRACE_S:.0f} s)")
        skipped = False
        try:
            if hard_stop:
                ctx.note("not run: the time budget was used up by the suites before")
            else:
                mod.run(ctx, tqdm)
                ctx.complete = True
        except Unavailable as e:  # the whole suite cannot run here (e.g. a GPU suite on a CPU machine)
            skipped = True
            print(f"svdq bench: suite {name} not run: {reason(e)}", file=sys.stderr)
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
            md_fn, plot_fn = getattr(mod, "to_markdown", to_markdown), getattr(mod, "plot", plot)
            if not skipped:
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
    from .suites import get

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

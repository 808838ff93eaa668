"""``svdq bench``: benchmarks against eager baselines (the code lives in ``benchmarks/runner.py``).

``benchmarks/`` is part of the source checkout, not of the installed package: with an
editable install (``pip install -e .``) the checkout root is put on ``sys.path``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

HELP = "benchmark linear layers, FLUX blocks, models and memory against eager/Inductor/torchao/bnb"


def _runner():
    try:
        return importlib.import_module("benchmarks.runner")
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", "benchmarks.runner"):
            raise
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "runner.py").is_file():
        return None
    sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.runner")


def add_parser(sub) -> argparse.ArgumentParser:
    runner = _runner()
    p = sub.add_parser("bench", help=HELP, description=(runner.__doc__ or HELP).split("\n\n")[0] if runner else HELP)
    if runner is not None:
        runner.add_arguments(p)
    return p


def _reexec_with_passive_omp() -> None:
    """``svdq bench`` imported torch before it could set OMP_WAIT_POLICY (see
    benchmarks/__main__.py): run the same command again with it set, once."""
    if "OMP_WAIT_POLICY" in os.environ or Path(sys.argv[0]).name != "svdq":
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    try:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    except OSError:  # pragma: no cover - keep going without it
        return


def run(args: argparse.Namespace) -> int:
    _reexec_with_passive_omp()
    runner = _runner()
    if runner is None:
        print("svdq bench needs a source checkout of svdq_compile (benchmarks/ is not installed with the wheel)",
              file=sys.stderr)
        return 2
    return runner.run(args)

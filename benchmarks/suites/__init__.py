"""Benchmark suites run by ``svdq bench`` / ``python -m benchmarks`` (see benchmarks/runner.py).

Each suite module defines ``run(ctx, tqdm)``: it builds its cases, calls
:func:`.harness.run_case` (or records rows itself) and leaves the result files to the runner.
"""
from __future__ import annotations

import importlib

SUITES = ("linear", "block", "model", "memory")
# Execution order, whatever the order on the command line: the cheap memory suite
# first, so a short GPU session always gets the FLUX.1 memory numbers.
RUN_ORDER = ("memory", "linear", "block", "model")


def get(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    return importlib.import_module(f"{__name__}.{name}")

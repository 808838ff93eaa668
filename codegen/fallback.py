"""Eager-mode safety net: a generated kernel that fails falls back to the torch path.

Any compile/launch error of the Triton kernels (including
:class:`.autotune.AutotuneError`, "every config failed") must not surface as an exception
out of the model: :func:`run_or_fallback` catches it, logs one WARNING per process (later
failures at DEBUG) and runs :func:`runtime.cpu.quantized_linear_cpu`, which runs on CUDA
too. The failing (spec, device) then stays on the torch path for the process, so a broken
kernel costs one failed attempt, not one per call. Only for eager calls: while
``torch.compile`` traces the op nothing runs, so there is nothing to catch.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

from svdq_compile.runtime.torch_path import quantized_linear_cpu
from svdq_compile.runtime.op_args import LinearArgs
from svdq_compile.codegen.spec import KernelSpec

__all__ = ["run_or_fallback"]

log = logging.getLogger(__name__)

_FAILED: set = set()  # (spec, device) whose kernels failed in this process
_WARNED: list = []
_LOCK = threading.Lock()


def run_or_fallback(a: LinearArgs, spec: KernelSpec, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``run()``, or the torch path for ``a`` if it raises (or raised before for this spec)."""
    key = (spec, a.x.device)
    if key in _FAILED:
        return quantized_linear_cpu(a)
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - compile/launch errors of generated kernels
        with _LOCK:
            _FAILED.add(key)
            first = not _WARNED
            _WARNED.append(key)
        (log.warning if first else log.debug)(
            "svdq_compile: the Triton kernels for %s failed (%s: %s); layers of this kind use the torch path",
            spec.key(), type(e).__name__, e)
        return quantized_linear_cpu(a)

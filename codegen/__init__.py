"""Generated Triton kernels for the SVDQuant quantized linear.

- :mod:`.spec`: :class:`KernelSpec`, the static description of one kernel;
- :mod:`.prologue`: one pass over X -> packed INT4/INT8 activations, scales, X' L2^T;
- :mod:`.gemm`: grouped INT8-MMA GEMM with per-group rescale and fused epilogue;
- :mod:`.autotune` / :mod:`.cache`: launch configs and the tuned-config cache;
- :mod:`.linear`: the wrapper installed into ``svdq::linear``;
- :mod:`.op`: the same as a ``torch.library.triton_op`` (``svdq::triton_linear``).

The unfused baseline the benchmarks compare with is ``benchmarks/suites/unfused.py``.

Importing this package does not import Triton: the kernels are defined (``triton.jit``)
when :mod:`.linear` is first imported, so ``TRITON_INTERPRET=1`` may be set until then.
"""
from __future__ import annotations

import importlib.util
import logging
import os

__all__ = ["available", "install"]

log = logging.getLogger(__name__)


def available() -> bool:
    """True when the kernels can run: Triton importable and (CUDA or TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def install() -> bool:
    """Register the Triton implementation with ``svdq::linear`` (and ``svdq::triton_linear``).

    Returns False (and logs why) when Triton cannot be imported.
    """
    try:
        from svdq_compile.runtime.ops import register_triton_impl
        from svdq_compile.codegen.linear import quantized_linear_triton
    except Exception as e:  # noqa: BLE001 - a broken Triton install must not break imports
        log.warning("svdq_compile.codegen: Triton kernels unavailable: %s", e)
        return False
    register_triton_impl(quantized_linear_triton)
    try:
        from svdq_compile.codegen import op  # noqa: F401 - registers svdq::triton_linear
    except Exception as e:  # noqa: BLE001
        log.debug("svdq::triton_linear not registered: %s", e)
    return True

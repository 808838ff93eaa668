"""Test setup for the Triton kernels.

Without a GPU the kernels run in Triton's CPU interpreter, which must be switched on
*before* the kernels are defined (``triton.jit`` decides at decoration time). pytest
imports this conftest before the test modules of this directory, so the variable is
set here, first thing. On a CUDA machine it is left off so the real kernels run.
"""
import os


def _cuda_available() -> bool:
    try:
        import torch  # importing torch does not import triton

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


os.environ.setdefault("TRITON_INTERPRET", "0" if _cuda_available() else "1")
# Tests run many small specs: benchmarking every config for each would dominate the
# GPU run (tests that check all configs pass them explicitly). Keep tuning results of
# the test run out of the user's cache.
os.environ.setdefault("SVDQ_AUTOTUNE", "0")
os.environ.setdefault("SVDQ_CACHE_DIR", "")

"""``mode="auto"``: per device, the fastest mode whose measured quality is at least W4A4's.

The rule and the figures behind it (README "Choosing a mode"):

- quality: both per-token modes keep SVDQuant's smoothing and low-rank branch and beat
  W4A4 group-64 on every model we measured, on every quantized layer (+0.6 to +6.4 dB;
  ``w4a8-int8`` above ``w4a8-fp8`` except on tiny FLUX: tests/test_auto_mode_quality.py and
  benchmarks/results/modes_quality.md; the planners' pretrained-transformer reference:
  cosine 0.9808 / 0.9745 / 0.9546);
- speed: with one activation scale per token the GEMM's K loop carries no float work,
  which group-64 scales on both operands cannot avoid (DESIGN 2.1);
- CUDA with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell):
  ``w4a8-fp8`` (an FP8 GEMM with an fp32 accumulator is what Triton's Hopper pipeliner
  keeps asynchronous; int8 -> int32 loops are serialised);
- CUDA without FP8 (Ampere, Turing) and CPUs: ``w4a8-int8`` (one exact int32
  accumulator over K: the INT8 tensor cores / cuBLAS ``_int_mm`` on GPU, the C++ INT8
  kernels with one group spanning K on CPU).

``w4a4`` stays the paper's exact numerics on every device; ask for it explicitly.
"""
from __future__ import annotations

import torch

__all__ = ["AUTO", "resolve_mode", "auto_choice"]

AUTO = "auto"


def auto_choice(device: torch.device | str) -> tuple[str, str]:
    """(mode, why) that ``mode="auto"`` picks for weights living on ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            cap = torch.cuda.get_device_capability(dev)
        except (RuntimeError, AssertionError):  # no driver (e.g. tracing on a CPU-only box)
            cap = (0, 0)
        if cap >= (8, 9):
            return "w4a8-fp8", f"auto: CUDA sm_{cap[0]}{cap[1]} has FP8 tensor cores (fp32-accumulated FP8 GEMM)"
        return "w4a8-int8", f"auto: CUDA sm_{cap[0]}{cap[1]} has no FP8 tensor cores (INT8 GEMM, one int32 accumulator)"
    return "w4a8-int8", f"auto: {dev.type} (INT8 GEMM with one group spanning K; quality >= w4a4)"


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """A concrete mode: ``mode`` itself, or :func:`auto_choice`'s for ``"auto"``."""
    return auto_choice(device)[0] if mode == AUTO else mode

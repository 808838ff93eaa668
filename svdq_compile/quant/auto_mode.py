"""``mode="auto"``: per device, the fastest mode whose measured quality is at least W4A4's.

The rule and the figures behind it (README "Choosing a mode"):

- quality: both per-token modes keep SVDQuant's smoothing and low-rank branch and beat
  W4A4 group-64 on every model we measured, on every quantized layer (+0.6 to +6.4 dB;
  ``w4a8-int8`` above ``w4a8-fp8`` except on tiny FLUX: tests/test_auto_mode_quality.py and
  benchmarks/results/modes_quality.md; the planners' pretrained-transformer reference:
  cosine 0.9808 / 0.9745 / 0.9546);
- speed: with one activation scale per token the GEMM's K loop carries no float work,
  which group-64 scales on both operands cannot avoid (docs/design.md section 2.1);
- CUDA with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell):
  ``w4a8-fp8`` (an FP8 GEMM with an fp32 accumulator is what Triton's Hopper pipeliner
  keeps asynchronous; int8 -> int32 loops are serialised);
- CUDA without FP8 (Ampere, Turing): ``w4a8-int8`` (one exact int32 accumulator over K:
  the INT8 tensor cores / cuBLAS ``_int_mm``);
- CPUs, by the ISA the C++ kernels run on (:func:`runtime.cpu_gemm.active_isa`), from
  same-run measurements (README "Choosing a mode"): AVX2 / AVX-VNNI: ``w4a4`` (there the
  per-token INT8 product costs more instructions than the per-group fold saves: linear
  K=N=3072 M=256 2.22x vs 2.67x of fp32, width-768 FLUX blocks 1.59x / 1.41x vs 1.69x /
  1.58x, AMD EPYC 2026-12-02); AVX512-VNNI / AMX: ``w4a8-int8`` (one group spanning K
  removes the per-group fold that bounds W4A4 there: torchao's per-channel INT8 ran FLUX
  blocks at 4.5x of fp32 vs W4A4's 3.2x; the per-token kernel itself is not measured on
  such a CPU yet); no C++ kernels (torch fallback): ``w4a8-int8`` (one fp32 GEMM of 8-bit
  values vs dequantizing both operands: 300 vs 546 ms at M=256, K=N=3072).

``w4a4`` stays the paper's exact numerics on every device; ask for it explicitly.
"""
from __future__ import annotations

import torch

__all__ = ["AUTO", "resolve_mode", "auto_choice"]

from svdq_compile.runtime.modes import QuantMode, get_mode

AUTO = "auto"
# CPU ISAs where W4A4's kernels measured faster than w4a8-int8's (see the module docstring).
_CPU_W4A4_FASTER = frozenset({"avx2", "avx_vnni"})


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
    if dev.type == "cpu":
        from svdq_compile.runtime import cpu_gemm

        isa = cpu_gemm.active_isa()
        if isa in _CPU_W4A4_FASTER:
            return "w4a4", f"auto: cpu/{isa} (measured faster than w4a8-int8 there)"
        return "w4a8-int8", f"auto: cpu/{isa} (per-token INT8, no per-group fold; quality >= w4a4)"
    return "w4a8-int8", f"auto: {dev.type} (per-token INT8; quality >= w4a4)"


def resolve_mode(mode: str, device: torch.device | str, why: str = "mode option") -> tuple[QuantMode, str]:
    """The one place ``"auto"`` becomes a mode: (registered mode, reason) for weights on
    ``device``; any other name is looked up as it is (``why`` is then its reason)."""
    if mode == AUTO:
        name, why = auto_choice(device)
        return get_mode(name), why
    return get_mode(mode), why

"""Benchmark suites run by ``svdq bench`` / ``python -m benchmarks`` (see benchmarks/runner.py).

Each suite module defines ``run(ctx, tqdm)``: it builds its cases, times them with
:mod:`.timing` (through :func:`.harness.run_case` or directly), records rows on the
:class:`.harness.Context` and leaves the result files to the runner. Optional module
attributes: ``to_markdown(payload)`` / ``plot(payload, path)`` (default: the method tables
of :mod:`.report`), ``PARAMS`` (the suite's own settings, changed with
``--param KEY=VALUE``; ``QUICK_PARAMS``: other defaults with ``--quick``), ``DEVICE`` (a
suite that always runs on one device), ``DEFAULT_REPEATS`` ((--quick, full) repeats when
``--repeats`` is not given) and ``prepare(device, smoke)`` (called before the runner imports
anything else: environment variables that must be set first).

The registry below names every suite: the default set, the suites that run only when
named, and the analyses (quality, not timing: modules in ``benchmarks/analysis/``), which
the same runner writes in the same result format.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["SUITES", "RUN_ORDER", "EXTRA", "ANALYSES", "DESCRIPTIONS", "NAMES", "get"]

SUITES = ("linear", "block", "model", "memory")
# Execution order, whatever the order on the command line: the cheap memory suite
# first, so a short GPU session always gets the FLUX.1 memory numbers.
RUN_ORDER = ("memory", "linear", "block", "model")
# Timing suites that run only when named with --suite (minutes each, or GPU-only).
EXTRA = ("export", "cpu_linear", "demo_speed", "passes", "calib_time", "kernels", "gpu_diag")
# Analyses (benchmarks/analysis/): quality measurements, not timings.
ANALYSES = ("ablation", "modes_quality", "lora_margin")
NAMES = SUITES + EXTRA + ANALYSES

# One line per suite for `svdq bench --list` (without importing the modules).
DESCRIPTIONS = {
    "linear": "one linear layer of FLUX / SD3 / PixArt / SDXL shapes: eager, Inductor, torchao, bnb, ours",
    "block": "one FLUX.1 double- and single-stream block (diffusers), the same methods",
    "model": "whole models: the demo digits generator, a tiny diffusers FluxTransformer2DModel",
    "memory": "weight bytes and forward peak memory, extrapolated to the FLUX.1 [dev] transformer",
    "export": "ONNX Runtime CPU latency of the float, exact and deploy ONNX files (minutes of export)",
    "cpu_linear": "CPU kernels: W4A4 / W4A8-INT8 linear (K=N=3072, rank 32) vs fp32 F.linear, and their parts",
    "demo_speed": "the demo's s/step, fp32 vs every quantized row, interleaved (steady state)",
    "passes": "graph passes: activation passes and CPU latency of FLUX blocks, passes off vs on",
    "calib_time": "calibration (decomposition) time of FLUX-shaped linears, extrapolated to FLUX.1",
    "kernels": "GPU: fused W4A4 Triton linear vs bf16, int8 _int_mm and unfused variants (do_bench)",
    "gpu_diag": "GPU: every GEMM launch config, W4A4 / W8A8 / W4A8, int8 ceilings, W4A16",
    "ablation": "SVDQuant's parts and a rank sweep (synthetic layers, demo PSNR / accuracy)",
    "modes_quality": "w4a4 vs w4a8-int8 / w4a8-fp8 quality (demo, outlier block, tiny pipelines)",
    "lora_margin": "SQNR gap of quantized tiny pipelines with vs without a LoRA",
}


def get(name: str) -> ModuleType:
    """The module of suite ``name`` (``benchmarks.suites.<name>`` or ``benchmarks.analysis.<name>``)."""
    if name not in NAMES:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(NAMES)}")
    if name in ANALYSES:
        return importlib.import_module(f"{__name__.rpartition('.')[0]}.analysis.{name}")
    return importlib.import_module(f"{__name__}.{name}")

"""svdq_compile: SVDQuant W4A4 as a torch.compile backend.

    import torch
    model = torch.compile(model, backend="svdquant", options={"rank": 32})

The backend is registered through the ``torch_dynamo_backends`` entry point, so the
import above is not even needed. See README.md.
"""
from __future__ import annotations

import logging

from svdq_compile import runtime  # registers the svdq::linear custom op
from svdq_compile.capture.calibration import LayerStats, calibrate, calibrating, clear_calibration, stats_of
from svdq_compile.quant.config import SVDQuantConfig
from svdq_compile.quant.decompose import sqnr_db
from svdq_compile.quant.modules import SVDQLinear
from svdq_compile.capture.quantize_module import quantize, quantized_modules
from svdq_compile.export.artifacts import ArtifactError, load, save
from svdq_compile.capture.explain import explain
from svdq_compile.export import export_onnx, export_tensorrt
from svdq_compile.integrations.diffusers.pipelines import PIPELINE_SKIP, load_pipeline, pipeline_config, quantize_pipeline, save_pipeline
from svdq_compile.integrations.nunchaku import NunchakuFormatError, load_nunchaku

__version__ = "0.1.0"

__all__ = [
    "SVDQuantConfig",
    "calibrate",
    "calibrating",
    "clear_calibration",
    "LayerStats",
    "stats_of",
    "sqnr_db",
    "SVDQLinear",
    "quantize",
    "quantized_modules",
    "save",
    "load",
    "ArtifactError",
    "explain",
    "export_onnx",
    "export_tensorrt",
    "quantize_pipeline",
    "save_pipeline",
    "load_pipeline",
    "pipeline_config",
    "PIPELINE_SKIP",
    "load_nunchaku",
    "NunchakuFormatError",
    "svdquant_backend",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _install_triton() -> None:
    """Route CUDA tensors to the generated Triton kernels when they can run."""
    try:
        from svdq_compile import codegen
    except Exception:  # pragma: no cover - codegen is optional at import time
        return
    install = getattr(codegen, "install", None)
    available = getattr(codegen, "available", None)
    if install is not None and available is not None and available():
        install()


_install_triton()


def _register_backend() -> None:
    """Register ``svdquant`` with Dynamo when the package's entry point is absent.

    With a pip install, Dynamo finds the backend through the ``torch_dynamo_backends``
    entry point (and may be importing us right now to load it): registering it here too
    would be a duplicate. From a plain source checkout there is no entry point.
    """
    from importlib.metadata import entry_points

    if any(ep.name == "svdquant" for ep in entry_points(group="torch_dynamo_backends")):
        return
    import torch._dynamo

    def svdquant(gm, example_inputs, **kwargs):
        from svdq_compile.capture.backend import svdquant_backend

        return svdquant_backend(gm, example_inputs, **kwargs)

    torch._dynamo.register_backend(svdquant, name="svdquant")


_register_backend()


def __getattr__(name: str):
    if name == "svdquant_backend":
        from svdq_compile.capture.backend import svdquant_backend

        return svdquant_backend
    raise AttributeError(name)

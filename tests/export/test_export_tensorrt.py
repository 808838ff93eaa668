"""TensorRT path (optional [tensorrt] extra). The engine build itself only runs where tensorrt,
torch_tensorrt and a CUDA GPU exist, which the project's CI does not have."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.export.export_helpers import Variants
from svdq_compile.export import TensorRTUnavailableError, export_tensorrt
from svdq_compile.export.tensorrt_export import _trt_linears

HAVE_TRT = all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "torch_tensorrt"))


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed: the missing-extra error cannot be observed")
def test_clear_error_without_tensorrt():
    with pytest.raises(TensorRTUnavailableError, match=r"pip install 'svdq-compile\[tensorrt\]'") as info:
        export_tensorrt(Variants().eval(), (torch.randn(2, 5, 128),))
    assert isinstance(info.value, ImportError)
    assert "CUDA" in str(info.value) and "export_onnx" in str(info.value)


def test_plugin_op_is_the_same_linear():
    """The TensorRT plugin's op (every optional tensor filled in) is numerically the
    SVDQLinear it replaces, and torch.export captures it as one node per call."""
    model = Variants().eval()
    x = torch.randn(3, 4, 128)
    with torch.no_grad():
        ref = model(x)
        with _trt_linears(model) as n:
            assert n == 5
            out = model(x)
            program = torch.export.export(model, (x,), strict=False)
    assert torch.equal(out, ref)
    calls = [node for node in program.graph.nodes if node.target == torch.ops.svdq_export.trt_linear.default]
    assert len(calls) == 6  # layer c is called twice
    assert sum(type(m).__name__ == "SVDQLinear" for m in model.modules()) == 5  # restored


@pytest.mark.skipif(not (HAVE_TRT and torch.cuda.is_available()),
                    reason="needs tensorrt + torch_tensorrt (the [tensorrt] extra) and a CUDA GPU; not run by CI")
def test_tensorrt_engine_matches_pytorch(tmp_path):  # pragma: no cover - no TensorRT on CI
    from svdq_compile import sqnr_db

    model = Variants().eval().cuda()
    x = torch.randn(2, 5, 128, device="cuda")
    trt_model = export_tensorrt(model, (x,), tmp_path / "variants.ep")
    with torch.no_grad():
        assert sqnr_db(model(x), trt_model(x)) >= 30.0

"""``svdq export`` command line."""
from __future__ import annotations

import importlib.util

import pytest

from svdq_compile.cli import main

pytest.importorskip("onnxscript", reason="needs the [onnx] extra")


def test_export_onnx_cli(tmp_path, capsys):
    out = tmp_path / "variants.onnx"
    assert main(["export", "--format", "onnx", "--model", "tests.export.export_helpers:variants_for_cli", "-o", str(out)]) == 0
    assert out.is_file()
    text = capsys.readouterr().out
    assert "6 quantized linears" in text
    assert "trtexec --onnx=" in text and "--fp16" in text


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_export_tensorrt_cli_without_tensorrt(tmp_path, capsys):
    rc = main(["export", "--format", "tensorrt", "--model", "tests.export.export_helpers:variants_for_cli",
               "-o", str(tmp_path / "v.ep")])
    assert rc == 2
    assert "pip install 'svdq-compile[tensorrt]'" in capsys.readouterr().err


def test_bad_model_spec(tmp_path):
    with pytest.raises(ValueError, match="module:function"):
        main(["export", "--model", "no_colon", "-o", str(tmp_path / "x.onnx")])


def test_export_onnx_cli_deploy_lists_ort_ops(tmp_path, capsys):
    out = tmp_path / "variants_deploy.onnx"
    assert main(["export", "--flavor", "deploy", "--model", "tests.export.export_helpers:variants_for_cli", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(deploy," in text and "ONNX Runtime (CPU EP, default options) runs" in text
    assert "MatMulNBits" in text  # the group-wise layers of Variants, fused by ORT

"""``svdq bench``: the default output folder and the ``export`` suite's report (the suite itself
runs minutes of ONNX export: ``svdq bench --suite export``)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks import runner


def test_default_out_is_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = runner.add_arguments(argparse.ArgumentParser()).parse_args([])
    assert args.out is None
    out = runner.output_dir(args.out)
    assert out == tmp_path / "svdq_bench_results"
    assert Path(runner.__file__).resolve().parent not in out.resolve().parents  # never benchmarks/results
    assert runner.output_dir(str(tmp_path / "x")) == tmp_path / "x"


def test_export_suite_is_selectable_and_reports(tmp_path):
    from benchmarks.suites import export as suite

    assert "export" in runner.EXTRA_SUITES
    assert runner._suite("export") is suite
    rows = []
    for key, ms in [("float", 100.0), ("exact", 150.0), ("deploy", 60.0), ("ort_int8_ref", 50.0)]:
        rows.append({"case": "block", "file": key, "status": "ok", "median_ms": ms, "min_ms": ms, "max_ms": ms,
                     "speedup_vs_float": 100.0 / ms, "sqnr_vs_torch_quant_db": 90.0, "sqnr_vs_torch_float_db": 30.0,
                     "file_bytes": 1e6, "file_vs_bf16": 0.3,
                     **({"ort_ops": {"com.microsoft.MatMulIntegerToFloat": 4}} if key == "deploy" else {})})
    payload = {"suite": "export", "device": "cpu", "complete": True, "settings": {"repeats": 3}, "notes": [],
               "machine": {"cpu": "x", "cores": 2}, "versions": {}, "rows": rows}
    md = suite.to_markdown(payload)
    assert "**1.67x**" in md and "MatMulIntegerToFloat 4" in md
    assert "- block: ort_int8_ref 2.00x (30.0 dB vs torch float), deploy 1.67x" in md
    png = tmp_path / "p.png"
    if suite.plot(payload, png):
        assert png.stat().st_size > 0
    assert os.path.basename(str(runner.DEFAULT_OUT)) == "svdq_bench_results"

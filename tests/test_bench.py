"""The benchmark runner (`svdq bench` / `python -m benchmarks`) in its tiny smoke mode.

Runs the linear suite on one 256x256 layer, 1 repeat, with the methods that need no
torch.compile (compiling would dominate the test's time), and checks the result files
and that baselines which cannot run here are reported as "n/a (reason)".
"""
from __future__ import annotations

import json

import pytest

from benchmarks import runner
from benchmarks.suites import report

METHODS = "eager,torchao_int4,bnb_nf4,ours_w4a4,ours_w8a8"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = runner.main(["--suite", "linear", "--quick", "--smoke", "--device", "cpu", "--out", str(out),
                      "--methods", METHODS, "--no-progress"])
    return rc, out


def test_runner_writes_json_markdown_png(smoke_run):
    rc, out = smoke_run
    assert rc == 0
    data = json.loads((out / "bench_linear_cpu.json").read_text())
    assert data["suite"] == "linear" and data["device"] == "cpu" and data["complete"] is True
    assert data["smoke"] is True and data["settings"]["repeats"] == 1
    for key in ("machine", "versions", "settings", "notes", "rows", "elapsed_s"):
        assert key in data, key
    assert data["machine"]["torch"] and "cores" in data["machine"]
    keys = {r["key"] for r in data["rows"]}
    assert keys == set(METHODS.split(","))
    for r in data["rows"]:
        assert {"case", "method", "status", "K", "N", "M"} <= set(r)
    ok = {r["key"]: r for r in data["rows"] if r["status"] == "ok"}
    assert {"eager", "ours_w4a4", "ours_w8a8"} <= set(ok)
    for r in ok.values():
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] == 1
        assert r["speedup"] > 0
    assert ok["eager"]["speedup"] == 1.0
    # The quantized layer approximates the float one (W4A4 with RTN residual on random
    # data is ~14 dB, W8A8 ~40 dB; 8 dB / 25 dB catch wrong kernels or layouts).
    assert ok["ours_w4a4"]["sqnr_db"] > 8
    assert ok["ours_w8a8"]["sqnr_db"] > 25

    md = (out / "bench_linear_cpu.md").read_text()
    assert "| case |" in md and "eager" in md and "ours W4A4" in md
    png = out / "bench_linear_cpu.png"
    if _has_matplotlib():
        assert png.stat().st_size > 1000


def test_unavailable_baselines_are_reported_not_dropped(smoke_run):
    _, out = smoke_run
    data = json.loads((out / "bench_linear_cpu.json").read_text())
    status = {r["key"]: r["status"] for r in data["rows"]}
    # bitsandbytes NF4 is GPU-only; torchao int4 weight-only has no CPU kernel here
    # (or torchao is not installed): either way an explicit reason.
    for key in ("bnb_nf4", "torchao_int4"):
        assert status[key].startswith("n/a (") and status[key].endswith(")") and len(status[key]) > 8
    md = (out / "bench_linear_cpu.md").read_text()
    assert md.count("n/a (") >= 2


def test_cli_bench_parses_same_arguments():
    from svdq_compile.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "--suite", "nope"])
    assert "unknown suite" in str(e.value)


def test_markdown_marks_incomplete_runs_and_errors():
    payload = {"suite": "block", "device": "cpu", "quick": True, "smoke": False, "complete": False,
               "machine": {"cpu": "x", "cores": 2, "torch": "2"}, "versions": {}, "settings": {"repeats": 1},
               "notes": ["a note"], "error": "RuntimeError: boom",
               "rows": [{"case": "c", "key": "eager", "method": "eager", "status": "ok", "median_ms": 2.0,
                         "min_ms": 1.0, "max_ms": 3.0, "speedup": 1.0},
                        {"case": "c", "key": "inductor", "method": "inductor",
                         "status": "n/a (skipped: time budget)"}]}
    md = report.to_markdown(payload)
    assert "Incomplete run" in md and "n/a (skipped: time budget)" in md and "boom" in md


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True

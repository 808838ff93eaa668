"""The benchmark runner (`svdq bench` / `python -m benchmarks`) in its tiny smoke mode.

Runs the linear suite on one 256x256 layer, 1 repeat, with the methods that need no
torch.compile (compiling would dominate the test's time), and checks the result files
and that baselines which cannot run here are reported as "n/a (reason)". Also: the suite
registry and --param, a former standalone script (cpu_linear) and the GPU suites (CPU smoke
under the Triton interpreter) through the same runner and result format, and that every
committed result file still renders.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import runner, suites
from benchmarks.suites import report

ROOT = Path(__file__).resolve().parents[1]

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
    _check_common_header(data)
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


def _check_common_header(data: dict) -> None:
    """What every result file carries: machine, CPU ISA, torch / triton / python versions, date."""
    m = data["machine"]
    for key in ("cpu", "cores", "cpu_isa", "torch", "triton", "python", "date"):
        assert key in m, key
    assert m["torch"] and m["python"] and m["date"] and m["cpu_isa"]
    assert data["versions"]["svdq_compile"]
    assert "repeats" in data["settings"] and "params" in data["settings"]


def test_registry_and_list(capsys):
    """Every suite has a module, a description and a unique name; --list prints them all."""
    assert len(set(suites.NAMES)) == len(suites.NAMES) == len(suites.DESCRIPTIONS)
    assert set(runner.EXTRA_SUITES) == set(suites.EXTRA) | set(suites.ANALYSES)
    assert {"cpu_linear", "demo_speed", "passes", "calib_time", "kernels", "gpu_diag"} <= set(suites.EXTRA)
    assert {"ablation", "modes_quality", "lora_margin"} <= set(suites.ANALYSES)
    assert suites.get("ablation").__name__ == "benchmarks.analysis.ablation"
    assert runner.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in suites.NAMES:
        assert f"\n{name} " in "\n" + out, name
        assert callable(suites.get(name).run), name
    assert "dim=3072" in out and "m=256,1024,4096" in out


def test_params_are_typed_and_checked():
    mods = {"passes": suites.get("passes"), "cpu_linear": suites.get("cpu_linear")}
    p = runner.parse_params(["dim=512", "decompose=full", "m=16,32"], mods, quick=False)
    assert p["passes"]["dim"] == 512 and p["passes"]["decompose"] == "full" and p["passes"]["heads"] == 24
    assert p["cpu_linear"]["m"] == (16, 32) and p["cpu_linear"]["k"] == 3072
    assert runner.parse_params([], mods, quick=True)["passes"]["dim"] == 512  # QUICK_PARAMS
    assert runner.parse_params(["dim=768"], mods, quick=True)["passes"]["dim"] == 768  # --param wins
    with pytest.raises(SystemExit, match="KEY one of"):
        runner.parse_params(["nope=1"], mods, quick=False)
    with pytest.raises(SystemExit, match="expected int"):
        runner.parse_params(["dim=wide"], mods, quick=False)
    bools = runner.parse_params(["skip_demo=yes"], {"ablation": suites.get("ablation")}, quick=False)
    assert bools["ablation"]["skip_demo"] is True


def test_cpu_linear_suite_through_the_runner(tmp_path):
    """A former standalone script, now a suite: same JSON / markdown / plot as the others."""
    rc = runner.main(["--suite", "cpu_linear", "--param", "m=16", "--param", "k=128", "--param", "n=128",
                      "--repeats", "1", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "bench_cpu_linear_cpu.json").read_text())
    assert data["suite"] == "cpu_linear" and data["device"] == "cpu" and data["complete"] is True
    _check_common_header(data)
    assert data["settings"]["params"] == {"m": [16], "k": 128, "n": 128}
    (r,) = data["rows"]
    assert (r["M"], r["K"], r["N"]) == (16, 128, 128) and r["isa"] == data["machine"]["cpu_isa"]
    assert r["fp32_linear_ms"] > 0 and r["quantized_linear_ms"] > 0 and r["speedup"] > 0
    assert r["weight_bytes_ratio"] > 1
    md = (tmp_path / "bench_cpu_linear_cpu.md").read_text()
    assert "Machine:" in md and "| 16 | 128x128 |" in md


def test_gpu_suites_on_cpu(tmp_path):
    """kernels: the CPU smoke run (Triton interpreter, tiny shapes) checks the suite's logic and
    the unfused baseline against the reference; gpu_diag needs CUDA: reported as not run, no file.
    A fresh process: the interpreter must be on before torch._inductor is imported."""
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--suite", "kernels,gpu_diag", "--smoke", "--device",
                          "cpu", "--out", str(tmp_path), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "suite gpu_diag not run: needs a CUDA GPU" in out.stderr
    assert not list(tmp_path.glob("bench_gpu_diag_*"))
    data = json.loads((tmp_path / "bench_kernels_cpu.json").read_text())
    _check_common_header(data)
    c = data["correctness"]
    assert c["ok"] and c["sqnr_fused_vs_reference_db"] > 40 and c["sqnr_unfused_vs_reference_db"] > 40, c
    (row,) = data["rows"]
    for v in ("bf16", "fused", "rank0", "unfused", "prologue", "gemm"):
        assert row["variants"][v]["ms"] > 0, (v, row["variants"][v])
    assert row["sqnr_fused_vs_unfused_db"] > 30
    assert "| 32 | 128 | 96 |" in (tmp_path / "bench_kernels_cpu.md").read_text()


# Result files that no suite wrote: the GPU session summary, `svdq demo`'s metrics.
_NOT_SUITE_RESULTS = ("gpu_session_", "metrics.json")


def test_committed_results_still_render(tmp_path):
    """Every result JSON in benchmarks/results (those of the replaced scripts included) renders
    with its suite's markdown and plot."""
    files = [f for f in sorted((ROOT / "benchmarks" / "results").rglob("*.json"))
             if not f.name.startswith(_NOT_SUITE_RESULTS[0]) and f.name != _NOT_SUITE_RESULTS[1]]
    assert len(files) >= 15
    for f in files:
        dst = tmp_path / f.relative_to(ROOT / "benchmarks" / "results")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
        written = report.render_file(dst)
        md = written[0].read_text()
        assert md.startswith("## ") and "Machine: " in md and "|---|" in md, f
        assert "Suite error" not in md or json.loads(f.read_text()).get("error"), f


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True

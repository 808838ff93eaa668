"""benchmarks/analysis/sass_report.py: offline (no-GPU) compilation of the GPU kernels.

The structural claims in docs/kernels.md (which MMA each tl.dot becomes, the wgmma waits
with pendings = 0 in the main loop, ptxas serialisation notes) come from this tool; these
tests check it still compiles the kernels offline, tells the lowerings apart and counts
every MMA family (FP8 wgmma is ``QGMMA``). The compiles run in a subprocess because the
codegen tests import the kernels under TRITON_INTERPRET=1 (interpreted kernels cannot be
compiled). Without ptxas/cuobjdump in the triton wheel they are skipped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

_PRELUDE = """
import json
from benchmarks.analysis import sass_report
tools = sass_report._bin_dir()
if not ((tools / "cuobjdump").exists() and (tools / "ptxas").exists()):
    print(json.dumps(None))
    raise SystemExit(0)
"""


def _run(code: str, timeout: int = 300):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DISABLE_MMA_V3")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    out = subprocess.run([sys.executable, "-c", _PRELUDE + code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res is None:
        pytest.skip("this triton wheel ships no cuobjdump/ptxas (needed to read the SASS offline)")
    return res


def test_library_gemm_compiles_for_hopper_with_both_lowerings():
    wg, ms = _run("print(json.dumps([sass_report.gemm_report(8, 8, 128, 64, 4, 4, arch=90, disable_mma_v3=d) "
                  "for d in (False, True)]))")
    # int8 main loop; the tf32 wgmmas are the low-rank up projection in the epilogue
    assert wg["mma"] == "wgmma" and wg["wgmma"] > 0 and wg["mma_sync"] == 0
    assert set(wg["mma_by_kind"]) == {"int8", "tf32"}, wg["mma_ops"]
    # Triton waits for every wgmma of the grouped GEMM at once (its result feeds the
    # per-group float rescale, not the next dot): the structural limit docs/kernels.md names.
    assert wg["wgmma_waits_pendings"] and set(wg["wgmma_waits_pendings"]) == {0}
    assert wg["main_loop_waits_pendings"] and wg["main_loop_wait0"] == len(wg["main_loop_waits_pendings"])
    assert ms["mma"] == "mma.sync" and ms["wgmma"] == 0 and ms["mma_sync"] > 0 and "int8" in ms["mma_by_kind"]
    assert ms["wgmma_waits_pendings"] == [] and ms["main_loop_waits_pendings"] == []
    for r in (wg, ms):
        assert 0 < r["registers"] <= 255 and r["ctas_per_sm"] >= 1


def test_fp8_gemm_counts_as_wgmma_and_keeps_one_in_flight():
    """A minimal FP8 (e4m3) GEMM for sm_90, both operands from memory, fp32 accumulator over
    all of K, rescale after the loop: FP8 wgmma (QGMMA) is counted (it used to read
    ``wgmma: 0, mma: none``), Triton keeps one wgmma in flight in the loop (pendings = 1,
    the only 0 is the wait after it), ptxas does not serialise, nothing spills."""
    r = _run("print(json.dumps(sass_report.probe_report('fp8e4nv', arch=90)))")
    assert r["mma"] == "wgmma" and r["wgmma"] > 0 and r["mma_kind"] == "fp8", r
    assert all(op.startswith("QGMMA.") and op.endswith(".E4M3.E4M3") for op in r["mma_ops"]), r["mma_ops"]
    assert r["main_loop_waits_pendings"] and r["main_loop_wait0"] == 0, r["wgmma_waits_pendings"]
    assert r["ptxas_verbose_ok"] and r["ptxas_serialization_codes"] == [], r["ptxas_notes"]
    assert r["stack_bytes"] == 0 and r["spill_store_bytes"] == 0


_PT = """
why = sass_report.pt_available()
if why is not None:
    print(json.dumps({"missing": why}))
    raise SystemExit(0)
gemm_cfgs, pro_cfgs = sass_report._pt_configs()
print(json.dumps({
    "gemm_fp8": sass_report.gemm_pt_report("fp8", gemm_cfgs[0], arch=90),
    "gemm_int8": sass_report.gemm_pt_report("int8", gemm_cfgs[0], arch=90),
    "prologue_fp8": sass_report.prologue_pt_report("fp8", pro_cfgs[0], arch=90),
    "expand_fp8": sass_report.expand_report("fp8", arch=90),
}))
"""


def test_per_token_kernels_keep_an_mma_in_flight_on_hopper():
    """Issue 16's offline acceptance, from a fresh compile for sm_90 at the default autotune
    configs: the FP8 per-token GEMM's main loop is FP8 wgmma with one kept in flight (no
    pendings = 0 wait in the loop), ptxas serialises nothing (no C7514/C7515), nothing
    spills; the prologue and the expansion pass compile without spills. The INT8 GEMM
    (int32 accumulator) is recorded as Triton compiles it: its pipeliner waits for every
    wgmma of a non-fp32 accumulator, which is why the library composition (torch._int_mm)
    comes first for int8 on a GPU."""
    r = _run(_PT)
    if "missing" in r:
        pytest.skip(f"the per-token kernels are not in this checkout: {r['missing']}")
    g = r["gemm_fp8"]
    assert g["mma"] == "wgmma" and g["wgmma"] > 0 and "fp8" in g["mma_by_kind"], g["mma_ops"]
    assert any(op.startswith("QGMMA.") for op in g["mma_ops"]), g["mma_ops"]
    assert g["main_loop_waits_pendings"] and g["main_loop_wait0"] == 0, g["wgmma_waits_pendings"]
    assert g["ptxas_verbose_ok"] and g["ptxas_serialization_codes"] == [], g["ptxas_notes"]
    for name in ("gemm_fp8", "gemm_int8", "prologue_fp8", "expand_fp8"):
        assert r[name]["stack_bytes"] == 0 and r[name]["spill_store_bytes"] == 0, (name, r[name])
        assert r[name]["registers"] <= 255
    i = r["gemm_int8"]
    assert i["mma"] == "wgmma" and "int8" in i["mma_by_kind"], i["mma_ops"]


def test_main_loop_waits_parser():
    """Waits are attributed to the innermost loop that issues a wgmma; the one after the
    loop is not a main-loop wait."""
    from benchmarks.analysis.sass_report import main_loop_waits, mma_summary

    ttgir = """
    %0 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<..>) : i32 {
      %1 = ttng.warp_group_dot %a, %b, %acc {isAsync = true} : ...
      %2:3 = ttng.warp_group_dot_wait %1, %a, %b {pendings = 1 : i32} : ...
      %3 = scf.if %c -> (i32) {
        scf.yield %x : i32
      } else {
        scf.yield %y : i32
      } loc(#loc3)
      scf.yield %2#0 : tensor<..>
    } loc(#loc1)
    %4 = ttng.warp_group_dot_wait %0 {pendings = 0 : i32} : ...
    %5 = scf.for %j = %c0 to %n step %c1 iter_args(%s = %z) -> (f32) : i32 {
      %6 = ttng.warp_group_dot_wait %q {pendings = 0 : i32} : ...
      scf.yield %s : f32
    } {tt.num_stages = 1 : i32}
    """
    assert main_loop_waits(ttgir) == [1]
    sass = """
        /*0100*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR8], R24 ;
        /*0110*/                   HGMMA.64x32x16.F32.BF16 R88, R24, gdesc[UR12], R88 ;
        /*0120*/              @P0  QMMA.16832.F32.E4M3.E4M3 R104, R160.reuse.ROW, R136.COL, R104 ;
        /*0130*/                   UTCQMMA gdesc[UR24], gdesc[UR14], tmem[UR19], tmem[UR16], idesc[UR17], UPT ;
    """
    s = mma_summary(sass)
    assert (s["mma"], s["wgmma"], s["mma_sync"], s["tcgen05_mma"]) == ("tcgen05", 2, 1, 1)
    assert s["mma_by_kind"] == {"fp8": 3, "bf16": 1}


def test_refuses_interpreted_kernels():
    from benchmarks.analysis import sass_report

    import triton

    @triton.jit
    def k(x_ptr):
        pass

    if hasattr(k, "cache_key"):
        pytest.skip("not running under TRITON_INTERPRET=1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sass_report.compile_offline(k, {}, {"x_ptr": "*fp32"}, {}, arch=90, num_warps=4, num_stages=1)

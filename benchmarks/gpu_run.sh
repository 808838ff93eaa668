#!/usr/bin/env bash
# The one prepared GPU session (device time is scarce): install, GPU tests, kernel and
# block benchmarks. Everything lands in $OUT (fetched back) with per-step time limits,
# so one slow step cannot eat the others' budget.
#   usage (on the GPU machine, repo root): bash benchmarks/gpu_run.sh
#   STEPS=tests,diag,mmav2 bash benchmarks/gpu_run.sh   # a subset (the default runs all
#   steps, up to ~12 min with the limits below: split it over two calls, e.g. the line
#   above, up to ~6 min, then STEPS=kernels,suites, up to ~6 min)
# What needs no GPU (the offline SASS analysis of the kernels) is not here:
#   python -m benchmarks.analysis.sass_report [--compat]
set -u
STEPS=${STEPS:-tests,kernels,diag,mmav2,suites}
want() { [[ ",$STEPS," == *",$1,"* ]]; }
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/svdq_gpu_out}
mkdir -p "$OUT"
T0=$(date +%s)
step() { echo; echo "=== $1 (t=$(( $(date +%s) - T0 ))s)"; }

step "install"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { echo "editable install failed:"; tail -5 "$OUT/install.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' | tee "$OUT/versions.json"
import json, datetime, torch, triton
print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "cuda": torch.version.cuda, "date": datetime.datetime.now().isoformat(timespec="seconds")}))
PY

if want tests; then
step "GPU tests (tests/codegen, the CUDA rows of tests/test_errors.py)"
timeout ${TEST_S:-170} python3 -m pytest tests/codegen tests/test_errors.py -q -p no:cacheprovider -rfE \
  --junitxml="$OUT/gpu_tests.xml" \
  >"$OUT/gpu_tests.txt" 2>&1
echo "pytest exit $?"; tail -25 "$OUT/gpu_tests.txt"
fi

# Every benchmark below is a suite of the one runner (`python -m benchmarks` = `svdq bench`):
# results as $OUT/bench_<suite>_cuda.{json,md,png}, JSON written as it goes; the runner's
# time budget (--budget-s, hard stop 30 s later) ends each step before its `timeout`.
#   bench LIMIT_S LOG SUITE OUT_DIR [runner options...]
bench() {
  local limit=$1 log=$2 suite=$3 dir=$4; shift 4
  timeout "$limit" python3 -m benchmarks --suite "$suite" --device cuda --out "$dir" --no-progress "$@" \
    >"$OUT/$log.txt" 2>&1
  echo "$log exit $?"; tail -25 "$OUT/$log.txt"
}

if want kernels; then
step "kernel benchmark"
bench ${KERNEL_S:-190} kernels kernels "$OUT" --budget-s ${KERNEL_BUDGET_S:-150}
fi

if want diag; then
step "GEMM diagnosis (configs, W4A4/W8A8/W4A8, int8 ceilings without group rescale)"
bench ${DIAG_S:-90} gpu_diag gpu_diag "$OUT" --budget-s ${DIAG_BUDGET_S:-55}
fi

if want mmav2; then
step "diag again with DISABLE_MMA_V3=1 (mma.sync instead of wgmma; docs/kernels.md)"
# Triton waits for every wgmma of the grouped GEMM right after issuing it (wait 0: no
# overlap with the per-group rescale); mma.sync has no such wait.
# Separate Triton and tuning caches: the switch must not reuse wgmma binaries or configs.
DISABLE_MMA_V3=1 TRITON_CACHE_DIR=/tmp/triton_mmav2 SVDQ_CACHE_DIR=/tmp/svdq_mmav2 \
  bench ${MMAV2_S:-90} mmav2 gpu_diag "$OUT/mmav2" --budget-s ${DIAG_BUDGET_S:-55}
fi

step "block + linear + memory suites"
if want suites; then
  bench ${SUITE_S:-170} suites ${SUITES:-block,memory} "$OUT"
fi
step "done"
ls -la "$OUT"

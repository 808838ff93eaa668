#!/usr/bin/env bash
# One run of issue #17's CPU acceptance figures with the kernels' ISA forced:
#   benchmarks/cpu_isa_run.sh avx2 [OUT]   (also avx_vnni, avx512_vnni, amx, neon, torch)
# Writes OUT (default benchmarks/results/cpu_isa_<isa>/): the W4A4 linear vs fp32 F.linear
# (suite cpu_linear: K = N = 3072, rank 32, M 256/1024/4096), the width-768 FLUX blocks vs
# eager fp32 (suite block, --quick), and the demo's s/step (`svdq demo`: fp32 eager vs every
# quantized row), plus machine.txt (the demo's interleaved s/step: --suite demo_speed).
# Run it on an idle machine: the three parts time against a baseline in the same process,
# but a busy CPU still widens the spread.
set -euo pipefail
ISA=${1:?usage: cpu_isa_run.sh ISA [OUT]}
OUT=${2:-benchmarks/results/cpu_isa_${ISA}}
PY=${PY:-python}
mkdir -p "$OUT"
export SVDQ_CPU_ISA=$ISA
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  grep -m1 "model name" /proc/cpuinfo || uname -m
  echo "cores: $(nproc)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>/dev/null || true
  echo "SVDQ_CPU_ISA=$ISA"
} | tee "$OUT/machine.txt"
$PY -m benchmarks --suite cpu_linear --isa "$ISA" --no-progress --out "$OUT"
$PY -m benchmarks --quick --suite block --isa "$ISA" --methods eager,inductor,ours_w4a4,ours_w4a8-int8 \
  --no-progress --out "$OUT"
$PY -m svdq_compile.cli demo --out "$OUT/demo" 2>&1 | grep -v "it/s\]" | tail -12
rm -f "$OUT/demo/grid.png"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"

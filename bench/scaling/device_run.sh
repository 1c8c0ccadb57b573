#!/usr/bin/env bash
# Issue 6 on a multi-GPU machine in one call: build (launch/setup.sh), the NCCL backend test and the
# sequence-parallel GPU test under mpirun (2 ranks, and 4 when there are 4 GPUs), the single-GPU tests of the
# ops SP relies on (short-conv halo, attention with query offsets), then bench/scaling/run.sh.
# Usage: bash bench/scaling/device_run.sh OUT_DIR [TOKENS_PER_GPU...]
set -uo pipefail
out=${1:?usage: device_run.sh OUT_DIR [TOKENS_PER_GPU...]}
shift
cd "$(dirname "$0")/../.."
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
gpus=$(nvidia-smi -L | wc -l)
{ echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $gpus GPUs"; nvidia-smi -L; } | tee "$out/device.txt"
echo "== setup"
bash launch/setup.sh >"$out/setup.log" 2>&1 || { echo "setup failed"; tail -n 40 "$out/setup.log"; exit 1; }
tail -n 2 "$out/setup.log"
root=()
[ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
echo "== ctest gpu_parallel + ops"
ctest --test-dir build --output-on-failure -L gpu_parallel -R "gpu_parallel|kda_layer_ops|attention_offset" >"$out/ctest.log" 2>&1
echo "ctest rc=$?"
grep -E "tests passed|tests failed|Passed|Failed|\*\*\*|^SP |rel\. err" "$out/ctest.log" | head -n 30
ctest --test-dir build --output-on-failure -R "kda_layer_ops|attention_offset|kda_compose" >"$out/ctest_ops.log" 2>&1
echo "ops ctest rc=$?"; grep -E "tests passed|Failed|\*\*\*" "$out/ctest_ops.log" | head
if [ "$gpus" -ge 4 ]; then
  echo "== SP GPU test, 4 ranks"
  mpirun "${root[@]}" -np 4 --bind-to none -x NCCL_NVLS_ENABLE ./build/parallel_gpu_test_sequence_parallel >"$out/sp4.log" 2>&1
  echo "np4 rc=$?"; grep -E "^SP |FAILED|PASSED|Failure" "$out/sp4.log" | head -n 20
fi
echo "== bench/scaling"
bash bench/scaling/run.sh "$@" 2>&1 | tee "$out/scaling.txt"

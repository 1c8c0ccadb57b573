#!/usr/bin/env bash
# Builds with the project's setup command on a GPU machine and runs the checks CI cannot run:
# the whole ctest suite (gpu label included) and the tiny training config on CUDA.
# Usage: bash bench/device_checks.sh OUT_DIR [extra train args...]
# Expects data/corpus/kjv.h5 to be present (carried along, or made by data/make_kjv.sh).
set -uo pipefail
out=${1:?usage: device_checks.sh OUT_DIR}
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
{
  echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi -L || true
} | tee "$out/device.txt"

echo "== setup" && bash launch/setup.sh >"$out/setup.log" 2>&1
rc=$?
tail -n 5 "$out/setup.log"
[ $rc -eq 0 ] || { echo "setup failed ($rc)"; tail -n 60 "$out/setup.log"; exit $rc; }

echo "== ctest (all labels)"
ctest --test-dir build --output-on-failure -j8 >"$out/ctest.log" 2>&1
echo "ctest rc=$?"
grep -E "tests passed|tests failed|Skipped|\*\*\*|Failed|Passed" "$out/ctest.log" | tail -n 60

if [ -f data/corpus/kjv.h5 ]; then
  echo "== tiny train on cuda"
  rm -rf runs/tiny-cuda
  ./build/hydistill train --config launch/configs/tiny-cpu-train.ini --device cuda --run.dir runs/tiny-cuda "$@" \
    >"$out/train_cuda.log" 2>&1
  echo "train rc=$?"
  tail -n 15 "$out/train_cuda.log"
  cp runs/tiny-cuda/metrics.jsonl "$out/metrics_cuda.jsonl" 2>/dev/null || true
fi

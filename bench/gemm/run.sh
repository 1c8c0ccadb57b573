#!/usr/bin/env bash
# bench/gemm: the matrix products of one issue-9 distill step (bench_e2e --mode distill), logged through
# HYD_GEMM_LOG and replayed by bench_gemm: each shape as kernels/cuda/matmul.cu runs it against the fastest
# algorithm cuBLASLt offers for it, and the step's totals (how far the step's GEMM time is from cuBLAS's best).
# Needs build/bench_e2e and build/bench_gemm (launch/setup.sh on a CUDA machine).
# Usage: bash bench/gemm/run.sh [BATCH SEQ]...   (default: 8 2048  2 8192); extra bench_gemm options in
# BENCH_GEMM_ARGS (e.g. --algos 32).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(8 2048 2 8192)
[ $(( ${#shapes[@]} % 2 )) -eq 0 ] || { echo "usage: bash bench/gemm/run.sh [BATCH SEQ]..."; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rc=0
for ((i = 0; i < ${#shapes[@]}; i += 2)); do
  b=${shapes[i]} t=${shapes[i + 1]}
  log="$tmp/gemm_B${b}xT${t}.log"
  if ! HYD_GEMM_LOG="$log" ./build/bench_e2e --mode distill --batch "$b" --seq "$t" --steps 1 --warmup 0 \
    >/dev/null; then
    echo "bench_e2e failed at B${b}xT${t}"; rc=1; continue
  fi
  echo "== distill step B${b}xT${t}: $(wc -l <"$log") products logged"
  # shellcheck disable=SC2086
  ./build/bench_gemm "$log" ${BENCH_GEMM_ARGS:-} || rc=1
done
exit $rc

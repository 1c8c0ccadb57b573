#!/usr/bin/env bash
# bench/moe expert-parallel weak scaling (issue 7): bench_moe under mpirun with P = 1, 2, 4 ranks (one GPU
# each, EP = P), N tokens per GPU (default 16384, issue 7's layer otherwise), and a table of the slowest
# rank's forward+backward time, tokens/s per GPU and the efficiency t(EP=1) / t(EP=P). Needs a CUDA build
# (BUILD_DIR/bench_moe) and as many GPUs as the largest P. NCCL_NVLS_ENABLE=0 as on the lent machines.
# Usage: bash bench/moe/run_ep.sh [BUILD_DIR] [options for bench_moe...]     RANKS="1 2 4" by default
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
build=build
if [[ $# -gt 0 && $1 != -* ]]; then
  build=$1
  shift
fi
export NCCL_NVLS_ENABLE=0
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
mpirun_cmd=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -x HYD_MOE_GEMM)
declare -A line
for p in ${RANKS:-1 2 4}; do
  if ((p > gpus)); then
    echo "EP=$p skipped: $gpus GPUs visible"
    continue
  fi
  out=$("${mpirun_cmd[@]}" -np "$p" "$build/bench_moe" "$@" 2>&1)
  rc=$?
  echo "$out" | grep -E "^hydistill|rank|error|Error" | head -n 5
  [[ $rc -eq 0 ]] && line[$p]=$(echo "$out" | grep "^hydistill" | tail -n 1)
done
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1"; }
base=""
[[ -n "${line[1]:-}" ]] && base=$(field "${line[1]}" fwdbwd_ms)
printf '\n%-4s %10s %12s %16s %11s %12s %10s\n' EP fwd_ms fwdbwd_ms "tokens/s/GPU" efficiency max_rows sent_MiB
for p in ${RANKS:-1 2 4}; do
  l=${line[$p]:-}
  [[ -z "$l" ]] && continue
  fb=$(field "$l" fwdbwd_ms)
  tok=$(field "$l" tokens)
  eff="-"
  [[ -n "$base" ]] && eff=$(awk -v a="$base" -v b="$fb" 'BEGIN{printf "%.2f", a / b}')
  printf '%-4s %10s %12s %16s %11s %12s %10s\n' "$p" "$(field "$l" fwd_ms)" "$fb" \
    "$(awk -v t="$tok" -v m="$fb" 'BEGIN{printf "%.0f", t / m * 1e3}')" "$eff" "$(field "$l" max_rows)" \
    "$(field "$l" sent_mib)"
done

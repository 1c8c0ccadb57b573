#!/usr/bin/env bash
# bench/attention: HyDistill's flash attention vs torch.nn.functional.scaled_dot_product_attention
# (causal, flash backend), same shapes, same machine, same call. Needs build/bench_attention (built
# by launch/setup.sh on a CUDA machine) and an importable torch with CUDA. Prints both lines and a
# table with ms, TFLOP/s (causal: fwd 2 B H T^2 d, fwd+bwd 3.5x) and ratios.
# Usage: bash bench/attention/run.sh [B T]...
set -uo pipefail
cd "$(dirname "$0")/../.."
ours=$(./build/bench_attention "$@") || { echo "bench_attention failed"; exit 1; }
echo "$ours"
theirs=$(python3 bench/attention/sdpa.py "$@" 2>&1 | grep '^sdpa ') || theirs=""
echo "$theirs"
python3 - "$ours" "$theirs" <<'PY'
import sys
def parse(text):
    rows = {}
    for line in text.splitlines():
        f = dict(kv.split("=") for kv in line.split()[1:])
        rows[(f["B"], f["T"])] = f
    return rows
ours, sdpa = parse(sys.argv[1]), parse(sys.argv[2])
print(f"{'shape':>12} | {'ours fwd':>9} {'SDPA fwd':>9} {'TF/s':>6} {'TF/s':>6} {'ratio':>6} | "
      f"{'ours f+b':>9} {'SDPA f+b':>9} {'TF/s':>6} {'TF/s':>6} {'ratio':>6}")
for key, o in ours.items():
    s = sdpa.get(key)
    shape = f"B{key[0]}xT{key[1]}"
    if s is None:
        print(f"{shape:>12} | {float(o['fwd_ms']):9.2f} {'-':>9} {float(o['fwd_tflops']):6.0f} {'-':>6} {'-':>6} | "
              f"{float(o['fwdbwd_ms']):9.2f} {'-':>9} {float(o['fwdbwd_tflops']):6.0f} {'-':>6} {'-':>6}")
        continue
    r1 = float(o['fwd_ms']) / float(s['fwd_ms']); r2 = float(o['fwdbwd_ms']) / float(s['fwdbwd_ms'])
    print(f"{shape:>12} | {float(o['fwd_ms']):9.2f} {float(s['fwd_ms']):9.2f} {float(o['fwd_tflops']):6.0f} "
          f"{float(s['fwd_tflops']):6.0f} {r1:6.2f} | {float(o['fwdbwd_ms']):9.2f} {float(s['fwdbwd_ms']):9.2f} "
          f"{float(o['fwdbwd_tflops']):6.0f} {float(s['fwdbwd_tflops']):6.0f} {r2:6.2f}")
backend = next((s.get("backend") for s in sdpa.values()), None)
print(f"ratio = ours / SDPA time (below 1 is faster); TF/s columns: ours, SDPA; SDPA backend: {backend}")
PY

#!/usr/bin/env bash
# bench/kda: HyDistill's KDA core vs FLA's chunk_kda, same shapes, same machine, same call.
# Needs build/bench_kda (built by launch/setup.sh on a CUDA machine) and an importable `fla`
# (on the device machine: carry FLA as wheels, see docs/benchmarks.md). Prints a table with ratios.
# FLA's first run on a fresh machine compiles and autotunes its Triton kernels (~4 minutes at B8xT4096 on an H200,
# stop 23); both land in Triton's cache (TRITON_CACHE_DIR). Carrying that cache between calls is limited to 64 MiB
# (the e2e reference's was 160 MB, stop 24; this one's size is not measured): on a fresh machine it is cheaper to start
# FLA's first run beside the build.
# Usage: bash bench/kda/run.sh [B T]...
set -uo pipefail
cd "$(dirname "$0")/../.."
ours=$(./build/bench_kda "$@") || { echo "bench_kda failed"; exit 1; }
echo "$ours"
theirs=$(python3 bench/kda/fla_kda.py "$@" 2>&1 | grep '^fla ') || theirs=""
echo "$theirs"
python3 - "$ours" "$theirs" <<'PY'
import sys
def parse(text):
    rows = {}
    for line in text.splitlines():
        f = dict(kv.split("=") for kv in line.split()[1:])
        rows[(f["B"], f["T"])] = f
    return rows
ours, fla = parse(sys.argv[1]), parse(sys.argv[2])
print(f"{'shape':>12} | {'ours fwd':>9} {'FLA fwd':>9} {'ratio':>6} | {'ours f+b':>9} {'FLA f+b':>9} {'ratio':>6} | {'ours GiB':>8} {'FLA GiB':>8}")
for key, o in ours.items():
    f = fla.get(key)
    shape = f"B{key[0]}xT{key[1]}"
    if f is None:
        print(f"{shape:>12} | {float(o['fwd_ms']):9.2f} {'-':>9} {'-':>6} | {float(o['fwdbwd_ms']):9.2f} {'-':>9} {'-':>6} | {float(o['peak_gib']):8.2f} {'-':>8}")
        continue
    r1 = float(o['fwd_ms']) / float(f['fwd_ms']); r2 = float(o['fwdbwd_ms']) / float(f['fwdbwd_ms'])
    print(f"{shape:>12} | {float(o['fwd_ms']):9.2f} {float(f['fwd_ms']):9.2f} {r1:6.2f} | {float(o['fwdbwd_ms']):9.2f} {float(f['fwdbwd_ms']):9.2f} {r2:6.2f} | {float(o['peak_gib']):8.2f} {float(f['peak_gib']):8.2f}")
print("ratio = ours / FLA time (below 1 is faster)")
PY

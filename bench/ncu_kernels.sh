#!/usr/bin/env bash
# Per-kernel GPU times of one command under Nsight Compute (gpu__time_duration), one line per launch.
# Usage: [NCU_SKIP=K] bash bench/ncu_kernels.sh LAUNCHES COMMAND...   (K launches skipped first)
set -uo pipefail
n=$1; shift
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
tmp=$(mktemp)
"$ncu" --launch-skip "${NCU_SKIP:-0}" --launch-count "$n" --metrics gpu__time_duration.sum --csv "$@" 2>/dev/null >"$tmp"
python3 - "$tmp" <<'PY'
import csv, sys
hdr = None
for r in csv.reader(open(sys.argv[1])):
    if 'Kernel Name' in r:
        hdr = r
        continue
    if hdr and len(r) == len(hdr):
        d = dict(zip(hdr, r))
        name = d['Kernel Name'].replace('(anonymous namespace)::', '').split('(')[0][:60]
        print(f"{d['ID']:>3} {name:<60} grid {d['Grid Size']:<14} {float(d['Metric Value'].replace(',', '')) / 1e3:9.1f} us")
PY
rm -f "$tmp"

#!/usr/bin/env bash
# Per-kernel GPU times (and optional extra metrics) of one command under Nsight Compute, one line
# per launch. Usage: [NCU_SKIP=K] [NCU_METRICS=m1,m2] bash bench/ncu_kernels.sh LAUNCHES COMMAND...
# (K launches are skipped first; extra metrics are printed after the time, by their last name part.)
set -uo pipefail
n=$1; shift
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
metrics=gpu__time_duration.sum${NCU_METRICS:+,$NCU_METRICS}
tmp=$(mktemp)
"$ncu" --launch-skip "${NCU_SKIP:-0}" --launch-count "$n" --metrics "$metrics" --csv "$@" 2>/dev/null >"$tmp"
python3 - "$tmp" <<'PY'
import csv, sys
from collections import OrderedDict
hdr, rows = None, OrderedDict()
for r in csv.reader(open(sys.argv[1])):
    if 'Kernel Name' in r:
        hdr = r
        continue
    if hdr and len(r) == len(hdr):
        d = dict(zip(hdr, r))
        key = d['ID']
        name = d['Kernel Name'].replace('(anonymous namespace)::', '').split('(')[0][:48]
        e = rows.setdefault(key, {'name': name, 'grid': d['Grid Size'], 'm': OrderedDict()})
        e['m'][d['Metric Name']] = d['Metric Value'].replace(',', '')
for key, e in rows.items():
    t = float(e['m'].pop('gpu__time_duration.sum', 'nan')) / 1e3
    extra = ' '.join(f"{k.split('__')[-1][:28]}={v}" for k, v in e['m'].items())
    print(f"{key:>3} {e['name']:<48} {e['grid']:<14} {t:9.1f} us  {extra}")
PY
rm -f "$tmp"

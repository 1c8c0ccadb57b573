#!/usr/bin/env bash
# Per-kernel GPU times (and optional extra metrics) of one command under Nsight Compute, one line
# per launch. Usage: [NCU_SKIP=K] [NCU_METRICS=m1,m2] [NCU_SUMMARY=1] bash bench/ncu_kernels.sh LAUNCHES COMMAND...
# (K launches are skipped first; extra metrics are printed after the time, by their last name part.)
# NCU_SUMMARY=1: instead of one line per launch, the kernels grouped by name (launches, total and mean
# time, share of the total), largest total first: where a whole step's GPU time goes. NCU_KERNELS=REGEX profiles
# only the kernels whose name matches (the others run unprofiled). Clocks are left as they run
# (--clock-control none, METHOD.md). NCU_CACHE=none keeps the caches warm between kernels (as in a real step) instead
# of flushing them before each one (ncu's default, NCU_CACHE=all).
set -uo pipefail
n=$1; shift
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
metrics=gpu__time_duration.sum${NCU_METRICS:+,$NCU_METRICS}
tmp=$(mktemp)
filter=()
[ -n "${NCU_KERNELS:-}" ] && filter=(--kernel-name "regex:$NCU_KERNELS")
"$ncu" --clock-control none --cache-control "${NCU_CACHE:-all}" "${filter[@]}" --launch-skip "${NCU_SKIP:-0}" --launch-count "$n" --metrics "$metrics" --csv "$@" 2>/dev/null >"$tmp"
python3 - "$tmp" "${NCU_SUMMARY:-0}" <<'PY'
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
if sys.argv[2] == '1':
    by = OrderedDict()
    for e in rows.values():
        t = float(e['m'].get('gpu__time_duration.sum', 'nan')) / 1e3
        n, tot = by.get(e['name'], (0, 0.0))
        by[e['name']] = (n + 1, tot + t)
    total = sum(t for _, t in by.values())
    print(f"{len(rows)} launches, {total / 1e3:.2f} ms of kernel time")
    print(f"{'kernel':<48} {'launches':>8} {'total ms':>9} {'mean us':>9} {'share':>6}")
    for name, (n, tot) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:<48} {n:>8} {tot / 1e3:>9.3f} {tot / n:>9.1f} {tot / total:>6.1%}")
    sys.exit(0)
def short(metric):  # e.g. smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio -> stall_barrier
    unit, name = metric.split('__')[0], metric.split('__')[-1]
    name = name.replace('average_warps_issue_stalled_', 'stall_').replace('_per_issue_active.ratio', '')
    name = name.replace('.avg.pct_of_peak_sustained_active', '%').replace('.avg.pct_of_peak_sustained_elapsed', '%')
    name = name.replace('pipe_tensor_op_hmma_cycles_active', 'tensor_active')
    name = name.replace('data_bank_conflicts_pipe_lsu_mem_shared.sum', 'smem_bank_conflicts')
    if name.startswith('throughput'):
        name = unit + '_' + name
    return name[:32]
for key, e in rows.items():
    t = float(e['m'].pop('gpu__time_duration.sum', 'nan')) / 1e3
    extra = ' '.join(f"{short(k)}={v}" for k, v in e['m'].items())
    print(f"{key:>3} {e['name']:<48} {e['grid']:<14} {t:9.1f} us  {extra}")
PY
rm -f "$tmp"

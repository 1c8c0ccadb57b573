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
cd "$(dirname "$0")/../.." || exit 1
ours=$(./build/bench_kda "$@") || { echo "bench_kda failed"; exit 1; }
echo "$ours"
theirs=$(python3 bench/kda/fla_kda.py "$@" 2>&1 | grep '^fla ') || theirs=""
echo "$theirs"
python3 - "$ours" "$theirs" <<'PY'
import sys
def parse(text):
    rows = {}
    for line in text.splitlines():
        if not line.startswith(("hydistill ", "fla ")):  # (BENCH_KDA_LASP=1 adds 'lasp' lines)
            continue
        f = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
        rows[(f["B"], f["T"])] = f
    return rows
ours, fla = parse(sys.argv[1]), parse(sys.argv[2])
# Ours twice: recomputing (fwd_ms / fwdbwd_ms) and the saving pair the layer uses by default (saving_*: the forward
# keeps its work for the backward); the ratios are ours / FLA.
num = lambda d, k: float(d[k]) if d and k in d else None
cell = lambda x, w=9, p=2: f"{x:{w}.{p}f}" if x is not None else f"{'-':>{w}}"
rat = lambda a, b: f"{a / b:6.2f}" if a is not None and b else f"{'-':>6}"
# Memory: ours recomputing and saving as the pool's reserved high-water mark, then saving allocated against FLA's
# allocated (torch.cuda.max_memory_allocated: the same measure) and FLA's reserved.
print(f"{'shape':>12} | {'ours fwd':>9} {'FLA fwd':>9} {'ratio':>6} | {'ours f+b':>9} {'saving':>9} {'FLA f+b':>9} "
      f"{'ratio':>6} {'saving':>6} | GiB reserved: {'ours':>6} {'saving':>6} | GiB allocated: {'saving':>6} "
      f"{'FLA':>6} | FLA reserved")
for key, o in ours.items():
    f = fla.get(key)
    fwd, fb, sfb = num(o, "fwd_ms"), num(o, "fwdbwd_ms"), num(o, "saving_fwdbwd_ms")
    ffwd, ffb = num(f, "fwd_ms"), num(f, "fwdbwd_ms")
    print(f"{'B' + key[0] + 'xT' + key[1]:>12} | {cell(fwd)} {cell(ffwd)} {rat(fwd, ffwd)} | {cell(fb)} {cell(sfb)} "
          f"{cell(ffb)} {rat(fb, ffb)} {rat(sfb, ffb)} | {'':13} {cell(num(o, 'peak_gib'), 6)} "
          f"{cell(num(o, 'saving_peak_gib'), 6)} | {'':14} {cell(num(o, 'saving_alloc_gib'), 6)} "
          f"{cell(num(f, 'peak_gib'), 6)} | {cell(num(f, 'reserved_gib'), 12)}")
print("ratio = ours / FLA time (below 1 is faster)")
PY

#!/usr/bin/env bash
# bench/scaling: weak scaling of sequence parallelism for the hybrid student (bench_scaling.cpp), one GPU per
# rank, on one host. For each tokens-per-GPU value, SP = 1, 2, 4 (as many as there are GPUs), then a table
# with the per-GPU throughput relative to SP = 1 (weak-scaling efficiency) and the bytes each KDA layer
# moves (independent of T). Needs build/bench_scaling (launch/setup.sh on a CUDA machine) and mpirun.
# Usage: bash bench/scaling/run.sh [TOKENS_PER_GPU...]   (default 4096 16384); env STEPS, PATTERN, LAYERS, DOCS.
set -uo pipefail
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0
tokens=("$@")
[ ${#tokens[@]} -gt 0 ] || tokens=(4096 16384)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$gpus" -ge 1 ] || { echo "no GPU visible"; exit 1; }
root=()
[ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
lines=""
for t in "${tokens[@]}"; do
  for sp in 1 2 4; do
    [ "$sp" -le "$gpus" ] || continue
    out=$(mpirun "${root[@]}" -np "$sp" --bind-to none -x NCCL_NVLS_ENABLE ./build/bench_scaling --sp "$sp" \
      --tokens-per-gpu "$t" --steps "${STEPS:-5}" --layers "${LAYERS:-12}" --pattern "${PATTERN:-KKKA}" \
      --docs "${DOCS:-1}" 2>&1)
    rc=$?
    line=$(echo "$out" | grep '^scaling ')
    if [ $rc -ne 0 ] || [ -z "$line" ]; then echo "sp=$sp tokens=$t failed (rc $rc):"; echo "$out" | tail -n 20; continue; fi
    echo "$line"
    lines+="$line"$'\n'
  done
done
python3 - "$lines" <<'PY'
import sys
rows = [dict(kv.split("=", 1) for kv in l.split()[1:]) for l in sys.argv[1].splitlines() if l.strip()]
base = {r["tokens_per_gpu"]: float(r["per_gpu"]) for r in rows if r["sp"] == "1"}
print(f"{'T/GPU':>6} {'SP':>3} {'step ms':>9} {'tok/s':>10} {'tok/s/GPU':>10} {'eff.':>6} {'comm':>6} "
      f"{'KDA B/layer':>12} {'halo B/layer':>12} {'attn B/layer':>13} {'GiB':>6}")
for r in rows:
    b = base.get(r["tokens_per_gpu"])
    eff = f"{float(r['per_gpu']) / b:6.2f}" if b else "     -"
    print(f"{r['tokens_per_gpu']:>6} {r['sp']:>3} {float(r['step_ms']):9.2f} {float(r['tokens_per_s']):10.0f} "
          f"{float(r['per_gpu']):10.0f} {eff} {float(r['comm_share']):6.3f} {r['kda_bytes_per_layer']:>12} "
          f"{r['halo_bytes_per_layer']:>12} {r['attn_bytes_per_layer']:>13} {float(r['mem_gib']):6.2f}")
print("eff. = tokens/s per GPU relative to SP = 1 at the same tokens per GPU (weak scaling); comm = share of the step in SP collectives")
PY

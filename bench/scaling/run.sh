#!/usr/bin/env bash
# bench/scaling: weak scaling of the hybrid student's training step (bench_scaling.cpp), one GPU per rank, on
# one host. For each tokens-per-GPU value: sequence parallelism SP = 1, 2, 4 (forward + backward, MODE sp), and
# data parallelism DP = 1, 2, 4 with the whole step (ZeRO-1 exchange + AdamW, MODE dp), as many ranks as there
# are GPUs; then a table with the per-GPU throughput relative to the one-GPU run of the same kind (weak-scaling
# efficiency) and the bytes each KDA layer moves (independent of T). Needs build/bench_scaling
# (launch/setup.sh on a CUDA machine) and mpirun.
# Usage: bash bench/scaling/run.sh [TOKENS_PER_GPU...]   (default 4096 16384); env MODE (sp | dp | both, the
# default), STEPS, PATTERN, LAYERS, DOCS, HYD_SP_ATTN_BALANCE (0: the contiguous LASP-2H instead of the
# default balanced work; docs/parallel.md), HYD_SP_ASYNC (0: synchronised, timed SP collectives, for the SP comm
# column, instead of the default queued ones: parallel/sequence_parallel.h), HYD_SP_PROFILE (1: per-phase times of
# the first and the last rank, synchronising around every phase: trainer/lasp.h), HYD_SP_WINDOWS (0: LASP-2's
# forward in steps on ranks with an incoming state instead of pipelined windows: trainer/lasp.cpp).
set -uo pipefail
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0
export HYD_SP_ATTN_BALANCE=${HYD_SP_ATTN_BALANCE:-} HYD_SP_ASYNC=${HYD_SP_ASYNC:-} HYD_SP_PROFILE=${HYD_SP_PROFILE:-}
export HYD_KDA_SAVE=${HYD_KDA_SAVE:-} HYD_SP_CONCURRENT=${HYD_SP_CONCURRENT:-} HYD_KDA_CONCURRENT=${HYD_KDA_CONCURRENT:-}
export HYD_SP_WINDOWS=${HYD_SP_WINDOWS:-}
tokens=("$@")
[ ${#tokens[@]} -gt 0 ] || tokens=(4096 16384)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$gpus" -ge 1 ] || { echo "no GPU visible"; exit 1; }
root=()
[ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
lines=""
mode=${MODE:-both}
runs=()  # "ranks sp optimizer"
if [ "$mode" = sp ] || [ "$mode" = both ]; then runs+=("1 1 0" "2 2 0" "4 4 0"); fi
if [ "$mode" = dp ] || [ "$mode" = both ]; then runs+=("1 1 1" "2 1 1" "4 1 1"); fi
for t in "${tokens[@]}"; do
  for r in "${runs[@]}"; do
    read -r np sp opt <<<"$r"
    [ "$np" -le "$gpus" ] || continue
    out=$(mpirun "${root[@]}" -np "$np" --bind-to none -x NCCL_NVLS_ENABLE -x HYD_SP_ATTN_BALANCE -x HYD_SP_ASYNC -x HYD_SP_PROFILE \
      -x HYD_KDA_SAVE -x HYD_SP_CONCURRENT -x HYD_KDA_CONCURRENT -x HYD_SP_WINDOWS ./build/bench_scaling --sp "$sp" \
      --tokens-per-gpu "$t" --steps "${STEPS:-5}" --layers "${LAYERS:-12}" --pattern "${PATTERN:-KKKA}" \
      --docs "${DOCS:-1}" --optimizer "$opt" 2>&1)
    rc=$?
    echo "$out" | grep '^profile ' || true  # HYD_SP_PROFILE=1: per-phase ms of the first and last rank
    line=$(echo "$out" | grep '^scaling ')
    if [ $rc -ne 0 ] || [ -z "$line" ]; then echo "np=$np sp=$sp optimizer=$opt tokens=$t failed (rc $rc):"; echo "$out" | tail -n 20; continue; fi
    echo "$line"
    lines+="$line"$'\n'
  done
done
python3 - "$lines" <<'PY'
import sys
rows = [dict(kv.split("=", 1) for kv in l.split()[1:]) for l in sys.argv[1].splitlines() if l.strip()]
key = lambda r: (r["tokens_per_gpu"], r.get("optimizer", "0"))
base = {key(r): float(r["per_gpu"]) for r in rows if r["gpus"] == "1"}
base_w = {key(r): float(r["tflops_per_gpu"]) for r in rows if r["gpus"] == "1"}
print(f"{'T/GPU':>6} {'DP':>3} {'SP':>3} {'opt':>3} {'step ms':>9} {'tok/s':>10} {'tok/s/GPU':>10} {'eff.':>6} "
      f"{'work eff.':>9} {'SP comm':>7} {'ZeRO ms':>8} {'KDA B/layer':>12} {'halo B/layer':>12} {'attn B/layer':>13} {'GiB':>6}")
for r in rows:
    b, bw = base.get(key(r)), base_w.get(key(r))
    eff = f"{float(r['per_gpu']) / b:6.2f}" if b else "     -"
    weff = f"{float(r['tflops_per_gpu']) / bw:9.2f}" if bw else "        -"
    comm = "queued" if r.get("sp_queued") == "1" else f"{float(r['comm_share']):.3f}"
    print(f"{r['tokens_per_gpu']:>6} {r['dp']:>3} {r['sp']:>3} {r.get('optimizer', '0'):>3} {float(r['step_ms']):9.2f} "
          f"{float(r['tokens_per_s']):10.0f} {float(r['per_gpu']):10.0f} {eff} {weff} {comm:>7} "
          f"{float(r.get('zero1_ms', 0)):8.2f} {r['kda_bytes_per_layer']:>12} {r['halo_bytes_per_layer']:>12} "
          f"{r['attn_bytes_per_layer']:>13} {float(r['mem_gib']):6.2f}")
print("eff. = tokens/s per GPU relative to the one-GPU run of the same kind (opt 0: forward + backward, opt 1: the whole")
print("step with ZeRO-1 and AdamW) at the same tokens per GPU (weak scaling); work eff. = the same for the model FLOPs a")
print("GPU does per second (tflops_per_gpu): under SP the causal attention of every query spans all ranks' tokens, so a")
print("GPU's attention work per token grows with SP and tokens/s alone cannot stay flat (docs/parallel.md);")
print("SP comm = share of the step in SP collectives")
print("(timed with HYD_SP_ASYNC=0; 'queued': the default NCCL collectives overlap compute and are not timed);")
print("ZeRO ms = reduce-scatter + all-gather of the ZeRO-1 step (between synchronisations)")
PY

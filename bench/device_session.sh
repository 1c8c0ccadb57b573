#!/usr/bin/env bash
# One device call covering the multi-GPU and MoE checks (issues 6 and 7): build (launch/setup.sh), the
# gpu_parallel tests (NCCL, SP, multi-rank train / distill), the gpu label, the DP and SP scaling tables and
# the MoE layer bench. Each part has its own time limit and log under OUT_DIR; a summary goes to stdout.
# Usage: bash bench/device_session.sh OUT_DIR [PARTS]   PARTS: comma list of gpu_parallel,gpu,dp,sp_k,sp_h,gpu_moe,moe,e2e,
# moe_rows,kda_save,e2e_ab,kda_ncu,lasp_ncu,step_ncu,kda_src,kda_fla
# (sp_h: the 3:1 hybrid's SP scaling with the contiguous LASP-2H and synchronised collectives
# (HYD_SP_ATTN_BALANCE=0 HYD_SP_ASYNC=0), the balanced one synchronised, then the defaults (balanced, queued);
# moe_rows: our MoE layer with the per-expert loop and the grouped cuBLAS call from 256 to 2048 rows per expert,
# for 64 experts of FFN 1408 and 128 of FFN 768: where one grouped call beats the loop;
# e2e_ab: the distill step B8xT2048 with the defaults and with each of AB_VARS (space-separated NAME=VALUE, e.g.
# "HYD_KDA_SAVE=0 HYD_MOE_GEMM=grouped"), alternating, twice: same-call A/B of switches;
# kda_ncu: the KDA core's chunk kernels at B8xT4096 under Nsight Compute with occupancy, throughput and stall
# metrics (why a kernel is far from its memory floor); lasp_ncu: the same for LASP-2's correction kernels
# (bench_kda 1 16384 with BENCH_KDA_LASP=1); step_ncu: every kernel of one distill step B8xT2048 grouped
# by name (where the step's time goes); kda_src: where the KDA backward's intra / products / prep kernels stall, per
# source line (Nsight Compute's per-instruction samples joined with nvdisasm's line info by bench/ncu_source_lines.py;
# give CUDAFLAGS=-lineinfo so that the build carries source references); kda_fla: issue 3's table, our KDA core and
# FLA's chunk_kda in one call (bench/kda/run.sh on KDA_SHAPES, default "8 4096"), FLA's Triton compilation started
# beside the build)
set -uo pipefail
out=${1:?usage: device_session.sh OUT_DIR [PARTS]}
parts=${2:-gpu_parallel,gpu,dp,sp_k,moe}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
has() { [[ ",$parts," == *",$1,"* ]]; }
echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null), $(nvidia-smi -L | wc -l) GPUs: $(nvidia-smi -L | head -1)"
if has kda_fla; then
  # FLA's first run compiles and autotunes its Triton kernels (~4 minutes on a fresh H200, stop 23): started here,
  # beside our build (CPU), so that run.sh's FLA run later finds them in Triton's cache. Needs the wheels in .whl/.
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>/dev/null ||
    python3 -m pip install -q --no-deps --no-index --break-system-packages .whl/*.whl 2>/dev/null ||
    echo "kda_fla: FLA wheels not installed (.whl/)"
  # shellcheck disable=SC2086
  python3 bench/kda/fla_kda.py ${KDA_SHAPES:-8 4096} >"$out/fla_warm.txt" 2>&1 &
  fla_warm=$!
fi
bash launch/setup.sh >"$out/setup.log" 2>&1 || { echo "setup failed"; tail -n 40 "$out/setup.log"; exit 1; }
echo "setup ok"
if has gpu_parallel; then
  timeout 300 ctest --test-dir build --output-on-failure -L gpu_parallel >"$out/gpu_parallel.log" 2>&1
  echo "gpu_parallel rc=$?"; grep -E "Test +#|tests passed|FAIL|worst rel" "$out/gpu_parallel.log" | head -n 30
fi
if has gpu; then
  timeout 240 ctest --test-dir build --output-on-failure -L '^gpu$' -j4 >"$out/gpu.log" 2>&1
  echo "gpu rc=$?"; grep -E "tests passed|Failed|\*\*\*|FAILED" "$out/gpu.log" | head -n 20
fi
if has dp; then
  MODE=dp STEPS=4 timeout 200 bash bench/scaling/run.sh 16384 >"$out/dp.txt" 2>&1
  echo "dp rc=$?"; tail -n 8 "$out/dp.txt"
fi
if has sp_k; then
  MODE=sp PATTERN=K STEPS=4 timeout 150 bash bench/scaling/run.sh 16384 >"$out/sp_k.txt" 2>&1
  echo "sp_k rc=$?"; tail -n 7 "$out/sp_k.txt"
fi
if has sp_h; then
  # SP_H_VARIANTS="1 1" (for instance) runs only the defaults.
  IFS=, read -r -a variants <<<"${SP_H_VARIANTS:-0 0,1 0,1 1}"
  for v in "${variants[@]}"; do
    read -r bal async <<<"$v"
    HYD_SP_ATTN_BALANCE=$bal HYD_SP_ASYNC=$async MODE=sp PATTERN=KKKA STEPS=4 timeout 200 \
      bash bench/scaling/run.sh 16384 >"$out/sp_h_bal${bal}_async$async.txt" 2>&1
    echo "sp_h HYD_SP_ATTN_BALANCE=$bal HYD_SP_ASYNC=$async rc=$?"; tail -n 7 "$out/sp_h_bal${bal}_async$async.txt"
  done
fi
if has moe_rows; then
  for cfg in "64 1408" "128 768"; do
    read -r e f <<<"$cfg"
    for n in 2048 4096 8192 16384; do
      for g in loop grouped auto; do
        HYD_MOE_GEMM=$g timeout 60 build/bench_moe --tokens "$n" --experts "$e" --ffn "$f" --iters 10 --warmup 3 \
          2>/dev/null | grep '^hydistill' | tee -a "$out/moe_rows.txt" | grep -o 'tokens=[0-9]* .*experts=[0-9]*\|gemm=[a-z]* gemm_dw=[a-z]*\|fwd_ms=[0-9.]* fwdbwd_ms=[0-9.]*' | tr '\n' ' '
        echo
      done
    done
  done
fi
if has kda_save; then
  # The KDA core keeping its forward work for the backward (the default; HYD_KDA_SAVE=0 recomputes): the bit-for-bit kernel test, the
  # models under it, the kernel bench (both pairs in one line) and the distill step with and without it.
  timeout 200 ctest --test-dir build --output-on-failure -R 'test_gpu_kda$|test_gpu_kda_layer|test_gpu_hybrid_model' >"$out/kda_save.log" 2>&1
  echo "kda_save tests rc=$?"; grep -E "tests passed|Failed|FAILED" "$out/kda_save.log" | head -n 10
  timeout 120 ./build/bench_kda 8 4096 2 16384 1 32768 | tee "$out/kda_save_bench.txt"
  for v in 0 1 0 1; do
    echo "e2e distill HYD_KDA_SAVE=$v"
    HYD_KDA_SAVE=$v timeout 90 ./build/bench_e2e --mode distill --batch 8 --seq 2048 --steps 8 --warmup 2 2>&1 |
      tail -n 1 | grep -o "step_ms=[0-9.]* tokens_per_s=[0-9]* mfu=[0-9.]* peak_gib=[0-9.]*"
  done
fi
if has e2e_ab; then
  for _ in 1 2; do
    for v in default ${AB_VARS:-}; do
      line=$( ([ "$v" = default ] || export "${v?}"; timeout 90 ./build/bench_e2e --mode distill --batch 8 --seq 2048 \
        --steps 8 --warmup 2 2>&1) | tail -n 1 | grep -o "step_ms=[0-9.]* tokens_per_s=[0-9]* mfu=[0-9.]* peak_gib=[0-9.]*")
      echo "e2e_ab $v: $line" | tee -a "$out/e2e_ab.txt"
    done
  done
fi
if has gpu_moe; then
  timeout 240 ctest --test-dir build -R test_gpu_moe --output-on-failure >"$out/gpu_moe.log" 2>&1
  echo "gpu_moe rc=$?"; grep -E "tests passed|Failed|FAILED|\*\*\*" "$out/gpu_moe.log" | head -n 20
  for g in grouped loop wmma; do
    HYD_MOE_GEMM=$g timeout 120 build/gpu_test_gpu_moe --gtest_filter=GpuMoe.Qwen3MoeModelsMatchCpu >"$out/gpu_moe_model_$g.log" 2>&1
    echo "qwen3_moe models with $g: rc=$?"; grep -E "PASSED|FAILED" "$out/gpu_moe_model_$g.log" | head -n 3
  done
fi
if has moe; then
  MOE_GEMMS="${MOE_GEMMS:-grouped loop wmma}" timeout 300 bash bench/moe/run.sh build >"$out/moe.txt" 2>&1
  echo "moe rc=$?"; tail -n 16 "$out/moe.txt"
fi
if has e2e; then
  timeout 420 bash bench/e2e/run.sh >"$out/e2e.txt" 2>&1
  echo "e2e rc=$?"; tail -n 20 "$out/e2e.txt"
fi
# Per launch: time, achieved occupancy, SM / DRAM / tensor-pipe busy, and the warp stall reasons per issued
# instruction (barrier, long scoreboard = global memory, short scoreboard = shared memory / SFU, MIO throttle,
# math pipe throttle), shared-memory bank conflicts.
stall_metrics() {
  local stalls=barrier,long_scoreboard,short_scoreboard,mio_throttle,math_pipe_throttle,wait,lg_throttle m st
  m=smsp__warps_active.avg.pct_of_peak_sustained_active,sm__throughput.avg.pct_of_peak_sustained_elapsed
  m=$m,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
  m=$m,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__inst_executed.sum
  for st in ${stalls//,/ }; do m=$m,smsp__average_warps_issue_stalled_${st}_per_issue_active.ratio; done
  echo "$m"
}
if has kda_ncu; then
  # One regex per kernel: with one for all, the first launches (bench_kda's forward runs first, 11 times) fill the
  # count before any backward kernel is reached.
  for kern in prep state reverse products intra; do
    NCU_KERNELS=$kern NCU_METRICS=$(stall_metrics) timeout 120 bash bench/ncu_kernels.sh 1 \
      ./build/bench_kda 8 4096 >>"$out/kda_ncu.txt" 2>&1
  done
  echo "kda_ncu rc=$?"; cat "$out/kda_ncu.txt"
fi
if has lasp_ncu; then
  # LASP-2's parallel-correction kernel on one GPU, B1xT16384 H16, the same metrics: two forward launches, then
  # (bench_kda runs the forward one 11 times first) two backward ones.
  for skip in 0 11; do
    BENCH_KDA_LASP=1 NCU_SKIP=$skip NCU_KERNELS='correct' NCU_METRICS=$(stall_metrics) timeout 120 \
      bash bench/ncu_kernels.sh 2 ./build/bench_kda 1 16384 >>"$out/lasp_ncu.txt" 2>&1
  done
  echo "lasp_ncu rc=$?"; cat "$out/lasp_ncu.txt"
fi
if has kda_fla; then
  wait "$fla_warm"
  echo "FLA warm-up beside the build (not a measurement): $(grep '^fla ' "$out/fla_warm.txt" | tr '\n' ' ')"
  # shellcheck disable=SC2086
  timeout 300 bash bench/kda/run.sh ${KDA_SHAPES:-8 4096} >"$out/kda_fla.txt" 2>&1
  echo "kda_fla rc=$?"; cat "$out/kda_fla.txt"
fi
if has kda_src; then
  # The line info comes from a cubin of kda_mma.cu built here with the build's flags; ncu_source_lines.py checks that
  # its instructions are the profiled ones (opcode by opcode) and says so when they are not.
  nvcc -std=c++20 -O3 -DNDEBUG -DHYD_WITH_CUDA --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 -lineinfo \
    -I. -cubin kernels/cuda/kda_mma.cu -o "$out/kda_mma.cubin" && nvdisasm --print-line-info "$out/kda_mma.cubin" >"$out/kda_mma.sass"
  ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  for kern in intra_kernel products_half_kernel prep_kernel; do
    timeout 120 "$ncu" --set full --import-source yes --clock-control none -k "regex:$kern" -c 1 -o "$out/$kern" \
      ./build/bench_kda 8 4096 >"$out/${kern}_run.txt" 2>&1
    "$ncu" -i "$out/$kern.ncu-rep" --page source --csv --print-source sass >"$out/${kern}_sass.csv" 2>&1
    awk -v k="$kern" '$0 ~ "^[.]text[.].*" k "ILi128" {p = 1; print; next} p && /^[.]text[.]/ {p = 0} p' \
      "$out/kda_mma.sass" >"$out/${kern}_lines.sass"
    echo "== $kern"; python3 bench/ncu_source_lines.py "$out/${kern}_sass.csv" "$out/${kern}_lines.sass" 25
  done
fi
if has step_ncu; then
  NCU_SUMMARY=1 timeout 300 bash bench/ncu_kernels.sh 100000 ./build/bench_e2e --mode distill --batch 8 --seq 2048 \
    --warmup 0 --steps 1 >"$out/step_ncu.txt" 2>&1
  echo "step_ncu rc=$?"; head -n 40 "$out/step_ncu.txt"
fi

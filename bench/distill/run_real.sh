#!/usr/bin/env bash
# Issue 5, "real distillation on real text", in one command:
#
#   bash bench/distill/run_real.sh OUT_DIR            # the experiment, on one GPU (--device cuda)
#   bash bench/distill/run_real.sh OUT_DIR --smoke    # the same pipeline shrunk for the CPU (~2-3 min, 2 cores)
#
# 1. Data. Passkey prompts for evaluation (data/make_passkey.py: 25 each of 128, 256, 512 and 1024 tokens,
#    i.e. up to the training length), then the teacher's training data (bench/distill/make_mix.py): the KJV
#    corpus (data/corpus/kjv.h5, data/make_kjv.sh) plus synthetic documents: passkey prompts of random length up
#    to seq_len (30% of all documents) and short repeated number lists (40%; they make the in-context copying
#    that retrieval needs appear much earlier in training, see make_mix.py). No synthetic number equals an
#    evaluation key. The KJV chapters keep their document indices, so the train/validation split
#    (data.val_fraction 0.05, data.seed 1234) holds out the same 61 chapters in the mix and in kjv.h5: no model
#    trains on them.
# 2. Teacher. A 30-step throughput probe, then `hydistill train` of bench/distill/teacher.ini (llama, 27.8M
#    parameters, 8 x 1024 tokens per step): 3000 steps (24.6M tokens, ~13 passes over the mix), fewer if the
#    probe says they would take longer than TEACHER_MAX_S (170 s). `hydistill export` of its checkpoint is the
#    distillation teacher (a llama directory with the corpus tokenizer).
# 3. Students. `hydistill distill` (bench/distill/distill.ini) twice with the same budget: 5% of the teacher's
#    training tokens (4 x 1024 tokens per step), ~20% of the steps in stage 1 (alignment) and the rest in
#    stage 2 (KL), on the teacher's data: (a) student.pattern KKKA (the 3:1 hybrid, KKKAKKKA), (b) pattern K
#    (KDA only, KKKKKKKK).
# 4. Evaluation. `hydistill eval` of each student's final checkpoint on the held-out KJV chapters (data.path =
#    kjv.h5) and the passkey prompts: loss/perplexity of teacher and student, KL, top-1 agreement, passkey
#    accuracy by length, KV-cache bytes per token.
# Estimated (not measured) on an H200: ~4-5 minutes in all (teacher <= 170 s of steps, students well under a
# minute each); the deadline (DEADLINE_S) stops it at 560 s whatever happens.
#
# OUT_DIR receives 5 small files, rewritten after every step (a run cut short still leaves what it had):
#   summary.md           setup, token counts and ratio, throughput, the comparison table (teacher | 3:1 hybrid |
#                        KDA-only, markdown for docs/benchmarks.md), the passkey verdict, per-step timings
#   eval_hybrid.jsonl    `hydistill eval` records (docs/formats.md "eval.jsonl")
#   eval_kda.jsonl
#   teacher_metrics.jsonl  the teacher's training log (loss, tokens/s, held-out loss every 1/5 of the run)
#   logs_tail.txt        the head and tail of every step's log
# Every run directory (checkpoints: ~0.4 GB each) stays under WORK_DIR (default: a new runs/real-distill.XXXXXX;
# runs/ is git-ignored). Each step's full log is WORK_DIR/logs/STEP.log.
#
# Failure handling: `set -uo pipefail`; each step's exit status is checked; a failing step prints its log's
# tail and the script exits non-zero after writing the summary of whatever finished. Every step runs under
# `timeout` against a whole-run deadline (DEADLINE_S, 560 s on the GPU) so that the summary is always written
# before an outer time limit. The total wall time is printed at the end.
#
# Environment: HYDISTILL (default build/hydistill), PYTHON (python3), CORPUS (data/corpus/kjv.h5; its
# tokenizer.json next to it), DEVICE (cuda; smoke: cpu), WORK_DIR, DEADLINE_S, TEACHER_STEPS (3000),
# TEACHER_MAX_S (170), PASSKEY_FRACTION (0.3), COPY_FRACTION (0.4), BUDGET_RATIO (0.05).
#
# Tested: `HYDISTILL=build-h6/hydistill bash bench/distill/run_real.sh /tmp/real-smoke --smoke` end to end on
# the CPU (2 cores) of the development machine (a CPU-only build); the GPU configuration itself has not been
# run by the author (no device access): its step plan adapts to the measured throughput. Not part of ctest.
set -uo pipefail

usage() {
  sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}
[[ $# -ge 1 ]] || usage 2
[[ "$1" == -h || "$1" == --help ]] && usage 0
OUT=$1
shift
MODE=full
for a in "$@"; do
  case "$a" in
    --smoke) MODE=smoke ;;
    -h | --help) usage 0 ;;
    *)
      echo "run_real.sh: unknown argument '$a'" >&2
      usage 2
      ;;
  esac
done

T_START=$(date +%s.%N)
mkdir -p "$OUT" || {
  echo "run_real.sh: cannot create $OUT" >&2
  exit 1
}
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1 # relative paths in the environment variables below are relative to the repository
HERE=bench/distill
HYD=${HYDISTILL:-build/hydistill}
PY=${PYTHON:-python3}
CORPUS=${CORPUS:-data/corpus/kjv.h5}
TOKDIR=$(dirname "$CORPUS")
LIB="$PY $HERE/real_lib.py"
PASSKEY_FRACTION=${PASSKEY_FRACTION:-0.3}
COPY_FRACTION=${COPY_FRACTION:-0.4}
BUDGET_RATIO=${BUDGET_RATIO:-0.05}
STAGE1_FRACTION=0.2
PASSKEY_SEED=20261127
MIX_SEED=7

if [[ $MODE == full ]]; then
  DEVICE=${DEVICE:-cuda}
  TEACHER_STEPS=${TEACHER_STEPS:-3000}
  TEACHER_MAX_S=${TEACHER_MAX_S:-170}
  TEACHER_MIN_STEPS=400
  PROBE_STEPS=30
  PK_LENGTHS=128,256,512,1024
  PK_PER=25
  DEADLINE_S=${DEADLINE_S:-560}
  T_OVR=(--device "$DEVICE")
  S_OVR=(--device "$DEVICE")
else
  # A 0.7M-parameter teacher (4 layers, hidden 64) on 128-token sequences: the same steps, minutes on a CPU.
  DEVICE=${DEVICE:-cpu}
  TEACHER_STEPS=${TEACHER_STEPS:-60}
  TEACHER_MAX_S=${TEACHER_MAX_S:-0}
  TEACHER_MIN_STEPS=10
  PROBE_STEPS=6
  PK_LENGTHS=96,128
  PK_PER=3
  DEADLINE_S=${DEADLINE_S:-1200}
  T_OVR=(--device "$DEVICE" --model.hidden_size 64 --model.intermediate_size 176 --model.num_layers 4
    --model.num_heads 4 --model.num_kv_heads 2 --model.max_position_embeddings 128 --data.seq_len 128
    --data.batch_size 4)
  S_OVR=(--device "$DEVICE" --data.seq_len 128 --data.batch_size 2 --log.interval 2)
fi

mkdir -p runs || exit 1
WORK=${WORK_DIR:-$(mktemp -d "$ROOT/runs/real-distill.XXXXXX")}
mkdir -p "$WORK/logs" "$WORK/data" || exit 1
FACTS=$WORK/facts.txt
TIMINGS=$WORK/timings.tsv
: >"$FACTS"
: >"$TIMINGS"
: >"$WORK/logs/steps.txt"
PK=$WORK/data/passkey_eval.h5
MIX=$WORK/data/mix/mix.h5

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
remaining() { awk -v a="$T_START" -v b="$(now)" -v d="$DEADLINE_S" 'BEGIN { printf "%d", d - (b - a) }'; }
fact() { printf '%s=%s\n' "$1" "$2" >>"$FACTS"; }
log_of() { echo "$WORK/logs/$1.log"; }

# Summary and copies into OUT_DIR; called after every step and at the end.
update_outputs() {
  $LIB summary "$WORK" "$OUT/summary.md" 2>>"$WORK/logs/summary_errors.txt" ||
    echo "run_real.sh: warning: the summary could not be written (see $WORK/logs/summary_errors.txt)" >&2
  local k
  for k in hybrid kda; do
    [[ -f "$WORK/eval_$k/eval.jsonl" ]] && cp "$WORK/eval_$k/eval.jsonl" "$OUT/eval_$k.jsonl"
  done
  [[ -f "$WORK/teacher/metrics.jsonl" ]] && cp "$WORK/teacher/metrics.jsonl" "$OUT/teacher_metrics.jsonl"
  {
    echo "# run_real.sh ($MODE) logs, head and tail of each; full logs in $WORK/logs"
    local name rc
    while IFS=$'\t' read -r name rc _; do
      local f
      f=$(log_of "$name")
      [[ -f "$f" ]] || continue
      echo
      echo "==================== $name (exit $rc): $(grep -F "$name:" "$WORK/logs/steps.txt" | tail -n 1 | cut -c1-400)"
      if [[ $(wc -l <"$f") -le 80 ]]; then
        cat "$f"
      else # the run's summary block, then its progress and final evaluation
        head -n 24 "$f"
        echo "[... $(($(wc -l <"$f") - 74)) lines ...]"
        tail -n 50 "$f"
      fi
    done <"$TIMINGS"
  } >"$OUT/logs_tail.txt" 2>/dev/null
  return 0
}

FAILED=""
finish() {
  local rc=$1
  local total
  total=$(since "$T_START")
  fact total_s "$total"
  if [[ $rc -eq 0 ]]; then
    fact status "complete"
  else
    fact status "FAILED at step '${FAILED:-?}' (exit $rc)"
  fi
  update_outputs
  echo
  echo "==================== summary ($OUT/summary.md)"
  cat "$OUT/summary.md" 2>/dev/null
  echo
  echo "outputs: $(cd "$OUT" && ls | tr '\n' ' ')"
  echo "run directories and full logs: $WORK"
  if [[ $rc -eq 0 ]]; then
    echo "run_real.sh: done in ${total} s"
  else
    echo "run_real.sh: FAILED at step '${FAILED:-?}' (exit $rc) after ${total} s" >&2
  fi
  exit "$rc"
}
trap 'FAILED=${FAILED:-signal}; finish 130' INT TERM

# run_step NAME CMD...: runs CMD with its output in logs/NAME.log, under the remaining time of the deadline.
run_step() {
  local name=$1
  shift
  local log left t0 rc dt
  log=$(log_of "$name")
  left=$(remaining)
  if [[ $left -le 5 ]]; then
    echo "run_real.sh: no time left for step '$name' (DEADLINE_S=$DEADLINE_S)" >&2
    printf '%s\t%s\t%s\n' "$name" "skipped (deadline)" 0 >>"$TIMINGS"
    FAILED=$name
    return 124
  fi
  printf '%s: %s\n' "$name" "$*" >>"$WORK/logs/steps.txt"
  echo "[$(since "$T_START") s] $name: $*"
  t0=$(now)
  if declare -F "$1" >/dev/null; then
    "$@" >"$log" 2>&1 # a function of this script (quick checks)
  else
    timeout --kill-after=10 "$left" "$@" >"$log" 2>&1
  fi
  rc=$?
  dt=$(since "$t0")
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >>"$TIMINGS"
  fact "time_$name" "$dt"
  if [[ $rc -ne 0 ]]; then
    FAILED=$name
    echo "run_real.sh: step '$name' FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ': over the deadline'), ${dt} s); last lines of $log:" >&2
    tail -n 30 "$log" | sed 's/^/  | /' >&2
    update_outputs
    return "$rc"
  fi
  echo "    ok in ${dt} s; $(tail -n 1 "$log" | cut -c1-200)"
  update_outputs
  return 0
}

# A python one-off whose failure is a step failure.
need() {
  local what=$1 value=$2
  if [[ -z "$value" ]]; then
    echo "run_real.sh: could not determine $what" >&2
    FAILED=${FAILED:-$what}
    finish 1
  fi
}

echo "run_real.sh: mode $MODE, device $DEVICE, hydistill $HYD, work dir $WORK, deadline ${DEADLINE_S} s"
fact mode "$MODE"
fact device "$DEVICE"
fact date "$(date -u '+%Y-%m-%d %H:%M UTC')"
fact commit "$(git rev-parse --short HEAD 2>/dev/null || echo '?')$([[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] && echo ' (with uncommitted changes)')"
if [[ $DEVICE == cuda* ]] && command -v nvidia-smi >/dev/null 2>&1; then
  fact device_name "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
else
  fact device_name "CPU, $(nproc) cores"
fi
fact val_fraction "$($LIB get $HERE/distill.ini data.val_fraction)"
fact split_seed "$($LIB get $HERE/distill.ini data.seed)"
fact passkey_lengths "$PK_LENGTHS"
fact passkey_per_length "$PK_PER"
fact passkey_seed "$PASSKEY_SEED"

# ------------------------------------------------------------------ 0. preflight
preflight() {
  local ok=0
  [[ -x "$HYD" ]] || {
    echo "hydistill not found or not executable: $HYD (build it: bash launch/setup.sh, or set HYDISTILL)"
    ok=1
  }
  if [[ $ok -eq 0 ]]; then
    "$HYD" eval --help | grep -q "usage: hydistill eval" || {
      echo "$HYD has no 'eval' command: rebuild it from this checkout"
      ok=1
    }
  fi
  for f in "$CORPUS" "$TOKDIR/tokenizer.json"; do
    [[ -f "$f" ]] || {
      echo "missing $f: run bash data/make_kjv.sh (or set CORPUS)"
      ok=1
    }
  done
  "$PY" -c "import numpy, h5py, tokenizers" || {
    echo "python3 lacks numpy/h5py/tokenizers (launch/setup.sh installs them)"
    ok=1
  }
  [[ $ok -eq 0 ]] && "$HYD" inspect "$CORPUS"
  [[ $DEVICE == cuda* ]] && { nvidia-smi || echo "warning: nvidia-smi failed"; }
  return $ok
}
run_step preflight preflight || finish $?

# ------------------------------------------------------------------ 1. data
T_SEQ=$($LIB get $HERE/teacher.ini data.seq_len "${T_OVR[@]}")
T_STEP_TOKENS=$(($($LIB get $HERE/teacher.ini data.batch_size "${T_OVR[@]}") * T_SEQ * $($LIB get $HERE/teacher.ini train.grad_accum "${T_OVR[@]}")))
S_SEQ=$($LIB get $HERE/distill.ini data.seq_len "${S_OVR[@]}")
S_STEP_TOKENS=$(($($LIB get $HERE/distill.ini data.batch_size "${S_OVR[@]}") * S_SEQ))
need "the token counts per step" "$T_STEP_TOKENS$S_STEP_TOKENS"
[[ $S_SEQ -eq $T_SEQ ]] || echo "run_real.sh: note: students use seq_len $S_SEQ, the teacher $T_SEQ"

run_step passkey_data "$PY" data/make_passkey.py --tokenizer "$TOKDIR" --lengths "$PK_LENGTHS" --per-length "$PK_PER" \
  --seed "$PASSKEY_SEED" --out "$PK" || finish $?
run_step mix_data "$PY" $HERE/make_mix.py --corpus "$CORPUS" --tokenizer "$TOKDIR" --exclude-keys "$PK" \
  --passkey-fraction "$PASSKEY_FRACTION" --copy-fraction "$COPY_FRACTION" --max-len "$T_SEQ" --seed "$MIX_SEED" --out "$MIX" \
  --val-fraction "$($LIB get $HERE/distill.ini data.val_fraction)" --split-seed "$($LIB get $HERE/distill.ini data.seed)" \
  --eval-tokens-per-batch "$S_STEP_TOKENS" || finish $?
grep '^MIX ' "$(log_of mix_data)" | tail -n 1 | sed 's/^MIX //' >"$WORK/data/mix.json"
KJV_EVAL_BATCHES=$("$PY" -c "import json; print(min(16, json.load(open('$WORK/data/mix.json'))['corpus_val_batches']))")
MIX_EVAL_BATCHES=$("$PY" -c "import json; print(min(8, json.load(open('$WORK/data/mix.json'))['mix_val_batches']))")
need "the held-out batches" "$KJV_EVAL_BATCHES"
if [[ $KJV_EVAL_BATCHES -lt 1 || $MIX_EVAL_BATCHES -lt 1 ]]; then
  echo "run_real.sh: the validation split holds less than one evaluation batch" >&2
  FAILED=mix_data
  finish 1
fi

# ------------------------------------------------------------------ 2. teacher
run_step teacher_probe "$HYD" train --config $HERE/teacher.ini "${T_OVR[@]}" --run.dir "$WORK/probe" --data.path "$MIX" \
  --train.steps "$PROBE_STEPS" --train.warmup_steps 1 --log.interval $((PROBE_STEPS / 3)) --log.eval_interval 0 \
  --log.eval_batches 0 || finish $?
PROBE_TPS=$($LIB tps "$WORK/probe/metrics.jsonl")
rm -rf "$WORK/probe"
fact probe_steps "$PROBE_STEPS"
fact probe_tps "$PROBE_TPS"
fact teacher_max_s "$TEACHER_MAX_S"
read -r T_STEPS T_WARMUP T_EVAL T_PROJ <<<"$($LIB plan-teacher "$PROBE_TPS" "$T_STEP_TOKENS" "$TEACHER_STEPS" "$TEACHER_MAX_S" "$TEACHER_MIN_STEPS")"
need "the teacher's steps" "${T_STEPS:-}"
echo "    probe: $PROBE_TPS tokens/s -> teacher: $T_STEPS steps x $T_STEP_TOKENS tokens (~${T_PROJ} s of steps; target $TEACHER_STEPS, cap ${TEACHER_MAX_S} s)"

run_step teacher "$HYD" train --config $HERE/teacher.ini "${T_OVR[@]}" --run.dir "$WORK/teacher" --data.path "$MIX" \
  --train.steps "$T_STEPS" --train.warmup_steps "$T_WARMUP" --log.eval_interval "$T_EVAL" || finish $?
TLOG=$(log_of teacher)
T_TOKENS=$((T_STEPS * T_STEP_TOKENS))
LOGGED=$("$PY" -c "import json; r=[json.loads(l) for l in open('$WORK/teacher/metrics.jsonl') if '\"tokens\"' in l]; print(r[-1]['tokens'] if r else '')")
if [[ -n "$LOGGED" && "$LOGGED" != "$T_TOKENS" ]]; then
  echo "run_real.sh: the teacher's metrics say $LOGGED tokens, expected $T_TOKENS; using the logged count" >&2
  T_TOKENS=$LOGGED
fi
fact teacher_steps "$T_STEPS"
fact teacher_tokens_per_step "$T_STEP_TOKENS"
fact teacher_tokens "$T_TOKENS"
fact teacher_tps "$($LIB tps "$WORK/teacher/metrics.jsonl")"
fact teacher_params "$(sed -n 's/^ *parameters *\([0-9]*\) (\(.*\))$/\1 (\2)/p' "$TLOG" | head -n 1)"
fact teacher_shape "$(sed -n 's/^ *model *//p' "$TLOG" | head -n 1)"
TRAIN_SPLIT=$(sed -n 's/^ *train split *[0-9]* documents, \([0-9]*\) tokens.*/\1/p' "$TLOG" | head -n 1)
[[ -n "$TRAIN_SPLIT" ]] && fact teacher_epochs "$(awk -v a="$T_TOKENS" -v b="$TRAIN_SPLIT" 'BEGIN { printf "%.2g", a / b }')"
T_CK=$(ls -d "$WORK"/teacher/step-* 2>/dev/null | sort | tail -n 1)
need "the teacher's checkpoint" "$T_CK"

run_step export_teacher "$HYD" export --checkpoint "$T_CK" --out "$WORK/teacher_hf" --dtype float32 || finish $?
if [[ ! -f "$WORK/teacher_hf/tokenizer.json" ]]; then
  echo "run_real.sh: the exported teacher has no tokenizer.json" >&2
  FAILED=export_teacher
  finish 1
fi

# ------------------------------------------------------------------ 3 + 4. students
read -r S1 S2 S_WARMUP S_TOKENS <<<"$($LIB plan-students "$T_TOKENS" "$BUDGET_RATIO" "$S_STEP_TOKENS" "$STAGE1_FRACTION")"
need "the students' steps" "${S_TOKENS:-}"
fact stage1_steps "$S1"
fact stage2_steps "$S2"
fact student_tokens_per_step "$S_STEP_TOKENS"
fact student_tokens "$S_TOKENS"
fact stage1_lr "$($LIB get $HERE/distill.ini distill.stage1_lr "${S_OVR[@]}")"
fact stage2_lr "$($LIB get $HERE/distill.ini distill.stage2_lr "${S_OVR[@]}")"
echo "    budget: teacher $T_TOKENS tokens -> each student $S_TOKENS tokens" \
  "($(awk -v a="$S_TOKENS" -v b="$T_TOKENS" 'BEGIN { printf "%.2f", 100 * a / b }')%): stage 1 $S1 + stage 2 $S2 steps x $S_STEP_TOKENS"

for spec in hybrid:KKKA kda:K; do
  k=${spec%%:*}
  pattern=${spec#*:}
  run_step "distill_$k" "$HYD" distill --config $HERE/distill.ini "${S_OVR[@]}" --run.dir "$WORK/$k" \
    --teacher.dir "$WORK/teacher_hf" --data.path "$MIX" --student.pattern "$pattern" --distill.stage1_steps "$S1" \
    --distill.stage2_steps "$S2" --distill.warmup_steps "$S_WARMUP" --eval.batches "$MIX_EVAL_BATCHES" \
    --eval.passkey_data "" || finish $?
  fact "${k}_layers" "$(sed -n 's/^ *student *pattern *\([KAT]*\).*/\1/p' "$(log_of "distill_$k")" | head -n 1)"
  fact "${k}_tps1" "$($LIB tps "$WORK/$k/metrics.jsonl" 1)"
  fact "${k}_tps2" "$($LIB tps "$WORK/$k/metrics.jsonl" 2)"
  S_CK=$(ls -d "$WORK/$k"/step-* 2>/dev/null | sort | tail -n 1)
  need "the $k student's checkpoint" "$S_CK"
  run_step "eval_$k" "$HYD" eval --config $HERE/distill.ini "${S_OVR[@]}" --checkpoint "$S_CK" --run.dir "$WORK/eval_$k" \
    --teacher.dir "$WORK/teacher_hf" --student.pattern "$pattern" --data.path "$CORPUS" \
    --eval.batches "$KJV_EVAL_BATCHES" --eval.passkey_data "$PK" || finish $?
done

finish 0

#!/usr/bin/env bash
# Checkpoints and resuming through the CLI, on the CPU with tiny models:
#   train    12 steps straight vs. stopped after step 6 (run.stop_after) and resumed (train.resume = auto):
#            the final checkpoint's state file is byte-identical (parameters, AdamW moments) and
#            metrics.jsonl holds the same records (losses, grad norms, lr, tokens; timings aside). The kept
#            checkpoints follow keep_last / keep_every; every manifest lists its files with their real
#            sizes and sha256sum digests; `hydistill inspect CHECKPOINT` verifies and summarises one (a
#            corrupt one is an error naming the file and 'sha256').
#   distill  the same across the stage boundary (stopped after the last stage-1 step) and inside stage 2,
#            eval.jsonl included.
#   refusals a second run into a run directory without train.resume (names metrics.jsonl), a resume with a
#            changed option (names the option and the manifest), a train checkpoint given to distill
#            (names 'command'), a corrupt checkpoint named by train.resume (names the file and 'sha256'):
#            non-zero exit and the run directory untouched. train.resume = auto skips a corrupt newest
#            checkpoint (saying so) and resumes from the one before, reaching the same final state.
# Usage: bash test_checkpoint_resume.sh HYDISTILL SOURCE_DIR
set -u
HYD="$1"
SRC="$2"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hyd_resume.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
source "$SRC/tests/cli/cli_lib.sh"
# One BLAS thread: the straight and the resumed runs must do the same arithmetic.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

python3 "$SRC/tests/cli/synthetic_data.py" markov "$WORK/v64.h5" --vocab 64 --docs 300 || fail "dataset"
python3 "$SRC/tests/cli/synthetic_data.py" markov "$WORK/v200.h5" --vocab 200 || fail "dataset"

run_ok() {  # run_ok NAME CMD...: exit 0 or fail with its stderr
  local name="$1"
  shift
  "$@" >"$WORK/out.txt" 2>"$WORK/err.txt" || { cat "$WORK/out.txt" "$WORK/err.txt"; fail "$name exited $?"; }
}

# ---------------------------------------------------------------- train
cat >"$WORK/train.ini" <<EOF
device = cpu
[run]
dir = $WORK/train_straight
[model]
hidden_size = 32
intermediate_size = 64
num_layers = 2
num_heads = 2
num_kv_heads = 1
max_position_embeddings = 32
[data]
path = $WORK/v64.h5
val_fraction = 0.05
seq_len = 32
batch_size = 2
[train]
steps = 12
grad_accum = 2
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
[log]
interval = 5
eval_interval = 5
eval_batches = 1
[checkpoint]
interval = 4
keep_last = 1
keep_every = 2
EOF
run_ok "train straight" "$HYD" train --config "$WORK/train.ini"
# keep_last may change on resume: the split run keeps steps 4 and 6, for the corrupt-checkpoint case below.
run_ok "train to step 6" "$HYD" train --config "$WORK/train.ini" --run.dir "$WORK/train_split" --run.stop_after 6 \
  --checkpoint.keep_last 2
grep -q "stopped after step 6" "$WORK/out.txt" || fail "no 'stopped after step 6' line"
[ -d "$WORK/train_split/step-00000004" ] && [ -d "$WORK/train_split/step-00000006" ] ||
  fail "run.stop_after 6 with keep_last 2 did not keep step-00000004 and step-00000006"
cp -r "$WORK/train_split" "$WORK/train_split_copy"
run_ok "train resumed" "$HYD" train --config "$WORK/train.ini" --run.dir "$WORK/train_split" --train.resume auto
grep -q "resumed from .*step-00000006" "$WORK/out.txt" || fail "the resumed train run does not say where it resumed"
cmp "$WORK/train_straight/step-00000012/rank-00000.safetensors" "$WORK/train_split/step-00000012/rank-00000.safetensors" ||
  fail "train: the resumed run's final state differs from the straight run's"
same_records "$WORK/train_straight/metrics.jsonl" "$WORK/train_split/metrics.jsonl"
for d in train_straight train_split; do
  got=$(cd "$WORK/$d" && ls -d step-* | tr '\n' ' ')
  [ "$got" = "step-00000008 step-00000012 " ] || fail "$d keeps '$got', expected step 8 (keep_every 2 x interval 4) and 12 (newest)"
done
python3 - "$WORK/train_split/step-00000012" <<'PY' || fail "manifest check"
import hashlib, json, os, sys
d = sys.argv[1]
m = json.load(open(os.path.join(d, "manifest.json")))
assert m["format"] == "hydistill-checkpoint" and m["command"] == "train" and m["step"] == 12, m
assert m["data"]["next_batch"] == 24 and m["optimizer"]["steps_taken"] == 12, (m["data"], m["optimizer"])
assert m["config"]["train.steps"] == "12" and m["config"]["train.resume"] == "auto", m["config"]
names = sorted(f["name"] for f in m["files"])
assert names == ["config.ini", "rank-00000.safetensors"], names
for f in m["files"]:
    p = os.path.join(d, f["name"])
    assert os.path.getsize(p) == f["size"], f
    assert hashlib.sha256(open(p, "rb").read()).hexdigest() == f["sha256"], f
print("manifest ok:", {k: m[k] for k in ("step", "stage", "library_version")})
PY

"$HYD" inspect "$WORK/train_split/step-00000012" >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "inspect CHECKPOINT"; }
grep -q "(verified)" "$WORK/out.txt" && grep -q "^command *train" "$WORK/out.txt" &&
  grep -q "rank-00000.safetensors .*sha256" "$WORK/out.txt" || { cat "$WORK/out.txt"; fail "inspect CHECKPOINT output"; }

# Refusals leave the run directory as it was.
cp "$WORK/train_straight/metrics.jsonl" "$WORK/metrics.before"
expect_error "second run without train.resume" 2 "metrics.jsonl" "train.resume" "run.dir" -- \
  "$HYD" train --config "$WORK/train.ini"
expect_error "resume with another learning rate" 2 "'train.lr'" "manifest.json" "0.02" -- \
  "$HYD" train --config "$WORK/train.ini" --train.resume auto --train.lr 0.02
cmp -s "$WORK/train_straight/metrics.jsonl" "$WORK/metrics.before" || fail "a refused run modified metrics.jsonl"

# A corrupt newest checkpoint: named by train.resume it is an error; auto skips it.
printf 'x' | dd of="$WORK/train_split_copy/step-00000006/rank-00000.safetensors" bs=1 seek=100 conv=notrunc 2>/dev/null
expect_error "inspect a corrupt checkpoint" nz "step-00000006/rank-00000.safetensors" "'sha256'" -- \
  "$HYD" inspect "$WORK/train_split_copy/step-00000006"
cp "$WORK/train_split_copy/metrics.jsonl" "$WORK/metrics.before"
expect_error "resume from a corrupt checkpoint" nz "step-00000006/rank-00000.safetensors" "'sha256'" -- \
  "$HYD" train --config "$WORK/train.ini" --run.dir "$WORK/train_split_copy" \
  --train.resume "$WORK/train_split_copy/step-00000006"
cmp -s "$WORK/train_split_copy/metrics.jsonl" "$WORK/metrics.before" || fail "a refused resume modified metrics.jsonl"
run_ok "train auto-resume past a corrupt checkpoint" "$HYD" train --config "$WORK/train.ini" \
  --run.dir "$WORK/train_split_copy" --train.resume auto
grep -q "skipping .*step-00000006.*sha256" "$WORK/out.txt" || fail "auto did not report skipping the corrupt checkpoint"
grep -q "resumed from .*step-00000004" "$WORK/out.txt" || fail "auto did not fall back to step-00000004"
cmp "$WORK/train_straight/step-00000012/rank-00000.safetensors" \
  "$WORK/train_split_copy/step-00000012/rank-00000.safetensors" || fail "train: resuming from step 4 changed the result"
same_records "$WORK/train_straight/metrics.jsonl" "$WORK/train_split_copy/metrics.jsonl"

# ---------------------------------------------------------------- distill
cat >"$WORK/distill.ini" <<EOF
device = cpu
[run]
dir = $WORK/distill_straight
[teacher]
dir = $SRC/tests/golden/data/llama
[student]
pattern = KA
[data]
path = $WORK/v200.h5
val_fraction = 0.05
seq_len = 32
batch_size = 2
[distill]
stage1_steps = 6
stage1_lr = 1e-2
stage2_steps = 6
stage2_lr = 1e-2
warmup_steps = 2
[log]
interval = 4
[checkpoint]
interval = 4
keep_last = 2
[eval]
interval = 5
batches = 1
EOF
run_ok "distill straight" "$HYD" distill --config "$WORK/distill.ini"
for stop in 6 9; do
  run_ok "distill to step $stop" "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/distill_$stop" \
    --run.stop_after $stop
  run_ok "distill resumed at $stop" "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/distill_$stop" \
    --train.resume auto
  cmp "$WORK/distill_straight/step-00000012/rank-00000.safetensors" \
    "$WORK/distill_$stop/step-00000012/rank-00000.safetensors" || fail "distill: resuming after step $stop changed the result"
  same_records "$WORK/distill_straight/metrics.jsonl" "$WORK/distill_$stop/metrics.jsonl"
  same_records "$WORK/distill_straight/eval.jsonl" "$WORK/distill_$stop/eval.jsonl"
done
grep -q "resumed from .*step-00000009 (stage 2 step 3)" "$WORK/out.txt" || fail "distill does not say it resumed in stage 2"
python3 - "$WORK/distill_straight" <<'PY' || fail "distill checkpoint contents"
import json, os, sys
d = sys.argv[1]
m = json.load(open(os.path.join(d, "step-00000012", "manifest.json")))
assert (m["command"], m["step"], m["stage"], m["stage_step"]) == ("distill", 12, 2, 6), m
assert m["teacher"]["dir"].endswith("tests/golden/data/llama") and len(m["teacher"]["config_sha256"]) == 64, m["teacher"]
evals = [json.loads(l) for l in open(os.path.join(d, "eval.jsonl"))]
assert [(e["stage"], e["step"], e["global_step"]) for e in evals] == [(1, 5, 5), (2, 4, 10), (2, 6, 12)], evals
PY
expect_error "distill resuming a train checkpoint" 2 "'command'" "train" -- \
  "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/distill_other" \
  --train.resume "$WORK/train_straight/step-00000012"
[ ! -e "$WORK/distill_other" ] || fail "a refused distill created its run directory"
expect_error "distill resume with another pattern" 2 "'student.pattern'" "manifest.json" -- \
  "$HYD" distill --config "$WORK/distill.ini" --train.resume auto --student.pattern AA
echo "PASS"

#!/usr/bin/env bash
# `hydistill eval` and the evaluations during `hydistill distill`, on the CPU: the golden tiny llama teacher
# (2 layers, vocab 256), a Markov-chain dataset and synthetic passkey prompts (tests/cli/synthetic_data.py).
#   * A student of T layers only and no training step is the teacher: KL == 0, top-1 agreement 1, both
#     losses equal and finite, the same passkey answers, the same KV cache and no KDA state.
#   * A KA student after a few steps: finite KL > 0, agreement in [0, 1], half the teacher's KV cache plus
#     a KDA state; `hydistill eval` of the run's last checkpoint gives exactly the numbers of the run's own
#     final evaluation (eval.jsonl); the table is printed; each eval appends one record.
#   * Bad inputs (a missing checkpoint, a manifest that is not JSON, a state file whose checksum fails, a
#     train checkpoint, another student pattern, another teacher, missing passkey data): non-zero exit, the
#     file and the field named, nothing written (the run directory of eval is not created).
# Usage: bash test_eval.sh HYDISTILL SOURCE_DIR
set -u
HYD="$1"
SRC="$2"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hyd_eval.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
source "$SRC/tests/cli/cli_lib.sh"
TEACHER="$SRC/tests/golden/data/llama"

python3 "$SRC/tests/cli/synthetic_data.py" markov "$WORK/data.h5" --vocab 200 || fail "dataset"
python3 "$SRC/tests/cli/synthetic_data.py" passkey "$WORK/passkey.h5" --vocab 200 --lengths 24,40 || fail "passkey"

cat >"$WORK/distill.ini" <<EOF
device = cpu
[run]
dir = $WORK/run_t
[teacher]
dir = $TEACHER
[student]
pattern = T
[data]
path = $WORK/data.h5
val_fraction = 0.05
seq_len = 32
batch_size = 2
[distill]
stage1_steps = 1
stage2_steps = 0
[eval]
batches = 2
passkey_data = $WORK/passkey.h5
EOF

# The all-T student with no step (stage 1 has no K layer to train): checkpoint step-00000000.
"$HYD" distill --config "$WORK/distill.ini" >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "distill (T)"; }
CK_T="$WORK/run_t/step-00000000"
[ -f "$CK_T/manifest.json" ] || fail "no checkpoint of the all-T student"
"$HYD" eval --config "$WORK/distill.ini" --checkpoint "$CK_T" --run.dir "$WORK/eval_t" >"$WORK/out.txt" 2>&1 ||
  { cat "$WORK/out.txt"; fail "eval (T) exited non-zero"; }
cat "$WORK/out.txt"
for row in "held-out loss" "perplexity" "KL(teacher || student)" "top-1 agreement" "passkey @24" "passkey @40" \
  "KV cache bytes / token"; do
  grep -qF "$row" "$WORK/out.txt" || fail "the eval table has no '$row' row"
done
python3 - "$WORK/eval_t/eval.jsonl" <<'PY' || fail "all-T student: eval.jsonl"
import json, math, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
assert len(recs) == 1, recs
r = recs[0]
for k in ("teacher_loss", "student_loss", "teacher_ppl", "student_ppl", "kl", "top1_agreement"):
    assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r)
assert r["held_out_tokens"] > 0 and r["teacher_loss"] > 0, r
assert r["kl"] == 0.0 or abs(r["kl"]) < 1e-7, r["kl"]
assert r["top1_agreement"] == 1.0, r["top1_agreement"]
assert r["teacher_loss"] == r["student_loss"], (r["teacher_loss"], r["student_loss"])
assert [p["length"] for p in r["passkey"]] == [24, 40] and all(p["total"] == 3 for p in r["passkey"]), r["passkey"]
assert all(p["teacher_correct"] == p["student_correct"] for p in r["passkey"]), r["passkey"]
# 2 layers x 2 kv heads x 16 dims x K and V x 2 bytes
assert r["teacher_kv_bytes_per_token"] == r["student_kv_bytes_per_token"] == 256, r
assert r["student_state_bytes_per_sequence"] == 0 and r["checkpoint"].endswith("step-00000000"), r
print(f"all-T student: kl {r['kl']}, top-1 {r['top1_agreement']}, loss {r['teacher_loss']:.4f} both")
PY

# A KA student trained a few steps, evaluated during the run and afterwards.
"$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/run_ka" --student.pattern KA --distill.stage1_steps 4 \
  --distill.stage2_steps 4 --distill.stage1_lr 1e-2 --distill.stage2_lr 1e-2 --eval.interval 4 \
  >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "distill (KA)"; }
grep -q "evaluation: stage 1 step 4 (step 4 of the run)" "$WORK/out.txt" || fail "no evaluation table at step 4"
CK_KA="$WORK/run_ka/step-00000008"
for i in 1 2; do
  "$HYD" eval --config "$WORK/distill.ini" --student.pattern KA --checkpoint "$CK_KA" --run.dir "$WORK/eval_ka" \
    >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "eval (KA) exited non-zero"; }
done
python3 - "$WORK/run_ka/eval.jsonl" "$WORK/eval_ka/eval.jsonl" <<'PY' || fail "KA student: eval.jsonl"
import json, math, sys
run = [json.loads(l) for l in open(sys.argv[1])]
ev = [json.loads(l) for l in open(sys.argv[2])]
assert [(r["stage"], r["step"], r["global_step"]) for r in run] == [(1, 4, 4), (2, 4, 8)], run
assert len(ev) == 2 and ev[0] == ev[1], "each eval appends one identical record"
r = ev[0]
assert 0 < r["kl"] < 50 and 0 <= r["top1_agreement"] <= 1, r
assert r["student_kv_bytes_per_token"] * 2 == r["teacher_kv_bytes_per_token"] and r["student_state_bytes_per_sequence"] > 0, r
last = dict(run[-1])
e = {k: v for k, v in r.items() if k != "checkpoint"}
assert last == e, f"the run's final evaluation {last} differs from hydistill eval of its checkpoint {e}"
print(f"KA student: kl {r['kl']:.4f}, top-1 {r['top1_agreement']:.3f}, loss {r['student_loss']:.4f} vs teacher {r['teacher_loss']:.4f}")
PY

# Bad inputs: non-zero exit, the file and the field named, nothing written.
# The run directory of these evals must never be created.
export NOT_CREATED="$WORK/eval_new"
EVAL=("$HYD" eval --config "$WORK/distill.ini" --run.dir "$NOT_CREATED")
expect_error "missing checkpoint" nz "$WORK/run_t/step-00000042" "no such checkpoint" -- \
  "${EVAL[@]}" --checkpoint "$WORK/run_t/step-00000042"
expect_error "no --checkpoint" 2 "'checkpoint'" "required" -- "${EVAL[@]}"
cp -r "$CK_T" "$WORK/broken_json"
echo '{"format": "hydistill-checkpoint", ' >"$WORK/broken_json/manifest.json"
expect_error "manifest not JSON" nz "broken_json/manifest.json" "not valid JSON" -- \
  "${EVAL[@]}" --checkpoint "$WORK/broken_json"
cp -r "$CK_T" "$WORK/broken_field"
python3 - "$WORK/broken_field/manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["stage_step"] = "zero"
json.dump(m, open(sys.argv[1], "w"))
PY
expect_error "manifest field of the wrong type" nz "broken_field/manifest.json" "'stage_step'" -- \
  "${EVAL[@]}" --checkpoint "$WORK/broken_field"
cp -r "$CK_T" "$WORK/broken_sha"
printf '\x01' | dd of="$WORK/broken_sha/rank-00000.safetensors" bs=1 seek=200 conv=notrunc 2>/dev/null
expect_error "checksum mismatch" nz "broken_sha/rank-00000.safetensors" "'sha256'" "checksum mismatch" -- \
  "${EVAL[@]}" --checkpoint "$WORK/broken_sha"
python3 "$SRC/tests/cli/synthetic_data.py" markov "$WORK/v64.h5" --vocab 64 || fail "dataset"
"$HYD" train --config /dev/null --run.dir "$WORK/train" --data.path "$WORK/v64.h5" --model.hidden_size 32 \
  --model.intermediate_size 32 --model.num_layers 1 --model.num_heads 2 --model.num_kv_heads 1 --data.seq_len 16 \
  --data.batch_size 1 --model.max_position_embeddings 16 --train.steps 1 >/dev/null 2>&1 || fail "train"
expect_error "a train checkpoint" nz "manifest.json" "'command'" "train" -- \
  "${EVAL[@]}" --checkpoint "$WORK/train/step-00000001"
expect_error "another student pattern" 2 "'student.pattern'" "'KA'" "'T'" -- \
  "${EVAL[@]}" --checkpoint "$CK_T" --student.pattern KA
expect_error "another teacher" 2 "'teacher.dir'" "teacher.dir" -- \
  "${EVAL[@]}" --checkpoint "$CK_T" --teacher.dir "$SRC/tests/golden/data/qwen2"
expect_error "missing passkey data" 2 "'eval.passkey_data'" "nope.h5" -- \
  "${EVAL[@]}" --checkpoint "$CK_T" --eval.passkey_data "$WORK/nope.h5"
unset NOT_CREATED
"$HYD" eval --help | grep -q -- "--checkpoint STR" || fail "eval --help does not list --checkpoint"
echo "PASS"

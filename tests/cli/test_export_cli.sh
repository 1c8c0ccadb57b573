#!/usr/bin/env bash
# `hydistill export` end to end on the CPU, the Quickstart's path in miniature: a BPE dataset
# (data/prepare.py --train-bpe, tokenizer.json next to it), a tiny llama trained a few steps, its train
# checkpoint exported as a plain llama directory (the dataset's tokenizer copied), that directory used as
# the teacher of `hydistill distill`, and the students exported with the teacher's tokenizer.
#   * The teacher export is a valid HF teacher (`hydistill inspect`, model_type llama, no modeling files).
#   * The student export has config.json (model_type hydistill_hybrid, auto_map), model.safetensors, the two
#     modeling files and the tokenizer.
#   * With torch + transformers importable (else this part is skipped with a message):
#     AutoModelForCausalLM loads the teacher as LlamaForCausalLM and the students with
#     trust_remote_code=True; a student of T layers only with no step equals the teacher (logits, rel < 1e-5);
#     the KA student gives finite logits of the right shape; AutoTokenizer loads from the student directory.
#   * launch/configs/tiny-cpu-distill.ini runs (its keys are valid; paths and sizes overridden) and ends at
#     step 100, the checkpoint the README exports.
#   * Refusals: an existing non-empty --out (left untouched), a missing or corrupt checkpoint (the file and the
#     field named), a missing --out, an unknown dtype: non-zero exit, nothing written.
# Usage: bash test_export_cli.sh HYDISTILL SOURCE_DIR
set -u
HYD="$1"
SRC="$2"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hyd_export_cli.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
source "$SRC/tests/cli/cli_lib.sh"
python3 -c "import tokenizers, h5py" 2>/dev/null || { echo "SKIPPED: python3 lacks tokenizers/h5py"; exit 77; }

python3 - "$WORK/corpus.txt" <<'PY' || fail "corpus"
import random, sys
rng = random.Random(0)
words = "in the beginning was the word and the word was with god light darkness day night first".split()
with open(sys.argv[1], "w") as f:
    for _ in range(300):
        f.write(" ".join(rng.choice(words) for _ in range(rng.randint(12, 40))).capitalize() + ".\n\n")
PY
python3 "$SRC/data/prepare.py" --input "$WORK/corpus.txt" --out "$WORK/bpe/data.h5" --train-bpe 300 --quiet \
  >"$WORK/prep.txt" 2>&1 || { cat "$WORK/prep.txt"; fail "prepare.py"; }

"$HYD" train --config /dev/null --run.dir "$WORK/train" --data.path "$WORK/bpe/data.h5" --model.hidden_size 32 \
  --model.intermediate_size 64 --model.num_layers 2 --model.num_heads 2 --model.num_kv_heads 1 \
  --model.max_position_embeddings 64 --data.seq_len 32 --data.batch_size 2 --train.steps 3 --log.eval_batches 0 \
  >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "train"; }
"$HYD" export --checkpoint "$WORK/train/step-00000003" --out "$WORK/teacher" --dtype float32 >"$WORK/out.txt" 2>&1 ||
  { cat "$WORK/out.txt"; fail "export of the train checkpoint"; }
cat "$WORK/out.txt"
for f in config.json model.safetensors tokenizer.json; do
  [ -f "$WORK/teacher/$f" ] || fail "the teacher export lacks $f"
done
[ ! -e "$WORK/teacher/modeling_hydistill.py" ] || fail "a dense export ships the hydistill modeling file"
"$HYD" inspect "$WORK/teacher" >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "inspect of the teacher export"; }
grep -q "llama" "$WORK/out.txt" || fail "inspect does not see a llama teacher"

cat >"$WORK/distill.ini" <<EOF
device = cpu
[run]
dir = $WORK/run_ka
[teacher]
dir = $WORK/teacher
[student]
pattern = KA
[data]
path = $WORK/bpe/data.h5
val_fraction = 0.05
seq_len = 32
batch_size = 2
[distill]
stage1_steps = 2
stage2_steps = 2
[eval]
batches = 1
EOF
"$HYD" distill --config "$WORK/distill.ini" >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "distill KA"; }
"$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/run_t" --student.pattern T --distill.stage2_steps 0 \
  >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "distill T"; }
"$HYD" export --checkpoint "$WORK/run_ka/step-00000004" --out "$WORK/student_ka" >"$WORK/out.txt" 2>&1 ||
  { cat "$WORK/out.txt"; fail "export of the KA student"; }
"$HYD" export --checkpoint "$WORK/run_t/step-00000000" --out "$WORK/student_t" --dtype float32 >"$WORK/out.txt" 2>&1 ||
  { cat "$WORK/out.txt"; fail "export of the T student"; }
for f in config.json model.safetensors configuration_hydistill.py modeling_hydistill.py tokenizer.json; do
  [ -f "$WORK/student_ka/$f" ] || fail "the student export lacks $f"
done
python3 - "$WORK/student_ka/config.json" <<'PY' || fail "student config.json"
import json, sys
c = json.load(open(sys.argv[1]))
assert c["model_type"] == "hydistill_hybrid" and c["mixer_types"] == ["kda", "nope_attention"], c
assert c["auto_map"]["AutoModelForCausalLM"] == "modeling_hydistill.HydistillForCausalLM", c["auto_map"]
assert c["torch_dtype"] == "bfloat16" and c["vocab_size"] == 300, c
PY

# The Quickstart's config file (launch/configs/tiny-cpu-distill.ini): every key is valid and the run works,
# here with this test's teacher and data and a couple of steps.
"$HYD" distill --config "$SRC/launch/configs/tiny-cpu-distill.ini" --run.dir "$WORK/run_qs" --teacher.dir "$WORK/teacher" \
  --data.path "$WORK/bpe/data.h5" --eval.passkey_data "" --student.pattern KA --data.seq_len 32 --data.batch_size 2 \
  --distill.stage1_steps 1 --distill.stage2_steps 1 >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "tiny-cpu-distill.ini"; }
[ -f "$WORK/run_qs/step-00000002/manifest.json" ] && [ -s "$WORK/run_qs/eval.jsonl" ] ||
  fail "tiny-cpu-distill.ini: no final checkpoint or evaluation"
steps_of() { sed -n "s/^$1 = \([0-9]*\).*/\1/p" "$SRC/launch/configs/tiny-cpu-distill.ini"; }
[ $(($(steps_of stage1_steps) + $(steps_of stage2_steps))) -eq 100 ] ||
  fail "tiny-cpu-distill.ini no longer ends at step 100 (the README's step-00000100)"

# Refusals: non-zero exit, the item named, nothing written.
mkdir -p "$WORK/full" && echo keep >"$WORK/full/file.txt"
expect_error "non-empty --out" nz "$WORK/full" "not empty" -- \
  "$HYD" export --checkpoint "$WORK/run_ka/step-00000004" --out "$WORK/full"
[ "$(ls "$WORK/full")" = "file.txt" ] && grep -q keep "$WORK/full/file.txt" || fail "the refused export touched --out"
expect_error "missing checkpoint" nz "$WORK/run_ka/step-00000099" "no such checkpoint" -- \
  "$HYD" export --checkpoint "$WORK/run_ka/step-00000099" --out "$WORK/x1"
cp -r "$WORK/run_ka/step-00000004" "$WORK/corrupt"
truncate -s -8 "$WORK/corrupt/rank-00000.safetensors"
expect_error "truncated state file" nz "corrupt/rank-00000.safetensors" "'size'" -- \
  "$HYD" export --checkpoint "$WORK/corrupt" --out "$WORK/x2"
expect_error "no --out" 2 "'out'" "required" -- "$HYD" export --checkpoint "$WORK/run_ka/step-00000004"
expect_error "unknown dtype" 2 "'dtype'" "float16" -- \
  "$HYD" export --checkpoint "$WORK/run_ka/step-00000004" --out "$WORK/x3" --dtype float16
for d in x1 x2 x3 x1.tmp x2.tmp x3.tmp; do [ ! -e "$WORK/$d" ] || fail "a refused export wrote $d"; done

if ! python3 -c "import torch, transformers" >/dev/null 2>&1; then
  echo "SKIPPED (the transformers part): torch/transformers not importable"
  echo "PASS"
  exit 0
fi
HF_HUB_OFFLINE=1 python3 - "$WORK" <<'PY' || fail "transformers check"
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
w = sys.argv[1]
teacher = AutoModelForCausalLM.from_pretrained(f"{w}/teacher")
student_t = AutoModelForCausalLM.from_pretrained(f"{w}/student_t", trust_remote_code=True)
student_ka = AutoModelForCausalLM.from_pretrained(f"{w}/student_ka", trust_remote_code=True)
assert type(teacher).__name__ == "LlamaForCausalLM", type(teacher)
assert type(student_ka).__name__ == "HydistillForCausalLM", type(student_ka)
tok = AutoTokenizer.from_pretrained(f"{w}/student_ka", trust_remote_code=True)
ids = torch.tensor([tok.encode("in the beginning was the word and the light")])
with torch.no_grad():
    a, b, c = teacher(ids).logits, student_t(ids).logits, student_ka(ids).logits
rel = ((a - b).norm() / a.norm()).item()
print(f"tokens {ids.shape[1]}; all-T student vs teacher: rel {rel:.2e}; KA student logits {tuple(c.shape)}")
assert rel < 1e-5, rel
assert c.shape == a.shape and torch.isfinite(c).all()
PY
echo "PASS"

#!/usr/bin/env bash
# `hydistill export` of Mixture-of-Experts students, end to end on the CPU: students of the golden tiny
# qwen3_moe teacher (tests/golden/data/qwen3_moe: 2 layers, layer 0 dense through mlp_only_layers, layer 1
# a MoE FFN of 8 experts, top 2, norm_topk_prob; vocab 256) distilled a few steps on a Markov dataset, exported,
# and read back by safetensors and transformers (tests/python/check_export_moe.py):
#   * KA, stage 1 + stage 2 (the MoE FFN trained): exported in float32 and bfloat16;
#   * T, stage 2 only with a CE term (at the teacher KL alone has no gradient), the MoE FFN trained: float32;
#   * T with no step (the teacher itself): exported in float32.
# `hydistill eval` measures the KA and trained-T students against the teacher on an evaluation file of 16
# documents of exactly seq_len tokens (val_fraction 0.999999, which must be < 1: every document falls in the
# validation split, which Python checks through the 16 x 31 held-out tokens eval reports; 4 batches of 4
# rows): each row is one whole document
# and the 4 batches cover each document once, so the means it reports are those over the 16 documents in
# any order, which Python recomputes from the exported modeling file and transformers' Qwen3Moe teacher.
# Python's assertions: check_export_moe.py's docstring. Exit 77 (skipped) without torch / transformers /
# safetensors / h5py.
# Usage: bash test_export_moe.sh HYDISTILL SOURCE_DIR
set -u
HYD="$1"
SRC="$2"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hyd_export_moe.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
source "$SRC/tests/cli/cli_lib.sh"
python3 -c "import torch, transformers, safetensors, h5py" >/dev/null 2>&1 ||
  { echo "SKIPPED: python3 lacks torch/transformers/safetensors/h5py"; exit 77; }
TEACHER="$SRC/tests/golden/data/qwen3_moe"
[ -f "$TEACHER/config.json" ] || fail "missing teacher $TEACHER"

python3 "$SRC/tests/cli/synthetic_data.py" markov "$WORK/train.h5" --vocab 200 --docs 200 --seed 0 || fail "train data"
# 31 Markov tokens + EOS = 32 tokens per document = seq_len.
python3 "$SRC/tests/cli/synthetic_data.py" markov "$WORK/eval.h5" --vocab 200 --docs 16 --seed 1 \
  --min-len 31 --max-len 32 || fail "eval data"

cat >"$WORK/distill.ini" <<EOF
device = cpu
[run]
dir = $WORK/run_ka
[teacher]
dir = $TEACHER
[student]
pattern = KA
[data]
path = $WORK/train.h5
val_fraction = 0.05
seq_len = 32
batch_size = 2
[train]
weight_decay = 0.0
[distill]
stage1_steps = 10
stage1_lr = 1e-2
stage2_steps = 10
stage2_lr = 1e-2
warmup_steps = 2
[eval]
batches = 0
[log]
interval = 10
EOF

"$HYD" distill --config "$WORK/distill.ini" >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "distill KA"; }
"$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/run_t" --student.pattern T --distill.stage2_steps 6 \
  --distill.w_ce 1 >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "distill T"; }
"$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/run_t0" --student.pattern T --distill.stage2_steps 0 \
  >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "distill T (no step)"; }
last_checkpoint() { ls -d "$1"/step-* 2>/dev/null | sort | tail -n 1; }
CK_KA=$(last_checkpoint "$WORK/run_ka")
CK_T=$(last_checkpoint "$WORK/run_t")
CK_T0=$(last_checkpoint "$WORK/run_t0")
[ "$(basename "$CK_KA")" = step-00000020 ] || fail "KA run: last checkpoint '$CK_KA', expected step-00000020"
[ "$(basename "$CK_T")" = step-00000006 ] || fail "T run: last checkpoint '$CK_T', expected step-00000006"
[ "$(basename "$CK_T0")" = step-00000000 ] || fail "T run without steps: last checkpoint '$CK_T0'"

mkdir -p "$WORK/exports"
export_to() {  # checkpoint, folder, dtype
  "$HYD" export --checkpoint "$1" --out "$WORK/exports/$2" --dtype "$3" >"$WORK/out.txt" 2>&1 ||
    { cat "$WORK/out.txt"; fail "export of $1 ($3)"; }
  for f in config.json model.safetensors configuration_hydistill.py modeling_hydistill.py; do
    [ -f "$WORK/exports/$2/$f" ] || fail "the export $2 lacks $f"
  done
}
export_to "$CK_KA" ka_f32 float32
export_to "$CK_KA" ka_bf16 bfloat16
export_to "$CK_T" t_f32 float32
export_to "$CK_T0" t0_f32 float32
echo "ok: exported $CK_KA (float32, bfloat16), $CK_T, $CK_T0"

eval_of() {  # checkpoint, pattern, out dir
  "$HYD" eval --config "$WORK/distill.ini" --checkpoint "$1" --student.pattern "$2" --run.dir "$3" \
    --data.path "$WORK/eval.h5" --data.val_fraction 0.999999 --data.seq_len 32 --data.batch_size 4 --eval.batches 4 \
    >"$WORK/out.txt" 2>&1 || { cat "$WORK/out.txt"; fail "eval of $1"; }
  cat "$WORK/out.txt"
}
eval_of "$CK_KA" KA "$WORK/eval_ka"
eval_of "$CK_T" T "$WORK/eval_t"
cp "$WORK/eval_ka/eval.jsonl" "$WORK/exports/ka_eval.jsonl"
cp "$WORK/eval_t/eval.jsonl" "$WORK/exports/t_eval.jsonl"

python3 "$SRC/tests/python/check_export_moe.py" --exports "$WORK/exports" --teacher "$TEACHER" \
  --eval-data "$WORK/eval.h5"
rc=$?
case $rc in
  0 | 77) exit $rc ;;
  *) fail "check_export_moe.py exited $rc" ;;
esac

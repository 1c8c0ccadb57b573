#!/usr/bin/env bash
# `hydistill distill` on the CPU from a Mixture-of-Experts teacher: the golden tiny qwen3_moe teacher
# (tests/golden/data/qwen3_moe: 2 layers, layer 0 dense through mlp_only_layers, layer 1 a MoE FFN of 8
# experts, top 2; vocab 256, random weights) and a small Markov dataset (vocab 200). A KA student keeps the
# teacher's MoE FFN (copied, trained in stage 2) and runs a few stage-1 and stage-2 steps. Asserts: exit 0,
# the transfer table lists the router and expert stacks copied from the teacher, stage-1 and stage-2
# records are finite, the stage-2 KL does not grow (first vs last record), the checkpoint is written, and
# `hydistill export` writes the MoE student with the teacher's MoE fields in config.json; with
# distill.router_aux_coef the stage-2 records carry the load-balancing term ("aux", inside "loss"), and bad
# values of it exit 2 naming the key. The golden tiny dots1 teacher (tests/golden/data/dots1: sigmoid router
# with a selection bias, routed scaling, a shared MLP, layer 0 dense through first_k_dense_replace) distills
# likewise: the transfer table copies the shared MLP and the bias, the records are finite, the checkpoint's
# bias is still the teacher's after stage 2, and `hydistill export` refuses the student naming model.family;
# with distill.router_bias_rate the bias follows the loads (auxiliary-loss-free balancing).
# Usage: bash test_distill_moe.sh HYDISTILL SOURCE_DIR
set -u
HYD="$1"
SRC="$2"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hyd_distill_moe.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
TEACHER="$SRC/tests/golden/data/qwen3_moe"
[ -f "$TEACHER/config.json" ] || fail "missing teacher $TEACHER"
python3 "$SRC/tests/cli/synthetic_data.py" markov "$WORK/tiny.h5" --vocab 200 --docs 200 --seed 0 ||
  fail "could not write the synthetic dataset"

cat > "$WORK/distill.ini" <<EOF2
device = cpu
[run]
dir = $WORK/run
[teacher]
dir = $TEACHER
[student]
pattern = KA
[data]
path = $WORK/tiny.h5
val_fraction = 0.05
seq_len = 32
batch_size = 2
[train]
weight_decay = 0.0
[distill]
stage1_steps = 20
stage1_lr = 1e-2
stage2_steps = 30
stage2_lr = 1e-2
warmup_steps = 2
min_lr_ratio = 0.5
[log]
interval = 10
EOF2

"$HYD" distill --config "$WORK/distill.ini" >"$WORK/out.txt" 2>"$WORK/err.txt"
rc=$?
cat "$WORK/out.txt"
[ "$rc" -eq 0 ] || { cat "$WORK/err.txt"; fail "distill exited with $rc"; }
grep -q "transfer table" "$WORK/out.txt" || fail "no transfer table header in stdout"
for p in mlp.gate.weight mlp.gate_up mlp.down; do
  grep -Eq " $p +\[.*\] +teacher:layers.1.$p$" "$WORK/out.txt" ||
    fail "the transfer table does not show layers.1.$p copied from the teacher"
done
grep -Eq " w_gate_up +\[.*\] +teacher:layers.0.w_gate_up$" "$WORK/out.txt" ||
  fail "the transfer table does not show the dense layer's w_gate_up from the teacher"
grep -q "stage 1 step 20/20 | mse" "$WORK/out.txt" || fail "no stage 1 progress line for step 20/20"
grep -q "stage 2 step 30/30 | kl" "$WORK/out.txt" || fail "no stage 2 progress line for step 30/30"

python3 - "$WORK/run/metrics.jsonl" <<'PY' || fail "metrics.jsonl check failed"
import json, math, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
s1 = [r for r in recs if r.get("stage") == 1]
s2 = [r for r in recs if r.get("stage") == 2]
assert len(s1) == 2 and len(s2) == 3, (len(s1), len(s2))
for r in s1:
    for k in ("step", "mse", "lr", "grad_norm"):
        assert isinstance(r.get(k), (int, float)) and math.isfinite(r[k]), f"stage 1 '{k}' in {r}"
for r in s2:
    for k in ("step", "kl", "ce", "loss", "lr", "grad_norm"):
        assert isinstance(r.get(k), (int, float)) and math.isfinite(r[k]), f"stage 2 '{k}' in {r}"
k0, k1 = s2[0]["kl"], s2[-1]["kl"]
print(f"stage 1 mse {s1[0]['mse']:.4g} -> {s1[-1]['mse']:.4g}; stage 2 kl {k0:.4g} -> {k1:.4g}")
assert k0 >= 0 and k1 <= k0 * 1.05, f"stage 2 kl grew: {k0} -> {k1}"
PY
# The MoE student exports (tests/cli/test_export_moe.sh checks the export against transformers and eval):
# here only that it is written with the teacher's MoE fields.
"$HYD" export --checkpoint "$WORK/run/step-00000050" --out "$WORK/export" >"$WORK/ex_out.txt" 2>&1 ||
  { cat "$WORK/ex_out.txt"; fail "export of the MoE student"; }
python3 - "$WORK/export/config.json" <<'PY' || fail "the export's config.json lacks the MoE fields"
import json, sys
c = json.load(open(sys.argv[1]))
assert (c["num_experts"], c["num_experts_per_tok"], c["mlp_only_layers"]) == (8, 2, [0]), c
PY
echo "ok: MoE student exported"

# The student's MoE load-balancing term (distill.router_aux_coef): logged as "aux" in every stage-2 record,
# positive and finite, and part of "loss"; a negative coefficient and a dense teacher exit 2 naming the key.
# HYD_PEAK_TFLOPS gives the CPU a peak, so stage 2 reports MFU: checked against FLOPs per token recounted
# here from the files (the student's checkpoint and the teacher's safetensors / config.json).
HYD_PEAK_TFLOPS=0.001 "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/aux" --distill.stage1_steps 2 \
  --distill.stage2_steps 4 --log.interval 1 --distill.router_aux_coef 0.01 >"$WORK/aux.txt" 2>&1 ||
  { cat "$WORK/aux.txt"; fail "distill with distill.router_aux_coef"; }
grep -q "stage 2 step 4/4 .* tok/s | MFU " "$WORK/aux.txt" || { cat "$WORK/aux.txt"; fail "no MFU in the progress line"; }
python3 - "$WORK/aux" "$TEACHER" <<'PY' || fail "the stage-2 MFU"
import glob, json, os, sys
from safetensors.numpy import load_file
run, teacher = sys.argv[1], sys.argv[2]
tc = json.load(open(os.path.join(teacher, "config.json")))
T, E, k = 32, tc.get("num_experts", tc.get("num_local_experts")), tc["num_experts_per_tok"]
q_dim = tc["num_attention_heads"] * tc["head_dim"]
def matmul_params(tensors, embed_name, expert_numel):
    # every parameter but the input embedding, minus the routed experts a token does not visit
    n = sum(v.size for name, v in tensors.items() if name != embed_name)
    return n - expert_numel // E * (E - k)
tw = load_file(os.path.join(teacher, "model.safetensors"))
t = matmul_params(tw, "model.embed_tokens.weight", sum(v.size for n, v in tw.items() if ".mlp.experts." in n))
teacher_fwd = (6 * t + 6 * tc["num_hidden_layers"] * T * q_dim) / 3
st = load_file(sorted(glob.glob(os.path.join(run, "step-*", "rank-00000.safetensors")))[-1])
sp = {name[len("param/"):]: v for name, v in st.items() if name.startswith("param/")}
embed = [n for n in sp if "embed" in n]
assert len(embed) == 1, embed
s = matmul_params(sp, embed[0], sum(v.size for n, v in sp.items() if n.endswith(("mlp.gate_up", "mlp.down"))))
flops = 6 * s + 6 * 1 * T * q_dim + teacher_fwd  # pattern KA: one attention layer
for r in (r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if r.get("stage") == 2):
    want = r["tokens_per_s"] * flops / 1e9
    assert abs(r["mfu"] - want) <= 1e-6 * want, (r["mfu"], want)
print(f"stage-2 MFU matches {flops:.4e} FLOPs per token (student fwd+bwd + teacher fwd)")
PY
grep -q "stage 2 step 4/4 | kl .* | aux " "$WORK/aux.txt" || { cat "$WORK/aux.txt"; fail "no aux in the progress line"; }
python3 - "$WORK/aux/metrics.jsonl" <<'PY' || fail "the aux records"
import json, math, sys
s2 = [r for r in map(json.loads, open(sys.argv[1])) if r.get("stage") == 2]
assert len(s2) == 4, len(s2)
for r in s2:
    assert math.isfinite(r["aux"]) and 0 < r["aux"] <= 0.01 * 8, r
    assert abs(r["loss"] - (r["kl"] + r["aux"])) <= 1e-9 * abs(r["loss"]) + 1e-12, r  # w_kl 1, w_ce 0
print("aux per stage-2 step:", [round(r["aux"], 6) for r in s2])
PY
"$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/bad1" --distill.router_aux_coef -1 >"$WORK/b1.txt" 2>&1
rc=$?
[ "$rc" = 2 ] && grep -q "distill.router_aux_coef" "$WORK/b1.txt" || { cat "$WORK/b1.txt"; fail "negative coef: exit $rc"; }
"$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/bad2" --distill.router_aux_coef 0.01 \
  --teacher.dir "$SRC/tests/golden/data/llama" >"$WORK/b2.txt" 2>&1
rc=$?
[ "$rc" = 2 ] && grep -q "distill.router_aux_coef.*no MoE layers" "$WORK/b2.txt" || { cat "$WORK/b2.txt"; fail "dense teacher: exit $rc"; }

DOTS1="$SRC/tests/golden/data/dots1"
"$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/dots1" --teacher.dir "$DOTS1" \
  --distill.stage1_steps 4 --distill.stage2_steps 6 --log.interval 2 >"$WORK/d1.txt" 2>&1 ||
  { cat "$WORK/d1.txt"; fail "distill from the dots1 teacher"; }
for p in mlp.gate.weight mlp.gate_up mlp.down mlp.shared_gate_up mlp.shared_down mlp.gate.e_score_correction_bias; do
  grep -Eq " $p +\[.*\] +teacher:layers.1.$p$" "$WORK/d1.txt" ||
    { cat "$WORK/d1.txt"; fail "the dots1 transfer table does not show layers.1.$p copied from the teacher"; }
done
python3 - "$WORK/dots1" "$DOTS1/model.safetensors" <<'PY' || fail "the dots1 student's records or checkpoint"
import glob, json, math, os, sys
from safetensors.numpy import load_file
recs = [json.loads(l) for l in open(os.path.join(sys.argv[1], "metrics.jsonl"))]
s2 = [r for r in recs if r.get("stage") == 2]
assert len(s2) == 3 and all(math.isfinite(r["kl"]) and math.isfinite(r["grad_norm"]) for r in s2), s2
state = load_file(sorted(glob.glob(os.path.join(sys.argv[1], "step-*", "rank-00000.safetensors")))[-1])
teacher = load_file(sys.argv[2])
bias = state["param/layers.1.mlp.gate.e_score_correction_bias"]
assert (bias == teacher["model.layers.1.mlp.gate.e_score_correction_bias"]).all(), bias
assert (state["param/layers.1.mlp.shared_down"][0] != teacher["model.layers.1.mlp.shared_experts.down_proj.weight"]).any()
print("dots1: stage 2 kl", [round(r["kl"], 5) for r in s2], "; selection bias unchanged, shared MLP trained")
PY
# Auxiliary-loss-free balancing (distill.router_bias_rate): after each of the 6 stage-2 steps the bias moves by
# +-rate or 0 per expert, so the checkpoint's bias differs from the teacher's by a multiple of the rate of at
# most 6 (and moved); the records carry load_imbalance (max / mean load, >= 1). A teacher without a selection
# bias, or a negative rate, exits 2 naming the key.
"$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/dots1_bal" --teacher.dir "$DOTS1" \
  --distill.stage1_steps 4 --distill.stage2_steps 6 --log.interval 2 --distill.router_bias_rate 0.01 \
  >"$WORK/d1b.txt" 2>&1 || { cat "$WORK/d1b.txt"; fail "distill from the dots1 teacher with router_bias_rate"; }
grep -q "router bias rate 0.01 (aux-loss-free)" "$WORK/d1b.txt" || { cat "$WORK/d1b.txt"; fail "header: router bias rate"; }
grep -q "| load max/mean " "$WORK/d1b.txt" || { cat "$WORK/d1b.txt"; fail "progress line: load max/mean"; }
python3 - "$WORK/dots1_bal" "$DOTS1/model.safetensors" <<'PY' || fail "dots1 with router_bias_rate: bias or records"
import glob, json, math, os, sys
import numpy as np
from safetensors.numpy import load_file
recs = [json.loads(l) for l in open(os.path.join(sys.argv[1], "metrics.jsonl"))]
s2 = [r for r in recs if r.get("stage") == 2]
assert len(s2) == 3 and all(r["load_imbalance"] >= 1.0 for r in s2), s2
state = load_file(sorted(glob.glob(os.path.join(sys.argv[1], "step-*", "rank-00000.safetensors")))[-1])
teacher = load_file(sys.argv[2])
moved = (state["param/layers.1.mlp.gate.e_score_correction_bias"].astype(np.float64)
         - teacher["model.layers.1.mlp.gate.e_score_correction_bias"].astype(np.float64)) / 0.01
steps = np.round(moved)
assert np.abs(moved - steps).max() < 1e-3 and np.abs(steps).max() <= 6 and np.abs(steps).max() >= 1, moved
print("dots1 with router_bias_rate 0.01: bias moved by", steps.astype(int).tolist(), "x rate; load max/mean",
      [round(r["load_imbalance"], 3) for r in s2])
PY
for bad in "--distill.router_bias_rate -1" "--distill.router_bias_rate 0.01 --teacher.dir $SRC/tests/golden/data/qwen3_moe"; do
  # shellcheck disable=SC2086
  "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/bad_rate" $bad >"$WORK/b3.txt" 2>&1
  rc=$?
  [ "$rc" = 2 ] && grep -q "distill.router_bias_rate" "$WORK/b3.txt" || { cat "$WORK/b3.txt"; fail "$bad: exit $rc"; }
done
"$HYD" export --checkpoint "$(ls -d "$WORK"/dots1/step-* | tail -1)" --out "$WORK/dots1_export" >"$WORK/d1x.txt" 2>&1
rc=$?
[ "$rc" != 0 ] && grep -q "model.family" "$WORK/d1x.txt" && [ ! -e "$WORK/dots1_export/config.json" ] ||
  { cat "$WORK/d1x.txt"; fail "export of a dots1 student: exit $rc, expected a refusal naming model.family"; }
echo "ok"

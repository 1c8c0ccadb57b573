#!/usr/bin/env bash
# Expert parallelism in `hydistill distill` (CPU, MPI): the golden qwen3_moe teacher (tests/golden/data/qwen3_moe:
# layer 1 a MoE FFN of 8 experts, top 2) and a KA student that keeps its MoE FFN, 4 stage-1 + 4 stage-2 steps.
# The teacher's MoE layers (stage 1's layer inputs, stage 2's logits) and the student's (stage 2, forward and
# backward) run their routed experts over groups of parallel.ep ranks. Against one process with the same global
# batch (every step's mse / kl / ce / grad_norm, rel. < 1e-4, fp32 sums in other orders):
#   dp 2 x ep 2 (2 ranks, one EP group over both data-parallel ranks), dp 2 x sp 2 x ep 2 and dp 4 x ep 4 (4 ranks);
# also dp 2 x ep 2 == dp 2 x ep 1; a dp 2 x ep 2 run stopped after step 6 and resumed == uninterrupted, bit for
# bit; its expert-sharded checkpoint (each expert's weights and optimizer state once, as pieces over the EP ranks'
# files) exports and evaluates in one process and resumes in one process, on dp 4 x ep 4 and dp 4 x ep 2;
# parallel.ep = 3 on 2 ranks and parallel.ep = 2 with a dense teacher exit 2 naming parallel.ep.
# HYD_EP_TEACHER=dots1 runs the same with the golden dots1 teacher (sigmoid router with a selection bias, routed
# scaling, a shared MLP computed locally on every rank; layer 0 dense through first_k_dense_replace) and
# distill.router_bias_rate 0.01 (the selection bias moved by the loads of every rank after each stage-2 step).
# Usage: bash test_distill_ep.sh HYDISTILL SOURCE_DIR MPIRUN [MPIRUN FLAGS...]   (MPIRUN with -np 4)
set -u
HYD="$1"
SRC="$2"
shift 2
PAR_MPIRUN=("$@")
# shellcheck source=tests/parallel/par_lib.sh
source "$SRC/tests/parallel/par_lib.sh"
par_distill_setup "$SRC/tests/golden/data/${HYD_EP_TEACHER:-qwen3_moe}"
if [ "${HYD_EP_TEACHER:-}" = dots1 ]; then
  # With auxiliary-loss-free balancing: the bias moves by the loads summed over every rank, so each layout must
  # still equal one process (and the resumed run the uninterrupted one).
  sed -i 's/^\[distill\]$/[distill]\nrouter_bias_rate = 0.01/' "$WORK/distill.ini"
  grep -q "^router_bias_rate = 0.01$" "$WORK/distill.ini" || fail "could not set distill.router_bias_rate"
fi
par_run one -- --data.batch_size 4
par_run dp2 "${MPIRUN2[@]}" -- --data.batch_size 2 --parallel.dp 2
par_run dp2ep2 "${MPIRUN2[@]}" -- --data.batch_size 2 --parallel.dp 2 --parallel.ep 2
par_run dp2sp2ep2 "${MPIRUN4[@]}" -- --data.batch_size 2 --parallel.dp 2 --parallel.sp 2 --parallel.ep 2
par_run dp4ep4 "${MPIRUN4[@]}" -- --data.batch_size 1 --parallel.dp 4 --parallel.ep 4
grep -q "routed experts over groups of 2 expert-parallel ranks, each storing 4 of the 8 per MoE layer" "$WORK/dp2ep2.out" || { cat "$WORK/dp2ep2.out"; fail "header"; }
calls=$(sed -n 's/^expert parallelism: rank 0 took part in \([0-9]*\) exchanges.*/\1/p' "$WORK/dp2ep2.out")
[ -n "$calls" ] && [ "$calls" -gt 0 ] || { cat "$WORK/dp2ep2.out"; fail "dp2 ep2: no expert-parallel exchange counted"; }
echo "dp2 x ep2: rank 0 took part in $calls exchanges"
# Several ranks: stage 2 reports the share of wall time in the synchronous collectives (line and record).
grep -q "stage 2 step .* tok/s.* | comm [0-9]*%" "$WORK/dp2sp2ep2.out" || { cat "$WORK/dp2sp2ep2.out"; fail "no comm share"; }
python3 - "$WORK/dp2sp2ep2/metrics.jsonl" "$WORK/one/metrics.jsonl" <<'PY' || fail "comm_share records"
import json, sys
s2 = [r for r in map(json.loads, open(sys.argv[1])) if r.get("stage") == 2]
assert s2 and all(0 < r["comm_share"] < 1 for r in s2), [r.get("comm_share") for r in s2]
assert all("comm_share" not in r for r in map(json.loads, open(sys.argv[2]))), "one process has no collectives"
print("dp2 x sp2 x ep2 stage-2 comm share:", [round(r["comm_share"], 3) for r in s2])
PY

python3 - "$WORK" <<'PY' || fail "an expert-parallel run differs from its reference"
import json, sys
w = sys.argv[1]
load = lambda n: [json.loads(l) for l in open(f"{w}/{n}/metrics.jsonl")]
worst = 0.0
for got_name, ref_name in [("dp2ep2", "one"), ("dp2ep2", "dp2"), ("dp2sp2ep2", "one"), ("dp4ep4", "one")]:
    got, ref = load(got_name), load(ref_name)
    assert len(got) == len(ref) == 8, (got_name, len(got), len(ref))
    for g, r in zip(got, ref):
        assert (g["stage"], g["step"], g["tokens"]) == (r["stage"], r["step"], r["tokens"]), (got_name, g, r)
        for key in (["mse"] if g["stage"] == 1 else ["kl", "ce"]) + ["grad_norm"]:
            e = abs(g[key] - r[key]) / max(abs(r[key]), 1e-12)
            worst = max(worst, e)
            assert e < 1e-4, f"{got_name} vs {ref_name} stage {g['stage']} step {g['step']} {key}: {g[key]} vs {r[key]}"
print(f"expert parallel == reference: worst rel. err {worst:.2e} over every step")
PY

# Stopped and resumed under dp 2 x ep 2: bit for bit.
par_run part "${MPIRUN2[@]}" -- --data.batch_size 2 --parallel.dp 2 --parallel.ep 2 --checkpoint.interval 2 --run.stop_after 6
# The checkpoint of step 6 is expert-sharded: each rank of the EP group wrote its experts' piece of every routed
# expert tensor (param/NAME[a:b], no whole param/NAME), and the optimizer's pieces cover every expert once.
python3 - "$WORK/part/step-00000006" <<'PY' || fail "the expert-sharded checkpoint"
import re, sys
from safetensors.numpy import load_file
d = sys.argv[1]
files = [load_file(f"{d}/rank-0000{r}.safetensors") for r in (0, 1)]
for kind in ("param", "adam_m"):
    for t in ("mlp.gate_up", "mlp.down"):
        name = f"{kind}/layers.1.{t}"
        assert all(name not in f for f in files), f"{name} stored whole"
        spans = sorted((int(m.group(1)), int(m.group(2)), r) for r, f in enumerate(files) for k in f
                       for m in [re.fullmatch(re.escape(name) + r"\[(\d+):(\d+)\]", k)] if m)
        assert spans and spans[0][0] == 0, (name, spans)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), (name, spans)
        if kind == "param":
            assert [r for _, _, r in spans] == [0, 1], (name, spans)  # rank r: experts [r E/2, (r+1) E/2)
        print(name, "pieces", [(a, b) for a, b, _ in spans])
PY
if [ "${HYD_EP_TEACHER:-qwen3_moe}" = qwen3_moe ]; then
  # Exported and evaluated in one process: the export assembles whole experts from the pieces.
  "$HYD" export --checkpoint "$WORK/part/step-00000006" --out "$WORK/part_export" --dtype float32 \
    >"$WORK/part_export.out" 2>&1 || { cat "$WORK/part_export.out"; fail "export of the expert-sharded checkpoint"; }
  python3 - "$WORK/part/step-00000006" "$WORK/part_export/model.safetensors" <<'PY' || fail "exported experts"
import sys
import numpy as np
from safetensors.numpy import load_file
d, exported = sys.argv[1], load_file(sys.argv[2])
files = [load_file(f"{d}/rank-0000{r}.safetensors") for r in (0, 1)]
pieces = sorted((k, f[k]) for f in files for k in f if k.startswith("param/layers.1.mlp.down["))
down = np.concatenate([v for _, v in sorted(pieces, key=lambda kv: int(kv[0].split("[")[1].split(":")[0]))])
E = sum(1 for k in exported if k.startswith("model.layers.1.mlp.experts.") and k.endswith(".down_proj.weight"))
assert E >= 2, E
down = down.reshape(E, *exported["model.layers.1.mlp.experts.0.down_proj.weight"].shape)
for e in range(E):
    assert np.array_equal(exported[f"model.layers.1.mlp.experts.{e}.down_proj.weight"], down[e]), e
print(f"export of the expert-sharded checkpoint: all {E} experts' down_proj equal the state files' pieces")
PY
fi
# Evaluated in one process and on 2 ranks with expert parallelism (each rank its half of the experts): the same
# held-out numbers.
OMP_NUM_THREADS=1 "$HYD" eval --config "$WORK/distill.ini" --run.dir "$WORK/part_eval" \
  --checkpoint "$WORK/part/step-00000006" >"$WORK/part_eval.out" 2>&1 ||
  { cat "$WORK/part_eval.out"; fail "hydistill eval of the expert-sharded checkpoint"; }
grep -q "appended to" "$WORK/part_eval.out" || { cat "$WORK/part_eval.out"; fail "eval output"; }
OMP_NUM_THREADS=1 "${MPIRUN2[@]}" "$HYD" eval --config "$WORK/distill.ini" --run.dir "$WORK/part_eval_ep" \
  --checkpoint "$WORK/part/step-00000006" --parallel.dp 2 --parallel.ep 2 >"$WORK/part_eval_ep.out" 2>&1 ||
  { cat "$WORK/part_eval_ep.out"; fail "hydistill eval on 2 expert-parallel ranks"; }
grep -q "expert parallel  2 ranks, each storing" "$WORK/part_eval_ep.out" || { cat "$WORK/part_eval_ep.out"; fail "eval ep header"; }
python3 - "$WORK/part_eval/eval.jsonl" "$WORK/part_eval_ep/eval.jsonl" <<'PY' || fail "eval on 2 expert-parallel ranks differs"
import json, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:])
assert len(a) == len(b) == 1, (len(a), len(b))
for k in ("held_out_tokens", "teacher_loss", "student_loss", "kl", "top1_agreement"):
    assert abs(a[0][k] - b[0][k]) <= 1e-5 * max(abs(a[0][k]), 1e-12), (k, a[0][k], b[0][k])
print("eval on 2 expert-parallel ranks == one process:", {k: b[0][k] for k in ("student_loss", "kl")})
PY
OMP_NUM_THREADS=1 "${MPIRUN2[@]}" "$HYD" eval --config "$WORK/distill.ini" --run.dir "$WORK/part_eval_dp" \
  --checkpoint "$WORK/part/step-00000006" --parallel.dp 2 >"$WORK/part_eval_dp.out" 2>&1
rc=$?
[ "$rc" = 2 ] && grep -q "parallel.dp" "$WORK/part_eval_dp.out" && [ ! -e "$WORK/part_eval_dp" ] ||
  { cat "$WORK/part_eval_dp.out"; fail "eval on 2 ranks without expert parallelism: exit $rc"; }
# The same checkpoint resumed in one process (ep 1), on dp 4 x ep 4 and on dp 4 x ep 2 (each expert's optimizer
# state sharded over its 2 replicas), re-sharded by name == uninterrupted.
cp -r "$WORK/part" "$WORK/part_one"
cp -r "$WORK/part" "$WORK/part_ep4"
cp -r "$WORK/part" "$WORK/part_dp4ep2"
par_run part_one -- --data.batch_size 4 --checkpoint.interval 2 --train.resume auto
par_run part_ep4 "${MPIRUN4[@]}" -- --data.batch_size 1 --parallel.dp 4 --parallel.ep 4 --checkpoint.interval 2 \
  --train.resume auto
par_run part_dp4ep2 "${MPIRUN4[@]}" -- --data.batch_size 1 --parallel.dp 4 --parallel.ep 2 --checkpoint.interval 2 \
  --train.resume auto
python3 - "$WORK" <<'PY' || fail "the expert-sharded checkpoint resumed on another layout"
import json, sys
w = sys.argv[1]
load = lambda n: [json.loads(l) for l in open(f"{w}/{n}/metrics.jsonl")]
ref = load("dp2ep2")
for name in ("part_one", "part_ep4", "part_dp4ep2"):
    got = load(name)
    assert len(got) == len(ref), (name, len(got))
    worst = 0.0
    for g, r in zip(got, ref):
        for k in ("mse", "kl", "ce", "grad_norm"):
            if k in r:
                e = abs(g[k] - r[k]) / max(abs(r[k]), 1e-12)
                worst = max(worst, e)
                assert e < 1e-4, (name, k, g, r)
    print(f"dp2 x ep2 checkpoint of step 6 resumed as {name}: worst rel. {worst:.2e}")
PY
par_run part "${MPIRUN2[@]}" -- --data.batch_size 2 --parallel.dp 2 --parallel.ep 2 --checkpoint.interval 2 --train.resume auto
grep -q "resumed from .*step-00000006" "$WORK/part.out" || { cat "$WORK/part.out"; fail "dp2 ep2: did not resume"; }
python3 - "$WORK/dp2ep2/metrics.jsonl" "$WORK/part/metrics.jsonl" <<'PY' || fail "dp2 ep2: the resumed run differs"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert len(a) == len(b)
for x, y in zip(a, b):
    for k in ("mse", "kl", "ce", "grad_norm"):
        assert x.get(k) == y.get(k), (k, x, y)
print("dp2 x ep2 stopped at step 6 and resumed == uninterrupted, bit for bit")
PY

OMP_NUM_THREADS=1 "${MPIRUN2[@]}" "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/bad" --parallel.dp 2 \
  --parallel.ep 3 >"$WORK/bad.out" 2>&1
rc=$?
[ "$rc" = 2 ] && grep -q "parallel.ep" "$WORK/bad.out" || { cat "$WORK/bad.out"; fail "ep = 3 on 2 ranks: exit $rc"; }
OMP_NUM_THREADS=1 "${MPIRUN2[@]}" "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/bad2" --parallel.dp 2 \
  --parallel.ep 2 --teacher.dir "$SRC/tests/golden/data/llama" >"$WORK/bad2.out" 2>&1
rc=$?
[ "$rc" = 2 ] && grep -q "parallel.ep" "$WORK/bad2.out" || { cat "$WORK/bad2.out"; fail "ep = 2, dense teacher: exit $rc"; }
echo "PASS"

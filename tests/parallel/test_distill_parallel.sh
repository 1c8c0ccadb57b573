#!/usr/bin/env bash
# `hydistill distill` over several ranks on the CPU: the golden tiny llama teacher (tests/golden/data/llama,
# random weights) and a KA student, 4 stage-1 + 4 stage-2 steps, one metrics record per step, against one
# process. Runs (MPIRUN starts the 4 ranks of the last one; 2-rank runs use -np 2 in place of -np 4):
#   sp = 2 (each sequence split over 2 ranks: LASP-2 / LASP-2H for student and teacher)  == one process
#   dp = 2 with data.batch_size B                                                       == one process with 2B
#   dp = 2 x sp = 2 (4 ranks)                                                           == one process with 2B
#   dp = 2 x sp = 2 with data.batch_size 1 and distill.w_hidden 0.5 == one process with 2 and w_hidden 0.5
# Asserts: stage 1 mse and stage 2 kl / ce (/ hidden_mse) of every step agree to rel. err < 1e-4 (fp32, different summation
# orders, 8 optimizer steps), the token counts are equal, only rank 0 prints (one header) and writes;
# the final held-out evaluation (rank 0, whole sequences) of the sp = 2 student gives the same student loss
# and KL as the single process's to rel. 1e-4; an sp = 2 run stopped at step 6 and resumed
# from its checkpoint logs the same values bit for bit; bad grids exit 2 naming parallel.dp / parallel.sp.
# Usage: bash test_distill_parallel.sh HYDISTILL SOURCE_DIR MPIRUN [MPIRUN FLAGS...]   (MPIRUN with -np 4)
set -u
HYD="$1"
SRC="$2"
shift 2
PAR_MPIRUN=("$@")
# shellcheck source=tests/parallel/par_lib.sh
source "$SRC/tests/parallel/par_lib.sh"
TEACHER="$SRC/tests/golden/data/llama"
par_distill_setup "$TEACHER"
par_run one -- --data.batch_size 2
par_run one_b4 -- --data.batch_size 4
par_run sp2 "${MPIRUN2[@]}" -- --data.batch_size 2 --parallel.sp 2
par_run dp2 "${MPIRUN2[@]}" -- --data.batch_size 2 --parallel.dp 2
par_run dp2sp2 "${MPIRUN4[@]}" -- --data.batch_size 2 --parallel.dp 2 --parallel.sp 2
par_run one_h -- --data.batch_size 2 --distill.w_hidden 0.5
par_run sp2dp2_h "${MPIRUN4[@]}" -- --data.batch_size 1 --parallel.dp 2 --parallel.sp 2 --distill.w_hidden 0.5
for r in sp2 dp2 dp2sp2; do
  [ "$(grep -c '^hydistill distill' "$WORK/$r.out")" = 1 ] || { cat "$WORK/$r.out"; fail "$r: the header is not printed once"; }
done
grep -q "sequence-parallel ranks (LASP-2 / LASP-2H)" "$WORK/sp2.out" || fail "sp2: the header does not describe the grid"

python3 - "$WORK" <<'PY' || fail "a multi-rank run differs from its single-process reference"
import json, sys
w = sys.argv[1]
def load(name):
    return [json.loads(l) for l in open(f"{w}/{name}/metrics.jsonl")]
def evals(name):
    return [json.loads(l) for l in open(f"{w}/{name}/eval.jsonl")]
def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)
worst = 0.0
for got_name, ref_name in [("sp2", "one"), ("dp2", "one_b4"), ("dp2sp2", "one_b4"), ("sp2dp2_h", "one_h")]:
    got, ref = load(got_name), load(ref_name)
    assert len(got) == len(ref) == 8, (got_name, len(got), len(ref))
    for g, r in zip(got, ref):
        assert (g["stage"], g["step"], g["tokens"]) == (r["stage"], r["step"], r["tokens"]), (got_name, g, r)
        keys = ["mse"] if g["stage"] == 1 else ["kl", "ce", "loss"] + (["hidden_mse"] if "hidden_mse" in r else [])
        assert ("hidden_mse" in r) == ("hidden_mse" in g), (got_name, g, r)
        for key in keys + ["grad_norm"]:
            e = rel(g[key], r[key])
            worst = max(worst, e)
            assert e < 1e-4, f"{got_name} stage {g['stage']} step {g['step']} {key}: {g[key]} vs {r[key]} (rel {e:.2e})"
    if got_name != "sp2":
        continue  # the evaluation's held-out batches have data.batch_size sequences: compare equal batch sizes only
    ge, re_ = evals(got_name)[-1], evals(ref_name)[-1]
    for k in ("student_loss", "kl"):
        a, b = ge[k], re_[k]
        e = rel(a, b)
        worst = max(worst, e)
        assert e < 1e-4, f"{got_name} final evaluation {k}: {a} vs {b}"
print(f"sp2 / dp2 / dp2 x sp2 == one process: worst rel. err {worst:.2e} over every step")
PY

# Interrupted and resumed under sp = 2 (ZeRO-1: sharded checkpoints, one state file per rank): the same
# records, bit for bit, as the uninterrupted sp = 2 run; also stopped inside stage 1 (step 2) and resumed
# across the stage boundary; and the step-6 checkpoint of 2 ranks re-sharded onto one process and onto
# dp 2 x sp 2 (4 ranks) continues as the uninterrupted run (rel. 1e-4: fp32 sums in other orders).
par_run part "${MPIRUN2[@]}" -- --data.batch_size 2 --parallel.sp 2 --checkpoint.interval 2 --run.stop_after 6
[ -f "$WORK/part/step-00000006/rank-00001.safetensors" ] || fail "sp2: no sharded checkpoint at step 6"
cp -r "$WORK/part/step-00000006" "$WORK/ck6"
par_run part "${MPIRUN2[@]}" -- --data.batch_size 2 --parallel.sp 2 --checkpoint.interval 2 --train.resume auto
grep -q "resumed from .*step-00000006" "$WORK/part.out" || { cat "$WORK/part.out"; fail "sp2: did not resume"; }
par_run part1 "${MPIRUN2[@]}" -- --data.batch_size 2 --parallel.sp 2 --checkpoint.interval 2 --run.stop_after 2
par_run part1 "${MPIRUN2[@]}" -- --data.batch_size 2 --parallel.sp 2 --checkpoint.interval 2 --train.resume auto
grep -q "resumed from .*step-00000002" "$WORK/part1.out" || { cat "$WORK/part1.out"; fail "sp2: did not resume in stage 1"; }
par_run rs1 -- --data.batch_size 2 --train.resume "$WORK/ck6"
par_run rs4 "${MPIRUN4[@]}" -- --data.batch_size 1 --parallel.dp 2 --parallel.sp 2 --train.resume "$WORK/ck6"
python3 - "$WORK" <<'PY' || fail "sp2: a resumed run differs"
import json, sys
w = sys.argv[1]
load = lambda n: {(r["stage"], r["step"]): r for r in map(json.loads, open(f"{w}/{n}/metrics.jsonl"))}
a = load("sp2")
for name in ("part", "part1"):
    b = load(name)
    assert a.keys() == b.keys(), (name, sorted(a), sorted(b))
    for k in a:
        key = "mse" if k[0] == 1 else "kl"
        assert a[k][key] == b[k][key] and a[k]["grad_norm"] == b[k]["grad_norm"], (name, k, a[k], b[k])
print("sp2 stopped at step 6 (stage 2) or 2 (stage 1) and resumed == uninterrupted, bit for bit")
for name in ("rs1", "rs4"):
    b = load(name)
    assert sorted(b) == [(2, 3), (2, 4)], (name, sorted(b))
    for k in b:
        for key in ("kl", "ce", "grad_norm"):
            e = abs(a[k][key] - b[k][key]) / max(abs(a[k][key]), 1e-12)
            print(f"{name} stage 2 step {k[1]} {key}: {b[k][key]:.9g} vs {a[k][key]:.9g} rel {e:.1e}")
            assert e < 1e-4, (name, k, key)
PY
# Export reads sharded checkpoints: rank 0's file holds every parameter.
"$HYD" export --checkpoint "$WORK/part/step-00000008" --out "$WORK/export_sp2" >"$WORK/export.out" 2>&1 \
  || { cat "$WORK/export.out"; fail "export of a sharded (2-rank) checkpoint"; }
[ -f "$WORK/export_sp2/model.safetensors" ] || fail "export of a sharded checkpoint wrote no model.safetensors"

# Sequence parallelism saves activation memory: the sp2 models hold B x T / 2 tokens (the held-out evaluation
# runs on the slices too, and matched one process above), so the header's model memory is below one process's.
python3 - "$WORK/one.out" "$WORK/sp2.out" <<'PY' || fail "sp2 does not report less model memory than one process"
import re, sys
mem = lambda p: float(re.search(r"^\s*memory\s+([0-9.]+) MB", open(p).read(), re.M).group(1))
one, sp2 = mem(sys.argv[1]), mem(sys.argv[2])
print(f"model memory: one process {one} MB, sp2 {sp2} MB per rank")
assert sp2 < one, (one, sp2)
PY
# Passkey evaluation needs whole prompts: refused with sp > 1 (exit 2 naming eval.passkey_data).
python3 "$SRC/tests/cli/synthetic_data.py" passkey "$WORK/passkey.h5" --vocab 200 --lengths 32 --per-length 2 \
  || fail "could not write the passkey dataset"
OMP_NUM_THREADS=1 "${MPIRUN2[@]}" "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/badpk" --parallel.sp 2 \
  --eval.passkey_data "$WORK/passkey.h5" >"$WORK/badpk.out" 2>&1
rc=$?
[ "$rc" = 2 ] && grep -q "eval.passkey_data.*not available with parallel.sp = 2" "$WORK/badpk.out" || { cat "$WORK/badpk.out"; fail "passkey with sp=2: exit $rc"; }

# A grid that does not match the world, and a slice that does not divide seq_len: exit 2 naming the key.
OMP_NUM_THREADS=1 "${MPIRUN2[@]}" "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/bad" --parallel.sp 3 \
  >"$WORK/bad.out" 2>&1
rc=$?
[ $rc -ne 0 ] && grep -q "parallel.dp" "$WORK/bad.out" || { cat "$WORK/bad.out"; fail "sp=3 on 2 ranks: rc $rc"; }
OMP_NUM_THREADS=1 "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/bad2" --parallel.sp 1 --parallel.dp 0 \
  >"$WORK/bad2.out" 2>&1
[ $? -eq 2 ] && grep -q "parallel.dp" "$WORK/bad2.out" || { cat "$WORK/bad2.out"; fail "dp=0 not refused with exit 2"; }
[ ! -e "$WORK/bad2" ] || fail "a refused run created its run directory"
# `hydistill eval` is one process: parallel options are refused before anything is read.
"$HYD" eval --config "$WORK/distill.ini" --run.dir "$WORK/bad3" --checkpoint "$WORK/none" --parallel.sp 2 \
  >"$WORK/bad3.out" 2>&1
[ $? -eq 2 ] && grep -q "parallel.dp" "$WORK/bad3.out" || { cat "$WORK/bad3.out"; fail "eval with sp=2 not refused"; }
echo "PASS"

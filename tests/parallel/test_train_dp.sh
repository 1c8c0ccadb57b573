#!/usr/bin/env bash
# `hydistill train` over 2 ranks on the CPU against one process with batch 4, same seeds, 5 optimizer steps
# (2 micro-batches each), one metrics record per step: parallel.dp = 2 (ZeRO-1) with data.batch_size 2 per
# rank, and parallel.sp = 2 (each sequence split over the ranks: the all-T hybrid model with LASP-2H,
# ZeRO-1 over both ranks) with batch 4. Asserts: the loss and grad_norm of every step and the final held-out
# val_loss (a function of the final parameters) agree to rel. err < 1e-5; the token counts are equal
# (global, summed over ranks); only rank 0 writes metrics.jsonl and prints (one progress header);
# parallel.dp * parallel.sp != world size exits 2 naming parallel.dp; parallel.sp = 3 (not dividing
# seq_len) exits 2 naming it.
# Sharded checkpoints (ZeRO-1, issue 8): the dp = 2 run's final checkpoint has one state file per rank
# (manifest world_size 2, each file listed with its checksum); a dp = 2 run stopped after step 2 and resumed
# (train.resume auto) logs the same values bit for bit as the uninterrupted one and ends with state files of
# the same SHA-256 (parameters and optimizer state bitwise equal), and so does a dp = 4 run over 4 ranks; its step-2 checkpoint resumed with other rank
# counts re-shards the optimizer state: one process with batch 4, and dp = 4 with batch 1 (4 ranks), continue
# as the uninterrupted dp = 2 run (rel. err < 1e-5, fp32 sums in other orders), as does a single-process
# step-2 checkpoint resumed on dp = 2; a batch that changes the global
# batch (dp 2 x 3) exits 2 naming data.batch_size.
# Usage: bash test_train_dp.sh HYDISTILL MPIRUN [MPIRUN FLAGS...]   (MPIRUN runs 2 ranks: "mpirun -np 2 ...")
set -u
HYD="$1"
shift
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PAR_MPIRUN=("$@")
# shellcheck source=tests/parallel/par_lib.sh
source "$SRC/tests/parallel/par_lib.sh"
MPIRUN=("${MPIRUN2[@]}")
par_train_setup "" "steps = 5
grad_accum = 2
grad_clip = 0.5" ""

# One process, batch 4.
OMP_NUM_THREADS=1 "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/single" --data.batch_size 4 \
  >"$WORK/single.out" 2>&1 || { cat "$WORK/single.out"; fail "single-process run failed"; }
# Two ranks, batch 2 each.
OMP_NUM_THREADS=1 "${MPIRUN[@]}" "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/dp2" --data.batch_size 2 \
  --parallel.dp 2 >"$WORK/dp2.out" 2>&1 || { cat "$WORK/dp2.out"; fail "dp=2 run failed"; }
[ "$(grep -c '^hydistill train' "$WORK/dp2.out")" = 1 ] || { cat "$WORK/dp2.out"; fail "dp=2: the header is not printed once"; }
python3 - "$WORK/dp2/step-00000005/manifest.json" <<'PY' || fail "dp=2: the final checkpoint is not sharded over 2 ranks"
import json, sys
m = json.load(open(sys.argv[1]))
assert m["topology"]["world_size"] == 2 and m["topology"]["dp"] == 2, m["topology"]
names = sorted(f["name"] for f in m["files"])
assert names == ["config.ini", "rank-00000.safetensors", "rank-00001.safetensors"], names
assert m["optimizer"]["zero1"]["ranks"] == 2, m["optimizer"]
PY
# Two ranks, each sequence of the batch of 4 split over both (sequence parallelism, LASP-2H).
OMP_NUM_THREADS=1 "${MPIRUN[@]}" "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/sp2" --data.batch_size 4 \
  --parallel.sp 2 >"$WORK/sp2.out" 2>&1 || { cat "$WORK/sp2.out"; fail "sp=2 run failed"; }
grep -q "sequence-parallel ranks (LASP-2H)" "$WORK/sp2.out" || { cat "$WORK/sp2.out"; fail "sp=2: header"; }

for run in dp2 sp2; do
python3 - "$WORK/single/metrics.jsonl" "$WORK/$run/metrics.jsonl" <<'PY' || fail "$run differs from one process with batch 4"
import json, sys
def load(p):
    return [json.loads(l) for l in open(p) if l.strip()]
a, b = load(sys.argv[1]), load(sys.argv[2])
assert len(a) == len(b), (len(a), len(b))
steps = 0
for x, y in zip(a, b):
    assert x["step"] == y["step"], (x, y)
    for k in ("loss", "grad_norm", "val_loss"):
        if k in x:
            rel = abs(x[k] - y[k]) / max(abs(x[k]), 1e-30)
            print(f"step {x['step']} {k}: {x[k]:.9g} vs {y[k]:.9g} rel {rel:.2e}")
            assert rel < 1e-5, (k, x, y)
    if "val_tokens" in x:
        assert x["val_tokens"] == y["val_tokens"], (x, y)
    if "tokens" in x:
        assert x["tokens"] == y["tokens"], (x, y)
        steps += 1
assert steps == 5, steps
assert any("val_loss" in x for x in a)
PY
done

# dp * sp != world size: exit 2 naming parallel.dp, nothing written.
OMP_NUM_THREADS=1 "${MPIRUN[@]}" "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/bad" --parallel.dp 3 \
  >"$WORK/bad.out" 2>&1
rc=$?
[ "$rc" = 2 ] || { cat "$WORK/bad.out"; fail "dp=3 on 2 ranks: exit $rc, expected 2"; }
grep -q "parallel.dp" "$WORK/bad.out" || { cat "$WORK/bad.out"; fail "dp=3 on 2 ranks: the error does not name parallel.dp"; }
[ ! -e "$WORK/bad" ] || fail "dp=3 on 2 ranks created the run directory"
# A plain process with dp = 2 (world size 1).
"$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/bad" --parallel.dp 2 >"$WORK/bad1.out" 2>&1
rc=$?
[ "$rc" = 2 ] && grep -q "parallel.dp" "$WORK/bad1.out" || { cat "$WORK/bad1.out"; fail "dp=2 without mpirun: exit $rc"; }
# sp = 2 without mpirun (world size 1) and sp = 3 (does not divide seq_len): exit 2 naming parallel.sp; resume
# with dp > 1 is refused.
"$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/bad" --parallel.sp 2 >"$WORK/bad2.out" 2>&1
rc=$?
[ "$rc" = 2 ] && grep -q "parallel.sp" "$WORK/bad2.out" || { cat "$WORK/bad2.out"; fail "sp=2 without mpirun: exit $rc"; }
"$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/bad" --parallel.sp 3 >"$WORK/bad2.out" 2>&1
rc=$?
[ "$rc" = 2 ] && grep -q "parallel.sp" "$WORK/bad2.out" || { cat "$WORK/bad2.out"; fail "sp=2: exit $rc"; }

# ---- sharded checkpoints: stop after step 2 (checkpoint), resume, compare with the uninterrupted dp = 2 run.
OMP_NUM_THREADS=1 "${MPIRUN[@]}" "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/dp2r" --data.batch_size 2 \
  --parallel.dp 2 --run.stop_after 2 >"$WORK/dp2r_a.out" 2>&1 || { cat "$WORK/dp2r_a.out"; fail "dp=2 stop_after 2"; }
[ -f "$WORK/dp2r/step-00000002/rank-00001.safetensors" ] || { cat "$WORK/dp2r_a.out"; fail "no sharded checkpoint at step 2"; }
cp -r "$WORK/dp2r/step-00000002" "$WORK/ck2"  # kept for the re-sharding runs below
OMP_NUM_THREADS=1 "${MPIRUN[@]}" "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/dp2r" --data.batch_size 2 \
  --parallel.dp 2 --train.resume auto >"$WORK/dp2r_b.out" 2>&1 || { cat "$WORK/dp2r_b.out"; fail "dp=2 resume"; }
grep -q "resumed from" "$WORK/dp2r_b.out" || { cat "$WORK/dp2r_b.out"; fail "dp=2 resume: no 'resumed from'"; }
python3 - "$WORK/dp2" "$WORK/dp2r" <<'PY' || fail "dp=2 stopped + resumed differs from the uninterrupted run"
import json, sys
load = lambda d: [json.loads(l) for l in open(d + "/metrics.jsonl") if l.strip()]
a, b = load(sys.argv[1]), load(sys.argv[2])
assert len(a) == len(b), (len(a), len(b))
for x, y in zip(a, b):
    for k in ("step", "loss", "grad_norm", "val_loss", "tokens", "val_tokens"):
        assert x.get(k) == y.get(k), (k, x, y)
ma = json.load(open(sys.argv[1] + "/step-00000005/manifest.json"))
mb = json.load(open(sys.argv[2] + "/step-00000005/manifest.json"))
sha = lambda m: {f["name"]: f["sha256"] for f in m["files"] if f["name"].startswith("rank-")}
assert sha(ma) == sha(mb), (sha(ma), sha(mb))
print("dp=2 resumed == uninterrupted: metrics and state files bitwise")
PY
# 4 ranks (dp 4, batch 1): stopped after step 2 and resumed == uninterrupted, state files bitwise.
OMP_NUM_THREADS=1 "${MPIRUN4[@]}" "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/dp4" --data.batch_size 1 \
  --parallel.dp 4 >"$WORK/dp4.out" 2>&1 || { cat "$WORK/dp4.out"; fail "dp=4 run"; }
OMP_NUM_THREADS=1 "${MPIRUN4[@]}" "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/dp4r" --data.batch_size 1 \
  --parallel.dp 4 --run.stop_after 2 >"$WORK/dp4r_a.out" 2>&1 || { cat "$WORK/dp4r_a.out"; fail "dp=4 stop_after 2"; }
OMP_NUM_THREADS=1 "${MPIRUN4[@]}" "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/dp4r" --data.batch_size 1 \
  --parallel.dp 4 --train.resume auto >"$WORK/dp4r_b.out" 2>&1 || { cat "$WORK/dp4r_b.out"; fail "dp=4 resume"; }
python3 - "$WORK/dp4" "$WORK/dp4r" <<'PY' || fail "dp=4 stopped + resumed differs from the uninterrupted run"
import json, sys
load = lambda d: [json.loads(l) for l in open(d + "/metrics.jsonl") if l.strip()]
a, b = load(sys.argv[1]), load(sys.argv[2])
assert len(a) == len(b)
for x, y in zip(a, b):
    for k in ("step", "loss", "grad_norm", "val_loss", "tokens"):
        assert x.get(k) == y.get(k), (k, x, y)
sha = lambda d: {f["name"]: f["sha256"] for f in json.load(open(d + "/step-00000005/manifest.json"))["files"]
                 if f["name"].startswith("rank-")}
assert sha(sys.argv[1]) == sha(sys.argv[2]) and len(sha(sys.argv[1])) == 4
print("dp=4 resumed == uninterrupted: metrics and 4 state files bitwise")
PY
# Re-sharding: the step-2 checkpoint of 2 ranks on 1 process (batch 4) and on 4 ranks (batch 1).
"$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/r1" --data.batch_size 4 --train.resume "$WORK/ck2" \
  >"$WORK/r1.out" 2>&1 || { cat "$WORK/r1.out"; fail "dp=2 checkpoint resumed on one process"; }
OMP_NUM_THREADS=1 "${MPIRUN4[@]}" "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/r4" --data.batch_size 1 \
  --parallel.dp 4 --train.resume "$WORK/ck2" >"$WORK/r4.out" 2>&1 || { cat "$WORK/r4.out"; fail "dp=2 checkpoint resumed on dp=4"; }
# And the reverse: a single-process checkpoint (step 2, batch 4) resumed on dp = 2 (batch 2).
"$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/s1" --data.batch_size 4 --run.stop_after 2 \
  >"$WORK/s1.out" 2>&1 || { cat "$WORK/s1.out"; fail "single process stop_after 2"; }
OMP_NUM_THREADS=1 "${MPIRUN[@]}" "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/r2" --data.batch_size 2 \
  --parallel.dp 2 --train.resume "$WORK/s1/step-00000002" >"$WORK/r2.out" 2>&1 || { cat "$WORK/r2.out"; fail "1 -> 2 ranks"; }
for run in r1 r4 r2; do
python3 - "$WORK/dp2/metrics.jsonl" "$WORK/$run/metrics.jsonl" <<'PY' || fail "$run: the re-sharded resume differs"
import json, sys
load = lambda p: [json.loads(l) for l in open(p) if l.strip()]
a, b = load(sys.argv[1]), load(sys.argv[2])
a = [x for x in a if x["step"] > 2]
assert len(a) == len(b) and len(b) > 0, (len(a), len(b))
for x, y in zip(a, b):
    assert x["step"] == y["step"], (x, y)
    for k in ("loss", "grad_norm", "val_loss"):
        if k in x:
            rel = abs(x[k] - y[k]) / max(abs(x[k]), 1e-30)
            print(f"step {x['step']} {k}: {x[k]:.9g} vs {y[k]:.9g} rel {rel:.2e}")
            assert rel < 1e-5, (k, x, y)
PY
done
# The global batch may not change on resume.
OMP_NUM_THREADS=1 "${MPIRUN[@]}" "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/bad4" --data.batch_size 3 \
  --parallel.dp 2 --train.resume "$WORK/ck2" >"$WORK/bad4.out" 2>&1
rc=$?
[ "$rc" = 2 ] && grep -q "data.batch_size" "$WORK/bad4.out" || { cat "$WORK/bad4.out"; fail "global batch change: exit $rc"; }
echo "PASS"

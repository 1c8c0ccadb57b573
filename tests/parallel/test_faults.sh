#!/usr/bin/env bash
# Fault handling of `hydistill train` (issue 8), scripted, on the CPU, 2 ranks (ZeRO-1, sharded checkpoints)
# unless said otherwise. Reference: an uninterrupted dp = 2 run of 8 steps with a checkpoint every 2 steps.
#  1. A rank killed (SIGKILL, fault injection) in the middle of writing the checkpoint of step 4: the job ends,
#     step-00000004 does not exist (only its .tmp folder); `train.resume auto` takes step 2, ignores the .tmp
#     folder, and the run ends with the reference's metrics and state files, bit for bit.
#  2. Both ranks killed after step 7 (between checkpoints): the resumed run starts from step 6 (at most one
#     checkpoint interval lost) and again ends bitwise equal to the reference.
#  3. SIGTERM raised in the process after step 3 (a stand-in for the scheduler's signal): the run finishes the
#     step, checkpoints step 3, exits 0; resumed, it ends bitwise equal to the reference. SIGUSR1 sent from
#     outside to mpirun (which forwards it to the ranks) during a long run: exit 0 with a checkpoint of the
#     step it stopped after.
#  4. Damaged checkpoints: a flipped byte and a truncated shard are refused naming the file (`hydistill
#     inspect` and train.resume PATH); `train.resume auto` reports the damaged newest checkpoint and resumes
#     from the previous one; a shard missing from its folder is refused naming it.
#  5. Divergence (train.lr 1e30): after train.max_bad_steps skipped steps in a row the run exits 1 naming
#     the checkpoint of the last good state, which verifies.
# Usage: bash test_faults.sh HYDISTILL SOURCE_DIR MPIRUN [MPIRUN FLAGS...]   (MPIRUN runs 2 ranks)
set -u
HYD="$1"
SRC="$2"
shift 2
PAR_MPIRUN=("$@")
# shellcheck source=tests/parallel/par_lib.sh
source "$SRC/tests/parallel/par_lib.sh"
MPIRUN=("${MPIRUN2[@]}")
export OMP_NUM_THREADS=1
par_train_setup "batch_size = 2" "steps = 8" "[parallel]
dp = 2
[checkpoint]
interval = 2
keep_last = 10"
train2() { "${MPIRUN[@]}" "$HYD" train --config "$WORK/tiny.ini" "$@"; }
same_as_ref() {  # RUN_DIR: metrics and the final checkpoint's state files bitwise equal to the reference
  python3 - "$WORK/ref" "$1" <<'PY'
import json, sys
load = lambda d: [json.loads(l) for l in open(d + "/metrics.jsonl") if l.strip()]
a, b = load(sys.argv[1]), load(sys.argv[2])
assert len(a) == len(b), (len(a), len(b))
for x, y in zip(a, b):
    for k in ("step", "loss", "grad_norm", "val_loss", "tokens"):
        assert x.get(k) == y.get(k), (k, x, y)
sha = lambda d: {f["name"]: f["sha256"] for f in json.load(open(d + "/step-00000008/manifest.json"))["files"]
                 if f["name"].startswith("rank-")}
assert sha(sys.argv[1]) == sha(sys.argv[2]) and len(sha(sys.argv[1])) == 2
print("  bitwise equal to the uninterrupted run")
PY
}

train2 --run.dir "$WORK/ref" >"$WORK/ref.out" 2>&1 || { cat "$WORK/ref.out"; fail "reference run failed"; }

echo "1. rank 1 killed while writing the step-4 checkpoint"
HYD_FAULT_KILL_IN_CHECKPOINT=4 train2 --run.dir "$WORK/crash" >"$WORK/crash1.out" 2>&1 && fail "the killed job exited 0"
[ -d "$WORK/crash/step-00000002" ] || fail "step 2 checkpoint missing"
[ ! -e "$WORK/crash/step-00000004" ] || fail "a partial step-4 checkpoint was published"
[ -d "$WORK/crash/step-00000004.tmp" ] || fail "expected the partial step-00000004.tmp folder"
train2 --run.dir "$WORK/crash" --train.resume auto >"$WORK/crash2.out" 2>&1 || { cat "$WORK/crash2.out"; fail "resume after the crash"; }
grep -q "resumed from .*step-00000002" "$WORK/crash2.out" || { cat "$WORK/crash2.out"; fail "did not resume from step 2"; }
same_as_ref "$WORK/crash" || fail "crash + resume differs from the reference"

echo "2. both ranks killed after step 7 (last checkpoint: step 6)"
HYD_FAULT_KILL_AFTER_STEP=7 train2 --run.dir "$WORK/kill" >"$WORK/kill1.out" 2>&1 && fail "the killed job exited 0"
train2 --run.dir "$WORK/kill" --train.resume auto >"$WORK/kill2.out" 2>&1 || { cat "$WORK/kill2.out"; fail "resume after kill"; }
grep -q "resumed from .*step-00000006" "$WORK/kill2.out" || { cat "$WORK/kill2.out"; fail "did not resume from step 6"; }
same_as_ref "$WORK/kill" || fail "kill + resume differs from the reference"

echo "3. SIGTERM after step 3, then SIGUSR1 from outside"
HYD_FAULT_TERM_AFTER_STEP=3 train2 --run.dir "$WORK/term" >"$WORK/term1.out" 2>&1 || { cat "$WORK/term1.out"; fail "SIGTERM: exit not 0"; }
grep -q "received SIGTERM: stopped after step 3 with a checkpoint" "$WORK/term1.out" || { cat "$WORK/term1.out"; fail "SIGTERM message"; }
[ -f "$WORK/term/step-00000003/manifest.json" ] || fail "SIGTERM: no step-3 checkpoint"
train2 --run.dir "$WORK/term" --train.resume auto >"$WORK/term2.out" 2>&1 || { cat "$WORK/term2.out"; fail "resume after SIGTERM"; }
same_as_ref "$WORK/term" || fail "SIGTERM + resume differs from the reference"
# exec: $! is mpirun itself, not a subshell around it.
(exec "${MPIRUN[@]}" "$HYD" train --config "$WORK/tiny.ini" --run.dir "$WORK/usr1" --train.steps 100000 \
  --checkpoint.interval 0 >"$WORK/usr1.out" 2>&1) &
pid=$!
for _ in $(seq 1 600); do
  [ -f "$WORK/usr1/metrics.jsonl" ] && [ "$(wc -l <"$WORK/usr1/metrics.jsonl")" -ge 2 ] && break
  sleep 0.1
done
kill -USR1 "$pid" 2>/dev/null || fail "SIGUSR1: mpirun is gone"
for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && { kill -9 "$pid"; fail "SIGUSR1: the run did not stop within 60 s"; }
wait "$pid"
rc=$?
[ "$rc" = 0 ] || { cat "$WORK/usr1.out"; fail "SIGUSR1: exit $rc"; }
stopped=$(sed -n 's/.*received SIGUSR1: stopped after step \([0-9]*\) with a checkpoint.*/\1/p' "$WORK/usr1.out")
[ -n "$stopped" ] || { cat "$WORK/usr1.out"; fail "SIGUSR1 message"; }
[ -f "$WORK/usr1/$(printf 'step-%08d' "$stopped")/rank-00001.safetensors" ] || fail "SIGUSR1: no checkpoint of step $stopped"
echo "  SIGUSR1 via mpirun: stopped after step $stopped with a checkpoint"

echo "4. damaged checkpoints"
cp -r "$WORK/ref" "$WORK/dmg"
python3 - "$WORK/dmg/step-00000008/rank-00001.safetensors" <<'PY'
import os, sys
p = sys.argv[1]
with open(p, "r+b") as f:
    f.seek(os.path.getsize(p) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0x40]))
PY
"$HYD" inspect "$WORK/dmg/step-00000008" >"$WORK/i1.out" 2>&1 && fail "inspect accepted a flipped byte"
grep -q "rank-00001.safetensors.*sha256" "$WORK/i1.out" || { cat "$WORK/i1.out"; fail "flipped byte: the error does not name the file and sha256"; }
train2 --run.dir "$WORK/dmg_r" --train.resume "$WORK/dmg/step-00000008" >"$WORK/r1.out" 2>&1 && fail "resume PATH accepted a flipped byte"
grep -q "rank-00001.safetensors" "$WORK/r1.out" || { cat "$WORK/r1.out"; fail "resume PATH: the file is not named"; }
train2 --run.dir "$WORK/dmg" --train.resume auto >"$WORK/r2.out" 2>&1 || { cat "$WORK/r2.out"; fail "resume auto past a damaged checkpoint"; }
grep -q "resumed from .*step-00000006" "$WORK/r2.out" || { cat "$WORK/r2.out"; fail "resume auto did not fall back to step 6"; }
truncate -s -100 "$WORK/ref/step-00000006/rank-00000.safetensors" 2>/dev/null || fail "truncate"
"$HYD" inspect "$WORK/ref/step-00000006" >"$WORK/i2.out" 2>&1 && fail "inspect accepted a truncated shard"
grep -q "rank-00000.safetensors.*size" "$WORK/i2.out" || { cat "$WORK/i2.out"; fail "truncated: the error does not name the file and size"; }
rm "$WORK/ref/step-00000004/rank-00001.safetensors"
"$HYD" inspect "$WORK/ref/step-00000004" >"$WORK/i3.out" 2>&1 && fail "inspect accepted a missing shard"
grep -q "rank-00001.safetensors.*missing" "$WORK/i3.out" || { cat "$WORK/i3.out"; fail "missing shard: not named"; }
"$HYD" inspect "$WORK/ref/step-00000008" >"$WORK/i4.out" 2>&1 || { cat "$WORK/i4.out"; fail "inspect of a good sharded checkpoint"; }
grep -q "topology         2 state files (sharded, ZeRO-1), written by dp 2 x sp 1 ranks" "$WORK/i4.out" || { cat "$WORK/i4.out"; fail "inspect: topology line"; }

echo "5. divergence"
train2 --run.dir "$WORK/nan" --train.lr 1e30 --train.max_bad_steps 2 --checkpoint.interval 0 >"$WORK/nan.out" 2>&1
rc=$?
[ "$rc" = 1 ] || { cat "$WORK/nan.out"; fail "divergence: exit $rc, expected 1"; }
ck=$(sed -n 's/.*the state before them is checkpointed in \([^;]*\);.*/\1/p' "$WORK/nan.out" | head -n 1)
[ -n "$ck" ] && [ -d "$ck" ] || { cat "$WORK/nan.out"; fail "divergence: no checkpoint named"; }
"$HYD" inspect "$ck" >"$WORK/i5.out" 2>&1 || { cat "$WORK/i5.out"; fail "the divergence checkpoint does not verify"; }
echo "PASS"

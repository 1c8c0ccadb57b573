# Helpers shared by the multi-rank distill tests of tests/parallel (sourced, not run). Set HYD (hydistill),
# SRC (the source tree) and MPIRUN4 (the launcher with `-np 4` and its flags, an array) before sourcing. Defines:
#   WORK                     a scratch folder, removed at exit
#   MPIRUN2                  MPIRUN4 with 2 ranks
#   fail MSG                 print FAIL and exit 1
#   par_distill_setup TEACHER_DIR
#                            skips (77) without python3 h5py; writes $WORK/tiny.h5 (Markov documents of 3..89
#                            tokens: shorter than a slice and across slice boundaries) and $WORK/distill.ini (a KA
#                            student of TEACHER_DIR, seq_len 128, 4 stage-1 + 4 stage-2 steps, a record per step,
#                            no periodic checkpoints, 2 held-out batches)
#   par_run NAME [LAUNCHER...] -- ARGS...
#                            hydistill distill --config $WORK/distill.ini --run.dir $WORK/NAME ARGS under LAUNCHER
#                            (output in $WORK/NAME.out); a failure prints it and fails
MPIRUN2=()
for a in "${MPIRUN4[@]}"; do [ "$a" = 4 ] && MPIRUN2+=(2) || MPIRUN2+=("$a"); done
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hyd_par.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
fail() {
  echo "FAIL: $*"
  exit 1
}

par_distill_setup() {
  local teacher=$1
  python3 -c "import h5py" 2>/dev/null || { echo "SKIP: python3 h5py not available"; exit 77; }
  [ -f "$teacher/config.json" ] || fail "missing teacher $teacher"
  python3 "$SRC/tests/cli/synthetic_data.py" markov "$WORK/tiny.h5" --vocab 200 --docs 300 --min-len 3 --max-len 90 \
    || fail "could not write the synthetic dataset"
  cat >"$WORK/distill.ini" <<EOF2
device = cpu
[teacher]
dir = $teacher
[student]
pattern = KA
[data]
path = $WORK/tiny.h5
val_fraction = 0.1
seq_len = 128
[train]
seed = 3
grad_clip = 1.0
[distill]
stage1_steps = 4
stage1_lr = 3e-3
stage2_steps = 4
stage2_lr = 1e-3
warmup_steps = 1
w_ce = 0.5
[log]
interval = 1
[checkpoint]
interval = 0
[eval]
batches = 2
EOF2
}

par_run() {
  local name=$1
  shift
  local launcher=()
  while [ "$1" != "--" ]; do
    launcher+=("$1")
    shift
  done
  shift
  OMP_NUM_THREADS=1 "${launcher[@]}" "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/$name" "$@" \
    >"$WORK/$name.out" 2>&1 || { cat "$WORK/$name.out"; fail "$name run failed"; }
}

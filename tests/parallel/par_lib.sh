# Helpers shared by the multi-rank CLI tests of tests/parallel (sourced, not run). Set HYD (hydistill),
# SRC (the source tree) and PAR_MPIRUN (the launcher with its `-np N` and flags, an array) before sourcing.
# Defines:
#   WORK                     a scratch folder, removed at exit (background jobs of the test killed first)
#   MPIRUN2, MPIRUN4         PAR_MPIRUN with 2 and 4 ranks
#   fail MSG                 print FAIL and exit 1
#   par_train_setup DATA_LINES TRAIN_LINES TAIL
#                            skips (77) without python3 h5py; writes $WORK/tiny.h5 (Markov documents of 10..59
#                            tokens, vocabulary 64) and $WORK/tiny.ini: a 2-layer llama of hidden 32, seq_len 32,
#                            lr 1e-2 with 1 warm-up step, a record per step, 2 held-out batches at the end; the
#                            extra lines go into [data] and [train], TAIL (more sections) at the end
#   par_distill_setup TEACHER_DIR
#                            skips (77) without python3 h5py; writes $WORK/tiny.h5 (Markov documents of 3..89
#                            tokens: shorter than a slice and across slice boundaries) and $WORK/distill.ini (a KA
#                            student of TEACHER_DIR, seq_len 128, 4 stage-1 + 4 stage-2 steps, a record per step,
#                            no periodic checkpoints, 2 held-out batches)
#   par_run NAME [LAUNCHER...] -- ARGS...
#                            hydistill distill --config $WORK/distill.ini --run.dir $WORK/NAME ARGS under LAUNCHER
#                            (output in $WORK/NAME.out); a failure prints it and fails
MPIRUN2=()
MPIRUN4=()
par_prev=""
for a in "${PAR_MPIRUN[@]}"; do
  if [ "$par_prev" = "-np" ] || [ "$par_prev" = "-n" ]; then
    MPIRUN2+=(2)
    MPIRUN4+=(4)
  else
    MPIRUN2+=("$a")
    MPIRUN4+=("$a")
  fi
  par_prev=$a
done
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hyd_par.XXXXXX")"
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
fail() {
  echo "FAIL: $*"
  exit 1
}

par_need_h5py() {
  python3 -c "import h5py" 2>/dev/null || { echo "SKIP: python3 h5py not available"; exit 77; }
}

par_train_setup() {
  par_need_h5py
  python3 "$SRC/tests/cli/synthetic_data.py" markov "$WORK/tiny.h5" --vocab 64 --docs 200 --min-len 10 --max-len 60 \
    || fail "could not write the synthetic dataset"
  cat >"$WORK/tiny.ini" <<EOF2
device = cpu
[model]
hidden_size = 32
intermediate_size = 64
num_layers = 2
num_heads = 4
num_kv_heads = 2
max_position_embeddings = 32
[data]
path = $WORK/tiny.h5
val_fraction = 0.1
seq_len = 32
$1
[train]
lr = 1e-2
warmup_steps = 1
$2
[log]
interval = 1
eval_interval = 0
eval_batches = 2
$3
EOF2
}

par_distill_setup() {
  local teacher=$1
  par_need_h5py
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

#!/usr/bin/env bash
# Smoke test of `hydistill train` on the CPU: a tiny synthetic dataset (python3 + h5py), ~20 steps of a
# tiny model. Asserts exit 0, metrics.jsonl records with the required keys, a falling loss, the
# effective config.ini, and that a second run into the same run.dir without run.overwrite fails
# naming metrics.jsonl and leaves it untouched.
# Usage: bash test_train_smoke.sh HYDISTILL SOURCE_DIR
#   HYD_SMOKE_DEVICE=cuda runs the same on a GPU (default cpu).
set -u
HYD="$1"
DEVICE="${HYD_SMOKE_DEVICE:-cpu}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hyd_train_smoke.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

python3 - "$WORK/tiny.h5" <<'PY' || fail "could not write the synthetic dataset"
import sys
import h5py
import numpy as np

# Documents from a sparse random Markov chain over 64 tokens (each token has 2 likely successors):
# the unigram entropy is ~ln(63), a model that learns bigrams gets to ~ln(2).
rng = np.random.default_rng(0)
V, eos = 64, 0
succ = rng.integers(1, V, size=(V, 2))
docs = []
for _ in range(400):
    n = int(rng.integers(20, 80))
    t = [int(rng.integers(1, V))]
    for _ in range(n - 1):
        t.append(int(succ[t[-1], rng.integers(0, 2)]))
    docs.append(t + [eos])
tokens = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs])
offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
with h5py.File(sys.argv[1], "w") as f:
    f.create_dataset("tokens", data=tokens)
    f.create_dataset("doc_offsets", data=offsets)
    f.attrs["vocab_size"] = V
    f.attrs["eos_id"] = eos
    f.attrs["tokenizer_sha256"] = "0" * 64
PY

cat > "$WORK/tiny.ini" <<EOF2
device = cpu
[run]
dir = $WORK/run
[model]
hidden_size = 64
intermediate_size = 128
num_layers = 2
num_heads = 4
num_kv_heads = 2
max_position_embeddings = 64
[data]
path = $WORK/tiny.h5
val_fraction = 0.05
seq_len = 64
batch_size = 4
[train]
steps = 20
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
weight_decay = 0.0
[log]
interval = 2
eval_interval = 10
eval_batches = 2
EOF2

# Overrides on the command line win over the file (steps 20 -> 24).
"$HYD" train --config "$WORK/tiny.ini" --device "$DEVICE" --train.steps 24 >"$WORK/out1.txt" 2>"$WORK/err1.txt"
rc=$?
cat "$WORK/out1.txt"
[ "$rc" -eq 0 ] || { cat "$WORK/err1.txt"; fail "train exited with $rc"; }
grep -q "step 24/24 | loss" "$WORK/out1.txt" || fail "no progress line for step 24/24 in stdout"
grep -q "val_loss" "$WORK/out1.txt" || fail "no evaluation line in stdout"
[ -f "$WORK/run/config.ini" ] || fail "run/config.ini was not written"
grep -Eq "^steps = 24$" "$WORK/run/config.ini" || fail "config.ini does not record the overridden train.steps = 24"
grep -Eq "^path = $WORK/tiny.h5$" "$WORK/run/config.ini" || fail "config.ini does not record data.path"

python3 - "$WORK/run/metrics.jsonl" "$WORK/tiny.h5" <<'PY' || fail "metrics.jsonl check failed"
import json, math, sys
import h5py
import numpy as np
counts = np.bincount(h5py.File(sys.argv[2], "r")["tokens"][:])
p = counts[counts > 0] / counts.sum()
unigram_entropy = float(-(p * np.log(p)).sum())
recs = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in recs if "loss" in r]
evals = [r for r in recs if "val_loss" in r]
assert len(train) == 12, f"expected 12 training records (24 steps / interval 2), got {len(train)}"
for r in train:
    for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "tokens"):
        assert k in r, f"record {r} lacks '{k}'"
        assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), f"'{k}' not a finite number in {r}"
assert [r["step"] for r in train] == list(range(2, 25, 2)), [r["step"] for r in train]
assert train[-1]["tokens"] == 24 * 4 * 64, train[-1]["tokens"]
first, last = train[0]["loss"], train[-1]["loss"]
print(f"loss {first:.3f} -> {last:.3f}; val_loss {[round(r['val_loss'], 3) for r in evals]}; "
      f"unigram entropy {unigram_entropy:.3f}")
assert last < first - 1.0, f"loss did not fall enough: {first} -> {last}"
assert [r["step"] for r in evals] == [10, 20, 24], [r["step"] for r in evals]
assert evals[-1]["val_loss"] < unigram_entropy - 1.0, (evals, unigram_entropy)
PY

# A second run into the same run.dir without run.overwrite: non-zero exit naming metrics.jsonl,
# metrics.jsonl byte-identical.
cp "$WORK/run/metrics.jsonl" "$WORK/metrics.before"
"$HYD" train --config "$WORK/tiny.ini" --device "$DEVICE" >"$WORK/out2.txt" 2>"$WORK/err2.txt"
rc=$?
cat "$WORK/err2.txt"
[ "$rc" -ne 0 ] || fail "second run into the same run.dir succeeded"
grep -q "metrics.jsonl" "$WORK/err2.txt" || fail "the error does not name metrics.jsonl"
cmp -s "$WORK/run/metrics.jsonl" "$WORK/metrics.before" || fail "metrics.jsonl was modified by the refused run"

# With run.overwrite the same run dir is accepted (and metrics.jsonl starts afresh).
"$HYD" train --config "$WORK/tiny.ini" --device "$DEVICE" --run.overwrite true --train.steps 2 >"$WORK/out3.txt" 2>"$WORK/err3.txt" ||
  { cat "$WORK/err3.txt"; fail "run.overwrite = true run failed"; }
[ "$(grep -c '"loss"' "$WORK/run/metrics.jsonl")" -eq 1 ] || fail "overwrite did not start a fresh metrics.jsonl"
echo "PASS"

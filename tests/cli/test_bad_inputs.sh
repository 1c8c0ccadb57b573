#!/usr/bin/env bash
# Bad inputs to the hydistill CLI: every case must exit non-zero AND name, on stderr, the file and
# the item (key, tensor) that is wrong, with the `hydistill: error:` prefix. Valid inputs next to the
# bad ones must pass, so that each failure is about the one defect introduced.
# Usage: bash test_bad_inputs.sh HYDISTILL SOURCE_DIR
set -u
HYD="$1"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hyd_bad_inputs.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# expect_error NAME WANT_RC NEEDLE... -- CMD...: runs CMD, checks the exit code (WANT_RC, or any
# non-zero for "nz") and that stderr holds the error prefix and every NEEDLE.
expect_error() {
  local name="$1" want="$2"
  shift 2
  local needles=()
  while [ "$1" != "--" ]; do needles+=("$1"); shift; done
  shift
  "$@" >"$WORK/out.txt" 2>"$WORK/err.txt"
  local rc=$?
  if [ "$rc" -eq 0 ]; then fail "$name: exit code 0"; return; fi
  if [ "$want" != "nz" ] && [ "$rc" -ne "$want" ]; then fail "$name: exit code $rc, expected $want"; fi
  grep -q "^hydistill: error: " "$WORK/err.txt" || fail "$name: no 'hydistill: error:' line on stderr"
  for n in "${needles[@]}"; do
    grep -qF -- "$n" "$WORK/err.txt" || fail "$name: stderr does not name '$n'"
  done
  echo "ok   $name (exit $rc): $(head -c 300 "$WORK/err.txt")"
}

expect_ok() {
  local name="$1"
  shift
  "$@" >"$WORK/out.txt" 2>"$WORK/err.txt" || { fail "$name: exit $? ($(cat "$WORK/err.txt"))"; return; }
  echo "ok   $name"
}

# ---------------------------------------------------------------- config files
python3 - "$WORK/data.h5" <<'PY' || { echo "FAIL: could not write the dataset"; exit 1; }
import sys
import h5py
import numpy as np
rng = np.random.default_rng(1)
docs = [rng.integers(1, 32, size=int(rng.integers(5, 40))).astype(np.int32) for _ in range(200)]
with h5py.File(sys.argv[1], "w") as f:
    f.create_dataset("tokens", data=np.concatenate(docs))
    f.create_dataset("doc_offsets", data=np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64))
    f.attrs["vocab_size"] = 32
    f.attrs["eos_id"] = 0
    f.attrs["tokenizer_sha256"] = "0" * 64
PY

write_ini() {  # write_ini FILE DATA_PATH EXTRA_LINES
  cat > "$1" <<EOF2
device = cpu
[run]
dir = $WORK/run-$(basename "$1" .ini)
[model]
hidden_size = 32
intermediate_size = 64
num_layers = 1
num_heads = 2
num_kv_heads = 1
max_position_embeddings = 64
[data]
path = $2
seq_len = 32
batch_size = 2
val_fraction = 0.2
[train]
steps = 2
[log]
eval_batches = 1
$3
EOF2
}

write_ini "$WORK/good.ini" "$WORK/data.h5" ""
expect_ok "valid config trains" "$HYD" train --config "$WORK/good.ini"

grep -v "^path = " "$WORK/good.ini" > "$WORK/missing_key.ini"
expect_error "missing config key" 2 "$WORK/missing_key.ini" "data.path" "missing" -- \
  "$HYD" train --config "$WORK/missing_key.ini"

write_ini "$WORK/unknown_key.ini" "$WORK/data.h5" "[train]
learning_rate = 1e-3"
expect_error "unknown config key" 2 "$WORK/unknown_key.ini" "train.learning_rate" "unknown key" -- \
  "$HYD" train --config "$WORK/unknown_key.ini"

expect_error "unknown command-line option" 2 "command line" "train.learnig_rate" -- \
  "$HYD" train --config "$WORK/good.ini" --train.learnig_rate 1e-3

write_ini "$WORK/bad_value.ini" "$WORK/data.h5" "[train]
warmup_steps = soon"
expect_error "malformed value" 2 "$WORK/bad_value.ini" "train.warmup_steps" "soon" -- \
  "$HYD" train --config "$WORK/bad_value.ini"

expect_error "nonexistent config file" 2 "$WORK/nope.ini" -- "$HYD" train --config "$WORK/nope.ini"

write_ini "$WORK/no_data.ini" "$WORK/missing/corpus.h5" ""
expect_error "nonexistent dataset path" 2 "$WORK/no_data.ini" "data.path" "$WORK/missing/corpus.h5" -- \
  "$HYD" train --config "$WORK/no_data.ini"
[ -e "$WORK/run-no_data" ] && fail "nonexistent dataset path: the run directory was created"

write_ini "$WORK/small_vocab.ini" "$WORK/data.h5" "[model]
vocab_size = 16"
expect_error "vocab smaller than the dataset's" 2 "model.vocab_size" "16" "32" "$WORK/data.h5" -- \
  "$HYD" train --config "$WORK/small_vocab.ini"

head -c 100 "$WORK/data.h5" > "$WORK/truncated.h5"
write_ini "$WORK/bad_data.ini" "$WORK/truncated.h5" ""
expect_error "truncated dataset" nz "$WORK/truncated.h5" -- "$HYD" train --config "$WORK/bad_data.ini"
expect_error "inspect a truncated dataset" nz "$WORK/truncated.h5" -- "$HYD" inspect "$WORK/truncated.h5"
expect_error "inspect a nonexistent path" 2 "$WORK/nothing.h5" -- "$HYD" inspect "$WORK/nothing.h5"
expect_ok "inspect a valid dataset" "$HYD" inspect "$WORK/data.h5"
grep -q "unigram entropy" "$WORK/out.txt" || fail "inspect DATASET does not print the unigram entropy"

# ---------------------------------------------------------------- teacher directories
# make_teacher DIR [MODE]: a 1-layer llama in HF layout; MODE "bad_shape" gives q_proj a wrong shape.
make_teacher() {
  python3 - "$1" "${2:-}" <<'PY'
import json, os, sys
import numpy as np
from safetensors.numpy import save_file
d, mode = sys.argv[1], sys.argv[2]
os.makedirs(d, exist_ok=True)
V, D, F, H, KV, hd = 64, 32, 48, 4, 2, 8
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
       "intermediate_size": F, "num_hidden_layers": 1, "num_attention_heads": H, "num_key_value_heads": KV,
       "head_dim": hd, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
       "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32",
       "bos_token_id": 1, "eos_token_id": 2}
json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=1)
r = np.random.default_rng(0)
w = lambda *s: (0.02 * r.standard_normal(s)).astype(np.float32)
t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": np.ones(D, np.float32), "lm_head.weight": w(V, D),
     "model.layers.0.input_layernorm.weight": np.ones(D, np.float32),
     "model.layers.0.post_attention_layernorm.weight": np.ones(D, np.float32),
     "model.layers.0.self_attn.q_proj.weight": w(H * hd, D), "model.layers.0.self_attn.k_proj.weight": w(KV * hd, D),
     "model.layers.0.self_attn.v_proj.weight": w(KV * hd, D), "model.layers.0.self_attn.o_proj.weight": w(D, H * hd),
     "model.layers.0.mlp.gate_proj.weight": w(F, D), "model.layers.0.mlp.up_proj.weight": w(F, D),
     "model.layers.0.mlp.down_proj.weight": w(D, F)}
if mode == "bad_shape":
    t["model.layers.0.self_attn.q_proj.weight"] = w(H * hd + 8, D)
save_file(t, os.path.join(d, "model.safetensors"))
PY
}

if make_teacher "$WORK/teacher"; then
  expect_ok "inspect a valid teacher" "$HYD" inspect "$WORK/teacher"

  make_teacher "$WORK/teacher_truncated"
  size=$(stat -c %s "$WORK/teacher_truncated/model.safetensors")
  truncate -s $((size - 1000)) "$WORK/teacher_truncated/model.safetensors"
  expect_error "truncated model.safetensors" nz "$WORK/teacher_truncated/model.safetensors" -- \
    "$HYD" inspect "$WORK/teacher_truncated"

  make_teacher "$WORK/teacher_bad_shape" bad_shape
  expect_error "wrong tensor shape" nz "teacher_bad_shape" "model.layers.0.self_attn.q_proj.weight" -- \
    "$HYD" inspect "$WORK/teacher_bad_shape"
else
  fail "could not write the teacher directories (python3 with numpy and safetensors)"
fi

expect_error "directory without config.json" 2 "$WORK/run-good" "config.json" -- "$HYD" inspect "$WORK/run-good"
expect_error "unimplemented subcommand" 2 -- "$HYD" distill --config "$WORK/good.ini"

if [ "$failures" -ne 0 ]; then
  echo "$failures failure(s)"
  exit 1
fi
echo "PASS"

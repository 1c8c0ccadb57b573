#!/usr/bin/env bash
# Multi-rank `hydistill train` and `hydistill distill` on 2 GPUs (label gpu_parallel; NCCL, one GPU per rank):
#   train   dp = 2 (ZeRO-1 over NCCL, data.batch_size 2 per rank) and sp = 2 (LASP-2H, batch 4)
#           against one GPU with batch 4: 6 optimizer steps of 2 micro-batches, a metrics record per step;
#   resume  dp = 2 run twice (run to run) and stopped after step 3 (sharded checkpoint) and resumed, each vs
#           the uninterrupted run: prints whether the metrics and the final state files are bitwise equal and
#           the first step that differs (the kernels' determinism: docs/formats.md), asserts rel. < 2e-2;
#   distill dp = 2 (gradients all-reduced over NCCL) and sp = 2 (LASP-2 / LASP-2H for student and teacher)
#           against one GPU: a random llama teacher (transformers, head dim 32 as the CUDA KDA kernels need)
#           and a KKA student, 3 stage-1 + 3 stage-2 steps; and dp = 2 x ep = 2 (expert parallelism over
#           NCCL) with a random qwen3_moe teacher whose MoE FFNs the student keeps, against one GPU.
# bf16 on GPUs: the runs do not agree to fp32 precision (the GEMMs see other shapes, the sums another order,
# and after each update the bf16 working weights round from masters that differ in the last bits, so the
# runs drift apart step by step). The first step of each stage starts from the same weights: there every
# value agrees to rel. 2e-3; later steps to rel. 2e-2 for the train loss / val_loss and the distill values
# (or abs. 2e-3 near 0), 1e-1 for the train grad_norm (the most sensitive). Token counts are exact. Also:
# device = cuda:0 with 2 ranks on one node exits 2 naming `device` (both ranks would share GPU 0).
# Usage: bash test_gpu_multirank.sh HYDISTILL SOURCE_DIR MPIRUN [MPIRUN FLAGS...]   (MPIRUN with -np 2)
set -u
HYD="$1"
SRC="$2"
shift 2
MPIRUN=("$@")
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hyd_gpu_multirank.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$gpus" -ge 2 ] || { echo "SKIP: needs 2 GPUs, $gpus visible"; exit 77; }
python3 -c "import h5py" 2>/dev/null || { echo "SKIP: python3 h5py not available"; exit 77; }
export NCCL_NVLS_ENABLE=0

python3 "$SRC/tests/cli/synthetic_data.py" markov "$WORK/tiny.h5" --vocab 256 --docs 400 --min-len 20 --max-len 300 \
  || fail "could not write the synthetic dataset"

compare() {  # compare A.jsonl B.jsonl KEY:REL,... ABS   (first step of a stage: rel. 2e-3)
  python3 - "$@" <<'PY'
import json, sys
a_path, b_path, abs_tol = sys.argv[1], sys.argv[2], float(sys.argv[4])
tols = {k: float(v) for k, v in (kv.split(":") for kv in sys.argv[3].split(","))}
load = lambda p: [json.loads(l) for l in open(p) if l.strip()]
a, b = load(a_path), load(b_path)
assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
bad = []
for x, y in zip(a, b):
    assert x.get("step") == y.get("step") and x.get("stage") == y.get("stage"), (x, y)
    first = x["step"] == 1
    for k, tol in tols.items():
        if k not in x:
            continue
        d = abs(x[k] - y[k])
        rel = d / max(abs(x[k]), 1e-30)
        limit = 2e-3 if first else tol
        ok = rel < limit or d < abs_tol
        print(f"  stage {x.get('stage', '-')} step {x['step']} {k}: {x[k]:.6g} vs {y[k]:.6g} rel {rel:.2e}"
              f" (limit {limit:g}){'' if ok else '  <-- FAIL'}")
        if not ok:
            bad.append((x.get("stage"), x["step"], k))
    for k in ("tokens", "val_tokens"):
        if k in x and x[k] != y[k]:
            bad.append((x.get("stage"), x["step"], k))
assert not bad, bad
PY
}
failed=()

# ---- train: a 4-layer llama (head dim 64), 6 steps.
cat > "$WORK/train.ini" <<EOF2
device = cuda
[model]
hidden_size = 256
intermediate_size = 512
num_layers = 4
num_heads = 4
num_kv_heads = 2
max_position_embeddings = 512
[data]
path = $WORK/tiny.h5
val_fraction = 0.1
seq_len = 256
[train]
steps = 6
grad_accum = 2
lr = 1e-3
warmup_steps = 2
grad_clip = 1.0
[log]
interval = 1
eval_interval = 0
eval_batches = 2
EOF2
"$HYD" train --config "$WORK/train.ini" --run.dir "$WORK/t1" --data.batch_size 4 >"$WORK/t1.out" 2>&1 \
  || { cat "$WORK/t1.out"; fail "train on one GPU failed"; }
"${MPIRUN[@]}" "$HYD" train --config "$WORK/train.ini" --run.dir "$WORK/tdp" --data.batch_size 2 --parallel.dp 2 \
  >"$WORK/tdp.out" 2>&1 || { cat "$WORK/tdp.out"; fail "train dp = 2 failed"; }
"${MPIRUN[@]}" "$HYD" train --config "$WORK/train.ini" --run.dir "$WORK/tsp" --data.batch_size 4 --parallel.sp 2 \
  >"$WORK/tsp.out" 2>&1 || { cat "$WORK/tsp.out"; fail "train sp = 2 failed"; }
grep -q "ZeRO-1 over 2 ranks" "$WORK/tdp.out" || { cat "$WORK/tdp.out"; fail "dp = 2: no ZeRO-1 in the header"; }
for run in tdp tsp; do
  echo "train $run vs one GPU"
  compare "$WORK/t1/metrics.jsonl" "$WORK/$run/metrics.jsonl" loss:2e-2,grad_norm:1e-1,val_loss:2e-2 0 \
    || failed+=("train $run")
done
# Run to run: the same dp = 2 run again (what the kernels' own nondeterminism alone gives; see docs/formats.md).
"${MPIRUN[@]}" "$HYD" train --config "$WORK/train.ini" --run.dir "$WORK/tdp_again" --data.batch_size 2 --parallel.dp 2 \
  >"$WORK/tdp_again.out" 2>&1 || { cat "$WORK/tdp_again.out"; fail "train dp = 2 (again) failed"; }
# Sharded checkpoints on GPUs: dp = 2 stopped after step 3 and resumed against the uninterrupted dp = 2 run.
"${MPIRUN[@]}" "$HYD" train --config "$WORK/train.ini" --run.dir "$WORK/tres" --data.batch_size 2 --parallel.dp 2 \
  --run.stop_after 3 >"$WORK/tres1.out" 2>&1 || { cat "$WORK/tres1.out"; fail "train dp = 2 stop_after 3 failed"; }
"${MPIRUN[@]}" "$HYD" train --config "$WORK/train.ini" --run.dir "$WORK/tres" --data.batch_size 2 --parallel.dp 2 \
  --train.resume auto >"$WORK/tres2.out" 2>&1 || { cat "$WORK/tres2.out"; fail "train dp = 2 resume failed"; }
echo "train dp = 2: the same run twice, and stopped after step 3 + resumed, vs uninterrupted (GPU)"
python3 - "$WORK/tdp" "$WORK/tdp_again" "$WORK/tres" <<'PY' || failed+=("train resume on GPUs")
import json, sys
load = lambda d: [json.loads(l) for l in open(d + "/metrics.jsonl") if l.strip()]
sha = lambda d: [f["sha256"] for f in json.load(open(d + "/step-00000006/manifest.json"))["files"] if f["name"].startswith("rank-")]
def diff(a_dir, b_dir):
    a, b = load(a_dir), load(b_dir)
    assert len(a) == len(b), (len(a), len(b))
    worst, bitwise, first = 0.0, True, None
    for x, y in zip(a, b):
        for k in ("loss", "grad_norm", "val_loss"):
            if k in x:
                if x[k] != y[k] and first is None:
                    first = f"step {x['step']} {k}"
                bitwise &= x[k] == y[k]
                worst = max(worst, abs(x[k] - y[k]) / max(abs(x[k]), 1e-30))
    return worst, bitwise, first, sha(a_dir) == sha(b_dir)
for name, other in (("run to run", sys.argv[2]), ("stop + resume", sys.argv[3])):
    worst, bitwise, first, same_state = diff(sys.argv[1], other)
    print(f"  {name}: metrics bitwise: {bitwise} (first difference: {first}), worst rel. {worst:.2e}; "
          f"final state files bitwise: {same_state}")
    assert worst < 2e-2, (name, worst)
PY
"${MPIRUN[@]}" "$HYD" train --config "$WORK/train.ini" --run.dir "$WORK/bad" --parallel.dp 2 --device cuda:0 \
  >"$WORK/bad.out" 2>&1
rc=$?
[ "$rc" = 2 ] && grep -q "device" "$WORK/bad.out" || { cat "$WORK/bad.out"; fail "cuda:0 with 2 ranks: exit $rc"; }

# ---- distill: a random llama teacher from transformers (skipped without it).
if python3 -c "import torch, transformers" 2>/dev/null; then
  python3 - "$WORK/teacher" <<'PY' || fail "could not write the teacher"
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1], safe_serialization=True)
PY
  cat > "$WORK/distill.ini" <<EOF2
device = cuda
[teacher]
dir = $WORK/teacher
[student]
pattern = KKA
[data]
path = $WORK/tiny.h5
val_fraction = 0.1
seq_len = 256
batch_size = 2
[train]
seed = 3
grad_clip = 1.0
[distill]
stage1_steps = 3
stage1_lr = 3e-3
stage2_steps = 3
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
  "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/d1" --data.batch_size 4 >"$WORK/d1.out" 2>&1 \
    || { cat "$WORK/d1.out"; fail "distill on one GPU failed"; }
  "${MPIRUN[@]}" "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/ddp" --parallel.dp 2 \
    >"$WORK/ddp.out" 2>&1 || { cat "$WORK/ddp.out"; fail "distill dp = 2 failed"; }
  "${MPIRUN[@]}" "$HYD" distill --config "$WORK/distill.ini" --run.dir "$WORK/dsp" --data.batch_size 4 --parallel.sp 2 \
    >"$WORK/dsp.out" 2>&1 || { cat "$WORK/dsp.out"; fail "distill sp = 2 failed"; }
  for run in ddp dsp; do
    echo "distill $run vs one GPU"
    compare "$WORK/d1/metrics.jsonl" "$WORK/$run/metrics.jsonl" mse:2e-2,kl:2e-2,ce:2e-2 2e-3 \
      || failed+=("distill $run")
  done
  # Expert parallelism on GPUs: a random qwen3_moe teacher (layers 1 and 2 MoE, 8 experts, top 2), the KKA
  # student keeps its MoE FFNs; dp 2 x ep 2 (NCCL block exchanges) against one GPU.
  python3 - "$WORK/moe_teacher" <<'PY' || fail "could not write the MoE teacher"
import sys, torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
torch.manual_seed(0)
cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                     num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2)
Qwen3MoeForCausalLM(cfg).save_pretrained(sys.argv[1], safe_serialization=True)
PY
  "$HYD" distill --config "$WORK/distill.ini" --teacher.dir "$WORK/moe_teacher" --run.dir "$WORK/dm1" \
    --data.batch_size 4 >"$WORK/dm1.out" 2>&1 || { cat "$WORK/dm1.out"; fail "MoE distill on one GPU failed"; }
  "${MPIRUN[@]}" "$HYD" distill --config "$WORK/distill.ini" --teacher.dir "$WORK/moe_teacher" --run.dir "$WORK/dmep" \
    --parallel.dp 2 --parallel.ep 2 >"$WORK/dmep.out" 2>&1 || { cat "$WORK/dmep.out"; fail "MoE distill dp 2 x ep 2 failed"; }
  grep -q "routed experts over groups of 2 expert-parallel ranks" "$WORK/dmep.out" \
    || { cat "$WORK/dmep.out"; fail "dp 2 x ep 2: no expert parallelism in the header"; }
  grep -E "^expert parallelism:" "$WORK/dmep.out" | head -n 1
  echo "distill MoE dp 2 x ep 2 vs one GPU"
  compare "$WORK/dm1/metrics.jsonl" "$WORK/dmep/metrics.jsonl" mse:2e-2,kl:2e-2,ce:2e-2 2e-3 \
    || failed+=("distill MoE dp2 x ep2")
else
  echo "distill part skipped: python3 torch / transformers not available"
fi
[ ${#failed[@]} -eq 0 ] || fail "differ from one GPU: ${failed[*]}"
echo "PASS"

#!/usr/bin/env bash
# data/make_passkey.py end to end: prompts of exact target lengths, /loss_mask exactly on the answer
# (which decodes to the inserted key), the needle and question in the text, the dataset attributes,
# determinism by seed, the file accepted by the C++ reader (hydistill inspect), and a too-short length
# failing with nothing written. Uses the tokenizer of data/corpus (bash data/make_kjv.sh) when present,
# else trains a small BPE with data/prepare.py.
#   bash tests/cli/test_make_passkey.sh <path-to-hydistill> <source-dir>
set -euo pipefail

HYD=${1:?usage: test_make_passkey.sh HYDISTILL SOURCE_DIR}
HYD="$(cd "$(dirname "$HYD")" && pwd)/$(basename "$HYD")"  # absolute: the test cds into a temp dir
SRC=$(cd "${2:?usage: test_make_passkey.sh HYDISTILL SOURCE_DIR}" && pwd)
MAKE="$SRC/data/make_passkey.py"
PY=${PYTHON:-python3}

if ! "$PY" -c "import numpy, h5py, tokenizers" 2>/dev/null; then
  echo "SKIPPED: $PY lacks numpy/h5py/tokenizers (launch/setup.sh installs them)"
  exit 77
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hyd_test_make_passkey.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# ---- tokenizer: the demo corpus's, else a small BPE trained on generated text
if [[ -f "$SRC/data/corpus/tokenizer.json" ]]; then
  TOK="$SRC/data/corpus"
else
  "$PY" - <<'EOF'
import random
rng = random.Random(3)
words = ("the pass key is remember it what grass green sky blue sun yellow here we go there and back again "
         "important information hidden inside lot of irrelevant text find memorize will quiz you about a piece").split()
with open("corpus.txt", "w") as f:
    for _ in range(300):
        f.write(" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))).capitalize() + ". "
                + str(rng.randint(0, 99999)) + ".\n\n")
EOF
  "$PY" "$SRC/data/prepare.py" --input corpus.txt --out bpe/corpus.h5 --train-bpe 400 --quiet >log_bpe.txt 2>&1 ||
    { cat log_bpe.txt; fail "prepare.py --train-bpe failed"; }
  TOK="$WORK/bpe"
fi
echo "tokenizer: $TOK"

LENGTHS=300,450,700
"$PY" "$MAKE" --tokenizer "$TOK" --lengths $LENGTHS --per-length 6 --seed 5 --out p.h5 >log.txt 2>&1 ||
  { cat log.txt; fail "make_passkey.py exited non-zero"; }
grep -q "wrote p.h5" log.txt || { cat log.txt; fail "no summary printed"; }
"$PY" "$MAKE" --tokenizer "$TOK" --lengths $LENGTHS --per-length 6 --seed 5 --out same.h5 >/dev/null
"$PY" "$MAKE" --tokenizer "$TOK" --lengths $LENGTHS --per-length 6 --seed 6 --out other.h5 >/dev/null

TOK="$TOK" LENGTHS="$LENGTHS" "$PY" - <<'EOF'
import hashlib, os, sys
import h5py, numpy as np
from tokenizers import Tokenizer

tok_dir = os.environ["TOK"]
lengths = [int(x) for x in os.environ["LENGTHS"].split(",")]
tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
sha = hashlib.sha256(open(os.path.join(tok_dir, "tokenizer.json"), "rb").read()).hexdigest()
errors = []
def check(cond, msg):
    if not cond:
        errors.append(msg)

with h5py.File("p.h5", "r") as f:
    for name in ("tokens", "doc_offsets", "loss_mask", "doc_lengths_target", "passkeys", "needle_depth"):
        check(name in f, f"/{name} missing")
    if errors:
        print("\n".join(errors)); sys.exit(1)
    t, off, m = f["tokens"][()], f["doc_offsets"][()], f["loss_mask"][()]
    nominal, keys, depth = f["doc_lengths_target"][()], f["passkeys"][()], f["needle_depth"][()]
    check(f["tokens"].dtype == np.int32, f"/tokens is {f['tokens'].dtype}, want int32")
    check(f["doc_offsets"].dtype == np.int64, "/doc_offsets is not int64")
    check(f["loss_mask"].dtype == np.uint8, "/loss_mask is not uint8")
    check(f["doc_lengths_target"].dtype == np.int64, "/doc_lengths_target is not int64")
    vocab, eos = int(f.attrs["vocab_size"]), int(f.attrs["eos_id"])
    file_sha = f.attrs["tokenizer_sha256"]
    file_sha = file_sha.decode() if isinstance(file_sha, bytes) else str(file_sha)
check(file_sha == sha, "tokenizer_sha256 is not sha256(tokenizer.json)")
check(vocab >= tok.get_vocab_size(with_added_tokens=False) and 0 <= eos < vocab, f"vocab_size {vocab} / eos_id {eos}")
D = len(off) - 1
check(D == 6 * len(lengths), f"{D} documents, want {6 * len(lengths)}")
check(list(nominal) == [n for n in lengths for _ in range(6)], f"doc_lengths_target {list(nominal)}")
check(len(m) == len(t) and off[0] == 0 and off[-1] == len(t), "mask/offsets do not span the tokens")
check(set(np.unique(m).tolist()) <= {0, 1}, "loss_mask values other than 0/1")
check(t.min() >= 0 and t.max() < vocab, "token ids outside the vocabulary")
check(len(set(keys.tolist())) > D // 2, f"keys barely vary: {keys.tolist()}")
check(0.0 <= depth.min() and depth.max() <= 1.0 and depth.max() - depth.min() > 0.3, f"needle depths {depth.tolist()}")
for d in range(D):
    if errors:
        break
    a, b = off[d], off[d + 1]
    doc, mask, key = t[a:b], m[a:b], str(keys[d])
    # The tokenizer's granularity is one token: the length is exact.
    check(b - a == nominal[d], f"document {d}: {b - a} tokens, want {nominal[d]}")
    check(doc[-1] == eos and not np.any(doc[:-1] == eos), f"document {d}: EOS not exactly at the end")
    check(mask[-1] == 0, f"document {d}: EOS is masked in")
    ones = np.flatnonzero(mask)
    check(len(ones) >= 1 and np.all(np.diff(ones) == 1) and ones[-1] == len(doc) - 2,
          f"document {d}: mask is not one run ending just before EOS: {ones.tolist()}")
    if errors:
        break
    answer = tok.decode(doc[ones].tolist())
    check(answer.strip() == key and len(key) == 5 and key.isdigit(), f"document {d}: answer {answer!r}, key {key}")
    before = tok.decode(doc[ones[0] - 1:ones[0]].tolist())
    check(not any(c.isdigit() for c in before), f"document {d}: the token before the answer holds digits: {before!r}")
    text = tok.decode(doc[:-1].tolist())
    check(f"The pass key is {key}. Remember it. {key} is the pass key." in text, f"document {d}: needle missing")
    check(text.rstrip().endswith(f"What is the pass key? The pass key is {key}") or
          text.replace("  ", " ").rstrip().endswith(f"What is the pass key? The pass key is {key}"),
          f"document {d}: ends with {text[-80:]!r}")
    check(text.count(key) == 3, f"document {d}: key appears {text.count(key)} times, want 3")

with h5py.File("same.h5", "r") as f1, h5py.File("other.h5", "r") as f2:
    check(np.array_equal(f1["tokens"][()], t) and np.array_equal(f1["loss_mask"][()], m), "same seed, different file")
    check(not np.array_equal(f2["passkeys"][()], keys), "another seed gave the same keys")
if errors:
    print("\n".join(errors[:20]))
    sys.exit(1)
print(f"make_passkey.py output OK ({D} prompts)")
EOF

# ---- the C++ reader accepts the file (extra datasets and all)
"$HYD" inspect p.h5 >inspect.txt 2>&1 || { cat inspect.txt; fail "hydistill inspect rejected p.h5"; }

# ---- a length too short for the prompt: non-zero exit, a message, nothing written
if "$PY" "$MAKE" --tokenizer "$TOK" --lengths 300,8 --per-length 2 --out short.h5 >out.txt 2>&1; then
  fail "--lengths 8 succeeded"
fi
grep -q "make_passkey.py: error: .*8 tokens is too short" out.txt || { cat out.txt; fail "no error for --lengths 8"; }
[[ ! -e short.h5 && ! -e short.h5.tmp ]] || fail "a failed run left short.h5 behind"
if "$PY" "$MAKE" --tokenizer no_such_dir --out x.h5 >out.txt 2>&1; then fail "a missing tokenizer succeeded"; fi
grep -q "no_such_dir" out.txt || { cat out.txt; fail "the error does not name the tokenizer directory"; }

echo "test_make_passkey: all checks passed"

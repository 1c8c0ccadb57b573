#!/usr/bin/env bash
# data/prepare.py end to end: text with a trained BPE, JSONL with that tokenizer as the "teacher",
# the written HDF5 checked with h5py (offsets, EOS at every document end, attributes, round trip of
# the text through the tokenizer), and bad inputs failing with the file named.
#   bash tests/cli/test_prepare.sh <path-to-hydistill> <source-dir>
set -euo pipefail

SRC=$(cd "${2:?usage: test_prepare.sh HYDISTILL SOURCE_DIR}" && pwd)
PREPARE="$SRC/data/prepare.py"
PY=${PYTHON:-python3}

if ! "$PY" -c "import numpy, h5py, tokenizers" 2>/dev/null; then
  echo "SKIPPED: $PY lacks numpy/h5py/tokenizers (launch/setup.sh installs them)"
  exit 77
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hyd_test_prepare.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# ---- inputs: 40 paragraphs separated by one or two blank lines (some with spaces), and 12 JSONL
# records (one with an empty text, which must be dropped).
"$PY" - <<'EOF'
import json, random
rng = random.Random(7)
words = ("in the beginning was word and light darkness over waters said let there be "
         "day night evening morning first second heaven earth").split()
def sentence():
    return " ".join(rng.choice(words) for _ in range(rng.randint(2, 14))).capitalize() + "."
docs = ["\n".join(sentence() for _ in range(rng.randint(1, 4))) for _ in range(40)]
with open("corpus.txt", "w") as f:
    for i, d in enumerate(docs):
        f.write(d + ("\n\n" if i % 3 else "\n  \n\n"))
json.dump(docs, open("docs_text.json", "w"))
recs = [{"id": i, "body": sentence() + " " + sentence()} for i in range(12)]
recs[5]["body"] = "   "
with open("corpus.jsonl", "w") as f:
    for r in recs:
        f.write(json.dumps(r) + "\n")
    f.write("\n")  # trailing blank line: ignored
json.dump([r["body"] for r in recs if r["body"].strip()], open("docs_jsonl.json", "w"))
EOF

# ---- text + trained BPE
"$PY" "$PREPARE" --input corpus.txt --out bpe/text.h5 --train-bpe 300 --doc-separator blank-lines >log_text.txt 2>&1 ||
  { cat log_text.txt; fail "prepare.py on text exited non-zero"; }
[[ -f bpe/tokenizer.json ]] || fail "--train-bpe did not save bpe/tokenizer.json next to the dataset"
grep -q "wrote bpe/text.h5" log_text.txt || { cat log_text.txt; fail "no summary printed"; }

# ---- JSONL with the trained tokenizer directory used as a teacher
"$PY" "$PREPARE" --input corpus.jsonl --out jsonl.h5 --tokenizer bpe --format jsonl --jsonl-field body \
  >log_jsonl.txt 2>&1 ||
  { cat log_jsonl.txt; fail "prepare.py on JSONL exited non-zero"; }

# ---- check both files
"$PY" - <<'EOF'
import hashlib, json, sys
import h5py, numpy as np
from tokenizers import Tokenizer

tok = Tokenizer.from_file("bpe/tokenizer.json")
sha = hashlib.sha256(open("bpe/tokenizer.json", "rb").read()).hexdigest()
eos = tok.token_to_id("<|endoftext|>")
errors = []
def check(cond, msg):
    if not cond:
        errors.append(msg)

for path, docs_file in (("bpe/text.h5", "docs_text.json"), ("jsonl.h5", "docs_jsonl.json")):
    docs = json.load(open(docs_file))
    with h5py.File(path, "r") as f:
        for name in ("tokens", "doc_offsets"):
            check(name in f, f"{path}: /{name} missing")
        for name in ("vocab_size", "eos_id", "tokenizer_sha256"):
            check(name in f.attrs, f"{path}: attribute {name} missing")
        if errors:
            break
        t, off = f["tokens"], f["doc_offsets"]
        check(t.dtype == np.int32 and t.ndim == 1, f"{path}: /tokens is {t.dtype} rank {t.ndim}, want int32 rank 1")
        check(off.dtype == np.int64 and off.ndim == 1, f"{path}: /doc_offsets is {off.dtype}, want int64")
        t, off = t[()], off[()]
        vocab, eos_id = int(f.attrs["vocab_size"]), int(f.attrs["eos_id"])
        file_sha = f.attrs["tokenizer_sha256"]
        file_sha = file_sha.decode() if isinstance(file_sha, bytes) else str(file_sha)
    check(vocab == 300, f"{path}: vocab_size {vocab}, want 300")
    check(eos_id == eos, f"{path}: eos_id {eos_id}, want {eos} (<|endoftext|>)")
    check(file_sha == sha, f"{path}: tokenizer_sha256 {file_sha} != sha256(tokenizer.json) {sha}")
    check(len(off) == len(docs) + 1, f"{path}: {len(off) - 1} documents, want {len(docs)}")
    check(off[0] == 0 and off[-1] == len(t), f"{path}: offsets span [{off[0]}, {off[-1]}], want [0, {len(t)}]")
    check(bool(np.all(np.diff(off) >= 2)), f"{path}: a document shorter than text + EOS")
    check(t.min() >= 0 and t.max() < vocab, f"{path}: token ids outside [0, {vocab})")
    if errors:
        break
    for d in range(len(docs)):
        piece = t[off[d]:off[d + 1]]
        check(piece[-1] == eos_id, f"{path}: document {d} does not end with EOS")
        check(not np.any(piece[:-1] == eos_id), f"{path}: EOS inside document {d}")
        text = tok.decode(piece[:-1].tolist())
        check(text == docs[d].strip(), f"{path}: document {d} decodes to {text!r}, want {docs[d].strip()!r}")
if errors:
    print("\n".join(errors[:20]))
    sys.exit(1)
print("prepare.py outputs OK")
EOF

# ---- --doc-separator lines / file give the expected document counts
"$PY" "$PREPARE" --input corpus.txt --out lines.h5 --tokenizer bpe --doc-separator lines --quiet >/dev/null
"$PY" "$PREPARE" --input corpus.txt corpus.txt --out file.h5 --tokenizer bpe --doc-separator file --quiet >/dev/null
"$PY" - <<'EOF'
import h5py, sys
lines = sum(1 for l in open("corpus.txt") if l.strip())
n_lines = len(h5py.File("lines.h5", "r")["doc_offsets"]) - 1
n_file = len(h5py.File("file.h5", "r")["doc_offsets"]) - 1
if n_lines != lines or n_file != 2:
    print(f"lines: {n_lines} documents (want {lines}); file: {n_file} (want 2)")
    sys.exit(1)
EOF

# ---- bad inputs: non-zero exit, the offending file named, nothing written
expect_failure() {  # expect_failure NEEDLE ARGS...
  local needle=$1
  shift
  if "$PY" "$PREPARE" "$@" >out.txt 2>&1; then
    cat out.txt
    fail "prepare.py $* succeeded"
  fi
  grep -qF -- "$needle" out.txt || { cat out.txt; fail "error for '$*' does not name '$needle'"; }
}
expect_failure "no_such_file.txt" --input corpus.txt no_such_file.txt --out bad.h5 --train-bpe 300
[[ ! -e bad.h5 && ! -e bad.h5.tmp ]] || fail "a failed run left bad.h5 behind"
expect_failure "corpus.jsonl:1" --input corpus.jsonl --out bad.h5 --tokenizer bpe --jsonl-field missing_field
expect_failure "no_teacher" --input corpus.txt --out bad.h5 --tokenizer no_teacher
[[ ! -e bad.h5 ]] || fail "a failed run left bad.h5 behind"

echo "test_prepare: all checks passed"

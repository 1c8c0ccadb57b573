#!/usr/bin/env python3
"""Teacher training data for bench/distill/run_real.sh: a token corpus (KJV) with synthetic passkey
retrieval documents mixed in, so that the teacher learns to retrieve pass keys and the students'
passkey accuracy means something.

    python3 bench/distill/make_mix.py --corpus data/corpus/kjv.h5 --tokenizer data/corpus \\
        --exclude-keys passkey_eval.h5 --passkey-fraction 0.25 --copy-fraction 0.4 --max-len 1024 \\
        --seed 7 --out DIR/mix.h5 --val-fraction 0.05 --split-seed 1234 --eval-tokens-per-batch 4096

Layout of OUT (docs/formats.md, no /loss_mask: every token is a target):
  documents [0, D_corpus)   the corpus' documents, unchanged and in the same order, so that the
                            train/validation split (a hash of (data.seed, document index)) puts exactly
                            the same corpus documents in validation as it does for the corpus file
                            itself: `hydistill eval --data.path CORPUS` then measures held-out loss on
                            corpus documents that neither the teacher nor the students trained on.
  then, shuffled together:
  passkey prompts           (--passkey-fraction of all documents) data/make_passkey.py's template and
                            filler, lengths uniform in [--min-len, --max-len], needle at a uniform depth.
  number lists              (--copy-fraction of all documents) " 48213 90871 11234 60407." said 3 to 5
                            times in a row (4 to 8 random 5-digit numbers): dense in-context copying of
                            the very tokens pass keys are made of. Small models trained on passkey
                            prompts alone learn retrieval late and abruptly (an induction-head phase
                            change); these documents bring it forward. Measured on the CPU with
                            data/make_passkey.py prompts of 100..250 tokens (4 layers, hidden 128,
                            4 x 256 tokens per step, lr 2e-3 cosine over 2500 steps; exact retrieval of
                            40 prompts of 128 and 256 tokens at steps 1000 / 1500 / 2000 / 2500):
                            passkey prompts only: 0 / 3 / 15 / 37 of 40; half the documents number
                            lists: 0 / 32 / 39 / 39 of 40.
Every 5-digit number of the synthetic documents is drawn from a seed of its own and is never a key of
the evaluation prompts (--exclude-keys), so no evaluation prompt is seen in training.
The corpus' tokenizer.json (+ tokenizer_config.json) is copied next to OUT, so that `hydistill export`
of the teacher's train checkpoint finds it (the file's hash must be the dataset's tokenizer_sha256).

Prints a JSON summary last (one line, prefixed 'MIX '): documents and tokens of each part, and the
corpus' and the mix's validation splits under (--split-seed, --val-fraction): documents, tokens and how
many held-out batches of --eval-tokens-per-batch tokens each holds (hydistill's PackedSampler split,
reimplemented; checked against `hydistill train`'s printed split sizes).
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "data"))
from make_passkey import PromptBuilder  # noqa: E402
from prepare import PrepareError, teacher_tokenizer  # noqa: E402

MASK64 = (1 << 64) - 1
SPLIT_SALT = 0x53504C4954210001  # data/dataset.cpp kSplitSalt


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def split_uniform(seed, doc):
    """data/dataset.cpp split_uniform: document `doc` is held out iff this is < val_fraction."""
    h = splitmix64(splitmix64((seed ^ SPLIT_SALT) & MASK64) ^ doc)
    return (h >> 11) * 2.0 ** -53


def parse_args(argv):
    p = argparse.ArgumentParser(prog="make_mix.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--corpus", required=True, help="token dataset of the real text (data/make_kjv.sh)")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="the corpus' tokenizer directory")
    p.add_argument("--exclude-keys", metavar="PASSKEY.h5", help="passkey file whose /passkeys must not be reused")
    p.add_argument("--passkey-fraction", type=float, default=0.25, help="passkey prompts / all documents")
    p.add_argument("--copy-fraction", type=float, default=0.0, help="number lists / all documents")
    p.add_argument("--min-len", type=int, default=0, help="shortest prompt (0: the shortest possible + 8)")
    p.add_argument("--max-len", type=int, required=True, help="longest prompt (the training seq_len)")
    p.add_argument("--digits", type=int, default=5)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", required=True, metavar="OUT.h5")
    p.add_argument("--val-fraction", type=float, default=0.05, help="for the printed split summary")
    p.add_argument("--split-seed", type=int, default=1234, help="data.seed, for the printed split summary")
    p.add_argument("--eval-tokens-per-batch", type=int, default=0, help="batch_size x seq_len of the evaluation")
    return p.parse_args(argv)


def shortest_prompt(builder, digits):
    key = "9" * digits
    for n in range(1, 4096):
        try:
            builder.build(n, key, 0.5)
            return n
        except PrepareError:
            pass
    raise PrepareError("cannot build a passkey prompt of up to 4096 tokens")


def main(argv=None):
    import h5py
    import numpy as np

    args = parse_args(argv)
    f_pk, f_cp = args.passkey_fraction, args.copy_fraction
    if not (0.0 <= f_pk < 1.0 and 0.0 <= f_cp < 1.0 and f_pk + f_cp < 1.0):
        raise PrepareError(f"--passkey-fraction {f_pk} and --copy-fraction {f_cp} must be >= 0 with a sum below 1")
    tok, eos_id, vocab_size, sha, tok_desc = teacher_tokenizer(args.tokenizer, None)
    with h5py.File(args.corpus, "r") as f:
        tokens = f["tokens"][:].astype(np.int64)
        offsets = f["doc_offsets"][:].astype(np.int64)
        attrs = {k: f.attrs[k] for k in ("vocab_size", "eos_id", "tokenizer_sha256")}
        if "loss_mask" in f:
            raise PrepareError(f"{args.corpus}: has a /loss_mask; expected a plain corpus")
    c_sha = attrs["tokenizer_sha256"]
    c_sha = c_sha.decode() if isinstance(c_sha, bytes) else str(c_sha)
    if c_sha != sha:
        raise PrepareError(f"{args.corpus} was tokenized with tokenizer sha256 {c_sha}, "
                           f"{args.tokenizer}/tokenizer.json is {sha}")
    if int(attrs["eos_id"]) != eos_id or int(attrs["vocab_size"]) != vocab_size:
        raise PrepareError(f"{args.corpus}: eos_id/vocab_size {int(attrs['eos_id'])}/{int(attrs['vocab_size'])} "
                           f"differ from the tokenizer's {eos_id}/{vocab_size}")

    excluded = set()
    if args.exclude_keys:
        with h5py.File(args.exclude_keys, "r") as f:
            excluded = set(int(k) for k in f["passkeys"][:])

    builder = PromptBuilder(tok, eos_id)
    shortest = shortest_prompt(builder, args.digits)
    min_len = args.min_len or shortest + 8
    if min_len < shortest or min_len > args.max_len:
        raise PrepareError(f"--min-len {min_len} must be in [{shortest}, --max-len {args.max_len}]")

    n_corpus = len(offsets) - 1
    n_total = n_corpus / (1.0 - f_pk - f_cp)
    n_pk, n_cp = int(round(f_pk * n_total)), int(round(f_cp * n_total))
    rng = random.Random(args.seed)
    lo, hi = 10 ** (args.digits - 1), 10 ** args.digits - 1

    def number():
        while True:
            k = rng.randint(lo, hi)
            if k not in excluded:
                return k

    kinds = ["passkey"] * n_pk + ["copy"] * n_cp
    rng.shuffle(kinds)
    docs, pk_len, cp_len = [], [], []
    for kind in kinds:
        if kind == "passkey":
            key, length, depth = number(), rng.randint(min_len, args.max_len), rng.random()
            while True:  # a key of many tokens may need a few more than the shortest prompt
                try:
                    doc, _, _ = builder.build(length, str(key), depth)
                    break
                except PrepareError:
                    if length >= args.max_len:
                        raise
                    length += 1
            pk_len.append(len(doc))
        else:
            unit = builder.encode(" " + " ".join(str(number()) for _ in range(rng.randint(4, 8))) + ".")
            doc = (unit * rng.randint(3, 5))[: args.max_len - 1] + [eos_id]
            cp_len.append(len(doc))
        docs.append(np.asarray(doc, dtype=np.int64))

    lengths = [len(d) for d in docs]
    all_tokens = np.concatenate([tokens] + docs)
    all_offsets = np.concatenate([offsets, offsets[-1] + np.cumsum(lengths, dtype=np.int64)])
    if all_tokens.min() < 0 or all_tokens.max() >= vocab_size:
        raise PrepareError(f"token ids outside [0, {vocab_size})")

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = os.path.join(args.tokenizer, name)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.join(out_dir, name):
            shutil.copyfile(src, os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "tokenizer.json"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == sha
    tmp = args.out + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.create_dataset("tokens", data=all_tokens.astype(np.int32))
        f.create_dataset("doc_offsets", data=all_offsets)
        f.attrs["vocab_size"] = np.int64(vocab_size)
        f.attrs["eos_id"] = np.int64(eos_id)
        f.attrs["tokenizer_sha256"] = sha
    os.replace(tmp, args.out)

    # Validation splits (the corpus' documents keep their indices in the mix).
    doc_len = np.diff(offsets)
    val_docs = [d for d in range(n_corpus) if doc_len[d] > 0 and split_uniform(args.split_seed, d) < args.val_fraction]
    val_tokens = int(sum(doc_len[d] for d in val_docs))
    syn_val = [i for i in range(len(docs)) if split_uniform(args.split_seed, n_corpus + i) < args.val_fraction]
    syn_val_tokens = int(sum(lengths[i] for i in syn_val))
    per_batch = args.eval_tokens_per_batch
    c_tokens, pk_tokens, cp_tokens = int(offsets[-1]), int(sum(pk_len)), int(sum(cp_len))
    all_n, all_t = n_corpus + len(docs), c_tokens + pk_tokens + cp_tokens
    summary = {
        "out": args.out,
        "corpus_docs": n_corpus, "corpus_tokens": c_tokens,
        "passkey_docs": n_pk, "passkey_tokens": pk_tokens,
        "passkey_doc_fraction": n_pk / all_n, "passkey_token_fraction": pk_tokens / all_t,
        "passkey_len_range": [min(pk_len, default=0), max(pk_len, default=0)],
        "copy_docs": n_cp, "copy_tokens": cp_tokens,
        "copy_doc_fraction": n_cp / all_n, "copy_token_fraction": cp_tokens / all_t,
        "excluded_keys": len(excluded),
        "corpus_val_docs": len(val_docs), "corpus_val_tokens": val_tokens,
        "synthetic_val_docs": len(syn_val), "mix_val_tokens": val_tokens + syn_val_tokens,
        "corpus_val_batches": val_tokens // per_batch if per_batch > 0 else None,
        "mix_val_batches": (val_tokens + syn_val_tokens) // per_batch if per_batch > 0 else None,
    }
    print(f"wrote {args.out}: {n_corpus} corpus documents ({c_tokens} tokens) + {n_pk} passkey prompts "
          f"({pk_tokens} tokens, lengths {summary['passkey_len_range'][0]}..{summary['passkey_len_range'][1]}) + "
          f"{n_cp} number lists ({cp_tokens} tokens); tokenizer {tok_desc}")
    print("MIX " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PrepareError as e:
        print(f"make_mix.py: error: {e}", file=sys.stderr)
        sys.exit(1)

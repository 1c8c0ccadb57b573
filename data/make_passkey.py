#!/usr/bin/env python3
"""Synthetic passkey-retrieval prompts as a HyDistill token dataset (format: docs/formats.md).

    python3 data/make_passkey.py --tokenizer DIR --lengths 256,512,1024 --per-length 20 --seed 0 \\
        --out passkey.h5

Each prompt is, in tokens, exactly its target length:

    <intro> <filler ...> The pass key is NNNNN. Remember it. NNNNN is the pass key. <filler ...>
    What is the pass key? The pass key is NNNNN<EOS>

The filler sentences repeat; the needle goes at a random depth (snapped to a sentence boundary);
the last filler sentence before the question is cut at a token so that the total is the target.
Pieces are tokenized separately (without the tokenizer's special tokens) and concatenated, which
makes the length exact and the answer's tokens known.

Output: /tokens int32 [N], /doc_offsets int64 [D+1] (one document per prompt, each ending with EOS),
/loss_mask uint8 [N] (1 exactly on the answer tokens; the EOS is 0), /doc_lengths_target int64 [D]
(the nominal length of each prompt, for accuracy by length), /passkeys int64 [D] and /needle_depth
float64 [D] (fraction of the filler before the needle); root attributes vocab_size, eos_id,
tokenizer_sha256 as data/prepare.py writes them (EOS and vocab_size found the same way).
The file is written under a temporary name and renamed when complete.
"""
import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare import PrepareError, teacher_tokenizer  # noqa: E402  (same folder, stdlib-only at import)

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="make_passkey.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="directory holding tokenizer.json")
    p.add_argument("--lengths", default="256,512,1024", help="comma-separated prompt lengths in tokens")
    p.add_argument("--per-length", type=int, default=20, help="prompts per length (default 20)")
    p.add_argument("--seed", type=int, default=0, help="random seed (keys and needle depths)")
    p.add_argument("--digits", type=int, default=5, help="digits of the pass key (default 5)")
    p.add_argument("--eos-token", help="EOS token when the directory does not say")
    p.add_argument("--out", required=True, metavar="OUT.h5", help="output HDF5 dataset")
    return p.parse_args(argv)


def parse_lengths(text):
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PrepareError(f"--lengths '{text}': expected comma-separated integers")
    if not lengths or any(n <= 0 for n in lengths):
        raise PrepareError(f"--lengths '{text}': expected positive integers")
    return lengths


class PromptBuilder:
    """Tokenized pieces of the prompt; every piece after the first is encoded with a leading space."""

    def __init__(self, tok, eos_id):
        self.tok, self.eos_id = tok, eos_id
        self.intro = self.encode(INTRO)
        self.filler = [self.encode(" " + s) for s in FILLER]
        self.question = self.encode(" " + QUESTION)

    def encode(self, text):
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def answer(self, key):
        """Tokens of ' KEY' split into (unmasked lead, masked answer): a whitespace-only first token
        (tokenizers that split the space off the digits) belongs to the prompt, not to the answer."""
        ids = self.encode(" " + key)
        lead = []
        while ids and self.tok.decode(ids[:1]).strip() == "":
            lead.append(ids.pop(0))
        if not ids or self.tok.decode(ids).strip() != key:
            raise PrepareError(f"the tokenizer does not round-trip the pass key '{key}' "
                               f"(decodes to {self.tok.decode(ids)!r})")
        return lead, ids

    def build(self, length, key, depth):
        """(tokens, mask, actual depth) of one prompt of exactly `length` tokens."""
        needle = self.encode(" " + NEEDLE.format(key=key))
        lead, answer = self.answer(key)
        fixed = len(self.intro) + len(needle) + len(self.question) + len(lead) + len(answer) + 1
        budget = length - fixed
        if budget < 0:
            raise PrepareError(f"--lengths: {length} tokens is too short; the prompt without filler needs {fixed}")
        filler, boundaries, i = [], [0], 0
        while len(filler) < budget:
            filler.extend(self.filler[i % len(self.filler)])
            boundaries.append(min(len(filler), budget))
            i += 1
        del filler[budget:]
        cut = min(boundaries, key=lambda b: abs(b - depth * budget))
        tokens = (self.intro + filler[:cut] + needle + filler[cut:] + self.question + lead + answer
                  + [self.eos_id])
        mask = [0] * (len(tokens) - len(answer) - 1) + [1] * len(answer) + [0]
        assert len(tokens) == length and len(mask) == length
        return tokens, mask, (cut / budget if budget else 0.0)


def write_passkey_dataset(out, docs, vocab_size, eos_id, sha):
    import h5py
    import numpy as np

    tokens = np.concatenate([np.asarray(d["tokens"], dtype=np.int64) for d in docs])
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise PrepareError(f"token ids span [{tokens.min()}, {tokens.max()}], outside vocab_size {vocab_size}")
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d["tokens"]) for d in docs], out=offsets[1:])
    tmp = out + ".tmp"
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("tokens", data=tokens.astype(np.int32))
            f.create_dataset("doc_offsets", data=offsets)
            f.create_dataset("loss_mask", data=np.concatenate([np.asarray(d["mask"], dtype=np.uint8) for d in docs]))
            f.create_dataset("doc_lengths_target", data=np.array([d["length"] for d in docs], dtype=np.int64))
            f.create_dataset("passkeys", data=np.array([d["key"] for d in docs], dtype=np.int64))
            f.create_dataset("needle_depth", data=np.array([d["depth"] for d in docs], dtype=np.float64))
            f.attrs["vocab_size"] = np.int64(vocab_size)
            f.attrs["eos_id"] = np.int64(eos_id)
            f.attrs["tokenizer_sha256"] = sha
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    lengths = parse_lengths(args.lengths)
    if args.per_length <= 0:
        raise PrepareError(f"--per-length must be positive, got {args.per_length}")
    if not 1 <= args.digits <= 18:
        raise PrepareError(f"--digits must be in [1, 18], got {args.digits}")
    tok, eos_id, vocab_size, sha, tok_desc = teacher_tokenizer(args.tokenizer, args.eos_token)
    builder = PromptBuilder(tok, eos_id)
    rng = random.Random(args.seed)
    lo = 10 ** (args.digits - 1) if args.digits > 1 else 0
    docs = []
    for length in lengths:
        for _ in range(args.per_length):
            key = rng.randint(lo, 10 ** args.digits - 1)
            tokens, mask, depth = builder.build(length, str(key), rng.random())
            docs.append({"tokens": tokens, "mask": mask, "length": length, "key": key, "depth": depth})
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    write_passkey_dataset(args.out, docs, vocab_size, eos_id, sha)
    print(f"wrote {args.out}")
    print(f"  prompts          {len(docs)} ({args.per_length} each of lengths {', '.join(map(str, lengths))})")
    print(f"  answer tokens    {sum(sum(d['mask']) for d in docs)}")
    print(f"  tokenizer        {tok_desc}")
    print(f"  time             {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PrepareError as e:
        print(f"make_passkey.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except ImportError as e:
        print(f"make_passkey.py: error: {e} (install with: pip install numpy h5py tokenizers, or run launch/setup.sh)",
              file=sys.stderr)
        sys.exit(1)

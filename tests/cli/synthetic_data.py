#!/usr/bin/env python3
"""Small synthetic token datasets for the CLI tests (format: docs/formats.md).

    synthetic_data.py markov OUT.h5 --vocab V [--docs N] [--seed S] [--min-len A --max-len B]
        documents from a sparse random Markov chain over tokens 1..V-1 (two likely successors per
        token), A to B-1 tokens each (default 20 to 59) plus the EOS = 0: learnable, so losses fall.
    synthetic_data.py passkey OUT.h5 --vocab V --lengths 24,40 [--per-length N] [--seed S]
        passkey-style prompts (the layout of data/make_passkey.py): random filler, then the last
        3 tokens before the EOS are the answer (/loss_mask = 1), /doc_lengths_target the nominal length.
"""
import argparse

import h5py
import numpy as np


def write(path, docs, vocab, masks=None, lengths=None):
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]))
        f.create_dataset("doc_offsets", data=np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64))
        if masks is not None:
            f.create_dataset("loss_mask", data=np.concatenate([np.asarray(m, dtype=np.uint8) for m in masks]))
        if lengths is not None:
            f.create_dataset("doc_lengths_target", data=np.asarray(lengths, dtype=np.int64))
        f.attrs["vocab_size"] = vocab
        f.attrs["eos_id"] = 0
        f.attrs["tokenizer_sha256"] = "0" * 64


def markov(args):
    rng = np.random.default_rng(args.seed)
    succ = rng.integers(1, args.vocab, size=(args.vocab, 2))
    docs = []
    for _ in range(args.docs):
        t = [int(rng.integers(1, args.vocab))]
        for _ in range(int(rng.integers(args.min_len, args.max_len)) - 1):
            t.append(int(succ[t[-1], rng.integers(0, 2)]))
        docs.append(t + [0])
    write(args.out, docs, args.vocab)


def passkey(args):
    rng = np.random.default_rng(args.seed)
    docs, masks, lengths = [], [], []
    for n in (int(x) for x in args.lengths.split(",")):
        for _ in range(args.per_length):
            docs.append([int(x) for x in rng.integers(1, args.vocab, size=n - 1)] + [0])
            masks.append([0] * (n - 4) + [1, 1, 1] + [0])
            lengths.append(n)
    write(args.out, docs, args.vocab, masks, lengths)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("markov", "passkey"))
    p.add_argument("out")
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--lengths", default="24,40")
    p.add_argument("--per-length", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=60)
    args = p.parse_args()
    (markov if args.kind == "markov" else passkey)(args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Tokenize text or JSONL into a HyDistill HDF5 token dataset (format: docs/formats.md).

    python3 data/prepare.py --input FILE [FILE...] --out OUT.h5 \\
        (--tokenizer TEACHER_DIR | --train-bpe VOCAB_SIZE) \\
        [--format auto|text|jsonl] [--jsonl-field text] [--doc-separator blank-lines|lines|file]

Documents:
  text   --doc-separator blank-lines (default): paragraphs separated by one or more blank lines;
         lines: every non-empty line; file: each input file is one document.
  jsonl  one JSON object per line, the document is the string in --jsonl-field (default "text").
Every document is tokenized without the tokenizer's own special tokens (no BOS) and ends with EOS.

Tokenizers:
  --tokenizer DIR   DIR/tokenizer.json (a teacher's Hugging Face tokenizer). EOS comes from
                    DIR/config.json eos_token_id, else DIR/tokenizer_config.json eos_token, else a
                    well-known EOS token in the vocabulary (or --eos-token). vocab_size is
                    config.json's vocab_size when present (the model's embedding rows), else the
                    tokenizer's size including added tokens.
  --train-bpe V     trains a byte-level BPE with V tokens (including the EOS token <|endoftext|>) on
                    the documents and saves it next to OUT.h5 as tokenizer.json (+ tokenizer_config.json)
                    so that the dataset can be decoded.

Output: /tokens int32 [N], /doc_offsets int64 [D+1], root attributes vocab_size, eos_id,
tokenizer_sha256 (sha256 of the tokenizer.json bytes). The file is written under a temporary name
and renamed when complete, so a failed run leaves nothing behind.
"""
import argparse
import hashlib
import json
import os
import re
import sys
import time

DEFAULT_EOS = "<|endoftext|>"
KNOWN_EOS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")
ENCODE_BATCH = 1024


class PrepareError(Exception):
    """A user-facing error: printed as 'prepare.py: error: ...', exit code 1."""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="prepare.py",
        description="Tokenize text/JSONL documents into a HyDistill HDF5 dataset (/tokens, /doc_offsets).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text or JSONL input files")
    p.add_argument("--out", required=True, metavar="OUT.h5", help="output HDF5 dataset")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="TEACHER_DIR", help="directory holding the teacher's tokenizer.json")
    tok.add_argument("--train-bpe", type=int, metavar="VOCAB_SIZE", help="train a byte-level BPE of this size")
    p.add_argument("--format", choices=("auto", "text", "jsonl"), default="auto",
                   help="input format (auto: .jsonl/.json files are JSONL, others text; default auto)")
    p.add_argument("--jsonl-field", default="text", help="JSONL field holding the document text (default text)")
    p.add_argument("--doc-separator", choices=("blank-lines", "lines", "file"), default="blank-lines",
                   help="how text files are cut into documents (default blank-lines)")
    p.add_argument("--eos-token", help="EOS token string (overrides the one found in the teacher's configs)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p.parse_args(argv)


# ---------------------------------------------------------------- reading documents

def file_format(path, fmt):
    if fmt != "auto":
        return fmt
    return "jsonl" if path.lower().endswith((".jsonl", ".json")) else "text"


def read_text(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not valid UTF-8 text (byte offset {e.start})")
    except OSError as e:
        raise PrepareError(f"{path}: cannot read: {e.strerror}")


def text_documents(path, separator):
    text = read_text(path).replace("\r\n", "\n")
    if separator == "file":
        pieces = [text]
    elif separator == "lines":
        pieces = text.split("\n")
    else:
        pieces = re.split(r"\n[ \t]*\n", text)
    for piece in pieces:
        piece = piece.strip()
        if piece:
            yield piece


def jsonl_documents(path, field):
    try:
        f = open(path, "r", encoding="utf-8")
    except OSError as e:
        raise PrepareError(f"{path}: cannot read: {e.strerror}")
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}:{lineno}: invalid JSON: {e.msg}")
            except UnicodeDecodeError as e:
                raise PrepareError(f"{path}:{lineno}: not valid UTF-8 (byte offset {e.start})")
            if not isinstance(obj, dict) or field not in obj:
                raise PrepareError(f"{path}:{lineno}: no field '{field}' (choose it with --jsonl-field)")
            value = obj[field]
            if not isinstance(value, str):
                raise PrepareError(f"{path}:{lineno}: field '{field}' is {type(value).__name__}, expected a string")
            if value.strip():
                yield value


def read_documents(args):
    docs, chars = [], 0
    for path in args.input:
        fmt = file_format(path, args.format)
        if fmt == "jsonl":
            new = list(jsonl_documents(path, args.jsonl_field))
        else:
            new = list(text_documents(path, args.doc_separator))
        if not new:
            print(f"prepare.py: warning: {path}: no documents", file=sys.stderr)
        docs.extend(new)
        chars += sum(len(d) for d in new)
    if not docs:
        raise PrepareError("no documents in the input files: " + ", ".join(args.input))
    return docs, chars


# ---------------------------------------------------------------- tokenizers

def load_json(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PrepareError(f"{path}: cannot parse: {e}")


def token_string(value):
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def teacher_tokenizer(tdir, eos_override):
    from tokenizers import Tokenizer

    if not os.path.isdir(tdir):
        raise PrepareError(f"{tdir}: teacher tokenizer directory not found")
    tok_path = os.path.join(tdir, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise PrepareError(f"{tok_path}: not found (the teacher directory needs a Hugging Face tokenizer.json)")
    try:
        tok = Tokenizer.from_file(tok_path)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise PrepareError(f"{tok_path}: cannot load: {e}")

    config_path = os.path.join(tdir, "config.json")
    tconfig_path = os.path.join(tdir, "tokenizer_config.json")
    config = load_json(config_path) if os.path.isfile(config_path) else {}
    tconfig = load_json(tconfig_path) if os.path.isfile(tconfig_path) else {}

    eos_id, source = None, None
    if eos_override:
        eos_id, source = tok.token_to_id(eos_override), "--eos-token"
        if eos_id is None:
            raise PrepareError(f"{tok_path}: --eos-token '{eos_override}' is not in the vocabulary")
    if eos_id is None:
        cfg_eos = config.get("eos_token_id")
        if isinstance(cfg_eos, list) and cfg_eos:
            cfg_eos = cfg_eos[0]  # several stop tokens: the first is the end-of-document token
        if isinstance(cfg_eos, int):
            eos_id, source = cfg_eos, f"{config_path} eos_token_id"
    if eos_id is None:
        name = token_string(tconfig.get("eos_token"))
        if name is not None:
            eos_id, source = tok.token_to_id(name), f"{tconfig_path} eos_token '{name}'"
            if eos_id is None:
                raise PrepareError(f"{tconfig_path}: eos_token '{name}' is not in {tok_path}")
    if eos_id is None:
        for name in KNOWN_EOS:
            if tok.token_to_id(name) is not None:
                eos_id, source = tok.token_to_id(name), f"token '{name}' in the vocabulary"
                break
    if eos_id is None:
        raise PrepareError(f"{tdir}: cannot determine the EOS token (no eos_token_id in config.json, no eos_token "
                           f"in tokenizer_config.json, none of {', '.join(KNOWN_EOS)} in the vocabulary); "
                           f"pass --eos-token")

    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if isinstance(config.get("vocab_size"), int):
        vocab_size = config["vocab_size"]  # ids beyond it are caught by write_dataset's range check
    with open(tok_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return tok, eos_id, vocab_size, sha, f"{tok_path} (EOS from {source})"


def train_bpe(docs, vocab_size, out_dir, eos_override):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    eos = eos_override or DEFAULT_EOS
    if vocab_size < 257:
        raise PrepareError(f"--train-bpe {vocab_size}: needs at least 257 tokens (256 bytes + EOS '{eos}')")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    eos_id = tok.token_to_id(eos)
    assert eos_id is not None, "trained BPE lost its special token"

    os.makedirs(out_dir, exist_ok=True)
    tok_path = os.path.join(out_dir, "tokenizer.json")
    tok.save(tok_path)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
                   "unk_token": eos, "model_max_length": 1 << 30}, f, indent=2)
        f.write("\n")
    with open(tok_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    # The trained vocabulary may come out smaller than asked for on a small corpus.
    return tok, eos_id, tok.get_vocab_size(with_added_tokens=True), sha, f"{tok_path} (trained byte-level BPE)"


# ---------------------------------------------------------------- writing

def tokenize(tok, docs, eos_id):
    import numpy as np

    lengths = np.empty(len(docs), dtype=np.int64)
    chunks = []
    for start in range(0, len(docs), ENCODE_BATCH):
        batch = tok.encode_batch(docs[start:start + ENCODE_BATCH], add_special_tokens=False)
        for i, enc in enumerate(batch):
            ids = np.asarray(enc.ids, dtype=np.int64)
            chunks.append(ids)
            chunks.append(np.array([eos_id], dtype=np.int64))
            lengths[start + i] = len(ids) + 1
    tokens = np.concatenate(chunks)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return tokens, offsets


def write_dataset(out, tokens, offsets, vocab_size, eos_id, sha):
    import h5py
    import numpy as np

    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise PrepareError(f"token ids span [{tokens.min()}, {tokens.max()}], outside vocab_size {vocab_size}")
    tmp = out + ".tmp"
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("tokens", data=tokens.astype(np.int32))
            f.create_dataset("doc_offsets", data=offsets.astype(np.int64))
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
    missing = [p for p in args.input if not os.path.isfile(p)]
    if missing:
        raise PrepareError("input file not found: " + ", ".join(missing))
    if args.train_bpe is not None and args.train_bpe <= 0:
        raise PrepareError(f"--train-bpe must be positive, got {args.train_bpe}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir, exist_ok=True)

    docs, chars = read_documents(args)
    if not args.quiet:
        print(f"read {len(docs)} documents ({chars} characters) from {len(args.input)} file(s)", flush=True)
    if args.tokenizer:
        tok, eos_id, vocab_size, sha, tok_desc = teacher_tokenizer(args.tokenizer, args.eos_token)
    else:
        if not args.quiet:
            print(f"training a byte-level BPE with {args.train_bpe} tokens ...", flush=True)
        tok, eos_id, vocab_size, sha, tok_desc = train_bpe(docs, args.train_bpe, out_dir, args.eos_token)
    tokens, offsets = tokenize(tok, docs, eos_id)
    write_dataset(args.out, tokens, offsets, vocab_size, eos_id, sha)

    lengths = offsets[1:] - offsets[:-1]
    print(f"wrote {args.out}")
    print(f"  documents        {len(docs)} (mean {lengths.mean():.1f} tokens, max {lengths.max()})")
    print(f"  tokens           {tokens.size} ({chars / tokens.size:.2f} characters per token)")
    print(f"  vocab size       {vocab_size}")
    print(f"  eos id           {eos_id} ({tok.id_to_token(eos_id)!r})")
    print(f"  tokenizer        {tok_desc}")
    print(f"  tokenizer sha256 {sha}")
    print(f"  time             {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except ImportError as e:
        print(f"prepare.py: error: {e} (install with: pip install numpy h5py tokenizers, or run launch/setup.sh)",
              file=sys.stderr)
        sys.exit(1)

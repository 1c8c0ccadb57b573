#!/usr/bin/env python3
"""Generates the dense-model golden files that tests/golden/test_golden_dense.cpp compares against.

For each tiny model (Llama with llama3 RoPE scaling, untied; Qwen3 with q/k norm, head_dim != hidden/heads,
tied embeddings, GQA; Qwen2 with q/k/v biases and YaRN RoPE) this script
  * builds the model with transformers from a fixed seed and overwrites every parameter with seeded random
    values (norm weights around 1, non-zero biases, weights large enough that the logits are far from
    uniform: a test that ignores a norm weight or a bias must fail),
  * saves it with save_pretrained (config.json + model.safetensors, float32) into data/<name>/,
  * runs two fixed token sequences of 33 tokens, each as its own forward, in float32 with eager attention,
  * writes data/<name>/golden.safetensors: input_ids I64 [2, 33], logits F32 [2, 33, V] and loss F64 []
    (mean next-token cross-entropy over both sequences: 2 x 32 targets).

Usage: python3 tests/golden/gen_dense_goldens.py [--out tests/golden/data] [--dump-hidden DIR]
  --dump-hidden also writes every layer's hidden states (HF output_hidden_states) for debugging a mismatch.
Needs torch, transformers (>= 4.45; written against 5.x) and safetensors. The C++ test needs none of them.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

SEQ_LEN = 33
NUM_SEQS = 2
VOCAB = 256


def model_specs():
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    llama = dict(
        common,
        tie_word_embeddings=False,
        # llama3 scaling with head_dim 16, theta 1e4, original context 32: wavelengths 6.3 (kept: below
        # 32/4), 19.9 (smoothly interpolated) and >= 63 (divided by factor): every branch is exercised.
        rope_theta=10000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32),
    )
    qwen3 = dict(common, head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0, eos_token_id=[2, 3])
    qwen2 = dict(
        common,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32),
    )
    return [
        ("llama", transformers.LlamaConfig, transformers.LlamaForCausalLM, llama),
        ("qwen3", transformers.Qwen3Config, transformers.Qwen3ForCausalLM, qwen3),
        ("qwen2", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, qwen2),
    ]


def make_config(cls, kw):
    kw = dict(kw)
    # transformers 5.x reads RoPE from rope_parameters (rope_theta inside); 4.x from rope_theta + rope_scaling.
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        rope = dict(kw.pop("rope_scaling", None) or {"rope_type": "default"})
        rope["rope_theta"] = kw.pop("rope_theta")
        kw["rope_parameters"] = rope
    cfg = cls(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def randomize(model, seed):
    """Seeded values for every parameter (HF's init leaves norms at 1 and biases at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                # Tied embeddings double as the output projection: keep those logits O(1) too.
                scale = 0.3 if model.config.tie_word_embeddings else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in ** 0.5))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(here, "data"))
    ap.add_argument("--dump-hidden", default=None, help="folder for per-layer hidden states (debugging)")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False

    tokens_gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, VOCAB, (NUM_SEQS, SEQ_LEN), generator=tokens_gen, dtype=torch.int64)

    for i, (name, cfg_cls, model_cls, kw) in enumerate(model_specs()):
        torch.manual_seed(100 + i)
        cfg = make_config(cfg_cls, kw)
        model = model_cls(cfg).to(torch.float32).eval()
        randomize(model, seed=200 + i)
        if cfg.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

        out_dir = os.path.join(args.out, name)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        gen_cfg = os.path.join(out_dir, "generation_config.json")
        if os.path.exists(gen_cfg):
            os.remove(gen_cfg)  # not needed by the test; keeps the folder minimal

        logits, hidden = [], []
        with torch.no_grad():
            for s in range(NUM_SEQS):  # each sequence is its own forward (positions restart at 0)
                out = model(input_ids=input_ids[s : s + 1], output_hidden_states=args.dump_hidden is not None)
                logits.append(out.logits[0].float())
                if args.dump_hidden:
                    hidden.append([h[0].float() for h in out.hidden_states])
            logits = torch.stack(logits)  # [S, T, V]
            # Mean next-token CE over both sequences, accumulated in float64 from the float32 logits.
            lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            loss = -lp.gather(-1, input_ids[:, 1:, None]).mean()
            # How far float32 HF is from a float64 run of the same weights: the floor for the C++ comparison.
            model64 = model.double()
            ref64 = torch.stack([model64(input_ids=input_ids[s : s + 1]).logits[0] for s in range(NUM_SEQS)])
            model.float()
        err32 = (logits.double() - ref64).norm() / ref64.norm()

        save_file(
            {
                "input_ids": input_ids.numpy(),
                "logits": logits.numpy().astype(np.float32),
                "loss": np.array(loss.item(), dtype=np.float64),
            },
            os.path.join(out_dir, "golden.safetensors"),
            # One key: safetensors orders metadata keys arbitrarily, and the files should be byte-reproducible.
            metadata={"generator": f"tests/golden/gen_dense_goldens.py (transformers {transformers.__version__}, "
                                   f"torch {torch.__version__})"},
        )
        if args.dump_hidden:
            d = os.path.join(args.dump_hidden, name)
            os.makedirs(d, exist_ok=True)
            save_file({f"seq{s}.hidden{l}": h.numpy() for s, hs in enumerate(hidden) for l, h in enumerate(hs)},
                      os.path.join(d, "hidden.safetensors"))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name}: params {n_params}, logits std {logits.std().item():.3f} max|.| {logits.abs().max().item():.3f}, "
              f"loss {loss.item():.6f}, fp32-vs-fp64 rel err {err32.item():.2e} -> {out_dir}")
        with open(os.path.join(out_dir, "config.json")) as f:
            json.load(f)  # sanity: valid JSON
    return 0


if __name__ == "__main__":
    sys.exit(main())

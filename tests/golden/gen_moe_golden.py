#!/usr/bin/env python3
"""Generates the MoE golden files (qwen3_moe, dots1) that tests/golden/test_golden_dense.cpp compares against.

qwen3_moe: a tiny random Qwen3MoeForCausalLM (vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16; 8 experts,
top-2, moe_intermediate_size 32, norm_topk_prob true, decoder_sparse_step 1, mlp_only_layers [0] so that layer 0
is a dense SwiGLU MLP with intermediate_size 96 and layer 1 is the sparse MoE block; untied lm_head).
dots1: a tiny random Dots1ForCausalLM (Qwen3-style attention with q/k norm, head_dim derived = 16; DeepSeek-V3
style MoE): vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, first_k_dense_replace 1 (layer 0 dense SwiGLU
with intermediate_size 96, layer 1 MoE), 8 routed experts top-2 with sigmoid scores, a non-zero random
e_score_correction_bias (it changes the choice of experts for many tokens, never the combine weights),
norm_topk_prob true, routed_scaling_factor 2.5, n_shared_experts 2 (one shared MLP of width 2 x 32, as HF
stores it), n_group = topk_group = 1; untied lm_head.
For both:
  * every parameter overwritten with seeded random values (norm weights around 1; the router's weights large
    enough that the expert scores are far from uniform and different tokens pick different experts),
  * saved with save_pretrained (config.json + model.safetensors, float32) into data/<name>/,
  * two fixed token sequences of 33 tokens (those of gen_dense_goldens.py), each its own forward, float32, eager
    attention, output_router_logits off (HF's loss is then the plain CE: no router aux loss),
  * data/<name>/golden.safetensors: input_ids I64 [2, 33], logits F32 [2, 33, V], loss F64 [].
The script also prints the smallest gap between the k-th and (k+1)-th selection score (router probability, plus
the bias for dots1) over all tokens: a C++ run routes like HF only if its float32 rounding stays far below that
gap. For dots1 it also counts the tokens whose choice the bias changes (at least one must, or the golden would
not test the bias).

Usage: python3 tests/golden/gen_moe_golden.py [--out tests/golden/data] [--models qwen3_moe,dots1]
Needs torch, transformers (written against 5.x; 4.x works if it knows Qwen3Moe / Dots1) and safetensors.
"""
import argparse
import os
import sys

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_dense_goldens import NUM_SEQS, SEQ_LEN, VOCAB, make_config  # noqa: E402

# What both tiny MoE models share: the skeleton, 32-wide experts, top 2 of them, renormalised.
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    output_router_logits=False,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    bos_token_id=1,
    eos_token_id=2,
)


def qwen3_moe_spec():
    return dict(COMMON, head_dim=16, num_experts=8, decoder_sparse_step=1, mlp_only_layers=[0],
                router_aux_loss_coef=0.001)


def dots1_spec():
    # No head_dim: Dots1Config derives it (hidden_size / heads = 16).
    return dict(COMMON, n_routed_experts=8, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                n_group=1, topk_group=1)


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                # Router logits of O(3): clearly preferred experts, distinct per token.
                p.copy_(torch.randn(p.shape, generator=g) * (3.0 / p.shape[-1] ** 0.5))
            else:
                fan_in = p.shape[-1]  # [out, in] or fused experts [E, out, in]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in ** 0.5))


def build_qwen3_moe():
    cfg = make_config(transformers.Qwen3MoeConfig, qwen3_moe_spec())
    # The per-expert Python loop (grouped_mm has no float64 on the CPU, needed for the fp64 reference).
    cfg._experts_implementation = "eager"
    model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.float32).eval()
    randomize(model, seed=250)
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"
    assert type(model.model.layers[1].mlp).__name__ == "Qwen3MoeSparseMoeBlock"
    return model


def build_dots1():
    cfg = make_config(transformers.Dots1Config, dots1_spec())
    cfg._experts_implementation = "eager"
    model = transformers.Dots1ForCausalLM(cfg).to(torch.float32).eval()
    randomize(model, seed=350)
    # The selection bias is a buffer (not a parameter): of the order of the sigmoid scores' spread, so that
    # it reorders the experts of many tokens.
    g = torch.Generator().manual_seed(351)
    with torch.no_grad():
        gate = model.model.layers[1].mlp.gate
        gate.e_score_correction_bias.copy_(0.3 * torch.randn(gate.e_score_correction_bias.shape, generator=g))
    assert type(model.model.layers[0].mlp).__name__ == "Dots1MLP"
    assert type(model.model.layers[1].mlp).__name__ == "Dots1MoE"
    assert model.model.layers[1].mlp.shared_experts.gate_proj.weight.shape[0] == 2 * 32
    return model


# name -> (builder, sigmoid router with a selection bias)
MODELS = {"qwen3_moe": (build_qwen3_moe, False), "dots1": (build_dots1, True)}


def generate(name, out_root, input_ids):
    build, sigmoid = MODELS[name]
    torch.manual_seed(150)
    model = build()
    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen_cfg = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)

    # Router inputs of the sparse layer, to report the routing margin and the load per expert.
    router_in = []
    hook = model.model.layers[1].mlp.gate.register_forward_hook(lambda m, i, o: router_in.append(i[0].detach()))
    logits = []
    with torch.no_grad():
        for s in range(NUM_SEQS):
            out = model(input_ids=input_ids[s : s + 1])
            logits.append(out.logits[0].float())
        logits = torch.stack(logits)
        lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        loss = -lp.gather(-1, input_ids[:, 1:, None]).mean()
        hook.remove()
        model64 = model.double()
        ref64 = torch.stack([model64(input_ids=input_ids[s : s + 1]).logits[0] for s in range(NUM_SEQS)])
        model.float()
    err32 = (logits.double() - ref64).norm() / ref64.norm()
    gate = model.model.layers[1].mlp.gate
    k = model.config.num_experts_per_tok
    x = torch.cat([r.reshape(-1, r.shape[-1]) for r in router_in]).float()
    router_logits = x @ gate.weight.float().T
    probs = torch.sigmoid(router_logits) if sigmoid else torch.softmax(router_logits, dim=-1)
    choice = probs + gate.e_score_correction_bias.float() if sigmoid else probs
    top = choice.topk(k + 1, dim=-1)
    margin = (top.values[:, -2] - top.values[:, -1]).min().item()
    load = torch.bincount(top.indices[:, :-1].reshape(-1), minlength=probs.shape[-1]).tolist()
    extra = ""
    if sigmoid:
        unbiased = probs.topk(k, dim=-1).indices.sort(dim=-1).values
        biased = top.indices[:, :-1].sort(dim=-1).values
        changed = (unbiased != biased).any(dim=-1).sum().item()
        assert changed > 0, "the selection bias changes no token's experts: the golden would not test it"
        extra = f", bias changes the experts of {changed} of {x.shape[0]} tokens"

    save_file(
        {
            "input_ids": input_ids.numpy(),
            "logits": logits.numpy().astype(np.float32),
            "loss": np.array(loss.item(), dtype=np.float64),
        },
        os.path.join(out_dir, "golden.safetensors"),
        metadata={"generator": f"tests/golden/gen_moe_golden.py (transformers {transformers.__version__}, "
                               f"torch {torch.__version__})"},
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: params {n_params}, logits std {logits.std().item():.3f}, loss {loss.item():.6f}, "
          f"fp32-vs-fp64 rel err {err32.item():.2e}, min top-k selection margin {margin:.2e}, load per expert "
          f"{load}{extra} -> {out_dir}")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(here, "data"))
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    args = ap.parse_args()
    torch.set_default_dtype(torch.float32)

    tokens_gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, VOCAB, (NUM_SEQS, SEQ_LEN), generator=tokens_gen, dtype=torch.int64)
    for name in args.models.split(","):
        if name not in MODELS:
            ap.error(f"unknown model '{name}' (expected one of {', '.join(MODELS)})")
        generate(name, args.out, input_ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())

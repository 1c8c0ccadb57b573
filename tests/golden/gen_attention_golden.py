#!/usr/bin/env python3
"""Generates the attention golden files that tests/golden/test_golden_attention.cpp compares against.

Reference: torch.nn.functional.scaled_dot_product_attention on the CPU in float64, with the whole packed batch
as one sequence (batch 1) and the document structure given as a boolean attn_mask [N_q, N_k] (True = attend):
block-diagonal and causal, aligned at the end of each document's key range (kernels/attention.h):
    document d has queries q[cu_q[d]:cu_q[d+1]] and keys k[cu_k[d]:cu_k[d+1]] (len_q, len_k);
    its query i (0-based) attends its keys j (0-based) with j <= i + (len_k - len_q).
GQA by repeating the kv heads: query head h reads kv head h // (Hq / Hkv) (repeat_interleave along the head dim),
the grouping of kernels/attention.h. Gradients dq, dk, dv from torch autograd of loss = sum(o * do) with a fixed
random do (dk/dv of the repeated heads sum back onto the shared kv head). scale = d^-1/2.
lse [N_q, Hq] = logsumexp of the masked scaled scores (SDPA does not return it), computed with torch.logsumexp;
the script also checks SDPA's o against the explicit softmax formula (the two float64 computations must agree to
1e-12) so the mask convention is verified on both sides.

Cases (Hq=4, Hkv=2, d=64; documents of 1, 17 and 20 tokens, kept small so all files stay under 300 KB):
  packed_docs  no offset: cu_q = cu_k = [0, 1, 18, 38] (the length-1 document attends only itself).
  query_slice  LASP-2H: the query slice [12, 30) of that packed sequence against the keys [0, 30):
               per document q = document ∩ [12, 30), k = document ∩ [0, 30), so cu_q = [0, 0, 6, 18] and
               cu_k = [0, 1, 18, 30]: the length-1 document has a key and no query (dk = dv = 0 there), document 1
               has 6 queries over 17 keys, document 2 has 12 queries over its first 12 keys.
Fully masked rows (len_q > len_k) are not in the goldens: SDPA's result for them is a convention of the backend
(NaN or 0 by version); tests/unit/test_ops_attention_offset.cpp checks them against the dense formula.

Files: data/attention/<case>.safetensors. q, k, v and do are bf16-exact (drawn in float64, rounded to bf16 before
the float64 run) and stored as BF16, so the CUDA kernels see exactly the golden's inputs. o, lse, dq, dk, dv are
the float64 results rounded to F32. cu_seqlens_q, cu_seqlens_k are I32 [D+1]. Metadata key "golden": JSON with
dims, scale, document lengths, the slice, the SDPA-vs-explicit difference and the versions used.

Usage: python3 tests/golden/gen_attention_golden.py [--out tests/golden/data/attention]
Needs torch and safetensors; the C++ test needs neither.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HQ, HKV, D = 4, 2, 64
DOC_LENGTHS = [1, 17, 20]


def boundaries(doc_lengths, query_slice):
    """cu_q, cu_k for the whole sequence (query_slice None) or for the query slice [a, b) against keys [0, b)."""
    cu = [0]
    for n in doc_lengths:
        cu.append(cu[-1] + n)
    if query_slice is None:
        return cu, list(cu)
    a, b = query_slice
    return [min(max(x, a), b) - a for x in cu], [min(x, b) for x in cu]


def attention_mask(cu_q, cu_k):
    n_q, n_k = cu_q[-1], cu_k[-1]
    mask = torch.zeros(n_q, n_k, dtype=torch.bool)
    for doc in range(len(cu_q) - 1):
        qb, len_q = cu_q[doc], cu_q[doc + 1] - cu_q[doc]
        kb, len_k = cu_k[doc], cu_k[doc + 1] - cu_k[doc]
        for i in range(len_q):
            visible = i + 1 + len_k - len_q  # keys 0 .. i + len_k - len_q
            if visible > 0:
                mask[qb + i, kb:kb + visible] = True
    return mask


def bf16_exact(x):
    return x.to(torch.bfloat16).to(torch.float64)


def make_case(name, query_slice, seed):
    gen = torch.Generator().manual_seed(seed)
    cu_q, cu_k = boundaries(DOC_LENGTHS, query_slice)
    n_q, n_k = cu_q[-1], cu_k[-1]
    q = bf16_exact(torch.randn(n_q, HQ, D, generator=gen, dtype=torch.float64))
    k = bf16_exact(torch.randn(n_k, HKV, D, generator=gen, dtype=torch.float64))
    v = bf16_exact(torch.randn(n_k, HKV, D, generator=gen, dtype=torch.float64))
    do = bf16_exact(torch.randn(n_q, HQ, D, generator=gen, dtype=torch.float64))
    mask = attention_mask(cu_q, cu_k)
    assert bool(mask.any(dim=1).all()), "every query row must see a key (SDPA's fully masked rows are backend-defined)"
    scale = D ** -0.5
    group = HQ // HKV

    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    # [N, H, d] -> SDPA's [B=1, H, L, d]; kv heads repeated so that query head h reads kv head h // group.
    q4 = qg.permute(1, 0, 2).unsqueeze(0)
    k4 = kg.permute(1, 0, 2).repeat_interleave(group, dim=0).unsqueeze(0)
    v4 = vg.permute(1, 0, 2).repeat_interleave(group, dim=0).unsqueeze(0)
    o4 = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale)
    o = o4.squeeze(0).permute(1, 0, 2)  # [N_q, Hq, d]
    (o * do).sum().backward()

    with torch.no_grad():
        k_rep = k.repeat_interleave(group, dim=1)  # [N_k, Hq, d]
        v_rep = v.repeat_interleave(group, dim=1)
        s = scale * torch.einsum("ihc,jhc->hij", q, k_rep)
        s = s.masked_fill(~mask.unsqueeze(0), float("-inf"))
        lse = torch.logsumexp(s, dim=-1).transpose(0, 1).contiguous()  # [N_q, Hq]
        p = torch.softmax(s, dim=-1)
        o_explicit = torch.einsum("hij,jhc->ihc", p, v_rep)
        sdpa_vs_explicit = float((o.detach() - o_explicit).abs().max())
    assert sdpa_vs_explicit < 1e-12, f"{name}: SDPA and the explicit formula differ by {sdpa_vs_explicit}"
    # Keys that no query sees get exactly zero gradients.
    unseen = ~mask.any(dim=0)
    assert bool((kg.grad[unseen] == 0).all()) and bool((vg.grad[unseen] == 0).all())

    tensors = {
        "q": q.to(torch.bfloat16).contiguous(),
        "k": k.to(torch.bfloat16).contiguous(),
        "v": v.to(torch.bfloat16).contiguous(),
        "do": do.to(torch.bfloat16).contiguous(),
        "cu_seqlens_q": torch.tensor(cu_q, dtype=torch.int32),
        "cu_seqlens_k": torch.tensor(cu_k, dtype=torch.int32),
        "o": o.detach().to(torch.float32).contiguous(),
        "lse": lse.to(torch.float32).contiguous(),
        "dq": qg.grad.to(torch.float32).contiguous(),
        "dk": kg.grad.to(torch.float32).contiguous(),
        "dv": vg.grad.to(torch.float32).contiguous(),
    }
    meta = {
        "case": name,
        "hq": HQ,
        "hkv": HKV,
        "d": D,
        "scale": scale,
        "doc_lengths": DOC_LENGTHS,
        "query_slice": list(query_slice) if query_slice else None,
        "cu_seqlens_q": cu_q,
        "cu_seqlens_k": cu_k,
        "seed": seed,
        "sdpa_vs_explicit_max_abs": sdpa_vs_explicit,
        "reference": "torch.nn.functional.scaled_dot_product_attention, float64, CPU, boolean attn_mask",
        "torch": torch.__version__,
    }
    return tensors, {"golden": json.dumps(meta)}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(here, "data", "attention"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, query_slice, seed in [("packed_docs", None, 1234), ("query_slice", (12, 30), 5678)]:
        tensors, metadata = make_case(name, query_slice, seed)
        path = os.path.join(args.out, name + ".safetensors")
        save_file(tensors, path, metadata=metadata)
        print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Generates the KDA golden files that tests/golden/test_golden_kda.cpp compares against.

Reference: flash-linear-attention's naive token-by-token KDA (fla/ops/kda/naive.py, naive_recurrent_kda),
run on the CPU in float64, one document at a time (a batch of 1, as FLA's naive reference has no cu_seqlens).
Gradients of every input come from torch autograd of
    loss = sum(o * do) + sum(final_state * dfinal_state)
with fixed random do and dfinal_state. FLA's naive chunk reference (naive_chunk_kda, chunk 64, documents
zero-padded to a multiple of 64 with g = 0 and beta = 0, which leaves the state untouched) must agree with the
recurrent one on every case; the script stops otherwise.

Conventions of FLA's naive functions and how they map onto kernels/kda.h (../shared/KDA.md):
  * layouts [B, T, H, K] for q/k, [B, T, HV, V] for v, [B, T, HV, K] for g, [B, T, HV] for beta,
    [B, HV, K, V] for the states; value head hv reads q/k head hv // (HV / H) (repeat_interleave): the same
    grouping as kernels/kda.h. Packed documents here = FLA's B=1 runs concatenated along T.
  * g is the per-channel log-decay (alpha = exp(g)), applied to the state before the delta update; beta is the
    update strength as given (no sigmoid inside the naive functions).
  * no L2 normalisation inside; q is multiplied by `scale` (default K^-1/2). Our ops take q already normalised
    and scaled, so the goldens store q_ours = l2norm(x) * dk^-1/2 and FLA is called with scale=1.0 (the script
    checks that this equals FLA's default-scale call on the unscaled q).
  * the naive functions cast their inputs to torch.float (float32). To run them in float64 the module is loaded
    from its file in the installed `fla` package (no `import fla`, which would pull in triton) with a `torch`
    whose `float` attribute is float64; the script checks that the float64 run differs from the stock float32
    run by float32 rounding only.

Files: data/kda/<case>.safetensors. q, k, v and do are bf16-exact (rounded to bf16 before the float64 run) and
stored as BF16: the CUDA kernels take them in bf16, so they see exactly the golden's inputs. Everything else is F32:
g, beta and the states as generated, the outputs and gradients as the float64 results rounded to float32 (to keep
all KDA goldens under 1.5 MB). Tensors (N packed tokens, D documents):
  inputs   q [N, H, dk], k [N, H, dk], v [N, HV, dv], g [N, HV, dk], beta [N, HV], cu_seqlens I32 [D+1],
           initial_state [D, HV, dk, dv], do [N, HV, dv], dfinal_state [D, HV, dk, dv]
  outputs  o [N, HV, dv], final_state [D, HV, dk, dv]
  grads    dq [N, H, dk], dk [N, H, dk], dv [N, HV, dv], dg [N, HV, dk], dbeta [N, HV],
           dinitial_state [D, HV, dk, dv]
Metadata key "golden": JSON with the dims, cu_seqlens, the regime of every value head, the chunk-vs-recurrent
difference and the versions used.

Cases (dims the CUDA kernels accept: dk in {32, 64, 128}, dv a multiple of 32 up to 128):
  packed_docs  H=HV=2, dk=dv=32, documents of 1, 63, 64, 65 and 200 tokens.
               Value head 0: typical g = logsigmoid(N(0,1)), beta = sigmoid(N(0,1));
               value head 1: even channels g near 0 (U[-1e-3, 0)), odd channels g near -20 (U[-20, -19)),
               beta near 1 (1 - U(1e-7, 1e-3)).
  regimes_gqa  H=2, HV=4 (value head hv reads q/k head hv // 2), dk=32, dv=64 (dk != dv catches transposed
               states; two 32-column state tiles on CUDA), one document of 65 tokens (crosses a chunk boundary).
               Value heads: 0 g near 0 with beta near 1; 1 g near -20, typical beta; 2 typical g, beta near 0
               (U(1e-7, 1e-3)); 3 typical g and beta.

Usage: python3 tests/golden/gen_kda_goldens.py [--out tests/golden/data/kda]
Needs torch, numpy, safetensors, einops and the flash-linear-attention + fla-core wheels (FLA's naive.py is read
from the installed package; it needs no GPU and no triton). The C++ test needs none of them.
"""
import argparse
import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch
from safetensors.torch import save_file

CHUNK = 64


def fla_naive_module(float_dtype):
    """FLA's fla/ops/kda/naive.py loaded from the installed package, its torch.float replaced by float_dtype."""
    spec = importlib.util.find_spec("fla")  # top-level lookup only: fla/__init__.py is not executed
    if spec is None or not spec.submodule_search_locations:
        sys.exit("flash-linear-attention is not installed: pip install flash-linear-attention fla-core")
    path = os.path.join(list(spec.submodule_search_locations)[0], "ops", "kda", "naive.py")

    class TorchWithFloat(types.ModuleType):
        def __getattr__(self, name):  # everything but `float` comes from torch
            return getattr(torch, name)

    shim = TorchWithFloat("torch")
    shim.float = float_dtype
    mod_spec = importlib.util.spec_from_file_location(f"fla_kda_naive_{float_dtype}".replace(".", "_"), path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    mod.torch = shim  # the functions look `torch` up in their module globals at call time
    return mod, path


def fla_version():
    try:
        from importlib.metadata import version

        return f"flash-linear-attention {version('flash-linear-attention')}, fla-core {version('fla-core')}"
    except Exception:  # noqa: BLE001 - only for the metadata string
        return "flash-linear-attention (version unknown)"


def l2norm(x):
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def bf16_exact(x):
    """x rounded to the nearest bf16 (ties to even), as float64."""
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).to(torch.bfloat16).double().numpy()


# Stored as BF16 (exact); the rest of the floating inputs as F32.
BF16_INPUTS = ("q", "k", "v", "do")


def make_inputs(rng, doc_lens, h, hv, dk, dv, gate_fn):
    """Random inputs as float32 arrays (the values the C++ test reads); gate_fn fills g and beta per value head."""
    n, d = sum(doc_lens), len(doc_lens)
    q = l2norm(rng.standard_normal((n, h, dk))) * dk ** -0.5
    k = l2norm(rng.standard_normal((n, h, dk)))
    v = rng.standard_normal((n, hv, dv))
    g = np.empty((n, hv, dk))
    beta = np.empty((n, hv))
    regimes = gate_fn(rng, g, beta)
    x = dict(
        q=q, k=k, v=v, g=g, beta=beta,
        initial_state=0.5 * rng.standard_normal((d, hv, dk, dv)),
        do=rng.standard_normal((n, hv, dv)),
        dfinal_state=rng.standard_normal((d, hv, dk, dv)),
    )
    x = {name: (bf16_exact(a) if name in BF16_INPUTS else a).astype(np.float32) for name, a in x.items()}
    x["cu_seqlens"] = np.concatenate([[0], np.cumsum(doc_lens)]).astype(np.int32)
    assert (x["g"] <= 0).all() and ((x["beta"] > 0) & (x["beta"] < 1)).all()
    return x, regimes


def typical(rng, g, beta, hv):
    n, _, dk = g.shape
    g[:, hv] = logsigmoid(rng.standard_normal((n, dk)))
    beta[:, hv] = sigmoid(rng.standard_normal(n))


def near_zero_g(rng, shape):
    return rng.uniform(-1e-3, 0.0, shape)


def near_minus20_g(rng, shape):
    return rng.uniform(-20.0, -19.0, shape)


def near_one_beta(rng, n):
    return 1.0 - rng.uniform(1e-7, 1e-3, n)


def near_zero_beta(rng, n):
    return rng.uniform(1e-7, 1e-3, n)


def gates_packed_docs(rng, g, beta):
    n, hv, dk = g.shape
    assert hv == 2
    typical(rng, g, beta, 0)
    g[:, 1, 0::2] = near_zero_g(rng, (n, dk // 2))
    g[:, 1, 1::2] = near_minus20_g(rng, (n, dk // 2))
    beta[:, 1] = near_one_beta(rng, n)
    return ["typical g, beta", "even channels g near 0, odd channels g near -20, beta near 1"]


def gates_regimes_gqa(rng, g, beta):
    n, hv, dk = g.shape
    assert hv == 4
    for head in range(hv):
        typical(rng, g, beta, head)
    g[:, 0] = near_zero_g(rng, (n, dk))
    beta[:, 0] = near_one_beta(rng, n)
    g[:, 1] = near_minus20_g(rng, (n, dk))
    beta[:, 2] = near_zero_beta(rng, n)
    return ["g near 0, beta near 1", "g near -20, typical beta", "typical g, beta near 0", "typical g, beta"]


CASES = [
    # name, seed, document lengths, H, HV, dk, dv, gates
    ("packed_docs", 41, [1, 63, 64, 65, 200], 2, 2, 32, 32, gates_packed_docs),
    ("regimes_gqa", 42, [65], 2, 4, 32, 64, gates_regimes_gqa),
]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def run_case(naive64, naive32, x):
    """FLA's recurrent reference per document in float64: outputs and autograd gradients (packed, float64)."""
    cu = x["cu_seqlens"]
    t = {name: torch.from_numpy(x[name]).double() for name in x if name != "cu_seqlens"}
    leaves = {name: t[name].clone().requires_grad_(True) for name in ("q", "k", "v", "g", "beta", "initial_state")}
    outs, finals = [], []
    loss = 0.0
    chunk_err = fp32_err = scale_err = 0.0
    for d in range(len(cu) - 1):
        a, b = int(cu[d]), int(cu[d + 1])
        doc = {name: leaves[name][a:b].unsqueeze(0) for name in ("q", "k", "v", "g", "beta")}
        s0 = leaves["initial_state"][d : d + 1]
        o, s = naive64.naive_recurrent_kda(**doc, scale=1.0, initial_state=s0, output_final_state=True)
        assert o.dtype == torch.float64 and s.dtype == torch.float64
        loss = loss + (o * t["do"][a:b].unsqueeze(0)).sum() + (s * t["dfinal_state"][d : d + 1]).sum()
        outs.append(o[0])
        finals.append(s[0])
        with torch.no_grad():
            # FLA's own convention: unscaled q and scale = dk^-1/2 inside must give the same o.
            dk = doc["q"].shape[-1]
            o_def, _ = naive64.naive_recurrent_kda(doc["q"] * dk ** 0.5, doc["k"], doc["v"], doc["g"], doc["beta"],
                                                   initial_state=s0, output_final_state=True)
            scale_err = max(scale_err, rel(o_def, o))
            # The chunk reference on the document padded to a multiple of 64 (g = 0, beta = 0: identity steps).
            pad = (-(b - a)) % CHUNK
            padded = {name: torch.cat([v_, v_.new_zeros(1, pad, *v_.shape[2:])], 1) for name, v_ in doc.items()}
            oc, sc = naive64.naive_chunk_kda(**padded, scale=1.0, initial_state=s0, output_final_state=True,
                                             chunk_size=CHUNK)
            chunk_err = max(chunk_err, rel(oc[:, : b - a], o), rel(sc, s))
            # Stock FLA (float32 inside): must be float32 rounding away from the float64 run, no more.
            o32, s32 = naive32.naive_recurrent_kda(**{n_: v_.float() for n_, v_ in doc.items()}, scale=1.0,
                                                   initial_state=s0.float(), output_final_state=True)
            fp32_err = max(fp32_err, rel(o32.double(), o), rel(s32.double(), s))
    loss.backward()
    res = {"o": torch.cat(outs, 0), "final_state": torch.stack(finals, 0)}
    for name in ("q", "k", "v", "g", "beta", "initial_state"):
        res["d" + name] = leaves[name].grad
    checks = {"chunk_vs_recurrent_rel": chunk_err, "fp32_vs_fp64_rel": fp32_err, "scale_convention_rel": scale_err}
    return res, checks


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(here, "data", "kda"))
    args = ap.parse_args()
    naive64, path = fla_naive_module(torch.float64)
    print(f"FLA naive reference: {path}")
    naive32, _ = fla_naive_module(torch.float32)
    os.makedirs(args.out, exist_ok=True)
    total = 0
    for name, seed, doc_lens, h, hv, dk, dv, gates in CASES:
        rng = np.random.default_rng(seed)
        x, regimes = make_inputs(rng, doc_lens, h, hv, dk, dv, gates)
        res, checks = run_case(naive64, naive32, x)
        # float64 must be far below float32 rounding; the stock float32 run must be near it (proves the shim works).
        if checks["chunk_vs_recurrent_rel"] > 1e-10 or checks["scale_convention_rel"] > 1e-12:
            sys.exit(f"{name}: FLA's references disagree: {checks}")
        if not 1e-9 < checks["fp32_vs_fp64_rel"] < 1e-4:
            sys.exit(f"{name}: the float64 run is not float64 (or float32 is broken): {checks}")
        tensors = {key: torch.from_numpy(val) for key, val in x.items()}
        for key in BF16_INPUTS:
            tensors[key] = tensors[key].to(torch.bfloat16)
            assert torch.equal(tensors[key].float(), torch.from_numpy(x[key])), f"{name}: {key} is not bf16-exact"
        for key, val in res.items():
            assert torch.isfinite(val).all(), f"{name}: {key} has non-finite values"
            tensors[key] = val.detach().float().contiguous()
        meta = dict(
            case=name, doc_lens=doc_lens, cu_seqlens=x["cu_seqlens"].tolist(), h=h, hv=hv, dk=dk, dv=dv, seed=seed,
            value_head_regimes=regimes, reference="fla/ops/kda/naive.py naive_recurrent_kda (float64, scale=1.0)",
            loss="sum(o * do) + sum(final_state * dfinal_state)",
            checks={key: float(f"{val:.3e}") for key, val in checks.items()},
            generator=f"tests/golden/gen_kda_goldens.py ({fla_version()}, torch {torch.__version__})",
        )
        out = os.path.join(args.out, f"{name}.safetensors")
        # One metadata key: safetensors orders metadata keys arbitrarily, and the files should be reproducible.
        save_file(tensors, out, metadata={"golden": json.dumps(meta, sort_keys=True)})
        size = os.path.getsize(out)
        total += size
        norms = ", ".join(f"{key} {tensors[key].norm().item():.3g}" for key in res)
        print(f"{name}: N={sum(doc_lens)} docs={doc_lens} H={h} HV={hv} dk={dk} dv={dv}; {checks}; {size} bytes")
        print(f"  norms: {norms}")
    print(f"total {total} bytes -> {args.out}")
    if total >= 1_500_000:
        sys.exit("KDA goldens exceed 1.5 MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

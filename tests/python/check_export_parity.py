#!/usr/bin/env python3
"""Parity of `hydistill export` with a real client: the C++ exporter's output read by safetensors and transformers.

Usage: check_export_parity.py DIR, where DIR holds one folder per case as written by the C++ test
ExportParity.WriteCase (tests/unit/test_export.cpp, run with HYD_EXPORT_PARITY_DIR=DIR):
    CASE/model_f32/        an f32 export (config.json, model.safetensors, the two .py files)
    CASE/model_bf16/       the same model exported in bf16
    CASE/reference.safetensors   input_ids I64 [B, T] and the C++ fp32 logits F32 [B, T, V]
Per case:
  1. safetensors.safe_open reads every tensor of both exports; the set of names, each shape and each dtype equal
     docs/export.md's table derived here from config.json (BF16 / F32 matrices, A_log and dt_bias F32 always,
     lm_head absent when tied, MoE layers with the router and per-expert matrices); every bf16 value is the f32
     export's value rounded to bf16. (tests/python/check_export_moe.py reuses read_export for MoE students.)
  2. AutoModelForCausalLM.from_pretrained(model_f32, trust_remote_code=True) loads with no missing, unexpected or
     mismatched keys, as the class shipped in the folder; its fp32 logits match the C++ forward: rel < 1e-4
     (||out - ref|| / ||ref||).
  3. The bf16 export loads in bf16 (A_log / dt_bias kept fp32) and its logits stay within 5e-2 of the C++ ones.
Exit 0 pass, 1 fail, 77 skipped (torch, transformers or safetensors not importable).
"""
import json
import os
import sys
import tempfile

try:
    import torch
    import transformers  # noqa: F401
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
except Exception as e:  # noqa: BLE001
    print(f"SKIPPED: torch/transformers/safetensors not importable ({e})")
    sys.exit(77)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAILURES = []


def check(name, cond, msg=""):
    print(f"  {'ok  ' if cond else 'FAIL'} {name}" + (f": {msg}" if msg and not cond else ""))
    if not cond:
        FAILURES.append(f"{name}: {msg}")


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def is_moe_layer(cfg, i):
    """docs/export.md: layer i has the MoE FFN iff num_experts > 0, i not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0 (absent keys: a dense model)."""
    step = cfg.get("decoder_sparse_step", 1)
    return (cfg.get("num_experts", 0) > 0 and step > 0 and i not in cfg.get("mlp_only_layers", [])
            and (i + 1) % step == 0)


def expected_tensors(cfg):
    """docs/export.md's tensor table: name -> (shape, dtype) for this config.json."""
    mat = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg["torch_dtype"]]
    f32 = torch.float32
    V, D, F = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    A, G, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    H, HV = cfg["kda_num_heads"], cfg["kda_num_v_heads"]
    dk, dv, K = cfg["kda_head_dim"], cfg["kda_v_head_dim"], cfg["kda_conv_size"]
    e = {"model.embed_tokens.weight": ([V, D], mat), "model.norm.weight": ([D], mat)}
    if not cfg["tie_word_embeddings"]:
        e["lm_head.weight"] = ([V, D], mat)
    for i, kind in enumerate(cfg["mixer_types"]):
        p = f"model.layers.{i}."
        e[p + "input_layernorm.weight"] = ([D], mat)
        e[p + "post_attention_layernorm.weight"] = ([D], mat)
        if is_moe_layer(cfg, i):
            E, Fe = cfg["num_experts"], cfg["moe_intermediate_size"]
            e[p + "mlp.gate.weight"] = ([E, D], mat)
            for x in range(E):
                e[p + f"mlp.experts.{x}.gate_proj.weight"] = ([Fe, D], mat)
                e[p + f"mlp.experts.{x}.up_proj.weight"] = ([Fe, D], mat)
                e[p + f"mlp.experts.{x}.down_proj.weight"] = ([D, Fe], mat)
        else:
            e[p + "mlp.gate_proj.weight"] = ([F, D], mat)
            e[p + "mlp.up_proj.weight"] = ([F, D], mat)
            e[p + "mlp.down_proj.weight"] = ([D, F], mat)
        a = p + "self_attn."
        if kind == "kda":
            e.update({
                a + "q_proj.weight": ([H * dk, D], mat), a + "k_proj.weight": ([H * dk, D], mat),
                a + "v_proj.weight": ([HV * dv, D], mat),
                a + "q_conv1d.weight": ([H * dk, 1, K], mat), a + "k_conv1d.weight": ([H * dk, 1, K], mat),
                a + "v_conv1d.weight": ([HV * dv, 1, K], mat),
                a + "f_proj.0.weight": ([dv, D], mat), a + "f_proj.1.weight": ([HV * dk, dv], mat),
                a + "b_proj.weight": ([HV, D], mat), a + "A_log": ([HV], f32), a + "dt_bias": ([HV * dk], f32),
                a + "g_proj.0.weight": ([dv, D], mat), a + "g_proj.1.weight": ([HV * dv, dv], mat),
                a + "g_proj.1.bias": ([HV * dv], mat), a + "o_norm.weight": ([dv], mat),
                a + "o_proj.weight": ([D, HV * dv], mat),
            })
        else:
            assert kind in ("rope_attention", "nope_attention"), kind
            e[a + "q_proj.weight"] = ([A * d, D], mat)
            e[a + "k_proj.weight"] = ([G * d, D], mat)
            e[a + "v_proj.weight"] = ([G * d, D], mat)
            if cfg["attention_bias"]:
                e[a + "q_proj.bias"] = ([A * d], mat)
                e[a + "k_proj.bias"] = ([G * d], mat)
                e[a + "v_proj.bias"] = ([G * d], mat)
            if cfg["qk_norm"]:
                e[a + "q_norm.weight"] = ([d], mat)
                e[a + "k_norm.weight"] = ([d], mat)
            e[a + "o_proj.weight"] = ([D, A * d], mat)
    return e


def read_export(folder, label):
    """All tensors of the export through safe_open, checked against the table; name -> tensor."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    check(f"{label} config model_type / auto_map", cfg.get("model_type") == "hydistill_hybrid"
          and cfg.get("auto_map", {}).get("AutoModelForCausalLM") == "modeling_hydistill.HydistillForCausalLM")
    want = expected_tensors(cfg)
    got = {}
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            got[name] = f.get_tensor(name)
    check(f"{label} tensor names = docs/export.md table", set(got) == set(want),
          f"missing {sorted(set(want) - set(got))}, unexpected {sorted(set(got) - set(want))}")
    bad = [f"{n}: {list(t.shape)} {t.dtype} (want {want[n][0]} {want[n][1]})" for n, t in got.items()
           if n in want and (list(t.shape) != want[n][0] or t.dtype != want[n][1])]
    check(f"{label} {len(got)} tensors with expected shape and dtype", not bad, "; ".join(bad[:5]))
    nonfinite = [n for n, t in got.items() if not torch.isfinite(t.float()).all()]
    check(f"{label} all values finite", not nonfinite, str(nonfinite[:5]))
    return cfg, got


def check_case(case_dir, label, work):
    print(f"case {label}")
    with safe_open(os.path.join(case_dir, "reference.safetensors"), framework="pt") as f:
        ids = f.get_tensor("input_ids").long()
        ref = f.get_tensor("logits").float()

    cfg32, t32 = read_export(os.path.join(case_dir, "model_f32"), "f32 export")
    cfg16, t16 = read_export(os.path.join(case_dir, "model_bf16"), "bf16 export")
    differ = [n for n in t16 if n in t32 and not torch.equal(
        t16[n], t32[n].to(t16[n].dtype))]
    check("bf16 export values = f32 export values rounded to bf16", not differ, str(differ[:5]))
    check("configs identical but torch_dtype",
          {k: v for k, v in cfg32.items() if k != "torch_dtype"} == {k: v for k, v in cfg16.items() if k != "torch_dtype"})
    print(f"  mixer_types {cfg32['mixer_types']}, tied {cfg32['tie_word_embeddings']}, "
          f"rope_scaling {cfg32['rope_scaling']}, attention_bias {cfg32['attention_bias']}, qk_norm {cfg32['qk_norm']}")

    model, info = AutoModelForCausalLM.from_pretrained(os.path.join(case_dir, "model_f32"), trust_remote_code=True,
                                                       output_loading_info=True)
    model = model.float().eval()
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    check("f32 export loads with no missing/unexpected/mismatched keys", not problems, str(problems))
    check("class comes from the exported modeling file", type(model).__name__ == "HydistillForCausalLM")
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    check("logits shape", list(out.shape) == list(ref.shape), f"{list(out.shape)} vs {list(ref.shape)}")
    err = rel_err(out, ref)
    print(f"  f32 logits vs C++: rel {err:.3e} (max|diff| {(out - ref).abs().max().item():.3e}, "
          f"|ref| rms {ref.pow(2).mean().sqrt().item():.3f})")
    check("f32 transformers logits == C++ logits (rel < 1e-4)", err < 1e-4, f"rel {err:.3e}")

    bf = AutoModelForCausalLM.from_pretrained(os.path.join(case_dir, "model_bf16"), trust_remote_code=True,
                                              dtype=torch.bfloat16).eval()
    kda_layers = [i for i, t in enumerate(cfg16["mixer_types"]) if t == "kda"]
    if kda_layers:
        attn = bf.model.layers[kda_layers[0]].self_attn
        check("bf16 load keeps A_log/dt_bias fp32", attn.A_log.dtype == torch.float32
              and attn.dt_bias.dtype == torch.float32 and attn.q_proj.weight.dtype == torch.bfloat16)
    with torch.no_grad():
        out16 = bf(input_ids=ids).logits.float()
    err16 = rel_err(out16, ref)
    print(f"  bf16 logits vs C++ f32: rel {err16:.3e}")
    check("bf16 export logits within 5e-2 of the C++ f32 logits", err16 < 5e-2, f"rel {err16:.3e}")


def main():
    if len(sys.argv) != 2:
        print("usage: check_export_parity.py DIR")
        return 2
    root = sys.argv[1]
    torch.set_num_threads(2)
    work = tempfile.mkdtemp(prefix="hyd_parity_modules_")
    os.environ["HF_MODULES_CACHE"] = os.path.join(work, "hf_modules")
    cases = sorted(c for c in os.listdir(root) if os.path.isfile(os.path.join(root, c, "reference.safetensors")))
    check("parity cases written by the C++ test", len(cases) > 0, f"none under {root}")
    for c in cases:
        try:
            check_case(os.path.join(root, c), c, work)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            check(f"case {c} ran", False, repr(e))
    if FAILURES:
        print(f"FAILED ({len(FAILURES)}):")
        for f in FAILURES:
            print("  " + f)
        return 1
    print(f"PASSED ({len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

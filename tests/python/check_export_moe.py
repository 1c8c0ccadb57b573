#!/usr/bin/env python3
"""Parity of `hydistill export` for Mixture-of-Experts students (qwen3_moe teachers), run by
tests/cli/test_export_moe.sh, which writes into EXPORTS:
    ka_f32/, ka_bf16/   a KA student after stage 1 + stage 2 (MoE FFN trained), float32 and bfloat16 exports
    t_f32/              a T student after stage 2 with a CE term (MoE FFN and attention trained), float32
    t0_f32/             a T student with no step (the teacher's weights), float32
    ka_eval.jsonl, t_eval.jsonl   `hydistill eval` of the KA and T checkpoints on EVAL_DATA (every document one
                        whole row of seq_len tokens, each document once)
Checks:
  1. Every export's tensors (safetensors.safe_open): names, shapes and dtypes equal docs/export.md's table derived
     from config.json (check_export_parity.read_export: the MoE layer's mlp.gate.weight [E, D] and
     mlp.experts.{e}.{gate,up,down}_proj.weight, the dense layer's mlp.{gate,up,down}_proj.weight); values finite;
     the bf16 export is the f32 one rounded; the configs carry the teacher's MoE fields (num_experts,
     num_experts_per_tok, moe_intermediate_size, norm_topk_prob, decoder_sparse_step, mlp_only_layers).
  2. t0_f32 holds exactly the teacher's tensors under the teacher's names (bit-equal, the teacher is float32),
     its attention and norms included; the trained students' router and experts differ from the teacher's.
  3. AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) loads each export with no missing,
     unexpected or mismatched key, as the shipped HydistillForCausalLM, with the MoE FFN on the MoE layers only.
  4. t0_f32's logits on the golden token sequences equal transformers' Qwen3Moe golden logits
     (tests/golden/data/qwen3_moe/golden.safetensors): rel < 1e-5.
  5. t_f32's logits equal those of transformers' Qwen3MoeForCausalLM loading the same safetensors file (the export's
     names are qwen3_moe's) with the teacher's config: rel < 1e-5, on the evaluation documents.
  6. `hydistill eval` (the C++ models) against the exported modeling file and transformers' teacher on the same 16
     documents: held-out tokens 16 x 31; student loss and teacher loss within rel 1e-4 (the dense export parity
     test's tolerance); KL(teacher || student) within 1e-4 of its value + 1e-6; top-1 agreement within 1 token.
  7. ka_bf16 loads in bf16 (A_log / dt_bias fp32) and its logits stay within 5e-2 of the f32 export's.
Exit 0 pass, 1 fail, 77 skipped (torch, transformers, safetensors or h5py not importable).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

try:
    import h5py
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers  # noqa: F401
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
except Exception as e:  # noqa: BLE001
    print(f"SKIPPED: torch/transformers/safetensors/h5py not importable ({e})")
    sys.exit(77)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_export_parity as parity  # noqa: E402
from check_export_parity import check, read_export, rel_err  # noqa: E402

MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
            "mlp_only_layers")


def read_safetensors(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def teacher_moe_fields(tcfg):
    experts = tcfg.get("num_experts", tcfg.get("num_local_experts"))
    return dict(num_experts=experts, num_experts_per_tok=tcfg["num_experts_per_tok"],
                moe_intermediate_size=tcfg["moe_intermediate_size"], norm_topk_prob=tcfg["norm_topk_prob"],
                decoder_sparse_step=tcfg.get("decoder_sparse_step", 1), mlp_only_layers=tcfg.get("mlp_only_layers", []))


def load_export(folder, label, dtype=torch.float32):
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True,
                                                       dtype=dtype)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    check(f"{label} loads with no missing/unexpected/mismatched keys", not problems, str(problems))
    check(f"{label} class is the exported HydistillForCausalLM", type(model).__name__ == "HydistillForCausalLM")
    return model.eval()


def eval_documents(path):
    with h5py.File(path, "r") as f:
        tokens, off = f["tokens"][:], f["doc_offsets"][:]
    docs = [tokens[off[i]:off[i + 1]] for i in range(len(off) - 1)]
    return torch.from_numpy(np.stack(docs).astype(np.int64))  # equal lengths: [N, T]


def held_out_metrics(student_logits, teacher_logits, ids):
    """hydistill eval's held-out metrics (distill/evaluation.h) over every row, target = the next token of the row."""
    s = student_logits[:, :-1].double().reshape(-1, student_logits.shape[-1])
    t = teacher_logits[:, :-1].double().reshape(-1, teacher_logits.shape[-1])
    y = ids[:, 1:].reshape(-1)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return dict(tokens=y.numel(), student_loss=F.nll_loss(ls, y).item(), teacher_loss=F.nll_loss(lt, y).item(),
                kl=(lt.exp() * (lt - ls)).sum(-1).mean().item(),
                top1_agreement=(s.argmax(-1) == t.argmax(-1)).double().mean().item())


def compare_with_eval(label, ours, record):
    theirs = {k: record["held_out_tokens" if k == "tokens" else k] for k in ours}
    print(f"  {label}: hydistill eval {json.dumps(theirs)}")
    print(f"  {label}: python         {json.dumps(ours)}")
    check(f"{label}: eval held-out tokens = {ours['tokens']}", record["held_out_tokens"] == ours["tokens"],
          f"eval has {record['held_out_tokens']} (a document outside the validation split?)")
    for k in ("student_loss", "teacher_loss"):
        e = abs(ours[k] - record[k]) / abs(record[k])
        print(f"  {label}: {k} rel {e:.3e}")
        check(f"{label}: {k} == hydistill eval's (rel < 1e-4)", e < 1e-4, f"rel {e:.3e}")
    d = abs(ours["kl"] - record["kl"])
    print(f"  {label}: kl |diff| {d:.3e} (kl {record['kl']:.4g})")
    check(f"{label}: KL == hydistill eval's (|diff| < 1e-4 kl + 1e-6)", d < 1e-4 * record["kl"] + 1e-6, f"{d:.3e}")
    tokens = abs(ours["top1_agreement"] - record["top1_agreement"]) * ours["tokens"]
    check(f"{label}: top-1 agreement == hydistill eval's (within 1 token)", tokens < 1.5, f"{tokens:.1f} tokens")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exports", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--eval-data", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = tempfile.mkdtemp(prefix="hyd_export_moe_")
    os.environ["HF_MODULES_CACHE"] = os.path.join(work, "hf_modules")
    ex = lambda name: os.path.join(args.exports, name)  # noqa: E731
    with open(os.path.join(args.teacher, "config.json")) as f:
        tcfg = json.load(f)
    teacher_tensors = read_safetensors(os.path.join(args.teacher, "model.safetensors"))
    want_moe = teacher_moe_fields(tcfg)
    moe_layers = [i for i in range(tcfg["num_hidden_layers"]) if parity.is_moe_layer(want_moe, i)]

    print("1. tensors and config.json")
    cfgs, tensors = {}, {}
    for name in ("ka_f32", "ka_bf16", "t_f32", "t0_f32"):
        cfgs[name], tensors[name] = read_export(ex(name), name)
        got = {k: cfgs[name].get(k) for k in MOE_KEYS}
        check(f"{name} config MoE fields = the teacher's", got == want_moe, f"{got} vs {want_moe}")
    check("the teacher has a MoE layer and a dense one", 0 < len(moe_layers) < tcfg["num_hidden_layers"],
          str(moe_layers))
    differ = [n for n in tensors["ka_bf16"] if not torch.equal(tensors["ka_bf16"][n],
                                                                tensors["ka_f32"][n].to(tensors["ka_bf16"][n].dtype))]
    check("bf16 export values = f32 export values rounded to bf16", not differ, str(differ[:5]))
    check("ka configs identical but torch_dtype", {k: v for k, v in cfgs["ka_f32"].items() if k != "torch_dtype"}
          == {k: v for k, v in cfgs["ka_bf16"].items() if k != "torch_dtype"})

    print("2. weights against the teacher's")
    t0 = tensors["t0_f32"]
    check("t0 export: the teacher's tensor names", set(t0) == set(teacher_tensors),
          f"missing {sorted(set(teacher_tensors) - set(t0))[:5]}, "
          f"unexpected {sorted(set(t0) - set(teacher_tensors))[:5]}")
    unequal = [n for n in t0 if n in teacher_tensors and not torch.equal(t0[n], teacher_tensors[n].float())]
    check("t0 export: every tensor bit-equal to the teacher's", not unequal, str(unequal[:5]))
    for name in ("ka_f32", "t_f32"):
        for layer in moe_layers:
            p = f"model.layers.{layer}.mlp."
            moved = {k: (tensors[name][p + k] - teacher_tensors[p + k].float()).abs().max().item()
                     for k in ("gate.weight", "experts.0.gate_proj.weight", "experts.0.down_proj.weight")}
            check(f"{name}: layer {layer} router and experts trained (differ from the teacher's)",
                  all(v > 0 for v in moved.values()), str(moved))

    print("3. loading through transformers")
    models = {name: load_export(ex(name), name) for name in ("ka_f32", "t_f32", "t0_f32")}
    for name, m in models.items():
        kinds = [type(layer.mlp).__name__ for layer in m.model.layers]
        want = ["HydistillSparseMoe" if i in moe_layers else "HydistillMLP" for i in range(len(kinds))]
        check(f"{name}: FFN kinds {kinds}", kinds == want, f"want {want}")

    print("4. the untrained T student against transformers' golden logits")
    golden = read_safetensors(os.path.join(args.teacher, "golden.safetensors"))
    with torch.no_grad():
        out = models["t0_f32"](input_ids=golden["input_ids"].long()).logits
    e = rel_err(out, golden["logits"].float())
    print(f"  t0 logits vs golden (transformers Qwen3Moe): rel {e:.3e}")
    check("t0 logits == golden logits (rel < 1e-5)", e < 1e-5, f"rel {e:.3e}")

    print("5. the trained T student against transformers' Qwen3Moe with the exported weights")
    ids = eval_documents(args.eval_data)
    hf_dir = os.path.join(work, "qwen3_moe_t")
    os.makedirs(hf_dir)
    shutil.copy(os.path.join(args.teacher, "config.json"), hf_dir)
    os.symlink(os.path.abspath(os.path.join(ex("t_f32"), "model.safetensors")),
               os.path.join(hf_dir, "model.safetensors"))
    ref_model, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True, dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    check("transformers' Qwen3Moe loads the T export's tensors", not problems and
          type(ref_model).__name__ == "Qwen3MoeForCausalLM", f"{type(ref_model).__name__} {problems}")
    with torch.no_grad():
        ref = ref_model.eval()(input_ids=ids).logits
        out = models["t_f32"](input_ids=ids).logits
    e = rel_err(out, ref)
    print(f"  t logits vs transformers Qwen3Moe: rel {e:.3e}")
    check("t logits == transformers' Qwen3Moe logits (rel < 1e-5)", e < 1e-5, f"rel {e:.3e}")

    print("6. hydistill eval (C++) against the exported modeling file and transformers' teacher")
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
        student_logits = {name: models[name](input_ids=ids).logits for name in ("ka_f32", "t_f32")}
    for name, record_file in (("ka_f32", "ka_eval.jsonl"), ("t_f32", "t_eval.jsonl")):
        with open(ex(record_file)) as f:
            record = [json.loads(line) for line in f][-1]
        compare_with_eval(name, held_out_metrics(student_logits[name], teacher_logits, ids), record)

    print("7. the bf16 export in bf16")
    bf = load_export(ex("ka_bf16"), "ka_bf16", dtype=torch.bfloat16)
    kda = [i for i, t in enumerate(cfgs["ka_bf16"]["mixer_types"]) if t == "kda"]
    if kda:
        attn = bf.model.layers[kda[0]].self_attn
        check("bf16 load keeps A_log/dt_bias fp32", attn.A_log.dtype == torch.float32
              and attn.dt_bias.dtype == torch.float32 and attn.q_proj.weight.dtype == torch.bfloat16)
    check("bf16 load: router in bf16 storage", bf.model.layers[moe_layers[0]].mlp.gate.weight.dtype == torch.bfloat16)
    with torch.no_grad():
        out16 = bf(input_ids=ids).logits.float()
    e16 = rel_err(out16, student_logits["ka_f32"])
    print(f"  bf16 logits vs f32 export: rel {e16:.3e}")
    check("bf16 export logits within 5e-2 of the f32 export's", e16 < 5e-2, f"rel {e16:.3e}")

    shutil.rmtree(work, ignore_errors=True)
    if parity.FAILURES:
        print(f"FAILED ({len(parity.FAILURES)}):")
        for f in parity.FAILURES:
            print("  " + f)
        return 1
    print("PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())

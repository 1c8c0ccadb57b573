#!/usr/bin/env python3
"""Tests of the exported modeling files checkpoint/python/{configuration,modeling}_hydistill.py (CPU, seconds).

  1. rope_attention-only students with weights copied from small random transformers teachers give the teacher's
     logits (fp32, rel < 1e-5): Llama with every RoPE variant (default, linear, llama3, yarn; yarn also at
     positions 3000+), Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm, head_dim != hidden/heads, tied embeddings),
     Qwen3Moe (the MoE FFN: top-2 renormalised with a dense layer from mlp_only_layers; top-3 not renormalised
     with decoder_sparse_step 2 and tied embeddings; 5.x's fused expert tensors split into qwen3_moe's
     per-expert names, which the student's state dict must take with no missing or unexpected key).
     Also the RoPE inverse frequencies and attention factor against transformers' own functions.
  2. kda_recurrence vs FLA's naive_recurrent_kda (fla/ops/kda/naive.py loaded from its file, run in float64) on
     random inputs with grouped value heads and extreme gate regimes: rel < 1e-10.
  3. Our KDA mixer vs FLA's KimiDeltaAttention layer: identical parameter names and shapes (FLA's state_dict
     loads strictly into ours and back). FLA's forward needs triton kernels: on a CUDA machine the real layer is
     compared (fp32, rel < 2e-3); without one that case is skipped with a message and FLA's layer runs instead
     with its kernels replaced by FLA's torch reference naive_recurrent_kda plus torch equivalents of the fused
     conv / l2norm / gate / gated norm, in float64 (rel < 1e-10): this checks the layer's wiring (which projection
     feeds what, head layouts, gating order). FLA's naive_kda_gate is checked against the gate formula (it runs
     in float32, rel < 1e-6).
  4. An export-style directory (config.json with auto_map, the two .py files, model.safetensors from
     safetensors.torch.save_file) loads with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
     with no missing/unexpected keys and gives bit-identical logits; so does a save_pretrained round trip; greedy
     generate() (no cache) equals an argmax loop; a padding mask is refused; a bf16 load keeps A_log/dt_bias fp32
     and stays within 5e-2 of the fp32 logits.
Exit 0 pass, 1 fail, 77 skipped (torch or transformers missing).
"""
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import traceback
import types

try:
    import torch
    import transformers
except Exception as e:  # noqa: BLE001
    print(f"SKIPPED: torch/transformers not importable ({e})")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(HERE))
PYDIR = os.path.join(SRC, "checkpoint", "python")
sys.path.insert(0, PYDIR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import configuration_hydistill  # noqa: E402
import modeling_hydistill  # noqa: E402
from configuration_hydistill import HydistillConfig  # noqa: E402
from modeling_hydistill import HydistillForCausalLM, HydistillKDA, kda_recurrence  # noqa: E402

FAILURES = []
SKIPS = []


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def check(name, cond, msg=""):
    if cond:
        print(f"  ok   {name} {msg}")
    else:
        print(f"  FAIL {name} {msg}")
        FAILURES.append(name)


def check_rel(name, out, ref, tol):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    e = rel_err(out, ref)
    check(name, e < tol, f"rel={e:.3e} (tol {tol:g})")


# ----------------------------------------------------------------------------------------------------------------
# 1. Teacher parity


SKELETON = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6)

ROPE_VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32,
             "beta_slow": 1},
}


def hf_config(cls, rope_theta, rope_scaling, **kw):
    """A transformers config from the 4.x-style rope fields (what our exporter writes), on 4.x or 5.x."""
    kw = dict(kw, rope_theta=rope_theta)
    if rope_scaling is not None:
        kw["rope_scaling"] = dict(rope_scaling)
    return cls(**kw)


def student_from_teacher(teacher, rope_theta, rope_scaling, **kw):
    cfg = HydistillConfig(rope_theta=rope_theta, rope_scaling=rope_scaling, mixer_types=["rope_attention"] * kw["num_hidden_layers"], **kw)
    student = HydistillForCausalLM(cfg).eval()
    sd = {k: v for k, v in teacher.state_dict().items() if "rotary_emb" not in k}
    missing, unexpected = student.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"
    return student


def teacher_parity(label, cls, rope_theta, rope_scaling, position_offset=0, **kw):
    torch.manual_seed(hash(label) % 1000)
    teacher = cls.from_config(hf_config(cls.config_class, rope_theta, rope_scaling, **kw)) if hasattr(cls, "from_config") else None
    if teacher is None:
        teacher = cls(hf_config(cls.config_class, rope_theta, rope_scaling, **kw))
    teacher = teacher.float().eval()
    with torch.no_grad():  # random norms and biases so the copy of every tensor matters
        for name, p in teacher.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
    student = student_from_teacher(teacher, rope_theta, rope_scaling, **kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 13))
    pos = (torch.arange(13) + position_offset).unsqueeze(0).expand(2, 13)
    with torch.no_grad():
        ref = teacher(input_ids=ids, position_ids=pos).logits
        out = student(input_ids=ids, position_ids=pos).logits
    check_rel(f"parity {label}", out, ref, 1e-5)


def per_expert_state_dict(sd):
    """A qwen3_moe state dict with the experts as separate tensors (transformers 4.x's names, and what
    save_pretrained writes): 5.x's fused mlp.experts.gate_up_proj [E, 2F, D] (rows gate; up) and down_proj
    [E, D, F] split into mlp.experts.{e}.{gate,up,down}_proj.weight."""
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p, F_ = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = v[e, :F_]
                out[f"{p}{e}.up_proj.weight"] = v[e, F_:]
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = v[e]
        elif "rotary_emb" not in k:
            out[k] = v
    return out


def qwen3_moe_parity(label, cls, kw):
    """rope_attention student with the MoE FFN vs transformers' Qwen3Moe: same weights, same logits (fp32)."""
    torch.manual_seed(hash(label) % 1000)
    teacher = cls(hf_config(cls.config_class, 1e6, None, **kw)).float().eval()
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # router logits O(3): distinct expert choices per token
                p.copy_(torch.randn_like(p) * (3.0 / p.shape[-1] ** 0.5))
            elif "experts" in name:
                p.copy_(torch.randn_like(p) * (1.0 / p.shape[-1] ** 0.5))
    fields = {k: v for k, v in kw.items() if k != "tie_word_embeddings"}
    cfg = HydistillConfig(rope_theta=1e6, qk_norm=True, mixer_types=["rope_attention"] * kw["num_hidden_layers"],
                          tie_word_embeddings=kw.get("tie_word_embeddings", False), **fields)
    student = HydistillForCausalLM(cfg).eval()
    sparse = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    want = [i for i, layer in enumerate(teacher.model.layers) if "experts" in dict(layer.named_modules())
            or any("experts" in n for n, _ in layer.named_parameters())]
    check(f"{label}: MoE layers {sparse} = transformers' {want}", sparse == want)
    sd = per_expert_state_dict(teacher.state_dict())
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = student.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    check(f"{label}: state dict loads", not missing and not unexpected, f"missing {missing}, unexpected {unexpected}")
    ids = torch.randint(0, kw["vocab_size"], (2, 17))
    with torch.no_grad():
        ref = teacher(input_ids=ids).logits
        out = student(input_ids=ids).logits
        x = torch.randn(34, kw["hidden_size"])
        experts, _, _ = student.model.layers[sparse[0]].mlp.route(x)
    check_rel(f"parity {label}", out, ref, 1e-5)
    check(f"{label}: routing uses several experts", experts.unique().numel() > kw["num_experts_per_tok"])


def test_teacher_parity():
    print("1. rope_attention students vs transformers teachers")
    from transformers import LlamaForCausalLM

    for name, scaling in ROPE_VARIANTS.items():
        teacher_parity(f"llama rope={name}", LlamaForCausalLM, 50000.0, scaling, **SKELETON)
    teacher_parity("llama rope=yarn positions 3000+", LlamaForCausalLM, 50000.0, ROPE_VARIANTS["yarn"],
                   position_offset=3000, **SKELETON)
    try:
        from transformers import Qwen2ForCausalLM
        teacher_parity("qwen2 (qkv bias)", Qwen2ForCausalLM, 1e6, None, attention_bias=True, **SKELETON)
    except ImportError:
        SKIPS.append("qwen2 parity: transformers has no Qwen2")
    try:
        from transformers import Qwen3ForCausalLM
        teacher_parity("qwen3 (qk_norm, head_dim 24, tied)", Qwen3ForCausalLM, 1e6, None, qk_norm=True,
                       head_dim=24, tie_word_embeddings=True, **SKELETON)
    except ImportError:
        SKIPS.append("qwen3 parity: transformers has no Qwen3")

    try:
        from transformers import Qwen3MoeForCausalLM
    except ImportError:
        Qwen3MoeForCausalLM = None
        SKIPS.append("qwen3_moe parity: transformers has no Qwen3Moe")
    if Qwen3MoeForCausalLM is not None:
        moe = dict(SKELETON, num_hidden_layers=4, head_dim=16, num_experts=6, num_experts_per_tok=2,
                   moe_intermediate_size=24)
        qwen3_moe_parity("qwen3_moe (top-2 of 6, renormalised, layer 1 dense)", Qwen3MoeForCausalLM,
                         dict(moe, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1]))
        qwen3_moe_parity("qwen3_moe (top-3 of 6, not renormalised, sparse step 2)", Qwen3MoeForCausalLM,
                         dict(moe, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=2,
                              mlp_only_layers=[], tie_word_embeddings=True))

    # inv_freq and attention factor against transformers' own functions.
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name, scaling in ROPE_VARIANTS.items():
        if scaling is None:
            continue
        cfg = hf_config(LlamaConfig, 50000.0, scaling, **SKELETON)
        ref, ref_factor = ROPE_INIT_FUNCTIONS[name](cfg, "cpu")
        ours, factor = modeling_hydistill.rope_inv_freq(16, 50000.0, scaling, SKELETON["max_position_embeddings"])
        check_rel(f"inv_freq {name}", ours, ref.float(), 1e-6)
        check(f"attention factor {name}", abs(factor - ref_factor) < 1e-12, f"{factor} vs {ref_factor}")


# ----------------------------------------------------------------------------------------------------------------
# 2. KDA recurrence vs FLA's naive reference


def fla_naive_module():
    """fla/ops/kda/naive.py from the installed package (fla/__init__ is not executed), its torch.float = float64."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "ops", "kda", "naive.py")
    if not os.path.exists(path):
        return None

    class TorchFloat64(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    shim = TorchFloat64("torch")
    shim.float = torch.float64
    mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location("hyd_fla_kda_naive_f64", path))
    saved = sys.modules.get("torch")
    sys.modules["torch"] = shim
    try:
        mod.__spec__.loader.exec_module(mod)
    finally:
        sys.modules["torch"] = saved
    return mod


def random_kda_inputs(B, T, H, HV, dk, dv, dtype=torch.float64):
    q = torch.nn.functional.normalize(torch.randn(B, T, H, dk, dtype=dtype), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, dk, dtype=dtype), dim=-1)
    v = torch.randn(B, T, HV, dv, dtype=dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, HV, dk, dtype=dtype))
    beta = torch.sigmoid(torch.randn(B, T, HV, dtype=dtype))
    # Value head 1: channels alternating g near 0 and near -20, beta near 1; head 2: beta near 0.
    g[:, :, 1, 0::2] = -torch.rand(B, T, (dk + 1) // 2, dtype=dtype) * 1e-3
    g[:, :, 1, 1::2] = -19 - torch.rand(B, T, dk // 2, dtype=dtype)
    beta[:, :, 1] = 1 - torch.rand(B, T, dtype=dtype) * 1e-3
    beta[:, :, 2] = torch.rand(B, T, dtype=dtype) * 1e-3
    return q, k, v, g, beta


def test_kda_recurrence():
    print("2. kda_recurrence vs FLA naive_recurrent_kda (float64)")
    naive = fla_naive_module()
    if naive is None:
        SKIPS.append("kda recurrence vs FLA: flash-linear-attention not installed")
        print("  SKIP flash-linear-attention not installed")
        return
    torch.manual_seed(2)
    for (H, HV, dk, dv, T) in [(2, 4, 16, 24, 70), (4, 4, 8, 8, 5)]:
        q, k, v, g, beta = random_kda_inputs(2, T, H, HV, dk, dv)
        ref, _ = naive.naive_recurrent_kda(q, k, v, g, beta)  # default scale dk^-1/2
        out = kda_recurrence(q * dk**-0.5, k, v, g, beta)
        check(f"recurrence dtype H={H} HV={HV}", out.dtype == torch.float64)
        check_rel(f"recurrence H={H} HV={HV} dk={dk} dv={dv} T={T}", out, ref, 1e-10)


# ----------------------------------------------------------------------------------------------------------------
# 3. KDA mixer vs FLA's layer


def fla_layer_class():
    try:
        from fla.layers.kda import KimiDeltaAttention
        return KimiDeltaAttention
    except Exception as e:  # noqa: BLE001
        print(f"  (fla.layers.kda does not import: {e})")
        return None


def kda_config(H=2, HV=4, dk=16, dv=24, D=48):
    return HydistillConfig(vocab_size=11, hidden_size=D, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=4, mixer_types=["kda"], kda_num_heads=H, kda_num_v_heads=HV,
                           kda_head_dim=dk, kda_v_head_dim=dv, kda_conv_size=4, kda_norm_eps=1e-6)


def test_kda_layer_vs_fla():
    print("3. KDA mixer vs FLA KimiDeltaAttention")
    cls = fla_layer_class()
    if cls is None:
        SKIPS.append("kda layer vs FLA: fla.layers.kda not importable")
        print("  SKIP fla.layers.kda not importable")
        return
    H, HV, dk, dv, D = 2, 4, 16, 24, 48
    torch.manual_seed(3)
    fla_layer = cls(hidden_size=D, expand_v=dv / dk, head_dim=dk, num_heads=H, num_v_heads=HV, conv_size=4,
                    norm_eps=1e-6, layer_idx=0)
    ours = HydistillKDA(kda_config(H, HV, dk, dv, D))
    with torch.no_grad():  # FLA leaves the norms at 1, biases at 0 and convs at its init: randomise every tensor
        for p in fla_layer.parameters():
            if p.ndim == 3:
                p.copy_(0.5 * torch.randn_like(p))
            elif p is not fla_layer.A_log and p is not fla_layer.dt_bias:
                p.add_(0.1 * torch.randn_like(p))
    fla_sd = fla_layer.state_dict()
    ours_sd = ours.state_dict()
    same = {k: tuple(v.shape) for k, v in fla_sd.items()} == {k: tuple(v.shape) for k, v in ours_sd.items()}
    check("parameter names and shapes equal FLA's", same,
          "" if same else f"\n    FLA  {sorted((k, tuple(v.shape)) for k, v in fla_sd.items())}"
                          f"\n    ours {sorted((k, tuple(v.shape)) for k, v in ours_sd.items())}")
    if not same:
        return
    ours.load_state_dict(fla_sd, strict=True)
    x = torch.randn(2, 37, D)

    if torch.cuda.is_available():
        try:
            fl = fla_layer.cuda().float().eval()
            torch.backends.cuda.matmul.allow_tf32 = False
            with torch.no_grad():
                ref = fl(x.cuda())[0].cpu()
                out = ours(x)  # CPU: the PyTorch recurrence
            check_rel("FLA layer (CUDA kernels) vs ours (CPU recurrence), fp32", out, ref, 2e-3)
            fla_layer = fla_layer.cpu()
        except Exception as e:  # noqa: BLE001
            FAILURES.append("FLA layer on CUDA")
            print(f"  FAIL FLA layer on CUDA raised {type(e).__name__}: {e}")
    else:
        msg = ("FLA's KimiDeltaAttention forward needs triton GPU kernels (ShortConvolution, chunk_kda / "
               "fused_recurrent_kda, FusedRMSNormGated) and this machine has no GPU: real-kernel comparison skipped")
        SKIPS.append(msg)
        print(f"  SKIP {msg}")

    # Wiring: FLA's layer forward with its kernels replaced by torch references, float64.
    naive = fla_naive_module()
    import fla.layers.kda as fla_kda_mod
    from fla.ops.kda.gate import naive_kda_gate

    def reference_kda(q, k, v, g, beta, A_log, dt_bias, scale=None, use_qk_l2norm_in_kernel=False,
                      use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, **kw):
        assert use_qk_l2norm_in_kernel and use_gate_in_kernel and use_beta_sigmoid_in_kernel and not allow_neg_eigval
        assert kw.get("initial_state") is None and kw.get("cu_seqlens") is None
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        # FLA's naive_kda_gate computes in float32: check it against its own formula run in float64, use the latter.
        g64 = -A_log.exp().view(-1, 1) * torch.nn.functional.softplus(g + dt_bias.view(g.shape[-2:]))
        gate_err.append(rel_err(naive_kda_gate(g, A_log, dt_bias), g64))
        return naive.naive_recurrent_kda(q, k, v, g64, torch.sigmoid(beta), scale=scale)[0], None

    def conv_forward(conv):
        def fwd(x, cache=None, output_final_state=False, cu_seqlens=None, **kw):
            y = torch.nn.Conv1d.forward(conv, x.transpose(1, 2))[..., : x.shape[1]]
            return torch.nn.functional.silu(y).transpose(1, 2), None
        return fwd

    def norm_forward(norm):
        assert norm.activation == "sigmoid" and getattr(norm, "bias", None) is None
        def fwd(o, gate):
            y = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
            return y * torch.sigmoid(gate)
        return fwd

    gate_err = []
    saved = (fla_kda_mod.chunk_kda, fla_kda_mod.fused_recurrent_kda)
    fla_kda_mod.chunk_kda = fla_kda_mod.fused_recurrent_kda = reference_kda
    try:
        fl = fla_layer.double().eval()
        for conv in (fl.q_conv1d, fl.k_conv1d, fl.v_conv1d):
            conv.forward = conv_forward(conv)
        fl.o_norm.forward = norm_forward(fl.o_norm)
        ours64 = ours.double()
        with torch.no_grad():
            for T in (37, 70):  # FLA picks fused_recurrent up to 64 tokens, chunk above
                xd = torch.randn(2, T, D, dtype=torch.float64)
                ref = fl(xd)[0]
                out = ours64(xd)
                check_rel(f"FLA layer wiring (torch references), float64, T={T}", out, ref, 1e-10)
        check("FLA naive_kda_gate (float32) agrees with its formula in float64", gate_err and max(gate_err) < 1e-6,
              f"rel={max(gate_err or [float('inf')]):.3e}")
    finally:
        fla_kda_mod.chunk_kda, fla_kda_mod.fused_recurrent_kda = saved


# ----------------------------------------------------------------------------------------------------------------
# 4. Export directory round trip through AutoModelForCausalLM


def hybrid_config(tied):
    return HydistillConfig(
        vocab_size=89, hidden_size=48, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 128},
        max_position_embeddings=1024, tie_word_embeddings=tied, attention_bias=True, qk_norm=True,
        mixer_types=["kda", "nope_attention", "rope_attention", "kda"], kda_num_heads=2, kda_num_v_heads=4,
        kda_head_dim=16, kda_v_head_dim=8, kda_conv_size=4, kda_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def export_style_config_json(cfg):
    """config.json as docs/export.md specifies it (what the C++ exporter writes)."""
    theta, scaling = cfg.rope_settings()
    return {
        "architectures": ["HydistillForCausalLM"],
        "model_type": "hydistill_hybrid",
        "auto_map": {"AutoConfig": "configuration_hydistill.HydistillConfig",
                     "AutoModelForCausalLM": "modeling_hydistill.HydistillForCausalLM"},
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": theta, "rope_scaling": scaling,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias, "qk_norm": cfg.qk_norm, "mixer_types": cfg.mixer_types,
        "kda_num_heads": cfg.kda_num_heads, "kda_num_v_heads": cfg.kda_num_v_heads,
        "kda_head_dim": cfg.kda_head_dim, "kda_v_head_dim": cfg.kda_v_head_dim, "kda_conv_size": cfg.kda_conv_size,
        "kda_norm_eps": cfg.kda_norm_eps, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
    }


def test_export_round_trip():
    print("4. export directory -> AutoModelForCausalLM.from_pretrained(trust_remote_code=True)")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    work = tempfile.mkdtemp(prefix="hyd_export_test_")
    os.environ["HF_MODULES_CACHE"] = os.path.join(work, "hf_modules")
    try:
        for tied in (False, True):
            torch.manual_seed(4 + tied)
            cfg = hybrid_config(tied)
            model = HydistillForCausalLM(cfg).eval()
            with torch.no_grad():  # no tensor left at a structured init value
                for name, p in model.named_parameters():
                    if name.endswith("norm.weight") or name.endswith("conv1d.weight") or name.endswith(".bias"):
                        p.add_(0.2 * torch.randn_like(p))
            d = os.path.join(work, f"export_tied{int(tied)}")
            os.makedirs(d)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(export_style_config_json(cfg), f, indent=2)
            for name in ("configuration_hydistill.py", "modeling_hydistill.py"):
                shutil.copy(os.path.join(PYDIR, name), d)
            sd = {k: v.contiguous() for k, v in model.state_dict().items()}
            if tied:
                del sd["lm_head.weight"]  # stored once, as the exporter writes it
            save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})

            loaded, info = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, output_loading_info=True)
            loaded = loaded.float().eval()
            problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
            check(f"tied={tied} loads with no missing/unexpected keys", not problems, str(problems))
            check(f"tied={tied} class from the directory", type(loaded).__name__ == "HydistillForCausalLM"
                  and type(loaded) is not HydistillForCausalLM)
            if tied:
                check("tied lm_head shares the embedding",
                      loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr())
            ids = torch.randint(0, cfg.vocab_size, (2, 19))
            with torch.no_grad():
                ref = model(input_ids=ids).logits
                out = loaded(input_ids=ids).logits
            check(f"tied={tied} identical logits after from_pretrained", torch.equal(out, ref),
                  f"max|diff|={(out - ref).abs().max().item():.3e}")

            d2 = os.path.join(work, f"saved_tied{int(tied)}")
            loaded.save_pretrained(d2)
            again = AutoModelForCausalLM.from_pretrained(d2, trust_remote_code=True).float().eval()
            with torch.no_grad():
                out2 = again(input_ids=ids).logits
            check(f"tied={tied} identical logits after save_pretrained/from_pretrained", torch.equal(out2, ref),
                  f"max|diff|={(out2 - ref).abs().max().item():.3e}")

            if not tied:
                prompt = ids[:1, :5]
                gen = loaded.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False,
                                      pad_token_id=0, eos_token_id=None)
                seq = prompt
                with torch.no_grad():
                    for _ in range(4):
                        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
                        seq = torch.cat([seq, nxt], dim=1)
                check("greedy generate() == argmax loop", torch.equal(gen, seq), f"{gen.tolist()} vs {seq.tolist()}")
                mask = torch.ones_like(ids)
                mask[0, :3] = 0
                try:
                    loaded(input_ids=ids, attention_mask=mask)
                    check("padding mask refused", False)
                except ValueError:
                    check("padding mask refused", True)
                with torch.no_grad():
                    full_mask = loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                check("all-ones attention_mask accepted", torch.equal(full_mask, out))
                bf = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.bfloat16).eval()
                kda = bf.model.layers[0].self_attn
                check("bf16 load keeps A_log/dt_bias fp32", kda.A_log.dtype == torch.float32
                      and kda.dt_bias.dtype == torch.float32 and kda.q_proj.weight.dtype == torch.bfloat16)
                with torch.no_grad():
                    check_rel("bf16 model vs fp32 logits", bf(input_ids=ids).logits.float(), ref, 5e-2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    torch.set_num_threads(2)
    for test in (test_teacher_parity, test_kda_recurrence, test_kda_layer_vs_fla, test_export_round_trip):
        try:
            test()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            FAILURES.append(test.__name__)
    for s in SKIPS:
        print(f"skipped: {s}")
    if FAILURES:
        print(f"FAILED: {FAILURES}")
        return 1
    print("all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

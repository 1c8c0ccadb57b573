# Copyright (c) HyDistill contributors.
"""Plain-PyTorch forward of a HyDistill hybrid student (model_type "hydistill_hybrid").

Shipped inside every `hydistill export` directory next to configuration_hydistill.py and loaded by transformers
through `auto_map` (AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)). Tensor names, shapes and
dtypes: docs/export.md. The KDA math: KDA.md in the HyDistill repository (restated at HydistillKDA below).

Layer l: h = h + mixer_l(input_layernorm(h)); h = h + mlp(post_attention_layernorm(h)), mixer_l per
config.mixer_types[l]:
  "rope_attention"  teacher attention: q/k/v/o projections (+ q/k/v biases when attention_bias), per-head q/k RMSNorm
                    when qk_norm (applied before RoPE, Qwen3 style), RoPE (default / linear / llama3 / yarn as
                    transformers computes them), causal grouped-query softmax attention, scale head_dim^-1/2.
  "nope_attention"  the same without RoPE.
  "kda"             Kimi Delta Attention with the weight names of FLA's KimiDeltaAttention layer.

FFN: the SwiGLU MLP, or on the layers config.is_moe_layer names (students of qwen3_moe teachers) the
Mixture-of-Experts FFN of HydistillSparseMoe (fp32 softmax router, top num_experts_per_tok, optional
renormalisation), with qwen3_moe's weight names.

Supported inputs: a plain causal batch, input_ids [B, T] (or inputs_embeds [B, T, D]), every row a single document
starting at position 0 (position_ids may be given; they only move RoPE). Not supported:
  * padding: an attention_mask with zeros raises ValueError (KDA state and conv windows would have to skip pads);
  * a KV / recurrent-state cache: use_cache is ignored and past_key_values is always None, so generate() recomputes
    the whole prefix at every step (correct, O(T^2) in the sequence length);
  * packed documents (cu_seqlens) and output_attentions.
KDA runs FLA's chunk_kda when `fla.ops.kda.chunk_kda` imports and the tensors are on CUDA (set the environment
variable HYDISTILL_KDA_BACKEND=torch to force the PyTorch recurrence); otherwise a token-by-token PyTorch
recurrence with an fp32 state (float64 when the inputs are float64).
"""
import inspect
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from transformers import GenerationMixin
except ImportError:  # transformers < 4.45: PreTrainedModel itself carries generate()
    GenerationMixin = object

try:
    from .configuration_hydistill import HydistillConfig
except ImportError:  # imported as a top-level module (tests put checkpoint/python on sys.path)
    from configuration_hydistill import HydistillConfig

_FLA_NOT_LOADED = object()
_fla_chunk_kda_fn = _FLA_NOT_LOADED


def _fla_chunk_kda():
    """FLA's chunk_kda, or None when it does not import; imported on first use on CUDA only (importing FLA on a
    machine without a GPU warns and is slow)."""
    global _fla_chunk_kda_fn
    if _fla_chunk_kda_fn is _FLA_NOT_LOADED:
        try:
            from fla.ops.kda import chunk_kda
        except Exception:  # not installed, or installed without a usable triton: the PyTorch recurrence is used
            chunk_kda = None
        _fla_chunk_kda_fn = chunk_kda
    return _fla_chunk_kda_fn

_TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])
L2NORM_EPS = 1e-6  # FLA's l2norm: x / sqrt(sum(x^2) + eps)


# ----------------------------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(head_dim, theta, scaling, max_position_embeddings, original_max_position_embeddings=None):
    """Inverse frequencies [head_dim/2] (float32, CPU) and the attention factor that multiplies cos and sin.

    scaling: None (plain RoPE) or a dict with "rope_type" in linear / llama3 / yarn and that type's keys, as in an
    HF config. The formulas are those of transformers' modeling_rope_utils; the pretraining context of llama3 / yarn
    is, in order: a top-level original_max_position_embeddings, the dict's, max_position_embeddings.
    """
    dim = head_dim
    base = float(theta)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = "default" if not scaling else scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0

    pretrain_len = original_max_position_embeddings or scaling.get("original_max_position_embeddings")
    pretrain_len = pretrain_len or max_position_embeddings
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        low_freq_wavelen, high_freq_wavelen = pretrain_len / low, pretrain_len / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (beyond the pretraining context / low) are slowed by `factor`, short ones kept, and
        # the band between them interpolated linearly in pretrain_len / wavelen.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (pretrain_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        factor = scaling.get("factor")
        factor = float(factor) if factor is not None else max_position_embeddings / pretrain_len

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in the context
            return (dim * math.log(pretrain_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate by factor
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq, float(attention_factor)
    raise ValueError(f"hydistill: rope_type '{rope_type}' is not supported (default, linear, llama3, yarn)")


class HydistillRotaryEmbedding(nn.Module):
    """cos/sin [B, T, head_dim] for position ids [B, T]; no buffers (computed on first use per device)."""

    def __init__(self, config):
        super().__init__()
        theta, scaling = config.rope_settings()
        self.head_dim = config.head_dim
        self.theta = theta
        self.scaling = scaling
        self.max_position_embeddings = config.max_position_embeddings
        self.original_max_position_embeddings = getattr(config, "original_max_position_embeddings", None)
        self._cache = {}

    def inv_freq_and_factor(self, device):
        if device not in self._cache:
            inv_freq, factor = rope_inv_freq(
                self.head_dim, self.theta, self.scaling, self.max_position_embeddings,
                self.original_max_position_embeddings,
            )
            self._cache[device] = (inv_freq.to(device), factor)
        return self._cache[device]

    def forward(self, x, position_ids):
        inv_freq, factor = self.inv_freq_and_factor(x.device)
        freqs = position_ids[..., None].to(torch.float32) * inv_freq  # float32, as transformers computes it
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * factor).to(x.dtype), (emb.sin() * factor).to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Norms, MLP, attention


class HydistillRMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), statistics in fp32 (as HF's LlamaRMSNorm)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        xf = x.to(torch.promote_types(dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class HydistillMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); width config.intermediate_size unless `intermediate_size` is given."""

    def __init__(self, config, intermediate_size=None):
        super().__init__()
        F_ = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, F_, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, F_, bias=False)
        self.down_proj = nn.Linear(F_, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HydistillSparseMoe(nn.Module):
    """Mixture-of-Experts FFN of qwen3_moe students (HyDistill's trainer/layer_moe.h with a softmax router, no
    shared experts, no selection bias), per token x [D]:

        s = softmax(x W_r^T) over the E experts        router in fp32 whatever the weights' dtype
        e_1..e_k = the k largest s (descending; equal scores: the lower expert index first)
        w_j = s[e_j], divided by sum_i s[e_i] when norm_topk_prob
        y = sum_j w_j expert_{e_j}(x),  expert_e = SwiGLU of width moe_intermediate_size

    Weights (qwen3_moe's names): gate.weight [E, D] (the router), experts.{e}.{gate,up}_proj.weight [F, D],
    experts.{e}.down_proj.weight [D, F]. Experts run on the rows routed to them only; the weighted sum is
    accumulated in fp32 (float64 for float64 inputs) and returned in x's dtype.
    """

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [HydistillMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)]
        )

    def route(self, x):
        """x [N, D] -> (experts [N, k] int64, weights [N, k] fp32 (float64 for float64 x), scores [N, E])."""
        acc = torch.promote_types(x.dtype, torch.float32)
        scores = torch.softmax(F.linear(x.to(acc), self.gate.weight.to(acc)), dim=-1)
        # A stable descending sort: among equal scores the lower expert index wins, as in the C++ top-k.
        weights, experts = torch.sort(scores, dim=-1, descending=True, stable=True)
        weights, experts = weights[:, : self.top_k], experts[:, : self.top_k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights, scores

    def forward(self, x):
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        experts, weights, _ = self.route(xf)
        out = torch.zeros(xf.shape, dtype=weights.dtype, device=x.device)
        for e in experts.unique().tolist():
            token, slot = (experts == e).nonzero(as_tuple=True)
            y = self.experts[e](xf[token]).to(weights.dtype) * weights[token, slot].unsqueeze(-1)
            out.index_add_(0, token, y)
        return out.to(x.dtype).reshape(shape)


class HydistillAttention(nn.Module):
    """Causal grouped-query softmax attention; RoPE when use_rope ("rope_attention"), none for "nope_attention".

    q head h reads k/v head h // (num_attention_heads / num_key_value_heads) (transformers' repeat_kv).
    """

    def __init__(self, config, use_rope):
        super().__init__()
        self.use_rope = use_rope
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = HydistillRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = HydistillRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, d]
        if self.use_rope:
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            q = q * c + rotate_half(q) * s
            k = k * c + rotate_half(k) * s
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim**-0.5)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


# ----------------------------------------------------------------------------------------------------------------
# KDA


def kda_recurrence(q, k, v, g, beta):
    """The KDA delta rule, token by token (KDA.md "Recurrence"), one state per (batch row, value head).

    q, k [B, T, H, dk] (q already L2-normalised and scaled, k L2-normalised), v [B, T, HV, dv], g [B, T, HV, dk]
    (log-decay, <= 0), beta [B, T, HV]; value head hv reads q/k head hv // (HV / H). Per token t:
        S <- Diag(exp(g_t)) S;   S <- S + beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T q_t
    S [dk, dv] starts at 0. Arithmetic in fp32 (float64 if any input is float64). Returns o [B, T, HV, dv] in
    v's dtype.
    """
    B, T, H, dk = q.shape
    HV, dv = v.shape[2], v.shape[3]
    out_dtype = v.dtype
    acc = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype) else torch.float32
    group = HV // H
    q = q.to(acc).repeat_interleave(group, dim=2)
    k = k.to(acc).repeat_interleave(group, dim=2)
    v, g, beta = v.to(acc), g.to(acc), beta.to(acc)
    S = torch.zeros(B, HV, dk, dv, dtype=acc, device=q.device)
    o = torch.empty(B, T, HV, dv, dtype=acc, device=q.device)
    for t in range(T):
        S = S * g[:, t].exp().unsqueeze(-1)
        k_t = k[:, t]
        residual = v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, S)
        S = S + torch.einsum("bhk,bhv->bhkv", beta[:, t].unsqueeze(-1) * k_t, residual)
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o.to(out_dtype)


def l2_normalize(x, eps=L2NORM_EPS):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class HydistillShortConv(nn.Module):
    """Causal depthwise convolution + SiLU over the sequence: y[t, c] = silu(sum_j w[c, 0, j] x[t - K + 1 + j, c]).

    weight [C, 1, K] (FLA's ShortConvolution / nn.Conv1d layout, tap K-1 = the current token); positions before
    the sequence start read zeros.
    """

    def __init__(self, channels, kernel_size):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel_size))

    def forward(self, x):  # x [B, T, C]
        T = x.shape[1]
        y = F.conv1d(x.transpose(1, 2), self.weight, padding=self.kernel_size - 1, groups=x.shape[-1])
        return F.silu(y[..., :T]).transpose(1, 2)


class HydistillGatedRMSNorm(nn.Module):
    """y = rmsnorm(o) * weight * sigmoid(gate) over the last dim (d_v), in fp32; FLA's FusedRMSNormGated(sigmoid)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, o, gate):
        acc = torch.promote_types(o.dtype, torch.float32)
        of = o.to(acc)
        y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(acc)
        return y * torch.sigmoid(gate.to(acc))


def _chunk_kda_takes_raw_inputs():
    params = inspect.signature(_fla_chunk_kda()).parameters
    return all(p in params for p in ("use_qk_l2norm_in_kernel", "use_gate_in_kernel", "use_beta_sigmoid_in_kernel"))


class HydistillKDA(nn.Module):
    """Kimi Delta Attention (KDA.md), weight names and shapes of FLA's KimiDeltaAttention:

    q_proj [H*dk, D], k_proj [H*dk, D], v_proj [HV*dv, D]; q_conv1d.weight [H*dk, 1, K], k_conv1d.weight
    [H*dk, 1, K], v_conv1d.weight [HV*dv, 1, K]; f_proj.0 [dv, D], f_proj.1 [HV*dk, dv]; b_proj [HV, D];
    A_log [HV]; dt_bias [HV*dk]; g_proj.0 [dv, D], g_proj.1 [HV*dv, dv] + bias [HV*dv]; o_norm.weight [dv];
    o_proj [D, HV*dv].

        q = l2norm(silu(conv_q(q_proj x))) * dk^-1/2,  k = l2norm(silu(conv_k(k_proj x))),  v = silu(conv_v(v_proj x))
        g = -exp(A_log[hv]) * softplus(f_proj(x) + dt_bias)   (per value head and key channel)
        beta = sigmoid(b_proj x)
        o = delta-rule recurrence (kda_recurrence)
        y = o_proj(rmsnorm(o) * o_norm.weight * sigmoid(g_proj x))
    """

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.H, self.HV = config.kda_num_heads, config.kda_num_v_heads
        self.dk, self.dv = config.kda_head_dim, config.kda_v_head_dim
        H, HV, dk, dv, K = self.H, self.HV, self.dk, self.dv, config.kda_conv_size
        self.q_proj = nn.Linear(D, H * dk, bias=False)
        self.k_proj = nn.Linear(D, H * dk, bias=False)
        self.v_proj = nn.Linear(D, HV * dv, bias=False)
        self.q_conv1d = HydistillShortConv(H * dk, K)
        self.k_conv1d = HydistillShortConv(H * dk, K)
        self.v_conv1d = HydistillShortConv(HV * dv, K)
        self.f_proj = nn.Sequential(nn.Linear(D, dv, bias=False), nn.Linear(dv, HV * dk, bias=False))
        self.b_proj = nn.Linear(D, HV, bias=False)
        self.A_log = nn.Parameter(torch.zeros(HV, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.zeros(HV * dk, dtype=torch.float32))
        self.g_proj = nn.Sequential(nn.Linear(D, dv, bias=False), nn.Linear(dv, HV * dv, bias=True))
        self.o_norm = HydistillGatedRMSNorm(dv, config.kda_norm_eps)
        self.o_proj = nn.Linear(HV * dv, D, bias=False)
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def use_fla(self, x):
        if not x.is_cuda or os.environ.get("HYDISTILL_KDA_BACKEND", "") == "torch":
            return False
        return _fla_chunk_kda() is not None

    def forward(self, x):
        B, T, _ = x.shape
        H, HV, dk, dv = self.H, self.HV, self.dk, self.dv
        q = self.q_conv1d(self.q_proj(x)).view(B, T, H, dk)
        k = self.k_conv1d(self.k_proj(x)).view(B, T, H, dk)
        v = self.v_conv1d(self.v_proj(x)).view(B, T, HV, dv)
        f = self.f_proj(x).view(B, T, HV, dk)
        b = self.b_proj(x)
        scale = dk**-0.5
        if self.use_fla(x) and _chunk_kda_takes_raw_inputs():
            # The call FLA's own layer makes: normalisation, gate and sigmoid fused into the kernels.
            o, _ = _fla_chunk_kda()(
                q=q, k=k, v=v, g=f, beta=b, scale=scale, A_log=self.A_log, dt_bias=self.dt_bias,
                use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
            )
        else:
            acc = torch.promote_types(x.dtype, torch.float32)
            g = -self.A_log.to(acc).exp().view(HV, 1) * F.softplus(f.to(acc) + self.dt_bias.to(acc).view(HV, dk))
            beta = torch.sigmoid(b.to(acc))
            qn = l2_normalize(q.to(acc)) * scale
            kn = l2_normalize(k.to(acc))
            if self.use_fla(x):  # older FLA: gates and normalisation computed here
                o, _ = _fla_chunk_kda()(q=qn.to(x.dtype), k=kn.to(x.dtype), v=v, g=g, beta=beta.to(x.dtype), scale=1.0)
            else:
                o = kda_recurrence(qn, kn, v.to(acc), g, beta)
        gate = self.g_proj(x).view(B, T, HV, dv)
        y = self.o_norm(o, gate).to(x.dtype).reshape(B, T, HV * dv)
        return self.o_proj(y)


# ----------------------------------------------------------------------------------------------------------------
# Model


class HydistillDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        self.input_layernorm = HydistillRMSNorm(config.hidden_size, config.rms_norm_eps)
        # One module name for every mixer kind, the teacher's: model.layers.{i}.self_attn.*
        if self.mixer_type == "kda":
            self.self_attn = HydistillKDA(config)
        else:
            self.self_attn = HydistillAttention(config, use_rope=self.mixer_type == "rope_attention")
        self.post_attention_layernorm = HydistillRMSNorm(config.hidden_size, config.rms_norm_eps)
        # qwen3_moe students: the MoE FFN where config.is_moe_layer says so, the SwiGLU MLP elsewhere.
        self.mlp = HydistillSparseMoe(config) if config.is_moe_layer(layer_idx) else HydistillMLP(config)

    def forward(self, h, cos, sin):
        x = self.input_layernorm(h)
        h = h + (self.self_attn(x) if self.mixer_type == "kda" else self.self_attn(x, cos, sin))
        return h + self.mlp(self.post_attention_layernorm(h))


class HydistillPreTrainedModel(PreTrainedModel):
    config_class = HydistillConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["HydistillDecoderLayer"]
    # KDA decay parameters stay fp32 when the model is loaded in bf16 (KDA.md: A_log and dt_bias are fp32).
    _keep_in_fp32_modules = ["A_log", "dt_bias"]
    _supports_cache_class = False
    _supports_static_cache = False

    @torch.no_grad()
    def _init_weights(self, module):
        """Fresh (not loaded) weights: normal(0, initializer_range) matrices, unit norms, identity convolutions
        (tap K-1 = 1), KDA decay parameters as FLA initialises them (A_log = log U[1, 16], dt_bias = softplus^-1 of
        dt log-uniform in [1e-3, 0.1])."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (HydistillRMSNorm, HydistillGatedRMSNorm)):
            nn.init.ones_(module.weight)
        elif isinstance(module, HydistillShortConv):
            nn.init.zeros_(module.weight)
            module.weight[:, 0, -1] = 1.0
        elif isinstance(module, HydistillKDA):
            a = torch.empty_like(module.A_log).uniform_(1, 16)
            module.A_log.copy_(a.log())
            lo, hi = math.log(1e-3), math.log(0.1)
            dt = (torch.rand_like(module.dt_bias) * (hi - lo) + lo).exp().clamp(min=1e-4)
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class HydistillModel(HydistillPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([HydistillDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = HydistillRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = HydistillRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("hydistill: pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and not bool((attention_mask != 0).all()):
            raise ValueError(
                "hydistill: padding (an attention_mask with zeros) is not supported; pass unpadded rows of equal "
                "length or one sequence at a time"
            )
        if kwargs.get("output_attentions"):
            raise ValueError("hydistill: output_attentions is not supported")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(T, device=h.device).unsqueeze(0).expand(B, T)
        cos, sin = self.rotary_emb(h, position_ids)
        hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(h)
            h = layer(h, cos, sin)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states.append(h)
            hidden_states = tuple(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=None, hidden_states=hidden_states)


class HydistillForCausalLM(HydistillPreTrainedModel, GenerationMixin):
    # transformers 5.x maps tied parameter -> source; 4.x lists the tied names.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_MAJOR >= 5 else ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = HydistillModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        **kwargs,
    ):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            output_attentions=kwargs.get("output_attentions"),
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            # Next-token cross-entropy, labels -100 ignored, mean over the counted tokens (transformers' convention).
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        if return_dict is False:
            return tuple(t for t in (loss, logits, None, out.hidden_states) if t is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=None, hidden_states=out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        # No cache: every step recomputes the whole sequence.
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}


__all__ = ["HydistillForCausalLM", "HydistillModel", "HydistillPreTrainedModel"]

# Copyright (c) HyDistill contributors.
"""Configuration of a HyDistill hybrid student (model_type "hydistill_hybrid").

This file is shipped inside every directory written by `hydistill export` (copied from checkpoint/python/) and is
loaded by `transformers` through `auto_map` with `trust_remote_code=True`. The schema is documented in
docs/export.md; the C++ exporter writes config.json to that schema.

The skeleton is the teacher's (Llama / Qwen2 / Qwen3): embeddings, per layer RMSNorm -> token mixer -> residual,
RMSNorm -> SwiGLU MLP -> residual, final RMSNorm, lm_head (tied or not). Only the token mixer changes per layer, as listed by
`mixer_types` (one entry per layer):
    "rope_attention"  the teacher's softmax attention, kept as is (RoPE with the teacher's theta and scaling)
    "nope_attention"  the same softmax attention without rotary embeddings (full causal)
    "kda"             Kimi Delta Attention (weight names of FLA's KimiDeltaAttention layer)

The FFN of a layer is the SwiGLU MLP (intermediate_size) or, for students of qwen3_moe teachers, the teacher's
Mixture-of-Experts FFN, with Qwen3MoeConfig's keys and meaning: `num_experts` routed SwiGLU experts of
`moe_intermediate_size`, a linear router (`mlp.gate`) whose softmax scores (fp32) pick the top `num_experts_per_tok`
experts per token, their scores renormalised to sum 1 when `norm_topk_prob`. Layer l has the MoE FFN iff
num_experts > 0, l is not in `mlp_only_layers` and (l + 1) % `decoder_sparse_step` == 0 (`is_moe_layer`).
num_experts = 0 (the default): every layer dense. `num_local_experts` (transformers 5.x's spelling) is read as
num_experts when num_experts is absent.

RoPE parameters are accepted in both transformers layouts: 4.x (`rope_theta` + `rope_scaling` with "rope_type" or
"type") and 5.x (`rope_parameters` with "rope_type" and "rope_theta"). `rope_settings()` returns them in one form
whatever transformers version is installed; the modeling file reads them only through it.

Why `mixer_types` and not `layer_types`: transformers 5.x gives `config.layer_types` a meaning of its own (attention
kinds such as "full_attention" / "sliding_attention", validated against a fixed list when the config is built and
saved, and read by its cache and mask code). A config.json carrying `layer_types` with our values is still accepted
(it is read as `mixer_types`), but the canonical key, and the one written back, is `mixer_types`.
"""
import copy

from transformers import PretrainedConfig

MIXER_TYPES = ("kda", "nope_attention", "rope_attention")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# transformers 5.x turned `rope_scaling` into a deprecated property aliasing `rope_parameters`; 4.x has neither.
_ROPE_SCALING_IS_PROPERTY = isinstance(getattr(PretrainedConfig, "rope_scaling", None), property)


def _default_mixer_types(num_layers):
    """DISTILL.md's default pattern: repeat K K K A (3:1), the last layer always NoPE attention."""
    types = ["nope_attention" if (i % 4) == 3 else "kda" for i in range(num_layers)]
    if num_layers > 0:
        types[-1] = "nope_attention"
    return types


def _normalize_rope(rope_theta, rope_scaling, rope_parameters):
    """Returns (theta, scaling) where scaling is None (plain RoPE) or a dict with "rope_type" != "default"."""
    src = rope_parameters if rope_parameters else rope_scaling
    scaling = None
    if src:
        if not isinstance(src, dict):
            raise ValueError(f"hydistill config: rope parameters must be a dict, got {src!r}")
        if "full_attention" in src and isinstance(src["full_attention"], dict):  # 5.x, nested by layer type
            src = src["full_attention"]
        scaling = copy.deepcopy(dict(src))
        if "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("type", None)
        scaling.setdefault("rope_type", "default")
        if "rope_theta" in scaling:
            rope_theta = scaling.pop("rope_theta")
        if scaling["rope_type"] not in ROPE_TYPES:
            raise ValueError(
                f"hydistill config: rope_type '{scaling['rope_type']}' is not supported (supported: {ROPE_TYPES})"
            )
        if scaling["rope_type"] == "default":
            scaling = None
    return float(rope_theta), scaling


class HydistillConfig(PretrainedConfig):
    model_type = "hydistill_hybrid"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attention_bias=False,
        qk_norm=False,
        mixer_types=None,
        kda_num_heads=None,
        kda_num_v_heads=None,
        kda_head_dim=None,
        kda_v_head_dim=None,
        kda_conv_size=4,
        kda_norm_eps=None,
        num_experts=None,
        num_experts_per_tok=0,
        moe_intermediate_size=0,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=None,
        router_aux_loss_coef=0.0,
        initializer_range=0.02,
        use_cache=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.qk_norm = qk_norm
        if mixer_types is None and kwargs.get("layer_types") is not None:
            mixer_types = kwargs.pop("layer_types")
        kwargs.pop("layer_types", None)
        self.mixer_types = list(mixer_types) if mixer_types is not None else _default_mixer_types(num_hidden_layers)
        self.kda_num_heads = num_attention_heads if kda_num_heads is None else kda_num_heads
        self.kda_num_v_heads = self.kda_num_heads if kda_num_v_heads is None else kda_num_v_heads
        self.kda_head_dim = self.head_dim if kda_head_dim is None else kda_head_dim
        self.kda_v_head_dim = self.kda_head_dim if kda_v_head_dim is None else kda_v_head_dim
        self.kda_conv_size = kda_conv_size
        self.kda_norm_eps = rms_norm_eps if kda_norm_eps is None else kda_norm_eps
        if num_experts is None:
            num_experts = kwargs.pop("num_local_experts", None) or 0
        kwargs.pop("num_local_experts", None)
        self.num_experts = int(num_experts)
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.norm_topk_prob = bool(norm_topk_prob)
        self.decoder_sparse_step = decoder_sparse_step
        self.mlp_only_layers = [] if mlp_only_layers is None else [int(i) for i in mlp_only_layers]
        # Kept for reference (the teacher's); the modeling file never adds a router loss.
        self.router_aux_loss_coef = router_aux_loss_coef
        self.initializer_range = initializer_range
        self.use_cache = use_cache

        theta, scaling = _normalize_rope(rope_theta, rope_scaling, kwargs.pop("rope_parameters", None))
        self.rope_theta = theta
        if _ROPE_SCALING_IS_PROPERTY:
            # transformers 5.x: the canonical field is rope_parameters (it also serializes it).
            self.rope_parameters = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
        else:
            self.rope_scaling = scaling
        self._validate()

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # Set again after the base class: some transformers versions give tie_word_embeddings a default there.
        self.tie_word_embeddings = tie_word_embeddings

    def is_moe_layer(self, layer_idx):
        """Whether layer `layer_idx` has the MoE FFN (Qwen3MoeDecoderLayer's rule)."""
        if self.num_experts <= 0 or self.decoder_sparse_step <= 0 or layer_idx in self.mlp_only_layers:
            return False
        return (layer_idx + 1) % self.decoder_sparse_step == 0

    def rope_settings(self):
        """(rope_theta, scaling) with scaling None for plain RoPE, else a dict with "rope_type" and its keys."""
        if _ROPE_SCALING_IS_PROPERTY:
            params = getattr(self, "rope_parameters", None)
            return _normalize_rope(getattr(self, "rope_theta", 10000.0), None, params)
        return _normalize_rope(self.rope_theta, self.rope_scaling, None)

    def _validate(self):
        def fail(field, msg):
            raise ValueError(f"hydistill config: '{field}': {msg}")

        if len(self.mixer_types) != self.num_hidden_layers:
            fail("mixer_types", f"has {len(self.mixer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        for i, t in enumerate(self.mixer_types):
            if t not in MIXER_TYPES:
                fail("mixer_types", f"entry {i} is '{t}' (expected one of {MIXER_TYPES})")
        if self.hidden_act != "silu":
            fail("hidden_act", f"'{self.hidden_act}' is not supported (the MLP is SwiGLU with silu)")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            fail("num_key_value_heads", f"{self.num_key_value_heads} does not divide {self.num_attention_heads}")
        if self.kda_num_v_heads % self.kda_num_heads != 0:
            fail("kda_num_v_heads", f"{self.kda_num_v_heads} is not a multiple of kda_num_heads {self.kda_num_heads}")
        if self.kda_conv_size < 1:
            fail("kda_conv_size", "must be >= 1")
        if self.num_experts < 0:
            fail("num_experts", f"must be >= 0, got {self.num_experts}")
        if any(self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                fail("num_experts_per_tok", f"must be in 1..{self.num_experts} (num_experts), got "
                     f"{self.num_experts_per_tok}")
            if self.moe_intermediate_size <= 0:
                fail("moe_intermediate_size", f"must be > 0, got {self.moe_intermediate_size}")


__all__ = ["HydistillConfig"]

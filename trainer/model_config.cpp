#include "trainer/model_config.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "trainer/core/error.h"

namespace hyd {

namespace {

// Throws "SOURCE: 'model.FIELD': MESSAGE".
[[noreturn]] void config_error(const std::string& source, const std::string& field, const std::string& message) {
  throw Error::at(source, "model." + field, message);
}

void require_positive(const std::string& source, const char* field, int64_t v) {
  if (v <= 0) config_error(source, field, "must be positive, got " + std::to_string(v));
}

void require_positive(const std::string& source, const char* field, double v) {
  if (!(v > 0)) config_error(source, field, "must be positive, got " + std::to_string(v));
}

}  // namespace

bool ModelConfig::is_moe_layer(int64_t l) const {
  if (num_experts <= 0 || decoder_sparse_step <= 0 || l < first_k_dense_replace) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), l) != mlp_only_layers.end()) return false;
  return (l + 1) % decoder_sparse_step == 0;
}

bool ModelConfig::has_moe_layers() const {
  for (int64_t l = 0; l < num_layers; ++l)
    if (is_moe_layer(l)) return true;
  return false;
}

void ModelConfig::finalize(const std::string& source) {
  if (family != "llama" && family != "qwen2" && family != "qwen3" && family != "qwen3_moe" && family != "dots1")
    config_error(source, "family",
                 "unknown model family '" + family + "' (expected llama, qwen2, qwen3, qwen3_moe or dots1)");
  require_positive(source, "vocab_size", vocab_size);
  require_positive(source, "hidden_size", hidden_size);
  require_positive(source, "intermediate_size", intermediate_size);
  require_positive(source, "num_layers", num_layers);
  require_positive(source, "num_heads", num_heads);
  require_positive(source, "num_kv_heads", num_kv_heads);
  if (num_heads % num_kv_heads != 0)
    config_error(source, "num_kv_heads",
                 "num_heads (" + std::to_string(num_heads) + ") must be a multiple of num_kv_heads (" +
                     std::to_string(num_kv_heads) + ")");
  if (head_dim < 0) config_error(source, "head_dim", "must be positive (or 0 for hidden_size / num_heads)");
  if (head_dim == 0) {
    if (hidden_size % num_heads != 0)
      config_error(source, "head_dim",
                   "is 0 (derived) but hidden_size (" + std::to_string(hidden_size) +
                       ") is not divisible by num_heads (" + std::to_string(num_heads) + "); set head_dim explicitly");
    head_dim = hidden_size / num_heads;
  }
  if (head_dim % 2 != 0)
    config_error(source, "head_dim", "must be even (RoPE rotates pairs of halves), got " + std::to_string(head_dim));
  require_positive(source, "rms_norm_eps", rms_norm_eps);
  require_positive(source, "rope_theta", rope_theta);
  require_positive(source, "max_position_embeddings", max_position_embeddings);

  const kernels::RopeScaling& rs = rope_scaling;
  if (rs.type != "default" && rs.type != "linear" && rs.type != "llama3" && rs.type != "yarn")
    config_error(source, "rope_scaling.type",
                 "unknown rope scaling '" + rs.type + "' (expected default, linear, llama3 or yarn)");
  if (rs.type != "default") require_positive(source, "rope_scaling.factor", rs.factor);
  if (rs.type == "llama3") {
    require_positive(source, "rope_scaling.original_max_position_embeddings", rs.original_max_position_embeddings);
    require_positive(source, "rope_scaling.low_freq_factor", rs.low_freq_factor);
    if (!(rs.high_freq_factor > rs.low_freq_factor))
      config_error(source, "rope_scaling.high_freq_factor", "must be larger than rope_scaling.low_freq_factor");
  }
  if (rs.type == "yarn") {
    if (rs.original_max_position_embeddings < 0)
      config_error(source, "rope_scaling.original_max_position_embeddings", "must not be negative");
    if (!(rs.beta_fast > rs.beta_slow))
      config_error(source, "rope_scaling.beta_fast", "must be larger than rope_scaling.beta_slow");
    if (rs.attention_factor < 0) config_error(source, "rope_scaling.attention_factor", "must not be negative");
  }

  // Mixture of Experts: only the qwen3_moe and dots1 families have it; num_experts 0 leaves every layer dense.
  if (num_experts < 0) config_error(source, "num_experts", "must be >= 0, got " + std::to_string(num_experts));
  if (num_experts > 0 && family != "qwen3_moe" && family != "dots1")
    config_error(
        source, "num_experts",
        "is " + std::to_string(num_experts) + " but family '" + family + "' has no experts (only qwen3_moe and dots1)");
  if (num_experts > 0) {
    if (num_experts_per_tok <= 0 || num_experts_per_tok > num_experts)
      config_error(source, "num_experts_per_tok",
                   "must be in 1..num_experts (" + std::to_string(num_experts) + "), got " +
                       std::to_string(num_experts_per_tok));
    require_positive(source, "moe_intermediate_size", moe_intermediate_size);
    require_positive(source, "decoder_sparse_step", decoder_sparse_step);
    for (size_t i = 0; i < mlp_only_layers.size(); ++i) {
      const int64_t l = mlp_only_layers[i];
      if (l < 0 || l >= num_layers)
        config_error(source, "mlp_only_layers[" + std::to_string(i) + "]",
                     "layer " + std::to_string(l) + " does not exist (num_layers " + std::to_string(num_layers) + ")");
    }
    if (!(router_aux_loss_coef >= 0))
      config_error(source, "router_aux_loss_coef", "must be >= 0, got " + std::to_string(router_aux_loss_coef));
    if (moe_score_func != "softmax" && moe_score_func != "sigmoid")
      config_error(source, "moe_score_func", "must be 'softmax' or 'sigmoid', got '" + moe_score_func + "'");
    if (!(routed_scaling_factor > 0) || !std::isfinite(routed_scaling_factor))
      config_error(source, "routed_scaling_factor",
                   "must be a positive finite number, got " + std::to_string(routed_scaling_factor));
    if (num_shared_experts < 0)
      config_error(source, "num_shared_experts", "must be >= 0, got " + std::to_string(num_shared_experts));
    if (first_k_dense_replace < 0)
      config_error(source, "first_k_dense_replace", "must be >= 0, got " + std::to_string(first_k_dense_replace));
  }

  if (bos_token_id < -1 || bos_token_id >= vocab_size)
    config_error(source, "bos_token_id",
                 "must be -1 (none) or a token id below vocab_size (" + std::to_string(vocab_size) + "), got " +
                     std::to_string(bos_token_id));
  if (eos_token_id < -1 || eos_token_id >= vocab_size)
    config_error(source, "eos_token_id",
                 "must be -1 (none) or a token id below vocab_size (" + std::to_string(vocab_size) + "), got " +
                     std::to_string(eos_token_id));
}

// Mirrors DenseModel's parameter list (trainer/model.cpp): embed, per layer attn_norm, wqkv, [bqkv],
// [q_norm, k_norm], wo, mlp_norm, then w_gate_up, w_down (dense layer) or mlp.gate.weight, mlp.gate_up,
// mlp.down (MoE layer: router [E, D] and E experts of 3 F_moe D; with moe_selection_bias the bias [E]; with
// shared experts mlp.shared_gate_up, mlp.shared_down: 3 F_s D, F_s = shared_expert_ffn()); final_norm;
// lm_head unless tied.
namespace {

int64_t count_parameters(const ModelConfig& c, int64_t active_experts) {
  const int64_t D = c.hidden_size, F = c.intermediate_size, V = c.vocab_size;
  int64_t n = V * D + D;
  if (!c.tie_word_embeddings) n += V * D;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    n += D                  // attn_norm
         + c.qkv_dim() * D  // wqkv
         + D * c.q_dim()    // wo
         + D;               // mlp_norm
    if (c.qkv_bias) n += c.qkv_dim();
    if (c.qk_norm) n += 2 * c.head_dim;
    if (c.is_moe_layer(l)) {
      const int64_t E = active_experts < 0 ? c.num_experts : active_experts;
      n += c.num_experts * D + E * 3 * c.moe_intermediate_size * D;  // router, gate_up + down per expert
      n += 3 * c.shared_expert_ffn() * D;                            // the shared MLP (every token)
      if (c.moe_selection_bias) n += c.num_experts;
    } else {
      n += 3 * F * D;  // w_gate_up, w_down
    }
  }
  return n;
}

}  // namespace

int64_t ModelConfig::num_parameters() const { return count_parameters(*this, -1); }

// 6 FLOPs per parameter per token for the matrix multiplies (2 forward, 4 backward), counted over
// every parameter that takes part in a matmul: all non-embedding weights plus the LM head (which is
// the embedding matrix again when tied; the embedding lookup itself costs no FLOPs). Norm weights
// and biases are counted too; they are a negligible fraction.
// Attention scores and the weighted sum: per layer and token, q.k over seq_len keys and p.v over
// seq_len values cost 2 * 2 * seq_len * q_dim forward with full attention; causal masking halves it
// (2 * seq_len * q_dim) and backward doubles that again, so fwd+bwd = 6 * seq_len * q_dim per layer.
// seq_len is the (packed) sequence length; with document masking the true cost is lower, and the
// MFU convention of counting the full causal length is kept on purpose.
// MoE layers: a token runs through the router, num_experts_per_tok experts and the shared MLP, so only those
// count (the selection bias is added, not multiplied: counted like a norm weight).
double ModelConfig::train_flops_per_token(int64_t seq_len) const {
  const double embed = static_cast<double>(vocab_size) * static_cast<double>(hidden_size);
  const double matmul_params = static_cast<double>(count_parameters(*this, num_experts_per_tok)) -
                               (tie_word_embeddings ? 0.0 : embed);  // non-embedding + LM head
  const double attention =
      6.0 * static_cast<double>(num_layers) * static_cast<double>(seq_len) * static_cast<double>(q_dim());
  return 6.0 * matmul_params + attention;
}

}  // namespace hyd

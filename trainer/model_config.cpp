#include "trainer/model_config.h"

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

void ModelConfig::finalize(const std::string& source) {
  if (family != "llama" && family != "qwen2" && family != "qwen3")
    config_error(source, "family", "unknown model family '" + family + "' (expected llama, qwen2 or qwen3)");
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
// [q_norm, k_norm], wo, mlp_norm, w_gate_up, w_down; final_norm; lm_head unless tied.
int64_t ModelConfig::num_parameters() const {
  const int64_t D = hidden_size, F = intermediate_size, V = vocab_size;
  int64_t per_layer = D                // attn_norm
                      + qkv_dim() * D  // wqkv
                      + D * q_dim()    // wo
                      + D              // mlp_norm
                      + 2 * F * D      // w_gate_up
                      + D * F;         // w_down
  if (qkv_bias) per_layer += qkv_dim();
  if (qk_norm) per_layer += 2 * head_dim;
  int64_t n = V * D + num_layers * per_layer + D;
  if (!tie_word_embeddings) n += V * D;
  return n;
}

// 6 FLOPs per parameter per token for the matrix multiplies (2 forward, 4 backward), counted over
// every parameter that takes part in a matmul: all non-embedding weights plus the LM head (which is
// the embedding matrix again when tied; the embedding lookup itself costs no FLOPs). Norm weights
// and biases are counted too; they are a negligible fraction.
// Attention scores and the weighted sum: per layer and token, q.k over seq_len keys and p.v over
// seq_len values cost 2 * 2 * seq_len * q_dim forward with full attention; causal masking halves it
// (2 * seq_len * q_dim) and backward doubles that again, so fwd+bwd = 6 * seq_len * q_dim per layer.
// seq_len is the (packed) sequence length; with document masking the true cost is lower, and the
// MFU convention of counting the full causal length is kept on purpose.
double ModelConfig::train_flops_per_token(int64_t seq_len) const {
  const double embed = static_cast<double>(vocab_size) * static_cast<double>(hidden_size);
  const double matmul_params =
      static_cast<double>(num_parameters()) - (tie_word_embeddings ? 0.0 : embed);  // non-embedding + LM head
  const double attention =
      6.0 * static_cast<double>(num_layers) * static_cast<double>(seq_len) * static_cast<double>(q_dim());
  return 6.0 * matmul_params + attention;
}

}  // namespace hyd

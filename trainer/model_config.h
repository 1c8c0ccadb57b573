// Dense decoder configuration (Llama / Qwen2 / Qwen3 family).
#pragma once

#include <cstdint>
#include <string>

#include "kernels/rope.h"

namespace hyd {

struct ModelConfig {
  std::string family = "llama";  // llama | qwen2 | qwen3 (HF model_type)
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // 0 = hidden_size / num_heads
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  kernels::RopeScaling rope_scaling;
  int64_t max_position_embeddings = 4096;
  bool tie_word_embeddings = false;
  bool qk_norm = false;   // Qwen3: per-head RMSNorm of q and k before RoPE
  bool qkv_bias = false;  // Qwen2: bias on q/k/v projections
  int32_t bos_token_id = -1;
  int32_t eos_token_id = -1;

  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  int64_t qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  // Resolves head_dim and checks every field; errors name `source` (a file) and the field.
  void finalize(const std::string& source);
  int64_t num_parameters() const;
  // Model FLOPs per token for forward+backward (6N + attention), for MFU.
  double train_flops_per_token(int64_t seq_len) const;
};

}  // namespace hyd

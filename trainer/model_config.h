// Decoder configuration (Llama / Qwen2 / Qwen3 dense, Qwen3-MoE, dots1).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/rope.h"

namespace hyd {

struct ModelConfig {
  std::string family = "llama";  // llama | qwen2 | qwen3 | qwen3_moe | dots1 (HF model_type)
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

  // Mixture of Experts (families qwen3_moe and dots1; HF Qwen3MoeConfig names, dots1's noted). num_experts == 0:
  // every layer dense. Sparse layers (is_moe_layer) replace the SwiGLU MLP by the MoE FFN of
  // trainer/layer_moe.h; dense ones keep intermediate_size.
  //   qwen3_moe: softmax router, top num_experts_per_tok, no shared experts, no selection bias, scale 1.
  //   dots1 (DeepSeek-V3-style router): sigmoid scores, the selection bias e_score_correction_bias, the
  //   combine weights times routed_scaling_factor, one shared SwiGLU MLP of shared_expert_ffn() on every
  //   token, the first first_k_dense_replace layers dense. Group-limited routing (HF n_group / topk_group
  //   other than 1) is refused by the config.json reader.
  int64_t num_experts = 0;               // dots1: n_routed_experts
  int64_t num_experts_per_tok = 0;       // top_k
  int64_t moe_intermediate_size = 0;     // F of each routed expert
  bool norm_topk_prob = false;           // renormalise the top-k probabilities to sum 1
  int64_t decoder_sparse_step = 1;       // every step-th layer is sparse: (l + 1) % step == 0
  std::vector<int64_t> mlp_only_layers;  // layers that stay dense whatever the step
  // Stored, not used yet: the model's loss is the plain CE (HF adds coef * aux only with
  // output_router_logits, which its checkpoints leave off).
  double router_aux_loss_coef = 0.0;
  std::string moe_score_func = "softmax";  // softmax | sigmoid (dots1: HF scoring_func, always sigmoid)
  // The router has a per-expert bias [E] added to the scores to choose the top-k only (never the combine
  // weights): HF mlp.gate.e_score_correction_bias, a buffer (no gradient; the model keeps it as a parameter
  // layers.L.mlp.gate.e_score_correction_bias whose gradient stays 0).
  bool moe_selection_bias = false;
  double routed_scaling_factor = 1.0;  // multiplies the combine weights (after norm_topk_prob)
  // HF n_shared_experts: the shared experts of a sparse layer, stored by HF as ONE SwiGLU MLP
  // (mlp.shared_experts.{gate,up,down}_proj) of width num_shared_experts * moe_intermediate_size.
  int64_t num_shared_experts = 0;
  int64_t first_k_dense_replace = 0;  // layers l < first_k_dense_replace are dense (dots1)

  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  int64_t qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  // Width of the shared-expert MLP of a sparse layer (0 without shared experts).
  int64_t shared_expert_ffn() const { return num_shared_experts * moe_intermediate_size; }
  // HF Qwen3MoeDecoderLayer: layer l is sparse iff l is not in mlp_only_layers, num_experts > 0 and
  // (l + 1) % decoder_sparse_step == 0; HF Dots1DecoderLayer: iff l >= first_k_dense_replace (its configs
  // have step 1 and no mlp_only_layers, so one rule covers both).
  bool is_moe_layer(int64_t l) const;
  bool has_moe_layers() const;
  // Resolves head_dim and checks every field; errors name `source` (a file) and the field.
  void finalize(const std::string& source);
  int64_t num_parameters() const;
  // Model FLOPs per token for forward+backward (6N + attention), for MFU; MoE layers count their router,
  // the num_experts_per_tok active experts and the shared experts only.
  double train_flops_per_token(int64_t seq_len) const;
};

}  // namespace hyd

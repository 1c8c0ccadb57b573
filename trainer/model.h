// Dense decoder-only transformer with explicit forward and backward.
//
//   h_0 = embed[tokens]
//   per layer l:  a = RMSNorm(h) ; q,k,v = a Wqkv^T (+b) ; [q,k = per-head RMSNorm] ; q,k = RoPE(q,k)
//                 h = h + Attention(q,k,v) Wo^T
//                 m = RMSNorm(h) ; h = h + SwiGLU(m Wgate_up^T) Wdown^T      (dense layer)
//                              or  h = h + MoE(m)                (cfg.is_moe_layer(l): qwen3_moe, dots1)
//   MoE(m) (trainer/layer_moe.h): qwen3_moe: softmax(m Wr^T) over E experts, top-k, optionally renormalised
//   to sum 1, sum over the k chosen experts of weight * SwiGLU expert; no shared experts, no biases.
//   dots1: sigmoid(m Wr^T), top-k of the scores plus the selection bias, weights (optionally renormalised)
//   times routed_scaling_factor, plus the shared SwiGLU MLP on every token. No aux loss in the loss
//   (router_aux_loss_coef is stored, unused). On CUDA: one GPU, f32 router, bf16 experts.
//   logits = RMSNorm(h) Wlm^T  (Wlm = embed when tied);  loss = mean CE over tokens with target >= 0
//
// Parameters live in one contiguous buffer (f32 on the CPU, bf16 on CUDA) and their gradients in
// another (f32 on both), in the order of `params()`. Layouts that differ from HF:
//   layers.L.wqkv     [(Hq + 2 Hkv) d, D]  rows: q heads, then k heads, then v heads (HF q_proj;k_proj;v_proj)
//   layers.L.bqkv     [(Hq + 2 Hkv) d]     (qkv_bias only)
//   layers.L.w_gate_up [2F, D]             rows: gate_proj then up_proj
// Other names: embed [V, D]; layers.L.attn_norm [D]; layers.L.q_norm, k_norm [d] (qk_norm only);
// layers.L.wo [D, Hq d]; layers.L.mlp_norm [D]; layers.L.w_down [D, F]; final_norm [D]; lm_head [V, D]
// (absent when tied).
// MoE layers have, instead of w_gate_up / w_down, the layer's experts as stacked storage (one parameter
// per kind, so that params() stays short and the names stable whatever E is; distill/teacher.cpp maps
// HF's per-expert tensors onto them, MoeLayerWeights documents the same layout):
// (F = moe_intermediate_size):
//   layers.L.mlp.gate.weight [E, D]       router (HF mlp.gate.weight)
//   layers.L.mlp.gate_up     [E, 2F, D]   expert e: rows [0, F) gate_proj, [F, 2F) up_proj
//   layers.L.mlp.down        [E, D, F]    expert e: down_proj
// and for dots1 (F_s = ModelConfig::shared_expert_ffn(): HF's n_shared_experts as one MLP):
//   layers.L.mlp.shared_gate_up [1, 2F_s, D]  rows [0, F_s) shared_experts.gate_proj, then up_proj
//   layers.L.mlp.shared_down    [1, D, F_s]   shared_experts.down_proj
//   layers.L.mlp.gate.e_score_correction_bias [E]  the selection bias (HF buffer; no weight decay, its
//                                                  gradient stays 0; on CUDA the router reads an f32 copy)
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/model_config.h"

namespace hyd {

class SequenceParallel;   // parallel/sequence_parallel.h
class MoeExpertParallel;  // trainer/layer_moe.h

// One packed micro-batch, on the model's device. Documents never attend across boundaries.
// A batch's tensors must be on the device when a model is called with it (copy_tensor and BatchUploader
// return once they are); the models do not synchronise the device to make sure.
struct Batch {
  Tensor tokens;      // i32 [N]
  Tensor targets;     // i32 [N], -1 where no loss is taken
  Tensor positions;   // i32 [N], position of the token inside its document (RoPE)
  Tensor cu_seqlens;  // i32 [D+1], document boundaries; cu_seqlens[D] = N
  int64_t num_tokens = 0;
  int64_t num_docs = 0;
  // The longest document, 1..num_tokens, computed on the host from cu_seqlens (max_doc_len() of
  // trainer/batch_upload.h): the attention kernels' grid bound, which they cannot read from the device.
  int64_t max_doc_len = 0;
  int64_t num_targets = 0;  // tokens with target >= 0: the loss is their mean
  // Sequence parallelism (HybridModel only): the batch is this rank's slice (trainer/lasp.h,
  // slice_batch_for_sp) and sp holds the group and the layout; null for a whole batch.
  const SequenceParallel* sp = nullptr;
  // Expert parallelism (HybridModel only): the MoE layers' routed experts are computed across this EP group
  // (every rank of it runs the same layers on its own tokens); null: every expert here.
  const MoeExpertParallel* ep = nullptr;
};

struct ParamInfo {
  std::string name;
  std::vector<int64_t> shape;
  bool weight_decay = false;  // matrices yes; norms, biases, no
  int64_t offset = 0;         // elements into the flat buffers
  int64_t numel = 0;
  Tensor value;  // view into flat_params()
  Tensor grad;   // view into flat_grads()
  // A piece of a larger tensor (expert-sharded storage, HybridConfig::expert_shards; ZeRO-1's shard pieces):
  // the elements [global_begin, global_begin + numel) of the row-major tensor NAME (the name up to any
  // '[') of shape global_shape. Empty global_shape: the parameter is the whole tensor.
  std::vector<int64_t> global_shape;
  int64_t global_begin = 0;
  const std::vector<int64_t>& full_shape() const { return global_shape.empty() ? shape : global_shape; }
  std::string base_name() const { return name.substr(0, name.find('[')); }
};

class DenseModel {
 public:
  // max_tokens: the largest micro-batch (sum of document lengths) forward/backward will see.
  DenseModel(const ModelConfig& cfg, Device device, int64_t max_tokens);
  ~DenseModel();
  DenseModel(const DenseModel&) = delete;
  DenseModel& operator=(const DenseModel&) = delete;

  const ModelConfig& config() const;
  Device device() const;
  std::vector<ParamInfo>& params();
  const ParamInfo& param(const std::string& name) const;  // throws hyd::Error naming an unknown parameter
  bool has_param(const std::string& name) const;
  Tensor flat_params() const;  // [P] f32 (CPU) / bf16 (CUDA)
  Tensor flat_grads() const;   // [P] f32

  // Normal(0, std) for matrices and embeddings, output projections scaled by 1/sqrt(2 L); norms = 1, biases = 0.
  void init_random(uint64_t seed, float std = 0.02f);
  // Host f32 values converted to the parameter's dtype; n must equal the parameter's numel.
  void set_param(const std::string& name, const float* data, int64_t n);
  std::vector<float> get_param(const std::string& name) const;
  std::vector<float> get_grad(const std::string& name) const;

  void zero_grad();
  // The same on ctx's stream, ordered with the ops queued there; no host synchronisation.
  void zero_grad(const ExecContext& ctx);
  // Forward and backward of the mean cross-entropy over the batch's targets, scaled by loss_scale
  // (e.g. 1 / gradient-accumulation steps) in the gradients. Gradients accumulate. Returns the
  // mean loss (unscaled).
  double forward_backward(ExecContext& ctx, const Batch& batch, float loss_scale = 1.0f);
  // Mean loss, no gradients.
  double forward_loss(ExecContext& ctx, const Batch& batch);
  // Full logits [N, V] copied to host f32 (tests, golden checks, evaluation of small batches).
  std::vector<float> forward_logits(ExecContext& ctx, const Batch& batch);

  // Bytes held by parameter, gradient and activation arenas.
  size_t memory_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace hyd

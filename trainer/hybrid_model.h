// Hybrid student model (DISTILL.md "Students"): the dense teacher's skeleton with each layer's token
// mixer chosen by a pattern, explicit forward and backward.
//
//   h_0 = embed[tokens]
//   per layer l:  a = RMSNorm(h) ; h = h + Mixer_l(a)
//                 m = RMSNorm(h) ; h = h + SwiGLU(m Wgate_up^T) Wdown^T      (dense layer)
//                              or  h = h + MoE(m)                          (cfg.model.is_moe_layer(l))
//   MoE(m): the DenseModel's qwen3_moe / dots1 FFN (trainer/model.h, trainer/layer_moe.h), same parameters
//   and kernels (CPU and one GPU). A student of a MoE teacher keeps the teacher's MoE FFNs, dots1's shared
//   experts and selection bias included (copied by distill/student_init.cpp, trained in stage 2; the bias's
//   gradient is 0, so it stays the teacher's).
//   logits = RMSNorm(h) Wlm^T  (Wlm = embed when tied);  loss = mean CE over tokens with target >= 0
// Mixer_l by the pattern's letter:
//   K  Kimi Delta Attention (trainer/layer_kda.h, dims from HybridConfig::kda)
//   A  NoPE causal softmax attention: the teacher's attention block without RoPE (q/k norm and qkv bias
//      as the family has them)
//   T  the teacher's attention as is (with RoPE)
// (trainer/layer_attention_mixer.h has the attention math.) A student made only of T layers is the
// DenseModel with the same weights, kernel for kernel (MoE layers included).
//
// Parameters (names as DenseModel where shared), in flat-buffer order:
//   embed [V, D]
//   per layer L: layers.L.attn_norm [D], then the mixer's
//       K: layers.L.q_proj.weight, k_proj.weight, v_proj.weight, q_conv1d.weight, k_conv1d.weight,
//          v_conv1d.weight, f_proj.0.weight, f_proj.1.weight, b_proj.weight, A_log, dt_bias,
//          g_proj.0.weight, g_proj.1.weight, g_proj.1.bias, o_norm.weight, o_proj.weight
//          (names and storage shapes as KdaLayerWeights: conv weights [C, K])
//       A, T: layers.L.wqkv [(Hq + 2 Hkv) d, D], layers.L.bqkv (qkv_bias), layers.L.q_norm, k_norm [d]
//          (qk_norm), layers.L.wo [D, Hq d]
//     then layers.L.mlp_norm [D], layers.L.w_gate_up [2F, D], layers.L.w_down [D, F]; a MoE layer has
//     instead (as DenseModel, F_e = moe_intermediate_size) layers.L.mlp.gate.weight [E, D],
//     layers.L.mlp.gate_up [E, 2F_e, D], layers.L.mlp.down [E, D, F_e] (dots1 also layers.L.mlp.shared_gate_up,
//     mlp.shared_down and mlp.gate.e_score_correction_bias)
//   final_norm [D], lm_head [V, D] (absent when tied)
// All values live in one flat buffer (f32 on the CPU, bf16 on CUDA, so the AdamW of trainer/optimizer.h
// takes params() as they are) and all gradients in one flat f32 buffer. The KDA gate parameters A_log
// and dt_bias are f32 in the KDA kernels on CUDA: the model keeps f32 working copies of their (bf16)
// values, refreshed at the start of every forward; their gradients are the flat buffer's f32 views.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "trainer/layer_kda.h"
#include "trainer/model.h"

namespace hyd {

enum class MixerKind : char { kda = 'K', nope_attention = 'A', teacher_attention = 'T' };

// student.pattern -> one mixer per layer. Two forms:
//   * a pattern without commas ("KKKA", "K", "KA"), repeated to num_layers; when it is shorter than
//     num_layers and contains A, the last layer is made A (a repeated hybrid always ends with full
//     attention, DISTILL.md), so "KKKA" over 6 layers is KKKAKA; patterns without A ("K", "T", "KT")
//     repeat as written. A pattern of exactly num_layers letters is taken as written ("KAKK" over 4
//     layers is KAKK); one longer than num_layers is an error.
//   * an explicit comma-separated list of exactly num_layers letters ("K,K,A,T"; spaces allowed),
//     taken as written.
// Letters: K, A, T. Errors are hyd::Error naming `source` and the field 'student.pattern'.
std::vector<MixerKind> parse_layer_pattern(const std::string& pattern, int64_t num_layers,
                                           const std::string& source = "student");
// One letter per layer, e.g. "KKKA".
std::string layer_pattern_string(const std::vector<MixerKind>& layers);

struct HybridConfig {
  ModelConfig model;  // the skeleton (embedding, norms, MLP, attention dims of A and T layers)
  KdaConfig kda;      // K layers; hidden 0 = model.hidden_size
  std::string pattern = "KKKA";
  std::vector<MixerKind> layers;  // filled by finalize
  // Expert-sharded storage (expert parallelism over expert_shards ranks, docs/parallel.md): the MoE layers'
  // routed experts stored here are [expert_shard E / S, (expert_shard + 1) E / S) of each layer (S =
  // expert_shards), as layers.L.mlp.gate_up [E / S, 2F, D] and layers.L.mlp.down [E / S, D, F], placed after
  // every other parameter in the flat buffers (HybridModel::expert_region_offset: ZeRO-1's expert region).
  // Such a model runs its MoE layers only under an expert-parallel group of S ranks (Batch::ep). 1 = every
  // expert, in the layer order of the parameter list.
  int64_t expert_shards = 1;
  int64_t expert_shard = 0;

  // Finalizes the model config, parses the pattern and validates kda (only when some layer is K).
  // Errors name `source` and the field.
  void finalize(const std::string& source);
  bool has(MixerKind kind) const;
};

// What a HybridModel is built for. train: everything below. inference (a distillation teacher, evaluation):
// forward-only calls (forward_loss, forward_logits, forward_logits_chunks, forward_hidden, lm_head_logits,
// forward_layer_inputs, forward_layer_outputs, mixer_input_norm) with the same results, kernel for kernel, in
// a fraction of the memory: no gradient buffer (flat_grads() and every ParamInfo::grad are empty), the
// residual stream in two alternating buffers, one set of saved activations shared by all layers of a kind,
// and scratch for the forward only. Calls that need gradients or a backward (forward_backward*, mixer_forward /
// mixer_backward, zero_grad, get_grad, forward_layer_inputs_host) throw hyd::Error saying so.
enum class ModelUse { train, inference };

class HybridModel {
 public:
  // max_tokens: the largest micro-batch (sum of document lengths) any call will see.
  HybridModel(const HybridConfig& cfg, Device device, int64_t max_tokens, ModelUse use = ModelUse::train);
  ~HybridModel();
  HybridModel(const HybridModel&) = delete;
  HybridModel& operator=(const HybridModel&) = delete;

  const HybridConfig& config() const;
  Device device() const;
  int64_t num_layers() const;
  MixerKind layer_kind(int64_t layer) const;

  std::vector<ParamInfo>& params();
  const ParamInfo& param(const std::string& name) const;  // throws hyd::Error naming an unknown parameter
  bool has_param(const std::string& name) const;
  // The parameters of layer `layer`'s token mixer (not its attn_norm), in flat-buffer order: what
  // stage 1 trains (e.g. AdamW(mixer_params(l) of every K layer, ...)).
  std::vector<ParamInfo> mixer_params(int64_t layer) const;
  Tensor flat_params() const;  // [P] f32 (CPU) / bf16 (CUDA)
  // First flat element of the routed experts' storage when it is sharded (HybridConfig::expert_shards > 1: every
  // later element belongs to a local expert); the flat size P otherwise.
  int64_t expert_region_offset() const;
  Tensor flat_grads() const;  // [P] f32 (empty for ModelUse::inference)

  // Matrices and embeddings Normal(0, std), output projections (wo, o_proj, w_down) scaled by
  // 1/sqrt(2 L); norms 1, biases 0; A_log and dt_bias as FLA initialises them (KdaLayerWeights).
  void init_random(uint64_t seed, float std = 0.02f);
  // Host f32 values converted to the parameter's dtype; n must equal the parameter's numel.
  void set_param(const std::string& name, const float* data, int64_t n);
  std::vector<float> get_param(const std::string& name) const;
  std::vector<float> get_grad(const std::string& name) const;

  void zero_grad();
  // The same on ctx's stream, ordered with the ops queued there; no host synchronisation.
  void zero_grad(const ExecContext& ctx);
  // As DenseModel: mean CE over the batch's targets; gradients (scaled by loss_scale) accumulate.
  double forward_backward(ExecContext& ctx, const Batch& batch, float loss_scale = 1.0f);
  double forward_loss(ExecContext& ctx, const Batch& batch);
  std::vector<float> forward_logits(ExecContext& ctx, const Batch& batch);  // [N, V] host f32

  // The MoE layers' load-balancing loss (trainer/layer_moe.h L_aux with coefficient `coef`, summed over the
  // MoE layers): computed by every forward from now on (moe_aux_loss() reads the last one's), and every
  // backward adds grad_scale x its gradient (the term's weight in the objective). coef 0: off (the default).
  void set_moe_aux_loss(double coef, double grad_scale);
  double moe_aux_loss() const;
  // Rows routed to each expert ([E], the pairs of this rank's tokens) by every MoE layer in the last forward,
  // with the name of the layer's selection-bias parameter (empty without one), layers in order.
  struct MoeLoad {
    int64_t layer = 0;
    std::string bias_param;
    std::vector<int64_t> load;
  };
  std::vector<MoeLoad> moe_expert_loads() const;

  // ---- Distillation (DISTILL.md stages 1 and 2) ------------------------------------------------------
  //
  // The LM head works on token chunks [t0, t1) of logits_chunk_size() tokens (the last chunk may be
  // shorter); a chunk's logits are [t1 - t0, V] in the activation dtype (f32 CPU / bf16 CUDA) on the
  // model's device, and are valid only inside the callback that receives them.
  //
  // Stage 2 pairs the teacher's and the student's chunks for the same tokens without ever holding
  // either model's full [N, V] logits:
  //   teacher.forward_hidden(tctx, batch);                      // final hidden states kept by the teacher
  //   student.forward_backward_logits(ctx, batch, [&](ExecContext& c, int64_t t0, int64_t t1, const Tensor& s) {
  //     if (t0 == 0) c.wait_for(tctx);                          // the teacher's forward is done
  //     const Tensor t = teacher_chunk.slice0(0, t1 - t0);      // the loop's [C, V] buffer, C >= the
  //     teacher.lm_head_logits(c, t0, t1, t);                    //   student's logits_chunk_size()
  //     kernels::distill_loss(c, s, t, labels.slice0(t0, t1), mask.slice0(t0, t1), kl.slice0(t0, t1), ...);
  //     return 0.0;  // per-token kl / ce stay on the device, reduced once after the call
  //   });
  // tctx may be ctx (one stream, the wait is then a no-op) or a context of its own (distill_loop.cpp on one
  // GPU), on which the teacher's forward overlaps with the student's; the chunk's teacher logits and the
  // loss run on the student's context c, so they are ordered with its chunk. Before the next step's teacher
  // forward, tctx.wait_for(ctx): the chunks read the teacher's buffers.

  // A chunk's loss: `logits` holds the student's logits of tokens [t0, t1). The function must overwrite
  // them in place with dLoss/dlogits (every scaling included: the model scales nothing) and returns the
  // chunk's loss contribution (summed into forward_backward_logits' result; a function that keeps its
  // per-token losses on the device may return 0 and reduce them after the call, which avoids a host
  // synchronisation per chunk).
  using LogitsChunkLoss = std::function<double(ExecContext& ctx, int64_t t0, int64_t t1, const Tensor& logits)>;
  // A forward-only visit of one chunk's logits.
  using LogitsChunkVisit = std::function<void(int64_t t0, int64_t t1, const Tensor& logits)>;

  // Tokens per LM-head chunk. The default comes from the vocabulary (a chunk of f32 logits <= 64 MiB,
  // 16..1024 tokens); set_logits_chunk_size accepts 1..that default (the scratch arena is sized for it).
  int64_t logits_chunk_size() const;
  void set_logits_chunk_size(int64_t tokens);

  // Forward, then per chunk: logits = RMSNorm(h_L) Wlm^T, loss_fn (dlogits in place), and the chunk's
  // backward through the LM head (d final-hidden, dWlm) before the next chunk reuses the buffer; then
  // the full backward. Gradients accumulate. Returns the sum of loss_fn's results. Batch as for
  // forward_backward (tokens; targets are checked but only loss_fn reads labels). forward_backward is
  // this call with a loss_fn of kernels::cross_entropy (same kernels in the same order).
  //
  // Stage 2's optional hidden-state term (DISTILL.md "plus optional hidden-state MSE"), when `hidden` is
  // given. With h[l] the residual stream after layer l (after its MLP block; h[L-1] is the input of
  // final_norm), S the tokens t with token_mask[t] != 0 (all N tokens when token_mask is empty), n = |S|:
  //   H = (1 / (L n)) sum_{l < L} sum_{t in S} ||h_s[l, t] - h_t[l, t]||^2 / D
  // i.e. the mean over layers and counted tokens of the per-token squared error divided by D. The call
  // returns loss_fn's sum + weight * H, writes H (unweighted) to hidden->mse, and during the backward
  // adds weight * dH/dh_s[l] = 2 weight (h_s[l] - h_t[l]) / (L n D) (zero rows outside S) to the
  // residual-stream gradient at each layer boundary. weight == 0: H is still computed, but nothing is
  // added to the result or the gradients (bit for bit the call without `hidden`). n == 0: H = 0.
  // The differences are taken in f32 (also from bf16 activations on CUDA).
  struct HiddenStateMatch {
    std::vector<Tensor> targets;      // num_layers() tensors [N, D], activation dtype, model's device: h_t[l]
    float weight = 0;                 // w >= 0
    std::vector<uint8_t> token_mask;  // host, N entries, or empty (every token counts)
    double mse = 0;                   // out: H
    // n of the mean when it runs over several ranks' tokens (sequence or data parallelism): every rank's
    // H and gradient then use this n, and the ranks' H add up to the whole mean. 0 = this call's counted
    // tokens (one rank).
    int64_t count = 0;
  };
  double forward_backward_logits(ExecContext& ctx, const Batch& batch, const LogitsChunkLoss& loss_fn,
                                 HiddenStateMatch* hidden = nullptr);
  // Forward only; visit(t0, t1, logits) for every chunk in order (evaluation; a teacher whose chunks
  // are consumed one at a time).
  void forward_logits_chunks(ExecContext& ctx, const Batch& batch, const LogitsChunkVisit& visit);
  // Forward only, keeping the final hidden states for lm_head_logits.
  void forward_hidden(ExecContext& ctx, const Batch& batch);
  // logits = RMSNorm(h_L)[t0:t1] Wlm^T of the last forward of this model (any forward_*, forward_backward
  // or forward_layer_inputs; not after a mixer_forward), written to `logits` [t1 - t0, V] (activation
  // dtype, model's device; any 0 <= t0 < t1 <= N, not limited to logits_chunk_size()). Asynchronous on ctx.
  void lm_head_logits(ExecContext& ctx, int64_t t0, int64_t t1, const Tensor& logits);

  // Stage 1's teacher-forced inputs, from a forward-only pass of this model (the teacher: an all-T
  // HybridModel is the DenseModel kernel for kernel):
  //   layer_inputs[l]  = h entering layer l (the residual stream before its attn_norm; [0] = embed[tokens])
  //   mixer_outputs[l] = Mixer_l(RMSNorm(layer_inputs[l])): the mixer's output before the residual add,
  //                      i.e. what mixer_forward(l, mixer_input_norm(l, layer_inputs[l])) gives.
  // Each vector is empty (not wanted) or num_layers() distinct, non-overlapping tensors [N, D] in the
  // activation dtype on the model's device, owned by the caller (e.g. carved from an arena of the
  // distill loop): the forward writes the residual stream straight into layer_inputs (no copy), so
  // they stay valid whatever this model runs next, including its own mixer_forward. An empty tensor in
  // a vector skips that layer. The final hidden states are kept too (lm_head_logits works after it).
  // Asynchronous on ctx.
  void forward_layer_inputs(ExecContext& ctx, const Batch& batch, const std::vector<Tensor>& layer_inputs,
                            const std::vector<Tensor>& mixer_outputs = {});
  // Stage 2's hidden-state targets, from a forward-only pass of this model (the teacher):
  //   layer_outputs[l] = h leaving layer l (the residual stream after its MLP block; [L-1] is the input of
  //                      final_norm), so layer_outputs[l] is what forward_layer_inputs gives as input l + 1.
  // num_layers() distinct, non-overlapping caller-owned tensors [N, D] (activation dtype, model's device),
  // written in place by the forward as forward_layer_inputs does. The final hidden states are kept too.
  // Asynchronous on ctx.
  void forward_layer_outputs(ExecContext& ctx, const Batch& batch, const std::vector<Tensor>& layer_outputs);
  // Host f32 copies of every layer input ([l] is N * D values), for tests and tools.
  std::vector<std::vector<float>> forward_layer_inputs_host(ExecContext& ctx, const Batch& batch);

  // ---- Stage 1 (alignment): one layer's token mixer alone, teacher-forced.
  // The batch gives the packed documents (num_tokens, num_docs, cu_seqlens; positions for T layers;
  // tokens and targets are not read). Tensors are [N, D] on the model's device in its activation dtype
  // (f32 CPU / bf16 CUDA).
  // normed = RMSNorm(hidden) with layers.L.attn_norm: the mixer's input for the layer input `hidden`.
  void mixer_input_norm(ExecContext& ctx, int64_t layer, const Batch& batch, const Tensor& hidden,
                        const Tensor& normed);
  // out = Mixer_l(normed_input). Keeps what mixer_backward needs for this layer until the next
  // full-model call or a mixer_forward with another token count; `normed_input` is read again by
  // mixer_backward and must stay unchanged until then. Several layers may be run before their backwards.
  void mixer_forward(ExecContext& ctx, int64_t layer, const Batch& batch, const Tensor& normed_input,
                     const Tensor& out);
  // Backward of the last mixer_forward of this layer: the mixer's parameter gradients accumulate
  // (nothing else is touched); d_input = d(out)/d(input)^T dout is written when not empty.
  void mixer_backward(ExecContext& ctx, int64_t layer, const Batch& batch, const Tensor& dout,
                      const Tensor& d_input = Tensor{});

  // Bytes held by the parameter, gradient, table, activation and scratch arenas.
  size_t memory_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Model FLOPs per token of the student's forward + backward, for MFU, by ModelConfig::train_flops_per_token's
// convention: 6 x the parameters that take part in a matrix multiply once per token (whole tensors, so a rank
// that holds some experts only counts all of them; MoE layers count their router, active and shared experts only;
// the input embedding unless tied to the LM head) + 6 x softmax-attention layers x seq_len x q_dim. KDA's chunked
// recurrence is not counted (a few % of the matmuls). seq_len: the whole sequence a query sees (under sequence
// parallelism all ranks' tokens together, so a GPU's attention work per token grows with SP).
double hybrid_train_flops_per_token(HybridModel& model, const HybridConfig& cfg, int64_t seq_len);

}  // namespace hyd

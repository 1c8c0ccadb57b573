// Mixture-of-Experts FFN layer (issue 7; ../shared/PARALLEL.md "Expert parallelism for MoE layers"): the
// CPU reference, forward and backward. No pre-norm and no residual: the block that holds it adds those.
// Per token t (x [N, D], router weight W_r [E, D], selection bias b [E]):
//   logits = x W_r^T                                  (fp32 router, whatever the activations' dtype)
//   s = softmax(logits) over the E experts | sigmoid(logits) element-wise          (score_func)
//   sel = s + b (b only with use_selection_bias: it steers the choice, never the combine weights)
//   e_1..e_k = top-k of sel (descending; ties go to the lower expert index); slot j holds e_j
//   w_j = s[e_j];  if norm_topk_prob: w_j /= sum_i s[e_i];  w_j *= route_scale
//   FFN_e(x) = (silu(x G_e^T) * (x U_e^T)) W_down_e^T   with W_gate_up_e = [G_e; U_e] [2F, D], W_down_e [D, F]
//   out[t] = sum_j w_j FFN_{e_j}(x[t]) + sum_{s < S} FFN^shared_s(x[t])     (shared experts: no gate)
//   L_aux = coef E sum_e f_e P_e  (aux_loss_coef > 0; Switch / Qwen style), f_e = #(t, j) with e_j = e / (N k)
//           (a constant: no gradient), P_e = mean_t s[t, e]. Returned by forward; backward adds its gradient.
// Dispatch (dropless): the N k (token, slot) pairs are sorted stably by expert (MoeRouting), the token rows
// gathered in that order (moe_permute), each expert's SwiGLU runs on its contiguous rows (an expert with
// zero rows is skipped), and the rows are scattered back and combined with w (moe_combine). Expert
// parallelism later exchanges the permuted rows between ranks with all-to-all-v, expert by expert.
// Backward: through the experts (row by row), the combine weights (the norm_topk_prob normalisation, then
// softmax / sigmoid), and P_e of L_aux, into W_r and x. Top-k is piecewise constant and b gets no gradient.
// Shapes: x, out [N, D]; scores [N, E]; per pair: expert, weight [N, k]; permuted rows xp, yp [N k, D],
// gate_up [N k, 2F], act [N k, F]; shared expert s: gate_up [N, 2 F_s], act [N, F_s].
// dtypes: values, activations, scores and gradients all f32 or all f64 (finite-difference harnesses) on the
// CPU; indices i32. CUDA: activations and weights bf16, weight
// gradients f32 (the master gradients, as the dense MLP), the router in f32 (logits by a GEMM with f32
// output, scores [N, E], combine weights and their gradients f32; d_logits is rounded to bf16 for the GEMMs
// into W_r and x). The ops are kernels/moe.h (one CPU reference, CUDA kernels): routing built on the device,
// grouped expert GEMMs by cuBLAS over the experts with rows (MoeLayer::gemm: grouped | loop, HYD_MOE_GEMM)
// or by the WMMA kernels reading the device offsets (wmma). The cuBLAS ones need the per-expert row counts
// on the host: forward copies them once (pinned memory, one host synchronisation per layer forward) and keeps
// them in Saved for the backward of the same micro-batch; wmma synchronises nowhere. aux_loss_coef > 0 adds a
// synchronisation (its value, which forward returns: two [E] vectors are copied to the host).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/moe.h"
#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/layer_common.h"
#include "trainer/model_config.h"

namespace hyd {

struct MoeConfig {
  int64_t hidden = 0;                  // D
  int64_t num_experts = 0;             // E (routed experts)
  int64_t top_k = 0;                   // k <= E
  int64_t expert_ffn = 0;              // F: SwiGLU intermediate size of a routed expert
  int64_t num_shared_experts = 0;      // S >= 0: run on every token, outputs summed (no gate)
  int64_t shared_ffn = 0;              // F_s: intermediate size of each shared expert (needed when S > 0)
  std::string score_func = "softmax";  // "softmax" | "sigmoid"
  bool norm_topk_prob = false;         // renormalise the k chosen scores to sum 1 (before route_scale)
  float route_scale = 1.0f;            // multiplies the combine weights
  bool use_selection_bias = false;     // DeepSeek-V3 auxiliary-loss-free balancing bias (selection only)
  float aux_loss_coef = 0.0f;          // load-balancing loss coefficient; 0 = off

  bool sigmoid() const { return score_func == "sigmoid"; }
  // Throws hyd::Error naming `source` (a config file, or the caller) and the offending field.
  void validate(const std::string& source = "MoeConfig") const;
};

// CPU conveniences over the ops of kernels/moe.h (which the layer calls on either device):
// The router step: scores [N, E] (softmax / sigmoid of x W_r^T) and the routing (top-k by scores + bias,
// combine weights, permutation). router_w [E, D]; bias [E] or empty (used only when
// cfg.use_selection_bias). x, router_w, bias, scores and r.weight share one dtype (f32 | f64).
void moe_route(const MoeConfig& cfg, const Tensor& x, const Tensor& router_w, const Tensor& bias, const Tensor& scores,
               const MoeRouting& r);
// xp[p] = x[token of order[p]]: the token rows in expert-major order. x [N, D], xp [N k, D].
void moe_permute(const MoeRouting& r, const Tensor& x, const Tensor& xp);
// pairs[t k + j] = xp[position[t k + j]]: the permuted rows back in pair order. xp, pairs [N k, D].
// (moe_unpermute(moe_permute(x)) holds k copies of every row of x.)
void moe_unpermute(const MoeRouting& r, const Tensor& xp, const Tensor& pairs);
// out[t] (= or +=) sum_j w_tj yp[position[t k + j]]. yp [N k, D], out [N, D].
void moe_combine(const MoeRouting& r, const Tensor& yp, const Tensor& out, bool accumulate);
// dx[t] (= or +=) sum_j dxp[position[t k + j]]: the adjoint of moe_permute. dxp [N k, D], dx [N, D].
void moe_permute_backward(const MoeRouting& r, const Tensor& dxp, const Tensor& dx, bool accumulate);

// Auxiliary-loss-free load balancing (DeepSeek-V3, after each optimizer step), on the selection bias:
//   bias_e += rate * sign(mean_load - load_e),   mean_load = (sum_e load_e) / E,   sign(0) = 0
// load_e: pairs routed to expert e during the step (MoeRouting::counts summed over micro-batches and the
// data-parallel ranks, so that every replica applies the same update). bias [E] f32 | f64 on the CPU.
void moe_update_selection_bias(const Tensor& bias, const std::vector<int64_t>& load, double rate);

class Communicator;  // parallel/comm.h
struct MoeLayer;

// Expert parallelism over an EP group of P ranks (PARALLEL.md): rank p computes the routed experts
// [p E/P, (p+1) E/P) (E must be a multiple of P) for the tokens of every rank of the group.
// Per MoE layer and micro-batch, forward: the per-(destination, local expert) row counts go through one
// all-to-all (MPI, host), the permuted token rows (already expert-major, so each destination's rows are
// contiguous) to the owners; each owner runs its experts on their rows (an expert's rows from every
// source, in source order), and the outputs go back the mirror way; the combine runs where the tokens
// live. Backward runs the same exchanges for the output gradients and back for the input gradients.
// Dropless: an expert may receive no row, or every row.
//   CPU: the rows travel by MPI all-to-all-v (grouped by source) and are regrouped expert by expert.
//   CUDA: NCCL (a communicator made from the group at construction, so every rank of the group must
//   construct it together, each on its own GPU); the rows travel by one all_to_all_blocks per exchange, each
//   (source, expert) block landing directly at its expert-major place (no regrouping copies). The received
//   rows and their SwiGLU intermediates reuse the layer's Saved buffers when they fit (received rows <= N k,
//   the balanced case); more rows take buffers of this object (one set per layer, grown when needed, kept).
//   One host synchronisation per layer forward (the counts, which the cuBLAS GEMMs need anyway); with
//   HYD_MOE_GEMM=wmma the device offsets of the local experts are uploaded too.
// Router and shared experts are computed locally (replicated weights); a routed expert's gradient exists
// only on its owner rank (zero elsewhere), so summing expert gradients over the group gives each expert's
// gradient once. The load-balancing loss (aux_loss_coef > 0) is computed per rank on its own tokens.
class MoeExpertParallel {
 public:
  // group must outlive this object; device: where the layers run (CUDA: collective NCCL set-up over group).
  explicit MoeExpertParallel(const Communicator& group, Device device = Device::cpu());
  ~MoeExpertParallel();
  MoeExpertParallel(const MoeExpertParallel&) = delete;
  MoeExpertParallel& operator=(const MoeExpertParallel&) = delete;
  int rank() const;
  int size() const;
  // Rows this rank's experts processed in the last forward of `layer` (all sources together).
  int64_t last_received_rows(const MoeLayer& layer) const;
  // CUDA: bytes this rank has sent in the rows' exchanges so far (NCCL, the CommCounters definition of
  // parallel/comm.h). CPU: 0 (the rows travel over the MPI group, whose counters the caller holds).
  uint64_t device_bytes_sent() const;

  struct Impl;  // the exchanges and the saved rows, per layer (layer_moe.cpp)
  std::unique_ptr<Impl> impl;
};

struct MoeLayer {
  MoeConfig cfg;
  std::string nvtx_fwd = "moe.fwd", nvtx_bwd = "moe.bwd";

  // Parameters (storage shape; MoeLayerWeights maps them to the HF qwen3_moe names):
  WeightRef router;          // [E, D]            mlp.gate.weight
  WeightRef gate_up;         // [E, 2F, D]        expert e: rows [0, F) gate_proj, [F, 2F) up_proj
  WeightRef down;            // [E, D, F]         down_proj
  // (Under expert parallelism over P ranks gate_up / down may instead hold only this rank's experts, [E / P, ...]
  // from expert rank * E / P on: expert-sharded storage; forward checks the size.)
  WeightRef shared_gate_up;  // [S, 2F_s, D]      (empty when S = 0)
  WeightRef shared_down;     // [S, D, F_s]
  Tensor selection_bias;     // [E] (a buffer, not trained by gradients; empty without use_selection_bias)

  // How the routed experts' GEMMs run on CUDA (kernels/moe.h MoeGemm; HYD_MOE_GEMM when the layer is made).
  kernels::MoeGemm gemm = kernels::moe_gemm_from_env();
  // Pinned staging of the per-expert row counts for the cuBLAS GEMMs (shared by copies of the layer: the
  // copy completes inside forward).
  std::shared_ptr<kernels::MoeHostCounts> host_counts = std::make_shared<kernels::MoeHostCounts>();

  // Exactly what backward needs; x is a view of the layer input, owned by the caller.
  struct Saved {
    Tensor x;
    Tensor scores;  // [N, E]
    MoeRouting routing;
    Tensor xp, gate_up, act, yp;        // permuted rows: [N k, D], [N k, 2F], [N k, F], [N k, D]
    Tensor shared_gate_up, shared_act;  // [S N, 2F_s], [S N, F_s] (empty when S = 0)
    Tensor aux_frac;                    // [E]: f_e of L_aux (the scores' dtype)
    Tensor aux_prob;                    // [E]: P_e of L_aux (the scores' dtype)
    // CUDA: the GEMM implementation forward ran (backward runs the same) and, for the cuBLAS ones, the rows
    // of every expert on the host ([E], routing.counts; empty with wmma and on the CPU).
    kernels::MoeGemm gemm = kernels::MoeGemm::wmma;
    std::vector<int32_t> counts_host;
  };
  struct Scratch {
    Tensor d_yp, d_act, d_gate_up, d_xp;  // permuted rows
    Tensor d_weight;                      // [N, k]
    Tensor d_scores;                      // [N, E]: then d_logits in place
    Tensor d_shared_act, d_shared_gate_up;
    Tensor d_logits_lp;  // [N, E] bf16: d_logits rounded for the router's GEMMs (bf16 activations only)
  };

  template <class Alloc>
  Saved alloc_saved(Alloc& arena, int64_t n, DType act) const {
    const int64_t nk = n * cfg.top_k, D = cfg.hidden, F = cfg.expert_ffn, S = cfg.num_shared_experts;
    const DType sd = moe_score_dtype(act);  // the router's dtype: f32 for bf16 activations
    Saved s;
    s.scores = arena.alloc({n, cfg.num_experts}, sd);
    s.routing = MoeRouting::alloc(arena, n, cfg.top_k, cfg.num_experts, sd);
    s.xp = arena.alloc({nk, D}, act);
    s.gate_up = arena.alloc({nk, 2 * F}, act);
    s.act = arena.alloc({nk, F}, act);
    s.yp = arena.alloc({nk, D}, act);
    if (S > 0) {
      s.shared_gate_up = arena.alloc({S * n, 2 * cfg.shared_ffn}, act);
      s.shared_act = arena.alloc({S * n, cfg.shared_ffn}, act);
    }
    s.aux_frac = arena.alloc({cfg.num_experts}, sd);
    s.aux_prob = arena.alloc({cfg.num_experts}, sd);
    return s;
  }
  template <class Alloc>
  Scratch alloc_scratch(Alloc& arena, int64_t n, DType act) const {
    const int64_t nk = n * cfg.top_k, D = cfg.hidden, F = cfg.expert_ffn;
    Scratch s;
    s.d_yp = arena.alloc({nk, D}, act);
    s.d_act = arena.alloc({nk, F}, act);
    s.d_gate_up = arena.alloc({nk, 2 * F}, act);
    s.d_xp = arena.alloc({nk, D}, act);
    const DType sd = moe_score_dtype(act);
    s.d_weight = arena.alloc({n, cfg.top_k}, sd);
    s.d_scores = arena.alloc({n, cfg.num_experts}, sd);
    if (cfg.num_shared_experts > 0) {
      s.d_shared_act = arena.alloc({n, cfg.shared_ffn}, act);
      s.d_shared_gate_up = arena.alloc({n, 2 * cfg.shared_ffn}, act);
    }
    if (act == DType::bf16) s.d_logits_lp = arena.alloc({n, cfg.num_experts}, DType::bf16);
    return s;
  }

  // out = MoE(in) (overwritten; must not alias in). Fills `saved` (from alloc_saved for the same N).
  // Returns L_aux (0 when aux_loss_coef is 0).
  // ep: expert parallelism over its group (nullptr: every expert here); made for the layer's device.
  double forward(const ExecContext& ctx, const Tensor& in, const Tensor& out, Saved& saved,
                 const MoeExpertParallel* ep = nullptr) const;
  // din = d(out)/d(in)^T dout + d_aux dL_aux/d(in) (overwritten, not accumulated); every weight gradient
  // is accumulated into. d_aux: the gradient of the total loss w.r.t. L_aux (1 when the loss adds it
  // as is). Temporaries come from `scratch`.
  // ep: the same as the forward's.
  void backward(const ExecContext& ctx, const Saved& saved, const Tensor& dout, const Tensor& din, Arena& scratch,
                double d_aux = 1.0, const MoeExpertParallel* ep = nullptr) const;
};

// The decoder's MoE FFN block with its residual, the sparse counterpart of MlpLayer (trainer/layer_mlp.h):
//   m = RMSNorm(x) ; out = x + MoE(m)
// shared by DenseModel and HybridModel. for_model builds it from a MoE ModelConfig; the load-balancing loss
// stays out of the model's loss (aux_loss_coef 0) for both families:
//   qwen3_moe (HF Qwen3MoeSparseMoeBlock): softmax router, top-k, optional renormalisation, no shared experts,
//     no selection bias, route_scale 1.
//   dots1 (HF Dots1MoE): sigmoid router, top-k of scores + e_score_correction_bias, optional renormalisation,
//     times routed_scaling_factor, plus one shared SwiGLU MLP of width F_s = n_shared_experts F_moe (HF stores
//     it as one MLP: MoeConfig num_shared_experts 1, shared_ffn F_s; the sum of n FFNs of width F_moe is the
//     FFN of their concatenated rows).
struct MoeBlock {
  float eps = 1e-6f;
  WeightRef norm;  // mlp_norm [D]
  MoeLayer moe;
  // The selection bias parameter (layers.L.mlp.gate.e_score_correction_bias [E], a view of the model's flat
  // buffer; empty without a selection bias). On the CPU (f32) moe.selection_bias is this very view; on CUDA
  // the flat value is bf16 and moe.selection_bias an f32 working copy (make_selection_bias_copies) that
  // forward refreshes from it, as the KDA gates' A_log / dt_bias. Its gradient stays 0 (the bias only steers
  // the top-k choice), so an optimizer step leaves it where it is.
  Tensor selection_bias_param;

  struct Saved {
    Tensor x, m, rstd;  // block input (view), normed input [N, D], its rstd f32 [N]
    MoeLayer::Saved moe;
  };
  template <class Alloc>
  Saved alloc_saved(Alloc& arena, int64_t n, DType act) const {
    Saved s;
    s.m = arena.alloc({n, moe.cfg.hidden}, act);
    s.rstd = arena.alloc({n}, DType::f32);
    s.moe = moe.alloc_saved(arena, n, act);
    return s;
  }
  // The block's own backward temporary (dm [N, D]); MoeLayer::backward takes its scratch after it.
  template <class Alloc>
  Tensor alloc_own_scratch(Alloc& arena, int64_t n, DType act) const {
    return arena.alloc({n, moe.cfg.hidden}, act);
  }
  // Everything backward takes from its scratch arena (for sizing).
  template <class Alloc>
  void alloc_scratch(Alloc& arena, int64_t n, DType act) const {
    alloc_own_scratch(arena, n, act);
    moe.alloc_scratch(arena, n, act);
  }
  // ref(name) gives the weight named `prefix + name` (mlp_norm, mlp.gate.weight, mlp.gate_up, mlp.down; with
  // shared experts mlp.shared_gate_up [1, 2F_s, D] and mlp.shared_down [1, D, F_s]; with a selection bias
  // mlp.gate.e_score_correction_bias [E]).
  template <class Ref>
  static MoeBlock for_model(const ModelConfig& mc, int64_t layer, float eps, Ref&& ref);
  // The model's MoE FFN parameters of one sparse layer, in flat-buffer order: (name, shape, weight decay).
  struct ParamSpec {
    std::string name;
    std::vector<int64_t> shape;
    bool weight_decay = true;
  };
  static std::vector<ParamSpec> param_specs(const ModelConfig& mc);
  // CUDA: f32 working copies of the selection biases of `blocks` (the sparse ones with a selection bias;
  // moe.selection_bias is rebound to them), carved from the returned arena, which the caller keeps as long as
  // the blocks. On the CPU, or without any selection bias, nothing is rebound and the arena is empty.
  static Arena make_selection_bias_copies(std::vector<MoeBlock>& blocks, Device device);
  // out = in + MoE(RMSNorm(in)); out must not alias in.
  // ep: expert parallelism over its group (nullptr: every expert here). Returns the layer's L_aux (0 unless
  // moe.cfg.aux_loss_coef > 0).
  double forward(const ExecContext& ctx, const Tensor& in, const Tensor& out, Saved& saved,
                 const MoeExpertParallel* ep = nullptr) const;
  // d_residual += RMSNorm'(x)^T MoE'(m)^T d_residual, in place; weight gradients accumulate.
  // d_aux: dObjective/dL_aux (the weight of the load-balancing term; 0 without it).
  void backward(const ExecContext& ctx, const Saved& saved, const Tensor& d_residual, Arena& scratch,
                const MoeExpertParallel* ep = nullptr, double d_aux = 0.0) const;

 private:
  static MoeConfig config_for_model(const ModelConfig& mc);
};

template <class Ref>
MoeBlock MoeBlock::for_model(const ModelConfig& mc, int64_t layer, float eps, Ref&& ref) {
  const std::string ls = std::to_string(layer);
  MoeBlock b;
  b.eps = eps;
  b.norm = ref("mlp_norm");
  b.moe.cfg = config_for_model(mc);
  b.moe.cfg.validate("layer " + ls + " (MoE FFN)");
  b.moe.nvtx_fwd = "layer." + ls + ".moe.fwd";
  b.moe.nvtx_bwd = "layer." + ls + ".moe.bwd";
  b.moe.router = ref("mlp.gate.weight");
  b.moe.gate_up = ref("mlp.gate_up");
  b.moe.down = ref("mlp.down");
  if (b.moe.cfg.num_shared_experts > 0) {
    b.moe.shared_gate_up = ref("mlp.shared_gate_up");
    b.moe.shared_down = ref("mlp.shared_down");
  }
  if (b.moe.cfg.use_selection_bias) {
    b.selection_bias_param = ref("mlp.gate.e_score_correction_bias").value;
    b.moe.selection_bias = b.selection_bias_param;
  }
  return b;
}

// Parameter and gradient memory of one standalone MoE layer (a later piece moves them into the model's flat
// buffers). Values and gradients f32 or f64, CPU only for now. Named views (HF qwen3_moe names; the
// shared experts follow DeepSeek's "shared_experts", one set per shared expert):
//   mlp.gate.weight [E, D]                           = router
//   mlp.experts.{e}.gate_proj.weight [F, D]          = gate_up[e, 0:F]
//   mlp.experts.{e}.up_proj.weight [F, D]            = gate_up[e, F:2F]
//   mlp.experts.{e}.down_proj.weight [D, F]          = down[e]
//   mlp.shared_experts.{s}.{gate,up,down}_proj.weight  likewise from shared_gate_up / shared_down
//   mlp.gate.e_score_correction_bias [E]             = selection_bias (buffer: no gradient, not trainable;
//                                                      only with use_selection_bias)
// Every name is a contiguous view of the concatenated storage.
class MoeLayerWeights {
 public:
  struct Param {
    std::string name;
    std::vector<int64_t> shape;
    bool trainable = true;  // false for the selection bias
    Tensor value, grad;     // views (grad empty when not trainable)
  };

  MoeLayerWeights(const MoeConfig& cfg, Device device, DType dtype);
  MoeLayerWeights(const MoeLayerWeights&) = delete;
  MoeLayerWeights& operator=(const MoeLayerWeights&) = delete;

  const MoeLayer& layer() const { return layer_; }
  DType dtype() const { return dtype_; }
  const std::vector<Param>& params() const { return params_; }
  const Param& param(const std::string& name) const;  // throws hyd::Error naming an unknown parameter

  // Every matrix normal(0, std); the selection bias 0.
  void init_random(uint64_t seed, float std = 0.02f);
  // Host values converted to the parameter's dtype; size must equal numel.
  void set_param(const std::string& name, const std::vector<double>& values);
  std::vector<double> get_param(const std::string& name) const;
  std::vector<double> get_grad(const std::string& name) const;  // throws for the selection bias
  void zero_grad();

 private:
  DType dtype_;
  Arena arena_;
  MoeLayer layer_;
  std::vector<Param> params_;
};

}  // namespace hyd

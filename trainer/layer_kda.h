// Kimi Delta Attention layer (the token mixer of FLA's KimiDeltaAttention; ../shared/KDA.md "Layer").
// No pre-norm and no residual: the block that holds it adds those.
//   q = l2norm(silu(conv_q(x Wq^T))) dk^-1/2,   k = l2norm(silu(conv_k(x Wk^T))),   v = silu(conv_v(x Wv^T))
//   g = -exp(A_log) softplus((x Wf0^T) Wf1^T + dt_bias),   beta = sigmoid(x Wb^T)
//   o = KDA(q, k, v, g, beta)   (gated delta rule, kernels/kda.h; the state resets at every document start)
//   out = gated_rmsnorm(o, gate = (x Wg0^T) Wg1^T + bg; o_norm) Wo^T
// Shapes (N tokens, D hidden, H q/k heads, HV value heads, dk / dv head dims, K conv size):
//   x, out [N, D]; q_lin, k_lin [N, H dk]; v_lin [N, HV dv]; q, k [N, H, dk]; v, o [N, HV, dv];
//   fg_lowT [2 dv, N] (f_low^T over g_low^T); g [N, HV, dk]; beta [N, HV]; gate, on [N, HV dv]; q_rstd, k_rstd [N H];
//   o_rstd [N HV].
// dtypes: activations and weights f32 or f64 on the CPU (f64 for finite-difference harnesses), bf16 on
// CUDA; on CUDA A_log, dt_bias, the gates g / beta, the norm statistics and every gradient are f32.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/layer_common.h"

namespace hyd {

struct KdaConfig {
  int64_t hidden = 0;      // D
  int64_t heads = 0;       // H: q/k heads
  int64_t v_heads = 0;     // HV: value heads, a multiple of H
  int64_t dk = 0;          // q/k head dim
  int64_t dv = 0;          // value head dim
  int64_t conv_size = 4;   // K
  float norm_eps = 1e-6f;  // o_norm

  int64_t key_dim() const { return heads * dk; }
  int64_t value_dim() const { return v_heads * dv; }
  int64_t gate_dim() const { return v_heads * dk; }
  // Throws hyd::Error naming `source` (a config file, or the caller) and the offending field.
  void validate(const std::string& source = "KdaConfig") const;
};

struct KdaLayer {
  KdaConfig cfg;
  std::string nvtx_fwd = "kda.fwd", nvtx_bwd = "kda.bwd";

  // Parameters (export name: storage shape). Conv weights are stored [C, K] and exported [C, 1, K].
  //   q_proj.weight [H dk, D]   k_proj.weight [H dk, D]   v_proj.weight [HV dv, D]
  //   q_conv1d.weight [H dk, K]   k_conv1d.weight [H dk, K]   v_conv1d.weight [HV dv, K]
  //   f_proj.0.weight [dv, D]   f_proj.1.weight [HV dk, dv]   b_proj.weight [HV, D]   A_log [HV]   dt_bias [HV dk]
  //   g_proj.0.weight [dv, D]   g_proj.1.weight [HV dv, dv]   g_proj.1.bias [HV dv]   o_norm.weight [dv]
  //   o_proj.weight [D, HV dv]
  WeightRef q_proj, k_proj, v_proj;
  WeightRef q_conv1d, k_conv1d, v_conv1d;
  WeightRef f_proj0, f_proj1, b_proj, A_log, dt_bias;
  WeightRef g_proj0, g_proj1, g_proj1_bias, o_norm;
  WeightRef o_proj;

  // Dtype of the gates and norm statistics for activations of dtype `act` (f32 on CUDA).
  static DType stat_dtype(DType act) { return act == DType::bf16 ? DType::f32 : act; }

  // Exactly what backward needs; x is a view of the layer input, owned by the caller and kept alive
  // until backward.
  struct Saved {
    Tensor x;
    Tensor q_lin, k_lin, v_lin;  // projections: the convolutions' inputs
    Tensor q, k, v;              // the KDA core's inputs (q, k normalised, q scaled)
    Tensor q_rstd, k_rstd;       // l2norm statistics
    Tensor fg_lowT;              // f_proj.0 and g_proj.0 outputs, transposed: [2 dv, N] (rows < dv: f_low^T)
    Tensor g, beta;              // gates
    Tensor gate;                 // output gate (before the sigmoid)
    Tensor o, o_rstd, on;        // KDA output; o_norm statistics; gated-norm output (o_proj input)
    // The KDA core's forward keeps what its backward would recompute (kernels::kda_forward_saving) when keep_core is
    // set (training models on CUDA unless HYD_KDA_SAVE=0, keep_core_from_env) and the core supports it (the
    // tensor-core kernels; under sequence parallelism the true pass keeps it, trainer/lasp.h): core_mem grows to the
    // largest batch (~152 KB per 64-token chunk and value head at dk = dv = 128), core is this batch's view, empty
    // when the forward did not keep it.
    bool keep_core = false;
    std::shared_ptr<Arena> core_mem;
    Tensor core;
  };
  // Training models keep the KDA core's forward work for its backward (more memory, no recomputation of the
  // prep and the state pass: the default since stop 20, measured -5.5 ms on the issue-9 distill step);
  // HYD_KDA_SAVE=0: recompute (less memory).
  static bool keep_core_from_env();
  // Forward temporaries (dead when forward returns).
  struct ForwardScratch {
    Tensor f, b;  // f_proj.1 and b_proj outputs, before the gates
  };
  // Backward temporaries (dead when backward returns).
  struct Scratch {
    Tensor d_on, d_o, d_gate, d_lowT;  // d_lowT: gradient of fg_lowT
    Tensor dq, dk, dv, dg, dbeta, df, db;
    Tensor d_lin;  // gradient of q_lin, then k_lin, then v_lin: [N * max(H dk, HV dv)]
  };

  template <class Alloc>
  Saved alloc_saved(Alloc& arena, int64_t n, DType act) const {
    const DType st = stat_dtype(act);
    Saved s;
    s.q_lin = arena.alloc({n, cfg.key_dim()}, act);
    s.k_lin = arena.alloc({n, cfg.key_dim()}, act);
    s.v_lin = arena.alloc({n, cfg.value_dim()}, act);
    s.q = arena.alloc({n, cfg.heads, cfg.dk}, act);
    s.k = arena.alloc({n, cfg.heads, cfg.dk}, act);
    s.v = arena.alloc({n, cfg.v_heads, cfg.dv}, act);
    s.q_rstd = arena.alloc({n * cfg.heads}, st);
    s.k_rstd = arena.alloc({n * cfg.heads}, st);
    s.fg_lowT = arena.alloc({2 * cfg.dv, n}, act);
    s.g = arena.alloc({n, cfg.v_heads, cfg.dk}, st);
    s.beta = arena.alloc({n, cfg.v_heads}, st);
    s.gate = arena.alloc({n, cfg.value_dim()}, act);
    s.o = arena.alloc({n, cfg.v_heads, cfg.dv}, act);
    s.o_rstd = arena.alloc({n * cfg.v_heads}, st);
    s.on = arena.alloc({n, cfg.value_dim()}, act);
    return s;
  }
  template <class Alloc>
  ForwardScratch alloc_forward_scratch(Alloc& arena, int64_t n, DType act) const {
    ForwardScratch s;
    s.f = arena.alloc({n, cfg.gate_dim()}, act);
    s.b = arena.alloc({n, cfg.v_heads}, act);
    return s;
  }
  template <class Alloc>
  Scratch alloc_scratch(Alloc& arena, int64_t n, DType act) const {
    const DType st = stat_dtype(act);
    Scratch s;
    s.d_on = arena.alloc({n, cfg.value_dim()}, act);
    s.d_o = arena.alloc({n, cfg.v_heads, cfg.dv}, act);
    s.d_gate = arena.alloc({n, cfg.value_dim()}, act);
    s.d_lowT = arena.alloc({2 * cfg.dv, n}, act);
    s.dq = arena.alloc({n, cfg.heads, cfg.dk}, act);
    s.dk = arena.alloc({n, cfg.heads, cfg.dk}, act);
    s.dv = arena.alloc({n, cfg.v_heads, cfg.dv}, act);
    s.dg = arena.alloc({n, cfg.v_heads, cfg.dk}, st);
    s.dbeta = arena.alloc({n, cfg.v_heads}, st);
    s.df = arena.alloc({n, cfg.v_heads, cfg.dk}, act);
    s.db = arena.alloc({n, cfg.v_heads}, act);
    s.d_lin = arena.alloc({n * std::max(cfg.key_dim(), cfg.value_dim())}, act);
    return s;
  }

  // out = KDA layer(in) for the packed documents of `seq` (num_tokens, num_docs and cu_seqlens are
  // read; cu_seqlens on the layer's device). Fills `saved` (from alloc_saved for the same N);
  // temporaries come from `scratch` (reset by the caller). out must not alias in. With `residual` ([N, D], may be
  // empty): out = residual + KDA layer(in), the block's residual add inside the output projection's GEMM.
  void forward(const ExecContext& ctx, const PackedSequence& seq, const Tensor& in, const Tensor& out, Saved& saved,
               Arena& scratch, const Tensor& residual = Tensor{}) const;
  // din = d(out)/d(in)^T dout (overwritten, not accumulated: the block adds its residual); every
  // weight gradient is accumulated into. Temporaries come from `scratch`.
  void backward(const ExecContext& ctx, const PackedSequence& seq, const Saved& saved, const Tensor& dout,
                const Tensor& din, Arena& scratch) const;
};

// Parameter and gradient memory of one standalone KDA layer (a later issue moves them into the hybrid
// student model's flat buffers). Values: `dtype` (f32 or f64 on the CPU, bf16 on CUDA; A_log and
// dt_bias f32 on CUDA); gradients: f32 (f64 with f64 values).
// The order in which init_random (KdaLayerWeights', HybridModel's) draws parameters listed in layout order: each
// KDA layer's g_proj.0.weight right after its dt_bias, where it was listed before f_proj.0 and g_proj.0 became
// adjacent (stop 31), so that a seed gives the same values as before. Indices into `names`.
std::vector<size_t> kda_init_draw_order(const std::vector<std::string>& names);

class KdaLayerWeights {
 public:
  struct Param {
    std::string name;                   // FLA / HF state-dict key, e.g. "f_proj.1.weight"
    std::vector<int64_t> export_shape;  // PyTorch shape (conv weights [C, 1, K])
    bool weight_decay = false;          // matrices and conv weights; not A_log, dt_bias, norm, bias
    WeightRef* ref = nullptr;           // into layer()
  };

  KdaLayerWeights(const KdaConfig& cfg, Device device, DType dtype);
  KdaLayerWeights(const KdaLayerWeights&) = delete;
  KdaLayerWeights& operator=(const KdaLayerWeights&) = delete;

  const KdaLayer& layer() const { return layer_; }
  DType dtype() const { return dtype_; }
  Device device() const { return arena_.device(); }
  const std::vector<Param>& params() const { return params_; }
  const Param& param(const std::string& name) const;  // throws hyd::Error naming an unknown parameter

  // FLA's initialisation: linear and conv weights normal(0, std); g_proj.1.bias 0; o_norm 1;
  // A_log = log(uniform(1, 16)); dt_bias = softplus^-1(dt) with dt log-uniform in [1e-3, 1e-1]
  // (clamped at 1e-4).
  void init_random(uint64_t seed, float std = 0.02f);
  // Host values (any float precision), converted to the parameter's dtype; size must equal numel.
  void set_param(const std::string& name, const std::vector<double>& values);
  std::vector<double> get_param(const std::string& name) const;
  std::vector<double> get_grad(const std::string& name) const;
  void zero_grad();

 private:
  DType dtype_;
  Arena arena_;
  KdaLayer layer_;
  std::vector<Param> params_;
};

}  // namespace hyd

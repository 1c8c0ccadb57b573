// Attention block of the dense decoder, with its residual connection:
//   a = RMSNorm(x) ; q = a Wq^T (+bq) ; k = a Wk^T (+bk) ; v = a Wv^T (+bv)
//   [q, k = per-head RMSNorm(q, k)]          (Qwen3 qk_norm, on [N * H, d] views)
//   q, k = RoPE(q, k ; positions)
//   o = Attention(q, k, v)                    (causal, GQA, documents given by cu_seqlens)
//   out = x + o Wo^T
// Wq, Wk, Wv are the row blocks [0, q_dim), [q_dim, q_dim + kv_dim), [q_dim + kv_dim, qkv_dim) of
// the fused wqkv [qkv_dim, D], so q, k and v land in separate contiguous [N, H, d] buffers as the
// attention op wants them, without a split copy.
// Shapes (N tokens): x, a, out [N, D]; q [N, Hq, d]; k, v [N, Hkv, d]; o [N, Hq, d]; lse f32 [N, Hq];
// rstd f32 [N]; q_rstd f32 [N * Hq]; k_rstd f32 [N * Hkv]. Activations f32 (CPU) / bf16 (CUDA).
#pragma once

#include <string>

#include "trainer/core/exec_context.h"
#include "trainer/layer_common.h"

namespace hyd {

class Arena;

struct AttentionLayer {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float eps = 1e-6f;
  bool qk_norm = false, qkv_bias = false;
  std::string nvtx_fwd, nvtx_bwd;  // "layer.L.attn.fwd" / ".bwd"

  WeightRef norm;    // attn_norm [D]
  WeightRef wqkv;    // [qkv_dim, D]
  WeightRef bqkv;    // [qkv_dim]  (qkv_bias only)
  WeightRef q_norm;  // [d]        (qk_norm only)
  WeightRef k_norm;  // [d]        (qk_norm only)
  WeightRef wo;      // [D, q_dim]

  int64_t q_dim() const { return heads * head_dim; }
  int64_t kv_dim() const { return kv_heads * head_dim; }

  // Exactly what backward needs. x is a view of the layer input (owned by the caller, kept alive
  // until backward); q_pre / k_pre / q_rstd / k_rstd exist only with qk_norm.
  struct Saved {
    Tensor x, a, rstd;
    Tensor q_pre, k_pre, q_rstd, k_rstd;
    Tensor q, k, v;  // after norm and RoPE: what attention consumed
    Tensor o, lse;
  };
  // Backward temporaries, taken from the scratch arena and dead after backward returns.
  struct Scratch {
    Tensor d_o, dq, dk, dv, dq_pre, dk_pre, da;
  };

  template <class Alloc>
  Saved alloc_saved(Alloc& arena, int64_t n, DType act) const {
    Saved s;
    s.a = arena.alloc({n, hidden}, act);
    s.rstd = arena.alloc({n}, DType::f32);
    if (qk_norm) {
      s.q_pre = arena.alloc({n, heads, head_dim}, act);
      s.k_pre = arena.alloc({n, kv_heads, head_dim}, act);
      s.q_rstd = arena.alloc({n * heads}, DType::f32);
      s.k_rstd = arena.alloc({n * kv_heads}, DType::f32);
    }
    s.q = arena.alloc({n, heads, head_dim}, act);
    s.k = arena.alloc({n, kv_heads, head_dim}, act);
    s.v = arena.alloc({n, kv_heads, head_dim}, act);
    s.o = arena.alloc({n, heads, head_dim}, act);
    s.lse = arena.alloc({n, heads}, DType::f32);
    return s;
  }
  template <class Alloc>
  Scratch alloc_scratch(Alloc& arena, int64_t n, DType act) const {
    Scratch s;
    s.d_o = arena.alloc({n, heads, head_dim}, act);
    s.dq = arena.alloc({n, heads, head_dim}, act);
    s.dk = arena.alloc({n, kv_heads, head_dim}, act);
    s.dv = arena.alloc({n, kv_heads, head_dim}, act);
    if (qk_norm) {
      s.dq_pre = arena.alloc({n, heads, head_dim}, act);
      s.dk_pre = arena.alloc({n, kv_heads, head_dim}, act);
    }
    s.da = arena.alloc({n, hidden}, act);
    return s;
  }

  // out = in + attention(RMSNorm(in)); out must not alias in. Fills `saved` (allocated by
  // alloc_saved for the same N).
  void forward(const ExecContext& ctx, const PackedSequence& seq, const Tensor& in, const Tensor& out,
               Saved& saved) const;
  // din = dout + d(attention path)/d(in); din may be the same tensor as dout (the residual-stream
  // gradient updated in place). Weight gradients are accumulated. Temporaries come from `scratch`.
  void backward(const ExecContext& ctx, const PackedSequence& seq, const Saved& saved, const Tensor& dout,
                const Tensor& din, Arena& scratch) const;
};

}  // namespace hyd

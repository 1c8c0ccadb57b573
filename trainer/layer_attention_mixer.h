// Softmax-attention token mixer of the hybrid student: the dense model's attention without its pre-norm
// and residual (the block holding it adds those), with RoPE optional.
//   q = a Wq^T (+bq) ; k = a Wk^T (+bk) ; v = a Wv^T (+bv)      (a: the block's normed input)
//   [q, k = per-head RMSNorm(q, k)]                             (qk_norm, on [N * H, d] views)
//   [q, k = RoPE(q, k ; positions)]                             (rope: the teacher's layers, "T")
//   o = Attention(q, k, v)                                      (causal, GQA, documents from cu_seqlens)
//   out = o Wo^T
// rope = false is the NoPE attention of DISTILL.md ("A"). With rope = true the sequence of kernels is
// exactly AttentionLayer's (trainer/layer_attention.h), so a student made of "T" layers computes the
// dense teacher bit for bit. Weight layout as AttentionLayer: wqkv [qkv_dim, D] rows q heads, k heads,
// v heads; bqkv [qkv_dim]; q_norm, k_norm [d]; wo [D, q_dim].
// Shapes (N tokens): a, out [N, D]; q [N, Hq, d]; k, v [N, Hkv, d]; o [N, Hq, d]; lse f32 [N, Hq];
// q_rstd f32 [N * Hq]; k_rstd f32 [N * Hkv]. Activations f32 (CPU) / bf16 (CUDA).
#pragma once

#include <string>

#include "trainer/core/exec_context.h"
#include "trainer/layer_common.h"
#include "trainer/model_config.h"

namespace hyd {

class Arena;

struct AttentionMixer {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float eps = 1e-6f;  // q/k norm
  bool qk_norm = false, qkv_bias = false, rope = true;
  std::string nvtx_fwd = "attn_mixer.fwd", nvtx_bwd = "attn_mixer.bwd";

  WeightRef wqkv;    // [qkv_dim, D]
  WeightRef bqkv;    // [qkv_dim]  (qkv_bias only)
  WeightRef q_norm;  // [d]        (qk_norm only)
  WeightRef k_norm;  // [d]        (qk_norm only)
  WeightRef wo;      // [D, q_dim]

  int64_t q_dim() const { return heads * head_dim; }
  int64_t kv_dim() const { return kv_heads * head_dim; }

  // The attention of a layer of model `mc` (head_dim resolved), with q / k norm eps `eps`, RoPE or not, and the
  // NVTX ranges nvtx + ".fwd" / ".bwd"; ref(name) gives the layer's weight `name` (wqkv; bqkv with qkv_bias;
  // q_norm, k_norm with qk_norm; wo).
  template <class Ref>
  static AttentionMixer for_model(const ModelConfig& mc, float eps, bool rope, const std::string& nvtx, Ref&& ref) {
    AttentionMixer a;
    a.hidden = mc.hidden_size;
    a.heads = mc.num_heads;
    a.kv_heads = mc.num_kv_heads;
    a.head_dim = mc.head_dim;
    a.eps = eps;
    a.qk_norm = mc.qk_norm;
    a.qkv_bias = mc.qkv_bias;
    a.rope = rope;
    a.nvtx_fwd = nvtx + ".fwd";
    a.nvtx_bwd = nvtx + ".bwd";
    a.wqkv = ref("wqkv");
    if (mc.qkv_bias) a.bqkv = ref("bqkv");
    if (mc.qk_norm) {
      a.q_norm = ref("q_norm");
      a.k_norm = ref("k_norm");
    }
    a.wo = ref("wo");
    return a;
  }

  // Exactly what backward needs. a is a view of the mixer input, owned by the caller and kept alive
  // until backward; q_pre / k_pre / q_rstd / k_rstd exist only with qk_norm.
  struct Saved {
    Tensor a;
    Tensor q_pre, k_pre, q_rstd, k_rstd;
    Tensor q, k, v;  // after norm and RoPE: what attention consumed
    Tensor o, lse;
  };
  // Backward temporaries (dead when backward returns).
  struct Scratch {
    Tensor d_o, dq, dk, dv, dq_pre, dk_pre;
  };

  template <class Alloc>
  Saved alloc_saved(Alloc& arena, int64_t n, DType act) const {
    Saved s;
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
    return s;
  }

  // out = mixer(a); out must not alias a. Fills `saved` (from alloc_saved for the same N). seq's RoPE
  // tables and positions are read only with rope.
  // With `residual` ([N, D], may be empty): out = residual + mixer(a), the add inside the output projection.
  void forward(const ExecContext& ctx, const PackedSequence& seq, const Tensor& a, const Tensor& out, Saved& saved,
               const Tensor& residual = Tensor{}) const;
  // da = d(out)/d(a)^T dout (overwritten, not accumulated); weight gradients are accumulated.
  // Temporaries come from `scratch`.
  void backward(const ExecContext& ctx, const PackedSequence& seq, const Saved& saved, const Tensor& dout,
                const Tensor& da, Arena& scratch) const;
};

}  // namespace hyd

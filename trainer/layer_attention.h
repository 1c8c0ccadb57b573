// Attention block of the dense decoder, with its pre-norm and residual connection:
//   a = RMSNorm(x) ; out = x + AttentionMixer(a)     (the mixer with RoPE: trainer/layer_attention_mixer.h)
// The attention itself (q / k / v projections from the fused wqkv, Qwen3's qk_norm, RoPE, causal GQA attention
// over the documents of cu_seqlens, the output projection with the residual add inside it) is the hybrid
// student's AttentionMixer, so a student of "T" layers computes this block's kernels in the same order.
// Shapes (N tokens): x, a, out [N, D]; rstd f32 [N]; the rest as AttentionMixer. Activations f32 (CPU) / bf16
// (CUDA).
#pragma once

#include <string>

#include "trainer/core/exec_context.h"
#include "trainer/layer_attention_mixer.h"
#include "trainer/layer_common.h"

namespace hyd {

class Arena;

struct AttentionLayer {
  AttentionMixer mixer;            // rope = true; its weights, shapes, qk-norm eps and NVTX ranges
  WeightRef norm;                  // attn_norm [D]
  float eps = 1e-6f;               // of the pre-norm
  std::string nvtx_fwd, nvtx_bwd;  // "layer.L.attn.fwd" / ".bwd"

  // Exactly what backward needs. x is a view of the layer input (owned by the caller, kept alive until
  // backward); m.a is RMSNorm(x).
  struct Saved {
    Tensor x, rstd;
    AttentionMixer::Saved m;
  };

  template <class Alloc>
  Saved alloc_saved(Alloc& arena, int64_t n, DType act) const {
    Saved s;
    const Tensor a = arena.alloc({n, mixer.hidden}, act);
    s.rstd = arena.alloc({n}, DType::f32);
    s.m = mixer.alloc_saved(arena, n, act);
    s.m.a = a;
    return s;
  }
  // Backward temporaries, taken from the scratch arena and dead after backward returns: da [N, D], then the
  // mixer's.
  template <class Alloc>
  void alloc_scratch(Alloc& arena, int64_t n, DType act) const {
    arena.alloc({n, mixer.hidden}, act);
    mixer.alloc_scratch(arena, n, act);
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

#include "trainer/layer_attention_mixer.h"

#include <cmath>

#include "kernels/attention.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "trainer/core/arena.h"
#include "trainer/lasp.h"

namespace hyd {

namespace {

// Row block [begin, end) of a [rows, ...] weight or bias; empty stays empty.
Tensor row_block(const Tensor& t, int64_t begin, int64_t end) { return t.empty() ? Tensor{} : t.slice0(begin, end); }

}  // namespace

void AttentionMixer::forward(const ExecContext& ctx, const PackedSequence& seq, const Tensor& a, const Tensor& out,
                             Saved& s, const Tensor& residual) const {
  NvtxRange range(nvtx_fwd.c_str());
  const int64_t n = seq.num_tokens, qd = q_dim(), kd = kv_dim();
  s.a = a;

  // Projections straight into q/k/v (or their pre-norm buffers).
  const Tensor q_lin = qk_norm ? s.q_pre : s.q;
  const Tensor k_lin = qk_norm ? s.k_pre : s.k;
  kernels::linear_forward(ctx, a, row_block(wqkv.value, 0, qd), row_block(bqkv.value, 0, qd), q_lin.view({n, qd}));
  kernels::linear_forward(ctx, a, row_block(wqkv.value, qd, qd + kd), row_block(bqkv.value, qd, qd + kd),
                          k_lin.view({n, kd}));
  kernels::linear_forward(ctx, a, row_block(wqkv.value, qd + kd, qd + 2 * kd),
                          row_block(bqkv.value, qd + kd, qd + 2 * kd), s.v.view({n, kd}));
  if (qk_norm) {
    kernels::rmsnorm_forward(ctx, s.q_pre.view({n * heads, head_dim}), q_norm.value, s.q.view({n * heads, head_dim}),
                             s.q_rstd, eps);
    kernels::rmsnorm_forward(ctx, s.k_pre.view({n * kv_heads, head_dim}), k_norm.value,
                             s.k.view({n * kv_heads, head_dim}), s.k_rstd, eps);
  }
  if (rope) {
    kernels::rope_forward(ctx, s.q, seq.positions, seq.rope_cos, seq.rope_sin);
    kernels::rope_forward(ctx, s.k, seq.positions, seq.rope_cos, seq.rope_sin);
  }

  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  if (seq.sp != nullptr)
    lasp_attention_forward(ctx, *seq.sp, this, s.q, s.k, s.v, s.o, s.lse, scale);
  else
    kernels::attention_forward(ctx, s.q, s.k, s.v, seq.cu_seqlens, seq.max_doc_len, s.o, s.lse, scale);
  kernels::linear_forward_residual(ctx, s.o.view({n, qd}), wo.value, residual, out);
}

void AttentionMixer::backward(const ExecContext& ctx, const PackedSequence& seq, const Saved& s, const Tensor& dout,
                              const Tensor& da, Arena& scratch) const {
  NvtxRange range(nvtx_bwd.c_str());
  const int64_t n = seq.num_tokens, qd = q_dim(), kd = kv_dim();
  const Scratch t = alloc_scratch(scratch, n, s.q.dtype);

  kernels::linear_backward(ctx, dout, s.o.view({n, qd}), wo.value, t.d_o.view({n, qd}), false, wo.grad, Tensor{});
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  if (seq.sp != nullptr)
    lasp_attention_backward(ctx, *seq.sp, this, t.d_o, s.q, s.k, s.v, s.o, s.lse, t.dq, t.dk, t.dv, scale);
  else
    kernels::attention_backward(ctx, t.d_o, s.q, s.k, s.v, s.o, s.lse, seq.cu_seqlens, seq.max_doc_len, t.dq, t.dk,
                                t.dv, scale);

  // RoPE is a rotation: its backward rotates the gradient back, in place.
  if (rope) {
    kernels::rope_backward(ctx, t.dq, seq.positions, seq.rope_cos, seq.rope_sin);
    kernels::rope_backward(ctx, t.dk, seq.positions, seq.rope_cos, seq.rope_sin);
  }

  Tensor dq_lin = t.dq, dk_lin = t.dk;
  if (qk_norm) {
    kernels::rmsnorm_backward(ctx, t.dq.view({n * heads, head_dim}), s.q_pre.view({n * heads, head_dim}), q_norm.value,
                              s.q_rstd, t.dq_pre.view({n * heads, head_dim}), q_norm.grad);
    kernels::rmsnorm_backward(ctx, t.dk.view({n * kv_heads, head_dim}), s.k_pre.view({n * kv_heads, head_dim}),
                              k_norm.value, s.k_rstd, t.dk_pre.view({n * kv_heads, head_dim}), k_norm.grad);
    dq_lin = t.dq_pre;
    dk_lin = t.dk_pre;
  }

  // The three projections share the input a: the first writes da, the others accumulate.
  kernels::linear_backward(ctx, dq_lin.view({n, qd}), s.a, row_block(wqkv.value, 0, qd), da, false,
                           row_block(wqkv.grad, 0, qd), row_block(bqkv.grad, 0, qd));
  kernels::linear_backward(ctx, dk_lin.view({n, kd}), s.a, row_block(wqkv.value, qd, qd + kd), da, true,
                           row_block(wqkv.grad, qd, qd + kd), row_block(bqkv.grad, qd, qd + kd));
  kernels::linear_backward(ctx, t.dv.view({n, kd}), s.a, row_block(wqkv.value, qd + kd, qd + 2 * kd), da, true,
                           row_block(wqkv.grad, qd + kd, qd + 2 * kd), row_block(bqkv.grad, qd + kd, qd + 2 * kd));
}

}  // namespace hyd

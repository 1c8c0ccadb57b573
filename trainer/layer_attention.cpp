#include "trainer/layer_attention.h"

#include <cmath>

#include "kernels/attention.h"
#include "kernels/elementwise.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "trainer/core/arena.h"

namespace hyd {

namespace {

// Row block [begin, end) of a [rows, ...] weight or bias; empty stays empty.
Tensor rows(const Tensor& t, int64_t begin, int64_t end) { return t.empty() ? Tensor{} : t.slice0(begin, end); }

}  // namespace

void AttentionLayer::forward(const ExecContext& ctx, const PackedSequence& seq, const Tensor& in, const Tensor& out,
                             Saved& s) const {
  NvtxRange range(nvtx_fwd.c_str());
  const int64_t n = seq.num_tokens, qd = q_dim(), kd = kv_dim();
  s.x = in;
  kernels::rmsnorm_forward(ctx, in, norm.value, s.a, s.rstd, eps);

  // Projections straight into q/k/v (or their pre-norm buffers).
  const Tensor q_lin = qk_norm ? s.q_pre : s.q;
  const Tensor k_lin = qk_norm ? s.k_pre : s.k;
  kernels::linear_forward(ctx, s.a, rows(wqkv.value, 0, qd), rows(bqkv.value, 0, qd), q_lin.view({n, qd}));
  kernels::linear_forward(ctx, s.a, rows(wqkv.value, qd, qd + kd), rows(bqkv.value, qd, qd + kd), k_lin.view({n, kd}));
  kernels::linear_forward(ctx, s.a, rows(wqkv.value, qd + kd, qd + 2 * kd), rows(bqkv.value, qd + kd, qd + 2 * kd),
                          s.v.view({n, kd}));
  if (qk_norm) {
    kernels::rmsnorm_forward(ctx, s.q_pre.view({n * heads, head_dim}), q_norm.value, s.q.view({n * heads, head_dim}),
                             s.q_rstd, eps);
    kernels::rmsnorm_forward(ctx, s.k_pre.view({n * kv_heads, head_dim}), k_norm.value,
                             s.k.view({n * kv_heads, head_dim}), s.k_rstd, eps);
  }
  kernels::rope_forward(ctx, s.q, seq.positions, seq.rope_cos, seq.rope_sin);
  kernels::rope_forward(ctx, s.k, seq.positions, seq.rope_cos, seq.rope_sin);

  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  kernels::attention_forward(ctx, s.q, s.k, s.v, seq.cu_seqlens, seq.max_doc_len, s.o, s.lse, scale);

  kernels::linear_forward_residual(ctx, s.o.view({n, qd}), wo.value, in, out);
}

void AttentionLayer::backward(const ExecContext& ctx, const PackedSequence& seq, const Saved& s, const Tensor& dout,
                              const Tensor& din, Arena& scratch) const {
  NvtxRange range(nvtx_bwd.c_str());
  const int64_t n = seq.num_tokens, qd = q_dim(), kd = kv_dim();
  const Scratch t = alloc_scratch(scratch, n, s.a.dtype);

  // out = x + o Wo^T
  kernels::linear_backward(ctx, dout, s.o.view({n, qd}), wo.value, t.d_o.view({n, qd}), false, wo.grad, Tensor{});

  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  kernels::attention_backward(ctx, t.d_o, s.q, s.k, s.v, s.o, s.lse, seq.cu_seqlens, seq.max_doc_len, t.dq, t.dk, t.dv,
                              scale);

  // RoPE is a rotation: its backward rotates the gradient back, in place.
  kernels::rope_backward(ctx, t.dq, seq.positions, seq.rope_cos, seq.rope_sin);
  kernels::rope_backward(ctx, t.dk, seq.positions, seq.rope_cos, seq.rope_sin);

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
  kernels::linear_backward(ctx, dq_lin.view({n, qd}), s.a, rows(wqkv.value, 0, qd), t.da, false, rows(wqkv.grad, 0, qd),
                           rows(bqkv.grad, 0, qd));
  kernels::linear_backward(ctx, dk_lin.view({n, kd}), s.a, rows(wqkv.value, qd, qd + kd), t.da, true,
                           rows(wqkv.grad, qd, qd + kd), rows(bqkv.grad, qd, qd + kd));
  kernels::linear_backward(ctx, t.dv.view({n, kd}), s.a, rows(wqkv.value, qd + kd, qd + 2 * kd), t.da, true,
                           rows(wqkv.grad, qd + kd, qd + 2 * kd), rows(bqkv.grad, qd + kd, qd + 2 * kd));

  // Residual: din = dout + RMSNorm'(x)^T da.
  prenorm_residual_backward(ctx, t.da, s.x, norm, s.rstd, dout, din);
}

}  // namespace hyd

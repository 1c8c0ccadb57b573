#include "trainer/layer_attention.h"

#include "kernels/rmsnorm.h"
#include "trainer/core/arena.h"

namespace hyd {

void AttentionLayer::forward(const ExecContext& ctx, const PackedSequence& seq, const Tensor& in, const Tensor& out,
                             Saved& s) const {
  NvtxRange range(nvtx_fwd.c_str());
  s.x = in;
  kernels::rmsnorm_forward(ctx, in, norm.value, s.m.a, s.rstd, eps);
  mixer.forward(ctx, seq, s.m.a, out, s.m, in);  // out = in + mixer(a)
}

void AttentionLayer::backward(const ExecContext& ctx, const PackedSequence& seq, const Saved& s, const Tensor& dout,
                              const Tensor& din, Arena& scratch) const {
  NvtxRange range(nvtx_bwd.c_str());
  const Tensor da = scratch.alloc({seq.num_tokens, mixer.hidden}, s.m.a.dtype);
  mixer.backward(ctx, seq, s.m, dout, da, scratch);
  // Residual: din = dout + RMSNorm'(x)^T da.
  prenorm_residual_backward(ctx, da, s.x, norm, s.rstd, dout, din);
}

}  // namespace hyd

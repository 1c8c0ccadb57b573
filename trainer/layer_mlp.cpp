#include "trainer/layer_mlp.h"

#include "kernels/elementwise.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/swiglu.h"
#include "trainer/core/arena.h"

namespace hyd {

void MlpLayer::forward(const ExecContext& ctx, const Tensor& in, const Tensor& out, Saved& s) const {
  NvtxRange range(nvtx_fwd.c_str());
  s.x = in;
  kernels::rmsnorm_forward(ctx, in, norm.value, s.m, s.rstd, eps);
  kernels::linear_forward(ctx, s.m, w_gate_up.value, Tensor{}, s.gate_up);
  kernels::swiglu_forward(ctx, s.gate_up, s.act);
  kernels::linear_forward_residual(ctx, s.act, w_down.value, in, out);
}

void MlpLayer::backward(const ExecContext& ctx, const Saved& s, const Tensor& dout, const Tensor& din,
                        Arena& scratch) const {
  NvtxRange range(nvtx_bwd.c_str());
  const Scratch t = alloc_scratch(scratch, s.x.size(0), s.m.dtype);
  kernels::linear_backward(ctx, dout, s.act, w_down.value, t.d_act, false, w_down.grad, Tensor{});
  kernels::swiglu_backward(ctx, t.d_act, s.gate_up, t.d_gate_up);
  kernels::linear_backward(ctx, t.d_gate_up, s.m, w_gate_up.value, t.dm, false, w_gate_up.grad, Tensor{});
  prenorm_residual_backward(ctx, t.dm, s.x, norm, s.rstd, dout, din);
}

}  // namespace hyd

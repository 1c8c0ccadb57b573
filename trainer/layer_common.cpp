#include "trainer/layer_common.h"

#include "kernels/rmsnorm.h"

namespace hyd {

void prenorm_residual_backward(const ExecContext& ctx, const Tensor& dnormed, const Tensor& in, const WeightRef& norm,
                               const Tensor& rstd, const Tensor& dout, const Tensor& din) {
  // din = dout + the norm's gradient, in the norm's backward pass (din may be dout itself).
  kernels::rmsnorm_backward(ctx, dnormed, in, norm.value, rstd, din, norm.grad, dout);
}

}  // namespace hyd

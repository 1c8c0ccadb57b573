#include "trainer/layer_common.h"

#include "kernels/elementwise.h"
#include "kernels/rmsnorm.h"

namespace hyd {

void prenorm_residual_backward(const ExecContext& ctx, const Tensor& dnormed, const Tensor& in, const WeightRef& norm,
                               const Tensor& rstd, const Tensor& dout, const Tensor& din, const Tensor& dx) {
  if (din.data == dout.data) {
    kernels::rmsnorm_backward(ctx, dnormed, in, norm.value, rstd, dx, norm.grad);
    kernels::add_inplace(ctx, din, dx);
  } else {
    kernels::rmsnorm_backward(ctx, dnormed, in, norm.value, rstd, din, norm.grad);
    kernels::add_inplace(ctx, din, dout);
  }
}

}  // namespace hyd

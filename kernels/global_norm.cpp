// Dispatcher for the global gradient norm and the clipping factor (see kernels/global_norm.h).
#include "kernels/global_norm.h"

#include "kernels/dispatch.h"

namespace hyd::kernels {

void sum_squares_accumulate(const ExecContext& ctx, const Tensor& grad, const Tensor& out) {
  constexpr const char* op = "sum_squares_accumulate";
  expect_dtype(grad, DType::f32, op, "grad");
  expect_dtype(out, DType::f32, op, "out");
  if (out.numel() != 1) HYD_THROW(op, ": argument 'out' has shape ", out.shape_str(), ", expected one element");
  expect_same_device(grad, out, op);
  if (grad.device.is_cpu()) {
    cpu::sum_squares_accumulate<float>(grad.ptr<float>(), grad.numel(), out.ptr<float>());
    return;
  }
#ifdef HYD_WITH_CUDA
  if (grad.device.is_cuda()) {
    check_context(ctx, grad, op);
    cuda::sum_squares_accumulate(grad.ptr<float>(), grad.numel(), out.ptr<float>(), ctx.stream());
    return;
  }
#endif
  unsupported(op, grad);
}

float clip_scale(double norm, double max_norm) {
  if (max_norm > 0 && norm > max_norm) return static_cast<float>(max_norm / (norm + 1e-6));
  return 1.f;
}

}  // namespace hyd::kernels

// Tensor-level dispatch for RMSNorm (see kernels/rmsnorm.h): validates, then runs the CPU reference
// (f32) or the CUDA kernels (bf16 activations and weight, f32 rstd and dw).
#include "kernels/rmsnorm.h"

#include <vector>

#include "kernels/dispatch.h"

namespace hyd::kernels {

void rmsnorm_forward(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& y, const Tensor& rstd,
                     float eps) {
  constexpr const char* op = "rmsnorm_forward";
  expect_shape(x, {-1, -1}, op, "x");
  const int64_t rows = x.shape[0], dim = x.shape[1];
  expect_shape(w, {dim}, op, "w");
  expect_shape(y, {rows, dim}, op, "y");
  expect_shape(rstd, {rows}, op, "rstd");
  expect_dtype(rstd, DType::f32, op, "rstd");
  if (!(eps >= 0.f)) HYD_THROW(op, ": eps must be >= 0, got ", eps);
  expect_same_device(x, w, op);
  expect_same_device(x, y, op);
  expect_same_device(x, rstd, op);
  check_context(ctx, x, op);
  if (x.device.is_cpu()) {
    expect_dtype(x, DType::f32, op, "x");
    expect_dtype(w, DType::f32, op, "w");
    expect_dtype(y, DType::f32, op, "y");
    cpu::rmsnorm_forward<float>(x.ptr<float>(), w.ptr<float>(), y.ptr<float>(), rstd.ptr<float>(), rows, dim, eps);
    return;
  }
#ifdef HYD_WITH_CUDA
  expect_dtype(x, DType::bf16, op, "x");
  expect_dtype(w, DType::bf16, op, "w");
  expect_dtype(y, DType::bf16, op, "y");
  cuda::rmsnorm_forward(x.ptr<bf16>(), w.ptr<bf16>(), y.ptr<bf16>(), rstd.ptr<float>(), rows, dim, eps, ctx.stream());
#else
  unsupported(op, x);
#endif
}

void rmsnorm_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      const Tensor& dx, const Tensor& dw, const Tensor& residual) {
  constexpr const char* op = "rmsnorm_backward";
  expect_shape(x, {-1, -1}, op, "x");
  const int64_t rows = x.shape[0], dim = x.shape[1];
  expect_shape(dy, {rows, dim}, op, "dy");
  expect_shape(w, {dim}, op, "w");
  expect_shape(rstd, {rows}, op, "rstd");
  expect_dtype(rstd, DType::f32, op, "rstd");
  expect_shape(dx, {rows, dim}, op, "dx");
  expect_shape(dw, {dim}, op, "dw");
  expect_dtype(dw, DType::f32, op, "dw");
  for (const Tensor* t : {&dy, &w, &rstd, &dx, &dw}) expect_same_device(x, *t, op);
  const bool add = !residual.empty();
  if (add) {
    expect_shape(residual, {rows, dim}, op, "residual");
    expect_dtype(residual, dx.dtype, op, "residual");
    expect_same_device(x, residual, op);
    HYD_CHECK(residual.data != dy.data, op, ": residual must not be dy");
  }
  check_context(ctx, x, op);
  if (x.device.is_cpu()) {
    expect_dtype(dy, DType::f32, op, "dy");
    expect_dtype(x, DType::f32, op, "x");
    expect_dtype(w, DType::f32, op, "w");
    expect_dtype(dx, DType::f32, op, "dx");
    if (add && residual.data == dx.data) {  // dx += the norm's gradient
      std::vector<float> g(static_cast<size_t>(rows * dim));
      cpu::rmsnorm_backward<float>(dy.ptr<float>(), x.ptr<float>(), w.ptr<float>(), rstd.ptr<float>(), g.data(),
                                   dw.ptr<float>(), rows, dim);
      float* d = dx.ptr<float>();
      for (size_t i = 0; i < g.size(); ++i) d[i] += g[i];
      return;
    }
    cpu::rmsnorm_backward<float>(dy.ptr<float>(), x.ptr<float>(), w.ptr<float>(), rstd.ptr<float>(), dx.ptr<float>(),
                                 dw.ptr<float>(), rows, dim);
    if (add) {
      float* d = dx.ptr<float>();
      const float* r = residual.ptr<float>();
      for (int64_t i = 0; i < rows * dim; ++i) d[i] += r[i];
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  expect_dtype(dy, DType::bf16, op, "dy");
  expect_dtype(x, DType::bf16, op, "x");
  expect_dtype(w, DType::bf16, op, "w");
  expect_dtype(dx, DType::bf16, op, "dx");
  cuda::rmsnorm_backward(dy.ptr<bf16>(), x.ptr<bf16>(), w.ptr<bf16>(), rstd.ptr<float>(), dx.ptr<bf16>(),
                         dw.ptr<float>(), rows, dim, ctx.stream(), add ? residual.ptr<bf16>() : nullptr);
#else
  unsupported(op, x);
#endif
}

}  // namespace hyd::kernels

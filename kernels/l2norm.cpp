// Tensor-level dispatch for the L2 normalisation (see kernels/l2norm.h): validates, then runs the CPU
// reference (f32 or f64) or the CUDA kernels (bf16 activations, f32 rstd).
#include "kernels/l2norm.h"

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

// CPU tensors are f32 or f64, all of one dtype; on CUDA activations are bf16 and rstd f32.
void expect_cpu_float(const Tensor& t, const char* op, const char* arg) {
  if (t.dtype != DType::f32 && t.dtype != DType::f64)
    HYD_THROW(op, ": argument '", arg, "' has dtype ", dtype_name(t.dtype), ", expected f32 or f64 on the CPU");
}

}  // namespace

void l2norm_forward(const ExecContext& ctx, const Tensor& x, const Tensor& y, const Tensor& rstd, float scale,
                    float eps) {
  constexpr const char* op = "l2norm_forward";
  expect_shape(x, {-1, -1}, op, "x");
  const int64_t rows = x.shape[0], dim = x.shape[1];
  expect_shape(y, {rows, dim}, op, "y");
  expect_shape(rstd, {rows}, op, "rstd");
  if (!(eps >= 0.f)) HYD_THROW(op, ": eps must be >= 0, got ", eps);
  expect_same_device(x, y, op);
  expect_same_device(x, rstd, op);
  check_context(ctx, x, op);
  if (x.device.is_cpu()) {
    expect_cpu_float(x, op, "x");
    expect_dtype(y, x.dtype, op, "y");
    expect_dtype(rstd, x.dtype, op, "rstd");
    if (x.dtype == DType::f32) {
      cpu::l2norm_forward<float>(x.ptr<float>(), y.ptr<float>(), rstd.ptr<float>(), rows, dim, scale, eps);
    } else {
      cpu::l2norm_forward<double>(x.ptr<double>(), y.ptr<double>(), rstd.ptr<double>(), rows, dim, scale, eps);
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  expect_dtype(x, DType::bf16, op, "x");
  expect_dtype(y, DType::bf16, op, "y");
  expect_dtype(rstd, DType::f32, op, "rstd");
  cuda::l2norm_forward(x.ptr<bf16>(), y.ptr<bf16>(), rstd.ptr<float>(), rows, dim, scale, eps, ctx.stream());
#else
  unsupported(op, x);
#endif
}

void l2norm_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& y, const Tensor& rstd, const Tensor& dx,
                     float scale) {
  constexpr const char* op = "l2norm_backward";
  expect_shape(y, {-1, -1}, op, "y");
  const int64_t rows = y.shape[0], dim = y.shape[1];
  expect_shape(dy, {rows, dim}, op, "dy");
  expect_shape(rstd, {rows}, op, "rstd");
  expect_shape(dx, {rows, dim}, op, "dx");
  if (!(scale != 0.f)) HYD_THROW(op, ": scale must be non-zero, got ", scale);
  for (const Tensor* t : {&dy, &rstd, &dx}) expect_same_device(y, *t, op);
  check_context(ctx, y, op);
  if (y.device.is_cpu()) {
    expect_cpu_float(y, op, "y");
    expect_dtype(dy, y.dtype, op, "dy");
    expect_dtype(rstd, y.dtype, op, "rstd");
    expect_dtype(dx, y.dtype, op, "dx");
    if (y.dtype == DType::f32) {
      cpu::l2norm_backward<float>(dy.ptr<float>(), y.ptr<float>(), rstd.ptr<float>(), dx.ptr<float>(), rows, dim,
                                  scale);
    } else {
      cpu::l2norm_backward<double>(dy.ptr<double>(), y.ptr<double>(), rstd.ptr<double>(), dx.ptr<double>(), rows, dim,
                                   scale);
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  expect_dtype(y, DType::bf16, op, "y");
  expect_dtype(dy, DType::bf16, op, "dy");
  expect_dtype(rstd, DType::f32, op, "rstd");
  expect_dtype(dx, DType::bf16, op, "dx");
  cuda::l2norm_backward(dy.ptr<bf16>(), y.ptr<bf16>(), rstd.ptr<float>(), dx.ptr<bf16>(), rows, dim, scale,
                        ctx.stream());
#else
  unsupported(op, y);
#endif
}

}  // namespace hyd::kernels

// Tensor-level dispatch for the gated RMSNorm (see kernels/gated_rmsnorm.h): validates, then runs the
// CPU reference (f32 or f64, every tensor of one dtype) or the CUDA kernels (bf16 activations and
// weight, f32 rstd and dw).
#include "kernels/gated_rmsnorm.h"

#include <utility>

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

void expect_cpu_float(const Tensor& t, const char* op, const char* arg) {
  if (t.dtype != DType::f32 && t.dtype != DType::f64)
    HYD_THROW(op, ": argument '", arg, "' has dtype ", dtype_name(t.dtype), ", expected f32 or f64 on the CPU");
}

}  // namespace

void gated_rmsnorm_forward(const ExecContext& ctx, const Tensor& o, const Tensor& gate, const Tensor& w,
                           const Tensor& y, const Tensor& rstd, float eps) {
  constexpr const char* op = "gated_rmsnorm_forward";
  expect_shape(o, {-1, -1}, op, "o");
  const int64_t rows = o.shape[0], dim = o.shape[1];
  expect_shape(gate, {rows, dim}, op, "gate");
  expect_shape(w, {dim}, op, "w");
  expect_shape(y, {rows, dim}, op, "y");
  expect_shape(rstd, {rows}, op, "rstd");
  if (!(eps >= 0.f)) HYD_THROW(op, ": eps must be >= 0, got ", eps);
  for (const Tensor* t : {&gate, &w, &y, &rstd}) expect_same_device(o, *t, op);
  check_context(ctx, o, op);
  if (o.device.is_cpu()) {
    expect_cpu_float(o, op, "o");
    for (auto [t, name] : {std::pair{&gate, "gate"}, {&w, "w"}, {&y, "y"}, {&rstd, "rstd"}})
      expect_dtype(*t, o.dtype, op, name);
    if (o.dtype == DType::f32) {
      cpu::gated_rmsnorm_forward<float>(o.ptr<float>(), gate.ptr<float>(), w.ptr<float>(), y.ptr<float>(),
                                        rstd.ptr<float>(), rows, dim, eps);
    } else {
      cpu::gated_rmsnorm_forward<double>(o.ptr<double>(), gate.ptr<double>(), w.ptr<double>(), y.ptr<double>(),
                                         rstd.ptr<double>(), rows, dim, eps);
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  for (auto [t, name] : {std::pair{&o, "o"}, {&gate, "gate"}, {&w, "w"}, {&y, "y"}})
    expect_dtype(*t, DType::bf16, op, name);
  expect_dtype(rstd, DType::f32, op, "rstd");
  cuda::gated_rmsnorm_forward(o.ptr<bf16>(), gate.ptr<bf16>(), w.ptr<bf16>(), y.ptr<bf16>(), rstd.ptr<float>(), rows,
                              dim, eps, ctx.stream());
#else
  unsupported(op, o);
#endif
}

void gated_rmsnorm_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& o, const Tensor& gate,
                            const Tensor& w, const Tensor& rstd, const Tensor& do_, const Tensor& dgate,
                            const Tensor& dw) {
  constexpr const char* op = "gated_rmsnorm_backward";
  expect_shape(o, {-1, -1}, op, "o");
  const int64_t rows = o.shape[0], dim = o.shape[1];
  expect_shape(dy, {rows, dim}, op, "dy");
  expect_shape(gate, {rows, dim}, op, "gate");
  expect_shape(w, {dim}, op, "w");
  expect_shape(rstd, {rows}, op, "rstd");
  expect_shape(do_, {rows, dim}, op, "do");
  expect_shape(dgate, {rows, dim}, op, "dgate");
  expect_shape(dw, {dim}, op, "dw");
  for (const Tensor* t : {&dy, &gate, &w, &rstd, &do_, &dgate, &dw}) expect_same_device(o, *t, op);
  check_context(ctx, o, op);
  if (o.device.is_cpu()) {
    expect_cpu_float(o, op, "o");
    for (auto [t, name] : {std::pair{&dy, "dy"},
                           {&gate, "gate"},
                           {&w, "w"},
                           {&rstd, "rstd"},
                           {&do_, "do"},
                           {&dgate, "dgate"},
                           {&dw, "dw"}})
      expect_dtype(*t, o.dtype, op, name);
    if (o.dtype == DType::f32) {
      cpu::gated_rmsnorm_backward<float>(dy.ptr<float>(), o.ptr<float>(), gate.ptr<float>(), w.ptr<float>(),
                                         rstd.ptr<float>(), do_.ptr<float>(), dgate.ptr<float>(), dw.ptr<float>(), rows,
                                         dim);
    } else {
      cpu::gated_rmsnorm_backward<double>(dy.ptr<double>(), o.ptr<double>(), gate.ptr<double>(), w.ptr<double>(),
                                          rstd.ptr<double>(), do_.ptr<double>(), dgate.ptr<double>(), dw.ptr<double>(),
                                          rows, dim);
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  for (auto [t, name] : {std::pair{&dy, "dy"}, {&o, "o"}, {&gate, "gate"}, {&w, "w"}, {&do_, "do"}, {&dgate, "dgate"}})
    expect_dtype(*t, DType::bf16, op, name);
  expect_dtype(rstd, DType::f32, op, "rstd");
  expect_dtype(dw, DType::f32, op, "dw");
  cuda::gated_rmsnorm_backward(dy.ptr<bf16>(), o.ptr<bf16>(), gate.ptr<bf16>(), w.ptr<bf16>(), rstd.ptr<float>(),
                               do_.ptr<bf16>(), dgate.ptr<bf16>(), dw.ptr<float>(), rows, dim, ctx.stream());
#else
  unsupported(op, o);
#endif
}

}  // namespace hyd::kernels

// Dispatchers for the matrix products (see kernels/matmul.h): argument validation, then the CPU
// (OpenBLAS) or CUDA (cuBLAS) implementation chosen by the tensors' device. CPU f64 tensors run the
// double loops (finite-difference harnesses of whole layers; gradients are then f64 too).
#include "kernels/matmul.h"

#include <cstring>

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

void expect_rank(const Tensor& t, int min_rank, const char* op, const char* arg) {
  if (t.ndim < min_rank)
    HYD_THROW(op, ": argument '", arg, "' has shape ", t.shape_str(), ", expected at least ", min_rank, " dimensions");
}

// Rows of a [..., features] activation: every dimension but the last.
int64_t rows_of(const Tensor& t) { return t.shape[t.ndim - 1] ? t.numel() / t.shape[t.ndim - 1] : 0; }

// `b` has the same leading dimensions as `a` (and its own last dimension `last`).
void expect_same_rows(const Tensor& a, const Tensor& b, int64_t last, const char* op, const char* arg_a,
                      const char* arg_b) {
  bool ok = a.ndim == b.ndim && b.shape[b.ndim - 1] == last;
  for (int i = 0; ok && i + 1 < a.ndim; ++i) ok = a.shape[i] == b.shape[i];
  if (!ok)
    HYD_THROW(op, ": argument '", arg_b, "' has shape ", b.shape_str(), ", expected the leading dimensions of '", arg_a,
              "' ", a.shape_str(), " and a last dimension of ", last);
}

}  // namespace

void gemm(const ExecContext& ctx, bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b, float beta,
          const Tensor& c) {
  constexpr const char* op = "gemm";
  expect_shape(c, {-1, -1}, op, "c");
  expect_shape(a, {-1, -1}, op, "a");
  const int64_t m = c.shape[0], n = c.shape[1], k = trans_a ? a.shape[0] : a.shape[1];
  if (trans_a)
    expect_shape(a, {k, m}, op, "a");
  else
    expect_shape(a, {m, k}, op, "a");
  if (trans_b)
    expect_shape(b, {n, k}, op, "b");
  else
    expect_shape(b, {k, n}, op, "b");
  expect_same_device(a, b, op);
  expect_same_device(a, c, op);
  if (a.device.is_cpu()) {
    if (a.dtype == DType::f64) {  // f64: CPU finite-difference harnesses
      expect_dtype(b, DType::f64, op, "b");
      expect_dtype(c, DType::f64, op, "c");
      cpu::gemm<double>(trans_a, trans_b, m, n, k, alpha, a.ptr<double>(), b.ptr<double>(), beta, c.ptr<double>());
      return;
    }
    expect_dtype(a, DType::f32, op, "a");
    expect_dtype(b, DType::f32, op, "b");
    expect_dtype(c, DType::f32, op, "c");
    cpu::gemm<float>(trans_a, trans_b, m, n, k, alpha, a.ptr<float>(), b.ptr<float>(), beta, c.ptr<float>());
    return;
  }
#ifdef HYD_WITH_CUDA
  if (a.device.is_cuda()) {
    check_context(ctx, a, op);
    expect_dtype(a, DType::bf16, op, "a");
    expect_dtype(b, DType::bf16, op, "b");
    if (c.dtype != DType::f32 && c.dtype != DType::bf16)
      HYD_THROW(op, ": argument 'c' has dtype ", dtype_name(c.dtype), ", expected f32 or bf16");
    cuda::gemm(ctx.cublas(), ctx.stream(), trans_a, trans_b, m, n, k, alpha, a.ptr<bf16>(), b.ptr<bf16>(), beta, c.data,
               c.dtype == DType::f32);
    return;
  }
#endif
  unsupported(op, a);
}

namespace {
struct LinearDims {
  int64_t m, n, k;
};
// The checks both forwards share: x [.., K] (rows flattened), w [N, K], y [.., N] with x's rows, one device.
LinearDims check_linear_forward(const char* op, const Tensor& x, const Tensor& w, const Tensor& y) {
  expect_rank(x, 2, op, "x");
  expect_shape(w, {-1, x.shape[x.ndim - 1]}, op, "w");
  const LinearDims d{rows_of(x), w.shape[0], w.shape[1]};
  expect_same_rows(x, y, d.n, op, "x", "y");
  expect_same_device(x, w, op);
  expect_same_device(x, y, op);
  return d;
}
// x, w and y of a linear forward all of dtype t.
void expect_operands(const char* op, DType t, const Tensor& x, const Tensor& w, const Tensor& y) {
  expect_dtype(x, t, op, "x");
  expect_dtype(w, t, op, "w");
  expect_dtype(y, t, op, "y");
}
}  // namespace

void linear_forward(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& y) {
  constexpr const char* op = "linear_forward";
  const auto [m, n, k] = check_linear_forward(op, x, w, y);
  if (!bias.empty()) {
    expect_shape(bias, {n}, op, "bias");
    expect_same_device(x, bias, op);
  }
  if (x.device.is_cpu() && x.dtype == DType::f64) {  // f64: CPU finite-difference harnesses
    expect_operands(op, DType::f64, x, w, y);
    if (!bias.empty()) expect_dtype(bias, DType::f64, op, "bias");
    cpu::gemm<double>(false, true, m, n, k, 1.0, x.ptr<double>(), w.ptr<double>(), 0.0, y.ptr<double>());
    if (!bias.empty()) cpu::bias_add<double>(y.ptr<double>(), bias.ptr<double>(), m, n);
    return;
  }
  if (x.device.is_cpu()) {
    expect_operands(op, DType::f32, x, w, y);
    if (!bias.empty()) expect_dtype(bias, DType::f32, op, "bias");
    cpu::gemm<float>(false, true, m, n, k, 1.f, x.ptr<float>(), w.ptr<float>(), 0.f, y.ptr<float>());
    if (!bias.empty()) cpu::bias_add<float>(y.ptr<float>(), bias.ptr<float>(), m, n);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (x.device.is_cuda()) {
    check_context(ctx, x, op);
    expect_operands(op, DType::bf16, x, w, y);
    if (!bias.empty()) expect_dtype(bias, DType::bf16, op, "bias");
    cuda::gemm(ctx.cublas(), ctx.stream(), false, true, m, n, k, 1.f, x.ptr<bf16>(), w.ptr<bf16>(), 0.f, y.data, false);
    if (!bias.empty()) cuda::bias_add(y.ptr<bf16>(), bias.ptr<bf16>(), m, n, ctx.stream());
    return;
  }
#endif
  unsupported(op, x);
}

void linear_forward_residual(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& residual,
                             const Tensor& y) {
  constexpr const char* op = "linear_forward_residual";
  if (residual.empty()) return linear_forward(ctx, x, w, Tensor{}, y);
  const auto [m, n, k] = check_linear_forward(op, x, w, y);
  expect_same_rows(x, residual, n, op, "x", "residual");
  expect_same_device(x, residual, op);
  expect_dtype(residual, y.dtype, op, "residual");
  if (x.device.is_cpu()) {
    const bool f64 = x.dtype == DType::f64;
    const DType t = f64 ? DType::f64 : DType::f32;
    expect_operands(op, t, x, w, y);
    if (y.data != residual.data) std::memcpy(y.data, residual.data, static_cast<size_t>(m * n) * dtype_size(t));
    if (f64)
      cpu::gemm<double>(false, true, m, n, k, 1.0, x.ptr<double>(), w.ptr<double>(), 1.0, y.ptr<double>());
    else
      cpu::gemm<float>(false, true, m, n, k, 1.f, x.ptr<float>(), w.ptr<float>(), 1.f, y.ptr<float>());
    return;
  }
#ifdef HYD_WITH_CUDA
  if (x.device.is_cuda()) {
    check_context(ctx, x, op);
    expect_operands(op, DType::bf16, x, w, y);
    cuda::linear_residual(ctx.cublas(), ctx.cublaslt(), ctx.stream(), ctx.workspace(), ctx.workspace_bytes(), m, n, k,
                          x.ptr<bf16>(), w.ptr<bf16>(), residual.ptr<bf16>(), y.ptr<bf16>());
    return;
  }
#endif
  unsupported(op, x);
}

// dx = dy w (or dx += dy w), dw += dy^T x, dbias += column sums of dy. dx, dw and dbias may each be
// empty (not computed), e.g. dx for the first layer or dw for a frozen weight.
void linear_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& dx,
                     bool accumulate_dx, const Tensor& dw, const Tensor& dbias) {
  constexpr const char* op = "linear_backward";
  expect_rank(x, 2, op, "x");
  expect_shape(w, {-1, x.shape[x.ndim - 1]}, op, "w");
  const int64_t m = rows_of(x), n = w.shape[0], k = w.shape[1];
  expect_same_rows(x, dy, n, op, "x", "dy");
  expect_same_device(x, dy, op);
  expect_same_device(x, w, op);
  if (!dx.empty()) {
    expect_same_rows(x, dx, k, op, "x", "dx");
    expect_same_device(x, dx, op);
  }
  // Weight gradients are f32, except on the f64 CPU path (finite-difference harnesses), where all is f64.
  const DType grad_dtype = x.device.is_cpu() && x.dtype == DType::f64 ? DType::f64 : DType::f32;
  if (!dw.empty()) {
    expect_shape(dw, {n, k}, op, "dw");
    expect_dtype(dw, grad_dtype, op, "dw");
    expect_same_device(x, dw, op);
  }
  if (!dbias.empty()) {
    expect_shape(dbias, {n}, op, "dbias");
    expect_dtype(dbias, grad_dtype, op, "dbias");
    expect_same_device(x, dbias, op);
  }
  if (x.device.is_cpu() && x.dtype == DType::f64) {
    expect_dtype(dy, DType::f64, op, "dy");
    expect_dtype(w, DType::f64, op, "w");
    if (!dx.empty()) {
      expect_dtype(dx, DType::f64, op, "dx");
      cpu::gemm<double>(false, false, m, k, n, 1.0, dy.ptr<double>(), w.ptr<double>(), accumulate_dx ? 1.0 : 0.0,
                        dx.ptr<double>());
    }
    if (!dw.empty())
      cpu::gemm<double>(true, false, n, k, m, 1.0, dy.ptr<double>(), x.ptr<double>(), 1.0, dw.ptr<double>());
    if (!dbias.empty()) cpu::bias_grad<double>(dy.ptr<double>(), dbias.ptr<double>(), m, n);
    return;
  }
  if (x.device.is_cpu()) {
    expect_dtype(dy, DType::f32, op, "dy");
    expect_dtype(x, DType::f32, op, "x");
    expect_dtype(w, DType::f32, op, "w");
    if (!dx.empty()) {
      expect_dtype(dx, DType::f32, op, "dx");
      cpu::gemm<float>(false, false, m, k, n, 1.f, dy.ptr<float>(), w.ptr<float>(), accumulate_dx ? 1.f : 0.f,
                       dx.ptr<float>());
    }
    if (!dw.empty()) cpu::gemm<float>(true, false, n, k, m, 1.f, dy.ptr<float>(), x.ptr<float>(), 1.f, dw.ptr<float>());
    if (!dbias.empty()) cpu::bias_grad<float>(dy.ptr<float>(), dbias.ptr<float>(), m, n);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (x.device.is_cuda()) {
    check_context(ctx, x, op);
    expect_dtype(dy, DType::bf16, op, "dy");
    expect_dtype(x, DType::bf16, op, "x");
    expect_dtype(w, DType::bf16, op, "w");
    if (!dx.empty()) {
      expect_dtype(dx, DType::bf16, op, "dx");
      cuda::gemm(ctx.cublas(), ctx.stream(), false, false, m, k, n, 1.f, dy.ptr<bf16>(), w.ptr<bf16>(),
                 accumulate_dx ? 1.f : 0.f, dx.data, false);
    }
    if (!dw.empty())
      cuda::gemm(ctx.cublas(), ctx.stream(), true, false, n, k, m, 1.f, dy.ptr<bf16>(), x.ptr<bf16>(), 1.f, dw.data,
                 true);
    if (!dbias.empty()) cuda::bias_grad(dy.ptr<bf16>(), dbias.ptr<float>(), m, n, ctx.stream());
    return;
  }
#endif
  unsupported(op, x);
}

void bias_add(const ExecContext& ctx, const Tensor& y, const Tensor& bias) {
  constexpr const char* op = "bias_add";
  expect_shape(y, {-1, -1}, op, "y");
  const int64_t m = y.shape[0], n = y.shape[1];
  expect_shape(bias, {n}, op, "bias");
  expect_same_device(y, bias, op);
  expect_dtype(bias, y.dtype, op, "bias");
  if (y.device.is_cpu()) {
    if (y.dtype == DType::f64) {
      cpu::bias_add<double>(y.ptr<double>(), bias.ptr<double>(), m, n);
    } else {
      expect_dtype(y, DType::f32, op, "y");
      cpu::bias_add<float>(y.ptr<float>(), bias.ptr<float>(), m, n);
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  check_context(ctx, y, op);
  expect_dtype(y, DType::bf16, op, "y");
  cuda::bias_add(y.ptr<bf16>(), bias.ptr<bf16>(), m, n, ctx.stream());
#else
  unsupported(op, y);
#endif
}

void bias_grad(const ExecContext& ctx, const Tensor& dy, const Tensor& dbias) {
  constexpr const char* op = "bias_grad";
  expect_shape(dy, {-1, -1}, op, "dy");
  const int64_t m = dy.shape[0], n = dy.shape[1];
  expect_shape(dbias, {n}, op, "dbias");
  expect_same_device(dy, dbias, op);
  if (dy.device.is_cpu()) {
    if (dy.dtype == DType::f64) {
      expect_dtype(dbias, DType::f64, op, "dbias");
      cpu::bias_grad<double>(dy.ptr<double>(), dbias.ptr<double>(), m, n);
    } else {
      expect_dtype(dy, DType::f32, op, "dy");
      expect_dtype(dbias, DType::f32, op, "dbias");
      cpu::bias_grad<float>(dy.ptr<float>(), dbias.ptr<float>(), m, n);
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  check_context(ctx, dy, op);
  expect_dtype(dy, DType::bf16, op, "dy");
  expect_dtype(dbias, DType::f32, op, "dbias");
  cuda::bias_grad(dy.ptr<bf16>(), dbias.ptr<float>(), m, n, ctx.stream());
#else
  unsupported(op, dy);
#endif
}

}  // namespace hyd::kernels

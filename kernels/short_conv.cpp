// Tensor-level dispatch for the short convolution (see kernels/short_conv.h): validates, then runs
// the CPU reference (f32 or f64) or the CUDA kernels (bf16 activations and weight, f32 dw).
// cu_seqlens contents are checked by the CPU implementation; on CUDA they are trusted. The optional
// halo and dhalo are checked here (shape [D, K-1, C], dtype and device).
#include "kernels/short_conv.h"

#include "kernels/dispatch.h"
#include "kernels/l2norm.h"

namespace hyd::kernels {

namespace {

struct ConvDims {
  int64_t n, channels, kernel, num_docs;
};

ConvDims check_common(const Tensor& x, const Tensor& w, const Tensor& cu_seqlens, const char* op) {
  expect_shape(x, {-1, -1}, op, "x");
  const int64_t n = x.shape[0], channels = x.shape[1];
  expect_shape(w, {channels, -1}, op, "w");
  if (w.shape[1] < 1) HYD_THROW(op, ": argument 'w' has shape ", w.shape_str(), ", expected a kernel size >= 1");
  expect_shape(cu_seqlens, {-1}, op, "cu_seqlens");
  if (cu_seqlens.shape[0] < 1) HYD_THROW(op, ": argument 'cu_seqlens' is empty, expected [num_docs + 1]");
  expect_dtype(cu_seqlens, DType::i32, op, "cu_seqlens");
  expect_same_device(x, w, op);
  expect_same_device(x, cu_seqlens, op);
  return {n, channels, w.shape[1], cu_seqlens.shape[0] - 1};
}

// CPU tensors are all f32 or all f64 (named by `x`'s dtype); CUDA activations and weight are bf16.
void expect_value_dtype(const Tensor& x, const Tensor& t, const char* op, const char* arg) {
  expect_dtype(t, x.device.is_cpu() ? x.dtype : DType::bf16, op, arg);
}

void expect_cpu_float(const Tensor& x, const char* op) {
  if (x.dtype != DType::f32 && x.dtype != DType::f64)
    HYD_THROW(op, ": argument 'x' has dtype ", dtype_name(x.dtype), ", expected f32 or f64 on the CPU");
}

// A halo tensor is given when it has data or a shape: [D, 0, C] (K = 1) may come without data.
bool given(const Tensor& t) { return !t.empty() || t.ndim > 0; }

void check_halo(const Tensor& x, const ConvDims& s, const Tensor& halo, const Tensor& value_like, const char* op,
                const char* arg) {
  expect_shape(halo, {s.num_docs, s.kernel - 1, s.channels}, op, arg);
  if (halo.empty() && halo.numel() > 0)
    HYD_THROW(op, ": argument '", arg, "' has shape ", halo.shape_str(), " but no data");
  expect_dtype(halo, value_like.dtype, op, arg);
  expect_same_device(x, halo, op);
}

struct Checked {
  ConvDims s;
  bool has_halo, has_dhalo;
};

// Everything short_conv_forward checks; `y` is the output.
Checked check_forward(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& cu_seqlens,
                      const Tensor& y, const Tensor& halo, const char* op) {
  const ConvDims s = check_common(x, w, cu_seqlens, op);
  expect_shape(y, {s.n, s.channels}, op, "y");
  expect_same_device(x, y, op);
  const bool has_halo = given(halo);
  if (has_halo) check_halo(x, s, halo, x, op, "halo");
  check_context(ctx, x, op);
  if (x.device.is_cpu()) {
    expect_cpu_float(x, op);
  } else {
    expect_dtype(x, DType::bf16, op, "x");
#ifdef HYD_WITH_CUDA
    if (s.kernel > cuda::kShortConvMaxKernel)
      HYD_THROW(op, ": argument 'w' has kernel size ", s.kernel,
                ", the CUDA kernel supports <= ", cuda::kShortConvMaxKernel);
#endif
  }
  expect_value_dtype(x, w, op, "w");
  expect_value_dtype(x, y, op, "y");
  return {s, has_halo, false};
}

// Everything short_conv_backward checks.
Checked check_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& x, const Tensor& w,
                       const Tensor& cu_seqlens, const Tensor& dx, const Tensor& dw, const Tensor& halo,
                       const Tensor& dhalo, const char* op) {
  const ConvDims s = check_common(x, w, cu_seqlens, op);
  expect_shape(dy, {s.n, s.channels}, op, "dy");
  expect_shape(dx, {s.n, s.channels}, op, "dx");
  expect_shape(dw, {s.channels, s.kernel}, op, "dw");
  for (const Tensor* t : {&dy, &dx, &dw}) expect_same_device(x, *t, op);
  const bool has_halo = given(halo), has_dhalo = given(dhalo);
  if (has_dhalo && !has_halo)
    HYD_THROW(op, ": argument 'dhalo' is given without 'halo' (the halo gradient needs the halo)");
  if (has_halo) check_halo(x, s, halo, x, op, "halo");
  if (has_dhalo) check_halo(x, s, dhalo, dx, op, "dhalo");
  check_context(ctx, x, op);
  if (x.device.is_cpu()) {
    expect_cpu_float(x, op);
    expect_dtype(dw, x.dtype, op, "dw");
  } else {
    expect_dtype(x, DType::bf16, op, "x");
    expect_dtype(dw, DType::f32, op, "dw");
#ifdef HYD_WITH_CUDA
    if (s.kernel > cuda::kShortConvMaxKernel)
      HYD_THROW(op, ": argument 'w' has kernel size ", s.kernel,
                ", the CUDA kernel supports <= ", cuda::kShortConvMaxKernel);
#endif
  }
  expect_value_dtype(x, w, op, "w");
  expect_value_dtype(x, dy, op, "dy");
  expect_value_dtype(x, dx, op, "dx");
  return {s, has_halo, has_dhalo};
}

// The l2 norm's arguments of the fused q / k path: head_dim divides the channels; y [n, channels] (the backward's
// input) and rstd [n * channels / head_dim] (f32 on CUDA). Returns the norm's row count.
int64_t check_norm(const Tensor& x, const ConvDims& s, const Tensor* y, const Tensor& rstd, int64_t head_dim,
                   const char* op) {
  if (head_dim <= 0 || s.channels % head_dim != 0)
    HYD_THROW(op, ": head_dim ", head_dim, " does not divide the ", s.channels, " channels of argument 'x'");
  const int64_t rows = s.n * (s.channels / head_dim);
  if (y != nullptr) {
    expect_shape(*y, {s.n, s.channels}, op, "y");
    expect_same_device(x, *y, op);
    expect_value_dtype(x, *y, op, "y");
  }
  expect_shape(rstd, {rows}, op, "rstd");
  expect_same_device(x, rstd, op);
  expect_dtype(rstd, x.device.is_cpu() ? x.dtype : DType::f32, op, "rstd");
  return rows;
}

// Calls f(T{}) with T = float or double, x's CPU dtype.
template <class F>
void with_cpu_type(const Tensor& x, F&& f) {
  if (x.dtype == DType::f32)
    f(float{});
  else
    f(double{});
}

template <class T>
T* ptr_or_null(const Tensor& t, bool present) {
  return present ? t.ptr<T>() : nullptr;
}

}  // namespace

void short_conv_forward(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& cu_seqlens,
                        const Tensor& y, const Tensor& halo) {
  constexpr const char* op = "short_conv_forward";
  const Checked c = check_forward(ctx, x, w, cu_seqlens, y, halo, op);
  const ConvDims& s = c.s;
  if (x.device.is_cpu()) {
    with_cpu_type(x, [&](auto t) {
      using T = decltype(t);
      cpu::short_conv_forward<T>(x.ptr<T>(), w.ptr<T>(), cu_seqlens.ptr<int32_t>(), s.num_docs, y.ptr<T>(), s.n,
                                 s.channels, s.kernel, ptr_or_null<T>(halo, c.has_halo));
    });
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::short_conv_forward(x.ptr<bf16>(), w.ptr<bf16>(), cu_seqlens.ptr<int32_t>(), s.num_docs, y.ptr<bf16>(), s.n,
                           s.channels, s.kernel, ptr_or_null<bf16>(halo, c.has_halo), ctx.stream());
#else
  unsupported(op, x);
#endif
}

void short_conv_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& x, const Tensor& w,
                         const Tensor& cu_seqlens, const Tensor& dx, const Tensor& dw, const Tensor& halo,
                         const Tensor& dhalo) {
  constexpr const char* op = "short_conv_backward";
  const Checked c = check_backward(ctx, dy, x, w, cu_seqlens, dx, dw, halo, dhalo, op);
  const ConvDims& s = c.s;
  if (x.device.is_cpu()) {
    with_cpu_type(x, [&](auto t) {
      using T = decltype(t);
      cpu::short_conv_backward<T>(dy.ptr<T>(), x.ptr<T>(), w.ptr<T>(), cu_seqlens.ptr<int32_t>(), s.num_docs,
                                  dx.ptr<T>(), dw.ptr<T>(), s.n, s.channels, s.kernel, ptr_or_null<T>(halo, c.has_halo),
                                  ptr_or_null<T>(dhalo, c.has_dhalo));
    });
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::short_conv_backward(dy.ptr<bf16>(), x.ptr<bf16>(), w.ptr<bf16>(), cu_seqlens.ptr<int32_t>(), s.num_docs,
                            dx.ptr<bf16>(), dw.ptr<float>(), s.n, s.channels, s.kernel,
                            ptr_or_null<bf16>(halo, c.has_halo), ptr_or_null<bf16>(dhalo, c.has_dhalo), ctx.stream());
#else
  unsupported(op, x);
#endif
}

void short_conv_l2norm_forward(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& cu_seqlens,
                               const Tensor& y, const Tensor& rstd, int64_t head_dim, float scale, const Tensor& halo) {
  constexpr const char* op = "short_conv_l2norm_forward";
  const Checked c = check_forward(ctx, x, w, cu_seqlens, y, halo, op);
  const ConvDims& s = c.s;
  const int64_t rows = check_norm(x, s, nullptr, rstd, head_dim, op);
  if (x.device.is_cpu()) {
    with_cpu_type(x, [&](auto t) {
      using T = decltype(t);
      cpu::short_conv_forward<T>(x.ptr<T>(), w.ptr<T>(), cu_seqlens.ptr<int32_t>(), s.num_docs, y.ptr<T>(), s.n,
                                 s.channels, s.kernel, ptr_or_null<T>(halo, c.has_halo));
      cpu::l2norm_forward<T>(y.ptr<T>(), y.ptr<T>(), rstd.ptr<T>(), rows, head_dim, scale, kL2NormEps);
    });
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::short_conv_l2norm_forward(x.ptr<bf16>(), w.ptr<bf16>(), cu_seqlens.ptr<int32_t>(), s.num_docs, y.ptr<bf16>(),
                                  rstd.ptr<float>(), s.n, s.channels, s.kernel, head_dim, scale, kL2NormEps,
                                  ptr_or_null<bf16>(halo, c.has_halo), ctx.stream());
#else
  unsupported(op, x);
#endif
}

void short_conv_l2norm_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& y, const Tensor& rstd,
                                int64_t head_dim, float scale, const Tensor& x, const Tensor& w,
                                const Tensor& cu_seqlens, const Tensor& dx, const Tensor& dw, const Tensor& halo,
                                const Tensor& dhalo) {
  constexpr const char* op = "short_conv_l2norm_backward";
  const Checked c = check_backward(ctx, dy, x, w, cu_seqlens, dx, dw, halo, dhalo, op);
  const ConvDims& s = c.s;
  const int64_t rows = check_norm(x, s, &y, rstd, head_dim, op);
  if (x.device.is_cpu()) {
    with_cpu_type(x, [&](auto t) {
      using T = decltype(t);
      cpu::l2norm_backward<T>(dy.ptr<T>(), y.ptr<T>(), rstd.ptr<T>(), dy.ptr<T>(), rows, head_dim, scale);
      cpu::short_conv_backward<T>(dy.ptr<T>(), x.ptr<T>(), w.ptr<T>(), cu_seqlens.ptr<int32_t>(), s.num_docs,
                                  dx.ptr<T>(), dw.ptr<T>(), s.n, s.channels, s.kernel, ptr_or_null<T>(halo, c.has_halo),
                                  ptr_or_null<T>(dhalo, c.has_dhalo));
    });
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::short_conv_l2norm_backward(dy.ptr<bf16>(), y.ptr<bf16>(), rstd.ptr<float>(), head_dim, scale, x.ptr<bf16>(),
                                   w.ptr<bf16>(), cu_seqlens.ptr<int32_t>(), s.num_docs, dx.ptr<bf16>(),
                                   dw.ptr<float>(), s.n, s.channels, s.kernel, ptr_or_null<bf16>(halo, c.has_halo),
                                   ptr_or_null<bf16>(dhalo, c.has_dhalo), ctx.stream());
#else
  unsupported(op, x);
#endif
}

}  // namespace hyd::kernels

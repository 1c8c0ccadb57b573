// Tensor-level dispatch for the small elementwise ops (see kernels/elementwise.h). The CPU side also
// handles bf16 (host-side conversions for loaders and exports); the CUDA side runs the kernels in
// kernels/cuda/elementwise.cu. add_inplace, fill and scale_inplace also take CPU f64 tensors (the
// finite-difference harnesses of whole layers).
#include "kernels/elementwise.h"

#include <cstring>

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

void expect_float_dtype(const Tensor& t, const char* op, const char* arg) {
  if (t.dtype != DType::f32 && t.dtype != DType::bf16)
    HYD_THROW(op, ": argument '", arg, "' has dtype ", dtype_name(t.dtype), ", expected f32 or bf16");
}

void expect_same_numel(const Tensor& a, const Tensor& b, const char* op, const char* a_name, const char* b_name) {
  if (a.numel() != b.numel())
    HYD_THROW(op, ": argument '", b_name, "' has shape ", b.shape_str(), " (", b.numel(), " elements), expected ",
              a.numel(), " elements like '", a_name, "' ", a.shape_str());
}

}  // namespace

void add_inplace(const ExecContext& ctx, const Tensor& y, const Tensor& x) {
  constexpr const char* op = "add_inplace";
  if (y.device.is_cpu() && y.dtype == DType::f64) {  // f64: CPU finite-difference harnesses
    expect_dtype(x, DType::f64, op, "x");
    expect_same_numel(y, x, op, "y", "x");
    expect_same_device(y, x, op);
    cpu::add_inplace<double>(y.ptr<double>(), x.ptr<double>(), y.numel());
    return;
  }
  expect_float_dtype(y, op, "y");
  expect_dtype(x, y.dtype, op, "x");
  expect_same_numel(y, x, op, "y", "x");
  expect_same_device(y, x, op);
  check_context(ctx, y, op);
  const int64_t n = y.numel();
  if (y.device.is_cpu()) {
    if (y.dtype == DType::f32) {
      cpu::add_inplace<float>(y.ptr<float>(), x.ptr<float>(), n);
    } else {
      bf16* yp = y.ptr<bf16>();
      const bf16* xp = x.ptr<bf16>();
      for (int64_t i = 0; i < n; ++i) yp[i] = float_to_bf16(bf16_to_float(yp[i]) + bf16_to_float(xp[i]));
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  if (y.dtype == DType::f32) {
    cuda::add_inplace_f32(y.ptr<float>(), x.ptr<float>(), n, ctx.stream());
  } else {
    cuda::add_inplace_bf16(y.ptr<bf16>(), x.ptr<bf16>(), n, ctx.stream());
  }
#else
  unsupported(op, y);
#endif
}

void convert(const ExecContext& ctx, const Tensor& dst, const Tensor& src) {
  constexpr const char* op = "convert";
  expect_float_dtype(dst, op, "dst");
  expect_float_dtype(src, op, "src");
  expect_same_numel(dst, src, op, "dst", "src");
  expect_same_device(dst, src, op);
  check_context(ctx, dst, op);
  const int64_t n = dst.numel();
  if (dst.dtype == src.dtype) {  // plain copy, ordered on the context's stream
    if (dst.data == src.data || n == 0) return;
    if (dst.device.is_cpu()) {
      std::memcpy(dst.data, src.data, dst.nbytes());
      return;
    }
#ifdef HYD_WITH_CUDA
    CHECK_CUDA(cudaMemcpyAsync(dst.data, src.data, dst.nbytes(), cudaMemcpyDeviceToDevice,
                               static_cast<cudaStream_t>(ctx.stream())));
    return;
#else
    unsupported(op, dst);
#endif
  }
  if (dst.device.is_cpu()) {
    if (dst.dtype == DType::bf16) {
      const float* s = src.ptr<float>();
      bf16* d = dst.ptr<bf16>();
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(s[i]);
    } else {
      const bf16* s = src.ptr<bf16>();
      float* d = dst.ptr<float>();
      for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_float(s[i]);
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  if (dst.dtype == DType::bf16) {
    cuda::convert_f32_to_bf16(dst.ptr<bf16>(), src.ptr<float>(), n, ctx.stream());
  } else {
    cuda::convert_bf16_to_f32(dst.ptr<float>(), src.ptr<bf16>(), n, ctx.stream());
  }
#else
  unsupported(op, dst);
#endif
}

void fill(const ExecContext& ctx, const Tensor& t, float value) {
  constexpr const char* op = "fill";
  if (t.device.is_cpu() && t.dtype == DType::f64) {
    double* p = t.ptr<double>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = value;
    return;
  }
  expect_float_dtype(t, op, "t");
  check_context(ctx, t, op);
  const int64_t n = t.numel();
  if (t.device.is_cpu()) {
    if (t.dtype == DType::f32) {
      float* p = t.ptr<float>();
      for (int64_t i = 0; i < n; ++i) p[i] = value;
    } else {
      bf16* p = t.ptr<bf16>();
      const bf16 v = float_to_bf16(value);
      for (int64_t i = 0; i < n; ++i) p[i] = v;
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  if (t.dtype == DType::f32) {
    cuda::fill_f32(t.ptr<float>(), value, n, ctx.stream());
  } else {
    cuda::fill_bf16(t.ptr<bf16>(), value, n, ctx.stream());
  }
#else
  unsupported(op, t);
#endif
}

void scale_inplace(const ExecContext& ctx, const Tensor& t, float s) {
  constexpr const char* op = "scale_inplace";
  if (t.device.is_cpu() && t.dtype == DType::f64) {
    cpu::scale_inplace<double>(t.ptr<double>(), s, t.numel());
    return;
  }
  expect_dtype(t, DType::f32, op, "t");
  check_context(ctx, t, op);
  const int64_t n = t.numel();
  if (t.device.is_cpu()) {
    cpu::scale_inplace<float>(t.ptr<float>(), s, n);
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::scale_f32(t.ptr<float>(), s, n, ctx.stream());
#else
  unsupported(op, t);
#endif
}

}  // namespace hyd::kernels

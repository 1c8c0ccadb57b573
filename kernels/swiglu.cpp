// Tensor-level dispatch for SwiGLU (see kernels/swiglu.h): CPU f32 reference or CUDA bf16 kernels.
#include "kernels/swiglu.h"

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

// in [N, 2F]: returns F, or throws naming the argument when the last dimension is odd.
int64_t half_width(const Tensor& in, const char* op, const char* arg) {
  expect_shape(in, {-1, -1}, op, arg);
  if (in.shape[1] % 2 != 0)
    HYD_THROW(op, ": argument '", arg, "' has shape ", in.shape_str(), ", expected [N, 2F] (gate | up)");
  return in.shape[1] / 2;
}

}  // namespace

void swiglu_forward(const ExecContext& ctx, const Tensor& in, const Tensor& out) {
  constexpr const char* op = "swiglu_forward";
  const int64_t f = half_width(in, op, "in");
  const int64_t n = in.shape[0];
  expect_shape(out, {n, f}, op, "out");
  expect_same_device(in, out, op);
  check_context(ctx, in, op);
  if (in.device.is_cpu()) {
    expect_dtype(in, DType::f32, op, "in");
    expect_dtype(out, DType::f32, op, "out");
    cpu::swiglu_forward<float>(in.ptr<float>(), out.ptr<float>(), n, f);
    return;
  }
#ifdef HYD_WITH_CUDA
  expect_dtype(in, DType::bf16, op, "in");
  expect_dtype(out, DType::bf16, op, "out");
  cuda::swiglu_forward(in.ptr<bf16>(), out.ptr<bf16>(), n, f, ctx.stream());
#else
  unsupported(op, in);
#endif
}

void swiglu_backward(const ExecContext& ctx, const Tensor& dout, const Tensor& in, const Tensor& din) {
  constexpr const char* op = "swiglu_backward";
  const int64_t f = half_width(in, op, "in");
  const int64_t n = in.shape[0];
  expect_shape(dout, {n, f}, op, "dout");
  expect_shape(din, {n, 2 * f}, op, "din");
  expect_same_device(in, dout, op);
  expect_same_device(in, din, op);
  check_context(ctx, in, op);
  if (in.device.is_cpu()) {
    expect_dtype(dout, DType::f32, op, "dout");
    expect_dtype(in, DType::f32, op, "in");
    expect_dtype(din, DType::f32, op, "din");
    cpu::swiglu_backward<float>(dout.ptr<float>(), in.ptr<float>(), din.ptr<float>(), n, f);
    return;
  }
#ifdef HYD_WITH_CUDA
  expect_dtype(dout, DType::bf16, op, "dout");
  expect_dtype(in, DType::bf16, op, "in");
  expect_dtype(din, DType::bf16, op, "din");
  cuda::swiglu_backward(dout.ptr<bf16>(), in.ptr<bf16>(), din.ptr<bf16>(), n, f, ctx.stream());
#else
  unsupported(op, in);
#endif
}

}  // namespace hyd::kernels

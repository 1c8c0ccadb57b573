// Tensor-level dispatch for the sigmoid output gate (see kernels/output_gate.h): CPU f32 reference or
// CUDA bf16 kernels.
#include "kernels/output_gate.h"

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

void expect_activation_dtype(const Tensor& t, const char* op, const char* arg) {
  expect_dtype(t, t.device.is_cpu() ? DType::f32 : DType::bf16, op, arg);
}

}  // namespace

void output_gate_forward(const ExecContext& ctx, const Tensor& o, const Tensor& gate, const Tensor& y) {
  constexpr const char* op = "output_gate_forward";
  expect_shape(o, {-1, -1}, op, "o");
  const int64_t rows = o.shape[0], cols = o.shape[1];
  expect_shape(gate, {rows, cols}, op, "gate");
  expect_shape(y, {rows, cols}, op, "y");
  expect_same_device(o, gate, op);
  expect_same_device(o, y, op);
  expect_activation_dtype(o, op, "o");
  expect_activation_dtype(gate, op, "gate");
  expect_activation_dtype(y, op, "y");
  check_context(ctx, o, op);
  if (o.device.is_cpu()) {
    cpu::output_gate_forward<float>(o.ptr<float>(), gate.ptr<float>(), y.ptr<float>(), rows * cols);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (o.device.is_cuda()) {
    cuda::output_gate_forward(o.ptr<bf16>(), gate.ptr<bf16>(), y.ptr<bf16>(), rows * cols, ctx.stream());
    return;
  }
#endif
  unsupported(op, o);
}

void output_gate_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& o, const Tensor& gate,
                          const Tensor& d_o, const Tensor& dgate) {
  constexpr const char* op = "output_gate_backward";
  expect_shape(o, {-1, -1}, op, "o");
  const int64_t rows = o.shape[0], cols = o.shape[1];
  expect_shape(dy, {rows, cols}, op, "dy");
  expect_shape(gate, {rows, cols}, op, "gate");
  expect_shape(d_o, {rows, cols}, op, "d_o");
  expect_shape(dgate, {rows, cols}, op, "dgate");
  for (const Tensor* t : {&dy, &gate, &d_o, &dgate}) expect_same_device(o, *t, op);
  expect_activation_dtype(dy, op, "dy");
  expect_activation_dtype(o, op, "o");
  expect_activation_dtype(gate, op, "gate");
  expect_activation_dtype(d_o, op, "d_o");
  expect_activation_dtype(dgate, op, "dgate");
  check_context(ctx, o, op);
  if (o.device.is_cpu()) {
    cpu::output_gate_backward<float>(dy.ptr<float>(), o.ptr<float>(), gate.ptr<float>(), d_o.ptr<float>(),
                                     dgate.ptr<float>(), rows * cols);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (o.device.is_cuda()) {
    cuda::output_gate_backward(dy.ptr<bf16>(), o.ptr<bf16>(), gate.ptr<bf16>(), d_o.ptr<bf16>(), dgate.ptr<bf16>(),
                               rows * cols, ctx.stream());
    return;
  }
#endif
  unsupported(op, o);
}

}  // namespace hyd::kernels

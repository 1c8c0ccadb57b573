// Dispatcher for cross-entropy (see kernels/cross_entropy.h). Targets >= vocab are rejected with a
// hyd::Error on the CPU; the CUDA kernel cannot throw and writes a NaN loss for such rows instead,
// which the trainer's non-finite-loss check catches.
#include "kernels/cross_entropy.h"

#include "kernels/dispatch.h"

namespace hyd::kernels {

void cross_entropy(const ExecContext& ctx, const Tensor& logits, const Tensor& targets, const Tensor& losses,
                   bool write_grad, float grad_scale) {
  constexpr const char* op = "cross_entropy";
  expect_shape(logits, {-1, -1}, op, "logits");
  const int64_t n = logits.shape[0], vocab = logits.shape[1];
  expect_shape(targets, {n}, op, "targets");
  expect_dtype(targets, DType::i32, op, "targets");
  expect_shape(losses, {n}, op, "losses");
  expect_dtype(losses, DType::f32, op, "losses");
  expect_same_device(logits, targets, op);
  expect_same_device(logits, losses, op);
  if (logits.device.is_cpu()) {
    expect_dtype(logits, DType::f32, op, "logits");
    cpu::cross_entropy<float>(logits.ptr<float>(), targets.ptr<int32_t>(), losses.ptr<float>(), n, vocab, write_grad,
                              grad_scale);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (logits.device.is_cuda()) {
    check_context(ctx, logits, op);
    expect_dtype(logits, DType::bf16, op, "logits");
    cuda::cross_entropy(logits.ptr<bf16>(), targets.ptr<int32_t>(), losses.ptr<float>(), n, vocab, write_grad,
                        grad_scale, ctx.stream());
    return;
  }
#endif
  unsupported(op, logits);
}

}  // namespace hyd::kernels

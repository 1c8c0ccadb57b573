// Dispatcher for the fused distillation loss (see kernels/distill_loss.h): validates every argument
// and option at the boundary, then runs the CPU f32 reference or the CUDA bf16 kernel.
#include "kernels/distill_loss.h"

#include <cmath>
#include <utility>

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

template <class T>
T* optional_ptr(const Tensor& t) {
  return t.empty() ? nullptr : t.ptr<T>();
}

}  // namespace

void distill_loss(const ExecContext& ctx, const Tensor& student, const Tensor& teacher, const Tensor& labels,
                  const Tensor& mask, const Tensor& kl, const Tensor& ce, const Tensor& top1,
                  const DistillLossOptions& opt) {
  constexpr const char* op = "distill_loss";
  expect_shape(student, {-1, -1}, op, "student");
  const int64_t n = student.shape[0], vocab = student.shape[1];
  if (vocab < 1) HYD_THROW(op, ": argument 'student' has shape ", student.shape_str(), ", expected a vocabulary >= 1");
  expect_shape(teacher, {n, vocab}, op, "teacher");
  expect_dtype(teacher, student.dtype, op, "teacher");
  expect_same_device(student, teacher, op);
  if (!labels.empty()) {
    expect_shape(labels, {n}, op, "labels");
    expect_dtype(labels, DType::i32, op, "labels");
    expect_same_device(student, labels, op);
  }
  if (!mask.empty()) {
    expect_shape(mask, {n}, op, "mask");
    expect_dtype(mask, DType::u8, op, "mask");
    expect_same_device(student, mask, op);
  }
  expect_shape(kl, {n}, op, "kl");
  expect_dtype(kl, DType::f32, op, "kl");
  expect_same_device(student, kl, op);
  expect_shape(ce, {n}, op, "ce");
  expect_dtype(ce, DType::f32, op, "ce");
  expect_same_device(student, ce, op);
  if (!top1.empty()) {
    expect_shape(top1, {n}, op, "top1");
    expect_dtype(top1, DType::u8, op, "top1");
    expect_same_device(student, top1, op);
  }
  if (!(std::isfinite(opt.temperature) && opt.temperature > 0))
    HYD_THROW(op, ": option 'temperature' is ", opt.temperature, ", expected a finite value > 0");
  const std::pair<const char*, float> finite[] = {
      {"w_kl", opt.w_kl}, {"w_ce", opt.w_ce}, {"grad_scale", opt.grad_scale}};
  for (const auto& [name, value] : finite)
    if (!std::isfinite(value)) HYD_THROW(op, ": option '", name, "' is ", value, ", expected a finite value");
  // The student row is overwritten with dlogits while the teacher row is still being read.
  if (n > 0 && student.data == teacher.data)
    HYD_THROW(op, ": arguments 'student' and 'teacher' share memory (the teacher logits are read only)");

  if (student.device.is_cpu()) {
    expect_dtype(student, DType::f32, op, "student");
    cpu::distill_loss<float>(student.ptr<float>(), teacher.ptr<float>(), optional_ptr<int32_t>(labels),
                             optional_ptr<uint8_t>(mask), kl.ptr<float>(), ce.ptr<float>(), optional_ptr<uint8_t>(top1),
                             n, vocab, opt);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (student.device.is_cuda()) {
    check_context(ctx, student, op);
    expect_dtype(student, DType::bf16, op, "student");
    cuda::distill_loss(student.ptr<bf16>(), teacher.ptr<bf16>(), optional_ptr<int32_t>(labels),
                       optional_ptr<uint8_t>(mask), kl.ptr<float>(), ce.ptr<float>(), optional_ptr<uint8_t>(top1), n,
                       vocab, opt, ctx.stream());
    return;
  }
#endif
  unsupported(op, student);
}

}  // namespace hyd::kernels

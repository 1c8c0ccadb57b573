// Dispatcher for AdamW (see kernels/adamw.h). Tensors are treated as flat arrays of n elements (a
// parameter keeps its own shape; only the element counts must agree).
#include "kernels/adamw.h"

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

void expect_numel(const Tensor& t, int64_t n, const char* op, const char* arg) {
  if (t.numel() != n)
    HYD_THROW(op, ": argument '", arg, "' has shape ", t.shape_str(), " (", t.numel(), " elements), expected ", n,
              " elements like 'master'");
}

}  // namespace

void adamw_update(const ExecContext& ctx, const Tensor& master, const Tensor& grad, const Tensor& m, const Tensor& v,
                  const Tensor& working, const AdamWStep& s) {
  constexpr const char* op = "adamw_update";
  const int64_t n = master.numel();
  expect_dtype(master, DType::f32, op, "master");
  expect_dtype(grad, DType::f32, op, "grad");
  expect_dtype(m, DType::f32, op, "m");
  expect_dtype(v, DType::f32, op, "v");
  expect_numel(grad, n, op, "grad");
  expect_numel(m, n, op, "m");
  expect_numel(v, n, op, "v");
  for (const Tensor* t : {&grad, &m, &v}) expect_same_device(master, *t, op);
  if (!working.empty()) {
    expect_numel(working, n, op, "working");
    expect_same_device(master, working, op);
  }
  if (s.step < 1) HYD_THROW(op, ": step must be >= 1 (1-based), got ", s.step);
  if (master.device.is_cpu()) {
    float* p = master.ptr<float>();
    cpu::adamw_update<float>(p, grad.ptr<float>(), m.ptr<float>(), v.ptr<float>(), n, s);
    if (!working.empty()) {
      // On the CPU the model may compute in f32 (a plain copy) or hold a bf16 copy like the GPU.
      if (working.dtype == DType::bf16) {
        bf16* w = working.ptr<bf16>();
        for (int64_t i = 0; i < n; ++i) w[i] = float_to_bf16(p[i]);
      } else {
        expect_dtype(working, DType::f32, op, "working");
        float* w = working.ptr<float>();
        for (int64_t i = 0; i < n; ++i) w[i] = p[i];
      }
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  if (master.device.is_cuda()) {
    check_context(ctx, master, op);
    if (!working.empty()) expect_dtype(working, DType::bf16, op, "working");
    cuda::adamw_update(master.ptr<float>(), grad.ptr<float>(), m.ptr<float>(), v.ptr<float>(),
                       working.empty() ? nullptr : working.ptr<bf16>(), n, s, ctx.stream());
    return;
  }
#endif
  unsupported(op, master);
}

}  // namespace hyd::kernels

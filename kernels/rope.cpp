// Tensor-level dispatch for rotary position embeddings (see kernels/rope.h). The tables' building
// (rope_inv_freq, rope_build_tables) lives with the CPU reference in kernels/cpu/rope.cpp.
#include "kernels/rope.h"

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

// x [N, H, d] rotated in place by +angle (sign 1) or -angle (sign -1).
void rope_dispatch(const ExecContext& ctx, const Tensor& x, const Tensor& positions, const Tensor& cos,
                   const Tensor& sin, int sign, const char* op, const char* x_name) {
  expect_shape(x, {-1, -1, -1}, op, x_name);
  const int64_t n = x.shape[0], heads = x.shape[1], head_dim = x.shape[2];
  if (head_dim % 2 != 0)
    HYD_THROW(op, ": argument '", x_name, "' has odd head_dim ", head_dim, " (shape ", x.shape_str(), ")");
  expect_shape(positions, {n}, op, "positions");
  expect_dtype(positions, DType::i32, op, "positions");
  expect_shape(cos, {-1, head_dim / 2}, op, "cos");
  expect_dtype(cos, DType::f32, op, "cos");
  const int64_t max_pos = cos.shape[0];
  expect_shape(sin, {max_pos, head_dim / 2}, op, "sin");
  expect_dtype(sin, DType::f32, op, "sin");
  for (const Tensor* t : {&positions, &cos, &sin}) expect_same_device(x, *t, op);
  check_context(ctx, x, op);
  if (x.device.is_cpu()) {
    expect_dtype(x, DType::f32, op, x_name);
    const int32_t* pos = positions.ptr<int32_t>();
    for (int64_t t = 0; t < n; ++t)
      if (pos[t] < 0 || pos[t] >= max_pos)
        HYD_THROW(op, ": positions[", t, "] = ", pos[t], " is outside the cos/sin tables [0, ", max_pos, ")");
    cpu::rope_apply<float>(x.ptr<float>(), pos, cos.ptr<float>(), sin.ptr<float>(), n, heads, head_dim, sign);
    return;
  }
#ifdef HYD_WITH_CUDA
  // Positions are not range-checked on the device (that would need a sync): the packer guarantees
  // position < max_pos, and the model sizes the tables from the config.
  expect_dtype(x, DType::bf16, op, x_name);
  cuda::rope_apply(x.ptr<bf16>(), positions.ptr<int32_t>(), cos.ptr<float>(), sin.ptr<float>(), n, heads, head_dim,
                   sign, ctx.stream());
#else
  unsupported(op, x);
#endif
}

}  // namespace

void rope_forward(const ExecContext& ctx, const Tensor& x, const Tensor& positions, const Tensor& cos,
                  const Tensor& sin) {
  rope_dispatch(ctx, x, positions, cos, sin, +1, "rope_forward", "x");
}

void rope_backward(const ExecContext& ctx, const Tensor& dx, const Tensor& positions, const Tensor& cos,
                   const Tensor& sin) {
  rope_dispatch(ctx, dx, positions, cos, sin, -1, "rope_backward", "dx");
}

}  // namespace hyd::kernels

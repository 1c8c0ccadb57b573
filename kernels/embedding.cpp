// Tensor-level dispatch for the token embedding (see kernels/embedding.h): validates, then runs the
// CPU reference (f32) or the CUDA kernels (bf16 activations, f32 dtable).
#include "kernels/embedding.h"

#include "kernels/dispatch.h"

namespace hyd::kernels {

void embedding_forward(const ExecContext& ctx, const Tensor& ids, const Tensor& table, const Tensor& out) {
  constexpr const char* op = "embedding_forward";
  expect_shape(ids, {-1}, op, "ids");
  expect_dtype(ids, DType::i32, op, "ids");
  expect_shape(table, {-1, -1}, op, "table");
  const int64_t n = ids.shape[0], vocab = table.shape[0], dim = table.shape[1];
  expect_shape(out, {n, dim}, op, "out");
  expect_same_device(ids, table, op);
  expect_same_device(table, out, op);
  check_context(ctx, table, op);
  if (table.device.is_cpu()) {
    expect_dtype(table, DType::f32, op, "table");
    expect_dtype(out, DType::f32, op, "out");
    cpu::embedding_forward<float>(ids.ptr<int32_t>(), table.ptr<float>(), out.ptr<float>(), n, vocab, dim);
    return;
  }
#ifdef HYD_WITH_CUDA
  expect_dtype(table, DType::bf16, op, "table");
  expect_dtype(out, DType::bf16, op, "out");
  cuda::embedding_forward(ids.ptr<int32_t>(), table.ptr<bf16>(), out.ptr<bf16>(), n, dim, ctx.stream());
#else
  unsupported(op, table);
#endif
}

void embedding_backward(const ExecContext& ctx, const Tensor& ids, const Tensor& dout, const Tensor& dtable) {
  constexpr const char* op = "embedding_backward";
  expect_shape(ids, {-1}, op, "ids");
  expect_dtype(ids, DType::i32, op, "ids");
  expect_shape(dtable, {-1, -1}, op, "dtable");
  expect_dtype(dtable, DType::f32, op, "dtable");
  const int64_t n = ids.shape[0], vocab = dtable.shape[0], dim = dtable.shape[1];
  expect_shape(dout, {n, dim}, op, "dout");
  expect_same_device(ids, dout, op);
  expect_same_device(dout, dtable, op);
  check_context(ctx, dtable, op);
  if (dtable.device.is_cpu()) {
    expect_dtype(dout, DType::f32, op, "dout");
    cpu::embedding_backward<float>(ids.ptr<int32_t>(), dout.ptr<float>(), dtable.ptr<float>(), n, vocab, dim);
    return;
  }
#ifdef HYD_WITH_CUDA
  expect_dtype(dout, DType::bf16, op, "dout");
  cuda::embedding_backward(ids.ptr<int32_t>(), dout.ptr<bf16>(), dtable.ptr<float>(), n, dim, ctx.stream());
#else
  unsupported(op, dtable);
#endif
}

}  // namespace hyd::kernels

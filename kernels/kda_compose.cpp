// Tensor-level dispatch of the LASP-2 composition (kernels/kda_compose.h).
#include "kernels/kda_compose.h"

namespace hyd::kernels {

namespace {

struct ComposeDims {
  int64_t ranks, rows, dk, dv;
};

ComposeDims check(const Tensor& trans, int rank, const Tensor& out, const Tensor& work, const ExecContext& ctx,
                  const char* op) {
  expect_shape(trans, {-1, -1, -1, -1}, op, "trans");
  const int64_t P = trans.shape[0], R = trans.shape[1], dk = trans.shape[2];
  const int64_t dv = trans.shape[3] - dk;
  HYD_CHECK(dv > 0, op, ": trans's last dimension ", trans.shape[3], " must exceed dk = ", dk);
  HYD_CHECK(rank >= 0 && rank < P, op, ": rank ", rank, " outside 0..", P - 1);
  expect_shape(out, {R, dk, dv}, op, "out");
  expect_dtype(trans, DType::f32, op, "trans");
  expect_dtype(out, DType::f32, op, "out");
  expect_same_device(trans, out, op);
  HYD_CHECK(ctx.device() == trans.device, op, ": tensors on ", trans.device.str(), ", context on ", ctx.device().str());
  if (trans.device.is_cuda()) {
    expect_shape(work, {R, dk, dv}, op, "work");
    expect_dtype(work, DType::f32, op, "work");
    expect_same_device(trans, work, op);
  }
  return {P, R, dk, dv};
}

}  // namespace

void kda_compose_prefix(const ExecContext& ctx, const Tensor& trans, int rank, const Tensor& out, const Tensor& work) {
  const ComposeDims s = check(trans, rank, out, work, ctx, "kda_compose_prefix");
  if (trans.device.is_cpu()) {
    cpu::kda_compose_prefix(trans.ptr<float>(), s.ranks, s.rows, s.dk, s.dv, rank, out.ptr<float>());
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::kda_compose_prefix(ctx.cublas(), ctx.stream(), trans.ptr<float>(), s.ranks, s.rows, s.dk, s.dv, rank,
                           out.ptr<float>(), work.ptr<float>());
#else
  HYD_THROW("kda_compose_prefix: CUDA tensor in a CPU-only build");
#endif
}

void kda_compose_suffix(const ExecContext& ctx, const Tensor& trans, const Tensor& adj, int rank, const Tensor& out,
                        const Tensor& work) {
  const ComposeDims s = check(trans, rank, out, work, ctx, "kda_compose_suffix");
  expect_shape(adj, {s.ranks, s.rows, s.dk, s.dv}, "kda_compose_suffix", "adj");
  expect_dtype(adj, DType::f32, "kda_compose_suffix", "adj");
  expect_same_device(trans, adj, "kda_compose_suffix");
  if (trans.device.is_cpu()) {
    cpu::kda_compose_suffix(trans.ptr<float>(), adj.ptr<float>(), s.ranks, s.rows, s.dk, s.dv, rank, out.ptr<float>());
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::kda_compose_suffix(ctx.cublas(), ctx.stream(), trans.ptr<float>(), adj.ptr<float>(), s.ranks, s.rows, s.dk,
                           s.dv, rank, out.ptr<float>(), work.ptr<float>());
#else
  HYD_THROW("kda_compose_suffix: CUDA tensor in a CPU-only build");
#endif
}

}  // namespace hyd::kernels

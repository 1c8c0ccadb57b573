// Dispatchers for causal GQA attention (see kernels/attention.h): argument validation, then the CPU
// reference or the CUDA kernels chosen by the tensors' device. cu_seqlens contents are checked by
// the CPU implementation; on CUDA they live on the device and are trusted (the batch builder checks
// them on the host before upload).
#include "kernels/attention.h"

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

[[maybe_unused]] constexpr int64_t kCudaMaxHeadDim = 256;

struct AttentionDims {
  int64_t n_q, n_k, hq, hkv, d, num_docs;
};

// Shapes shared by forward and backward: q [N_q, Hq, d], k/v [N_k, Hkv, d], cu_seqlens_q/_k i32 [D+1],
// lse f32 [N_q, Hq]. With one boundary array for both (the overloads without cu_seqlens_k), the
// messages name it 'cu_seqlens' and N_q = N_k.
AttentionDims check_common(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                           const Tensor& lse, const char* op) {
  const bool same_cu = &cu_q == &cu_k;
  const char* cu_q_name = same_cu ? "cu_seqlens" : "cu_seqlens_q";
  expect_shape(q, {-1, -1, -1}, op, "q");
  const int64_t n_q = q.shape[0], hq = q.shape[1], d = q.shape[2];
  expect_shape(k, {same_cu ? n_q : -1, -1, d}, op, "k");
  const int64_t n_k = k.shape[0], hkv = k.shape[1];
  if (hkv == 0 || hq % hkv != 0)
    HYD_THROW(op, ": argument 'k' has ", hkv, " heads, which must divide the ", hq, " query heads of 'q'");
  expect_shape(v, {n_k, hkv, d}, op, "v");
  expect_shape(cu_q, {-1}, op, cu_q_name);
  if (cu_q.shape[0] < 1) HYD_THROW(op, ": argument '", cu_q_name, "' is empty, expected [num_docs + 1]");
  expect_dtype(cu_q, DType::i32, op, cu_q_name);
  if (!same_cu) {
    expect_shape(cu_k, {cu_q.shape[0]}, op, "cu_seqlens_k");
    expect_dtype(cu_k, DType::i32, op, "cu_seqlens_k");
  }
  expect_shape(lse, {n_q, hq}, op, "lse");
  expect_dtype(lse, DType::f32, op, "lse");
  for (const Tensor* t : {&k, &v, &cu_q, &cu_k, &lse}) expect_same_device(q, *t, op);
  return {n_q, n_k, hq, hkv, d, cu_q.shape[0] - 1};
}

void expect_activation_dtype(const Tensor& t, const char* op, const char* arg) {
  expect_dtype(t, t.device.is_cpu() ? DType::f32 : DType::bf16, op, arg);
}

void forward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
             const Tensor& cu_k, const Tensor& o, const Tensor& lse, float scale) {
  constexpr const char* op = "attention_forward";
  const AttentionDims s = check_common(q, k, v, cu_q, cu_k, lse, op);
  expect_shape(o, {s.n_q, s.hq, s.d}, op, "o");
  expect_same_device(q, o, op);
  expect_activation_dtype(q, op, "q");
  expect_activation_dtype(k, op, "k");
  expect_activation_dtype(v, op, "v");
  expect_activation_dtype(o, op, "o");
  if (q.device.is_cpu()) {
    cpu::attention_forward<float>(q.ptr<float>(), k.ptr<float>(), v.ptr<float>(), cu_q.ptr<int32_t>(),
                                  cu_k.ptr<int32_t>(), s.num_docs, o.ptr<float>(), lse.ptr<float>(), s.n_q, s.n_k, s.hq,
                                  s.hkv, s.d, scale);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (q.device.is_cuda()) {
    check_context(ctx, q, op);
    if (s.d > kCudaMaxHeadDim) HYD_THROW(op, ": argument 'q' has head dim ", s.d, ", the CUDA kernel supports <= 256");
    cuda::attention_forward(q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), cu_q.ptr<int32_t>(), cu_k.ptr<int32_t>(),
                            s.num_docs, o.ptr<bf16>(), lse.ptr<float>(), s.n_q, s.n_k, s.hq, s.hkv, s.d, scale,
                            ctx.stream());
    return;
  }
#else
  (void)ctx;
#endif
  unsupported(op, q);
}

void backward(const ExecContext& ctx, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
              const Tensor& o, const Tensor& lse, const Tensor& cu_q, const Tensor& cu_k, const Tensor& dq,
              const Tensor& dk, const Tensor& dv, float scale) {
  constexpr const char* op = "attention_backward";
  const AttentionDims s = check_common(q, k, v, cu_q, cu_k, lse, op);
  expect_shape(dout, {s.n_q, s.hq, s.d}, op, "dout");
  expect_shape(o, {s.n_q, s.hq, s.d}, op, "o");
  expect_shape(dq, {s.n_q, s.hq, s.d}, op, "dq");
  expect_shape(dk, {s.n_k, s.hkv, s.d}, op, "dk");
  expect_shape(dv, {s.n_k, s.hkv, s.d}, op, "dv");
  for (const Tensor* t : {&dout, &o, &dq, &dk, &dv}) expect_same_device(q, *t, op);
  expect_activation_dtype(dout, op, "dout");
  expect_activation_dtype(q, op, "q");
  expect_activation_dtype(k, op, "k");
  expect_activation_dtype(v, op, "v");
  expect_activation_dtype(o, op, "o");
  expect_activation_dtype(dq, op, "dq");
  expect_activation_dtype(dk, op, "dk");
  expect_activation_dtype(dv, op, "dv");
  if (q.device.is_cpu()) {
    cpu::attention_backward<float>(dout.ptr<float>(), q.ptr<float>(), k.ptr<float>(), v.ptr<float>(), o.ptr<float>(),
                                   lse.ptr<float>(), cu_q.ptr<int32_t>(), cu_k.ptr<int32_t>(), s.num_docs,
                                   dq.ptr<float>(), dk.ptr<float>(), dv.ptr<float>(), s.n_q, s.n_k, s.hq, s.hkv, s.d,
                                   scale);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (q.device.is_cuda()) {
    check_context(ctx, q, op);
    if (s.d > kCudaMaxHeadDim) HYD_THROW(op, ": argument 'q' has head dim ", s.d, ", the CUDA kernel supports <= 256");
    cuda::attention_backward(dout.ptr<bf16>(), q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), o.ptr<bf16>(),
                             lse.ptr<float>(), cu_q.ptr<int32_t>(), cu_k.ptr<int32_t>(), s.num_docs, dq.ptr<bf16>(),
                             dk.ptr<bf16>(), dv.ptr<bf16>(), s.n_q, s.n_k, s.hq, s.hkv, s.d, scale, ctx.stream());
    return;
  }
#else
  (void)ctx;
#endif
  unsupported(op, q);
}

}  // namespace

void attention_forward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& cu_seqlens, const Tensor& o, const Tensor& lse, float scale) {
  forward(ctx, q, k, v, cu_seqlens, cu_seqlens, o, lse, scale);
}

void attention_forward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, const Tensor& o, const Tensor& lse,
                       float scale) {
  forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, o, lse, scale);
}

void attention_backward(const ExecContext& ctx, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& o, const Tensor& lse, const Tensor& cu_seqlens, const Tensor& dq,
                        const Tensor& dk, const Tensor& dv, float scale) {
  backward(ctx, dout, q, k, v, o, lse, cu_seqlens, cu_seqlens, dq, dk, dv, scale);
}

void attention_backward(const ExecContext& ctx, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& o, const Tensor& lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                        const Tensor& dq, const Tensor& dk, const Tensor& dv, float scale) {
  backward(ctx, dout, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, dq, dk, dv, scale);
}

}  // namespace hyd::kernels

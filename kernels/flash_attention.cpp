// Dispatchers for the fast causal GQA attention (see kernels/flash_attention.h): argument
// validation, then the CPU reference path or the CUDA FlashAttention-2 kernels by the tensors'
// device. Boundary arrays on CUDA live on the device and are trusted (the batch builder checks them
// on the host); the CPU path checks their contents.
#include "kernels/flash_attention.h"

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

struct FlashDims {
  int64_t nq, nk, hq, hkv, d, num_docs;
};

// q [Nq, Hq, d], k/v [Nk, Hkv, d], cu_seqlens_q/k i32 [D+1], lse f32 [Nq, Hq], max lengths >= 0.
FlashDims check_common(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                       int64_t max_len_q, int64_t max_len_k, const Tensor& lse, const char* op) {
  expect_shape(q, {-1, -1, -1}, op, "q");
  const int64_t nq = q.shape[0], hq = q.shape[1], d = q.shape[2];
  expect_shape(k, {-1, -1, d}, op, "k");
  const int64_t nk = k.shape[0], hkv = k.shape[1];
  if (hkv == 0 || hq % hkv != 0)
    HYD_THROW(op, ": argument 'k' has ", hkv, " heads, which must divide the ", hq, " query heads of 'q'");
  expect_shape(v, {nk, hkv, d}, op, "v");
  expect_shape(cu_q, {-1}, op, "cu_seqlens_q");
  if (cu_q.shape[0] < 1) HYD_THROW(op, ": argument 'cu_seqlens_q' is empty, expected [num_docs + 1]");
  expect_shape(cu_k, {cu_q.shape[0]}, op, "cu_seqlens_k");
  expect_dtype(cu_q, DType::i32, op, "cu_seqlens_q");
  expect_dtype(cu_k, DType::i32, op, "cu_seqlens_k");
  if (max_len_q < 0) HYD_THROW(op, ": argument 'max_len_q' is ", max_len_q, ", expected >= 0");
  if (max_len_k < 0) HYD_THROW(op, ": argument 'max_len_k' is ", max_len_k, ", expected >= 0");
  expect_shape(lse, {nq, hq}, op, "lse");
  expect_dtype(lse, DType::f32, op, "lse");
  for (const Tensor* t : {&k, &v, &cu_q, &cu_k, &lse}) expect_same_device(q, *t, op);
  return {nq, nk, hq, hkv, d, cu_q.shape[0] - 1};
}

void expect_activation_dtype(const Tensor& t, const char* op, const char* arg) {
  expect_dtype(t, t.device.is_cpu() ? DType::f32 : DType::bf16, op, arg);
}

[[maybe_unused]] void expect_cuda_supported(const FlashDims& s, const char* op) {
  if (!flash_attention_supported(s.d, DType::bf16))
    HYD_THROW(op, ": argument 'q' has head dim ", s.d, ", the CUDA flash kernel supports 64 and 128");
}

}  // namespace

bool flash_attention_supported(int64_t head_dim, DType dtype) {
  return dtype == DType::bf16 && (head_dim == 64 || head_dim == 128);
}

void flash_attention_forward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_len_q,
                             int64_t max_len_k, const Tensor& o, const Tensor& lse, float scale) {
  constexpr const char* op = "flash_attention_forward";
  const FlashDims s = check_common(q, k, v, cu_seqlens_q, cu_seqlens_k, max_len_q, max_len_k, lse, op);
  expect_shape(o, {s.nq, s.hq, s.d}, op, "o");
  expect_same_device(q, o, op);
  expect_activation_dtype(q, op, "q");
  expect_activation_dtype(k, op, "k");
  expect_activation_dtype(v, op, "v");
  expect_activation_dtype(o, op, "o");
  if (q.device.is_cpu()) {
    cpu::flash_attention_forward<float>(q.ptr<float>(), k.ptr<float>(), v.ptr<float>(), cu_seqlens_q.ptr<int32_t>(),
                                        cu_seqlens_k.ptr<int32_t>(), s.num_docs, o.ptr<float>(), lse.ptr<float>(), s.nq,
                                        s.nk, s.hq, s.hkv, s.d, scale);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (q.device.is_cuda()) {
    check_context(ctx, q, op);
    expect_cuda_supported(s, op);
    cuda::flash_attention_forward(q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), cu_seqlens_q.ptr<int32_t>(),
                                  cu_seqlens_k.ptr<int32_t>(), s.num_docs, max_len_q, max_len_k, o.ptr<bf16>(),
                                  lse.ptr<float>(), s.nq, s.nk, s.hq, s.hkv, s.d, scale, ctx.stream());
    return;
  }
#endif
  unsupported(op, q);
}

void flash_attention_backward(const ExecContext& ctx, const Tensor& dout, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Tensor& o, const Tensor& lse, const Tensor& cu_seqlens_q,
                              const Tensor& cu_seqlens_k, int64_t max_len_q, int64_t max_len_k, const Tensor& dq,
                              const Tensor& dk, const Tensor& dv, float scale) {
  constexpr const char* op = "flash_attention_backward";
  const FlashDims s = check_common(q, k, v, cu_seqlens_q, cu_seqlens_k, max_len_q, max_len_k, lse, op);
  expect_shape(dout, {s.nq, s.hq, s.d}, op, "dout");
  expect_shape(o, {s.nq, s.hq, s.d}, op, "o");
  expect_shape(dq, {s.nq, s.hq, s.d}, op, "dq");
  expect_shape(dk, {s.nk, s.hkv, s.d}, op, "dk");
  expect_shape(dv, {s.nk, s.hkv, s.d}, op, "dv");
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
    cpu::flash_attention_backward<float>(dout.ptr<float>(), q.ptr<float>(), k.ptr<float>(), v.ptr<float>(),
                                         o.ptr<float>(), lse.ptr<float>(), cu_seqlens_q.ptr<int32_t>(),
                                         cu_seqlens_k.ptr<int32_t>(), s.num_docs, dq.ptr<float>(), dk.ptr<float>(),
                                         dv.ptr<float>(), s.nq, s.nk, s.hq, s.hkv, s.d, scale);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (q.device.is_cuda()) {
    check_context(ctx, q, op);
    expect_cuda_supported(s, op);
    cuda::flash_attention_backward(dout.ptr<bf16>(), q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), o.ptr<bf16>(),
                                   lse.ptr<float>(), cu_seqlens_q.ptr<int32_t>(), cu_seqlens_k.ptr<int32_t>(),
                                   s.num_docs, max_len_q, max_len_k, dq.ptr<bf16>(), dk.ptr<bf16>(), dv.ptr<bf16>(),
                                   s.nq, s.nk, s.hq, s.hkv, s.d, scale, ctx.stream());
    return;
  }
#endif
  unsupported(op, q);
}

}  // namespace hyd::kernels

// Dispatchers for causal GQA attention (see kernels/attention.h): one argument validation for forward
// and backward, then the CPU reference, or on CUDA the FlashAttention-2 kernels
// (kernels/flash_attention.h) for the head dims they support and the simple kernels for the others.
// On the CPU the boundary arrays and the max-length bounds are checked here, naming the op; on CUDA
// they live on the device and are trusted (the batch builder checks them on the host before upload).
#include "kernels/attention.h"

#include "kernels/dispatch.h"
#include "kernels/flash_attention.h"

namespace hyd::kernels {

namespace {

[[maybe_unused]] constexpr int64_t kCudaMaxHeadDim = 256;

struct AttentionDims {
  int64_t n_q, n_k, hq, hkv, d, num_docs;
};

// One boundary array and its length bound, with the names errors give them.
struct Boundaries {
  const Tensor& cu;
  int64_t max_len;
  int64_t rows;  // N_q or N_k: the last boundary
  const char* cu_name;
  const char* max_name;
  const char* what;  // "queries" / "keys" / "tokens"
};

// CPU only: the array's contents, and every document's length against the bound.
void check_host_boundaries(const Boundaries& b, int64_t num_docs, const char* op) {
  const int32_t* cu = b.cu.ptr<int32_t>();
  cpu::check_cu_seqlens(cu, num_docs, b.rows, op, b.cu_name);
  for (int64_t doc = 0; doc < num_docs; ++doc)
    if (cu[doc + 1] - cu[doc] > b.max_len)
      HYD_THROW(op, ": argument '", b.max_name, "' is ", b.max_len, " but document ", doc, " has ",
                cu[doc + 1] - cu[doc], " ", b.what, " ('", b.cu_name, "')");
}

// Shapes shared by forward and backward: q [N_q, Hq, d], k/v [N_k, Hkv, d], cu_seqlens_q/_k i32 [D+1],
// max lengths >= 0, lse f32 [N_q, Hq], activations f32 (CPU) / bf16 (CUDA). With one boundary array for
// both (the overloads without cu_seqlens_k pass the same Tensor twice), the messages name it
// 'cu_seqlens' / 'max_len' and N_q = N_k.
AttentionDims check_common(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                           int64_t max_len_q, int64_t max_len_k, const Tensor& lse, const char* op) {
  const bool same_cu = &cu_q == &cu_k;
  expect_shape(q, {-1, -1, -1}, op, "q");
  const int64_t n_q = q.shape[0], hq = q.shape[1], d = q.shape[2];
  expect_shape(k, {same_cu ? n_q : -1, -1, d}, op, "k");
  const int64_t n_k = k.shape[0], hkv = k.shape[1];
  if (hkv == 0 || hq % hkv != 0)
    HYD_THROW(op, ": argument 'k' has ", hkv, " heads, which must divide the ", hq, " query heads of 'q'");
  expect_shape(v, {n_k, hkv, d}, op, "v");
  const Boundaries bq{cu_q,
                      max_len_q,
                      n_q,
                      same_cu ? "cu_seqlens" : "cu_seqlens_q",
                      same_cu ? "max_len" : "max_len_q",
                      same_cu ? "tokens" : "queries"};
  const Boundaries bk{cu_k, max_len_k, n_k, "cu_seqlens_k", "max_len_k", "keys"};
  expect_shape(cu_q, {-1}, op, bq.cu_name);
  if (cu_q.shape[0] < 1) HYD_THROW(op, ": argument '", bq.cu_name, "' is empty, expected [num_docs + 1]");
  expect_dtype(cu_q, DType::i32, op, bq.cu_name);
  if (!same_cu) {
    expect_shape(cu_k, {cu_q.shape[0]}, op, bk.cu_name);
    expect_dtype(cu_k, DType::i32, op, bk.cu_name);
  }
  for (const Boundaries* b : {&bq, &bk})
    if (b->max_len < 0) HYD_THROW(op, ": argument '", b->max_name, "' is ", b->max_len, ", expected >= 0");
  expect_shape(lse, {n_q, hq}, op, "lse");
  expect_dtype(lse, DType::f32, op, "lse");
  for (const Tensor* t : {&k, &v, &cu_q, &cu_k, &lse}) expect_same_device(q, *t, op);
  const DType act = q.device.is_cpu() ? DType::f32 : DType::bf16;
  expect_dtype(q, act, op, "q");
  expect_dtype(k, act, op, "k");
  expect_dtype(v, act, op, "v");
  const int64_t num_docs = cu_q.shape[0] - 1;
  if (q.device.is_cpu()) {
    check_host_boundaries(bq, num_docs, op);
    if (!same_cu) check_host_boundaries(bk, num_docs, op);
  }
  return {n_q, n_k, hq, hkv, d, num_docs};
}

// The query-shaped and key-shaped outputs / gradients: shape, device and activation dtype.
void expect_rows(const Tensor& t, int64_t rows, int64_t heads, int64_t d, const Tensor& q, const char* op,
                 const char* arg) {
  expect_shape(t, {rows, heads, d}, op, arg);
  expect_same_device(q, t, op);
  expect_dtype(t, q.device.is_cpu() ? DType::f32 : DType::bf16, op, arg);
}

[[maybe_unused]] void expect_cuda_head_dim(const AttentionDims& s, const char* op) {
  if (s.d > kCudaMaxHeadDim) HYD_THROW(op, ": argument 'q' has head dim ", s.d, ", the CUDA kernel supports <= 256");
}

void forward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
             const Tensor& cu_k, int64_t max_len_q, int64_t max_len_k, const Tensor& o, const Tensor& lse,
             float scale) {
  constexpr const char* op = "attention_forward";
  const AttentionDims s = check_common(q, k, v, cu_q, cu_k, max_len_q, max_len_k, lse, op);
  expect_rows(o, s.n_q, s.hq, s.d, q, op, "o");
  if (q.device.is_cpu()) {
    cpu::attention_forward<float>(q.ptr<float>(), k.ptr<float>(), v.ptr<float>(), cu_q.ptr<int32_t>(),
                                  cu_k.ptr<int32_t>(), s.num_docs, o.ptr<float>(), lse.ptr<float>(), s.n_q, s.n_k, s.hq,
                                  s.hkv, s.d, scale);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (q.device.is_cuda()) {
    check_context(ctx, q, op);
    expect_cuda_head_dim(s, op);
    if (flash_attention_supported(s.d, q.dtype))
      cuda::flash_attention_forward(q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), cu_q.ptr<int32_t>(),
                                    cu_k.ptr<int32_t>(), s.num_docs, max_len_q, max_len_k, o.ptr<bf16>(),
                                    lse.ptr<float>(), s.n_q, s.n_k, s.hq, s.hkv, s.d, scale, ctx.stream());
    else
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
              const Tensor& o, const Tensor& lse, const Tensor& cu_q, const Tensor& cu_k, int64_t max_len_q,
              int64_t max_len_k, const Tensor& dq, const Tensor& dk, const Tensor& dv, float scale) {
  constexpr const char* op = "attention_backward";
  const AttentionDims s = check_common(q, k, v, cu_q, cu_k, max_len_q, max_len_k, lse, op);
  expect_rows(dout, s.n_q, s.hq, s.d, q, op, "dout");
  expect_rows(o, s.n_q, s.hq, s.d, q, op, "o");
  expect_rows(dq, s.n_q, s.hq, s.d, q, op, "dq");
  expect_rows(dk, s.n_k, s.hkv, s.d, q, op, "dk");
  expect_rows(dv, s.n_k, s.hkv, s.d, q, op, "dv");
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
    expect_cuda_head_dim(s, op);
    if (flash_attention_supported(s.d, q.dtype))
      cuda::flash_attention_backward(dout.ptr<bf16>(), q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), o.ptr<bf16>(),
                                     lse.ptr<float>(), cu_q.ptr<int32_t>(), cu_k.ptr<int32_t>(), s.num_docs, max_len_q,
                                     max_len_k, dq.ptr<bf16>(), dk.ptr<bf16>(), dv.ptr<bf16>(), s.n_q, s.n_k, s.hq,
                                     s.hkv, s.d, scale, ctx.stream());
    else
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
                       const Tensor& cu_seqlens, int64_t max_len, const Tensor& o, const Tensor& lse, float scale) {
  forward(ctx, q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, o, lse, scale);
}

void attention_forward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_len_q, int64_t max_len_k,
                       const Tensor& o, const Tensor& lse, float scale) {
  forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_len_q, max_len_k, o, lse, scale);
}

void attention_backward(const ExecContext& ctx, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& o, const Tensor& lse, const Tensor& cu_seqlens, int64_t max_len, const Tensor& dq,
                        const Tensor& dk, const Tensor& dv, float scale) {
  backward(ctx, dout, q, k, v, o, lse, cu_seqlens, cu_seqlens, max_len, max_len, dq, dk, dv, scale);
}

void attention_backward(const ExecContext& ctx, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& o, const Tensor& lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                        int64_t max_len_q, int64_t max_len_k, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                        float scale) {
  backward(ctx, dout, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_len_q, max_len_k, dq, dk, dv, scale);
}

}  // namespace hyd::kernels

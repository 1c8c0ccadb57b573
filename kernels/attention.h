// Causal grouped-query softmax attention with document masking and an optional query offset. Query
// head h reads key/value head h / (Hq / Hkv).
// Tokens of a packed batch are laid out by document. Document d's queries are q rows
// [cu_q[d], cu_q[d+1]) and its keys/values are k/v rows [cu_k[d], cu_k[d+1]) (the FlashAttention
// varlen convention); with len_q = cu_q[d+1] - cu_q[d] and len_k = cu_k[d+1] - cu_k[d], query i
// (0-based inside its document) attends keys j (0-based) with
//   j <= i + (len_k - len_q)          (causal, queries aligned with the end of the key range).
// cu_q == cu_k is the ordinary causal document mask (token i attends j <= i of its own document);
// the overloads without cu_seqlens_k are that case. LASP-2H passes, for a query slice, q = document
// ∩ slice and k = document ∩ [sequence start, slice end).
//   s_ij = scale * <q_i, k_j>,  lse_i = log sum_j exp(s_ij),  o_i = sum_j exp(s_ij - lse_i) v_j
// A query that sees no key (len_q > len_k, i < len_q - len_k) has o_i = 0, lse_i = -inf and zero
// gradients; nothing is NaN.
// backward (P = softmax, D_i = <do_i, o_i>):
//   dv_j = sum_i P_ij do_i,  dS_ij = P_ij (<do_i, v_j> - D_i),  dq_i = scale sum_j dS_ij k_j,
//   dk_j = scale sum_i dS_ij q_i   (summed over the query heads that share a kv head)
// Shapes: q/o/dq/do [N_q, Hq, d]; k/v/dk/dv [N_k, Hkv, d]; cu_seqlens_q/_k i32 [D+1] on the tensors'
// device (cu[0] = 0, non-decreasing, cu_q[D] = N_q, cu_k[D] = N_k); lse f32 [N_q, Hq].
// max_len_q / max_len_k (max_len with one boundary array): host-side upper bounds of the per-document
// query / key counts. They size the CUDA flash kernels' grids, whose blocks cover max_len rows of
// every document, so a bound that is too small would leave rows unwritten: the CPU path checks them
// against the boundary arrays; on CUDA the arrays live on the device and are trusted (the batch
// builder computes both on the host).
// dtypes: CPU f32 (the reference, plain loops in double); CUDA bf16 (math and lse in f32). CUDA
// kernels: head dims 64 and 128 run the FlashAttention-2 kernels of kernels/flash_attention.h; other
// head dims up to 256 the simple kernels declared below (one block per query row, then per key row).
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

// Same boundaries for queries and keys (N_q = N_k); max_len bounds every document's length.
void attention_forward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& cu_seqlens, int64_t max_len, const Tensor& o, const Tensor& lse, float scale);
void attention_backward(const ExecContext& ctx, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& o, const Tensor& lse, const Tensor& cu_seqlens, int64_t max_len, const Tensor& dq,
                        const Tensor& dk, const Tensor& dv, float scale);
// Separate query and key boundaries (query offset).
void attention_forward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_len_q, int64_t max_len_k,
                       const Tensor& o, const Tensor& lse, float scale);
void attention_backward(const ExecContext& ctx, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& o, const Tensor& lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                        int64_t max_len_q, int64_t max_len_k, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                        float scale);

namespace cpu {
// Checks a host boundary array: cu[0] = 0, non-decreasing, cu[num_docs] = n. Errors name op and arg.
void check_cu_seqlens(const int32_t* cu, int64_t num_docs, int64_t n, const char* op, const char* arg);

template <class T>
void attention_forward(const T* q, const T* k, const T* v, const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
                       int64_t num_docs, T* o, T* lse, int64_t n_q, int64_t n_k, int64_t hq, int64_t hkv, int64_t d,
                       double scale);
template <class T>
void attention_backward(const T* dout, const T* q, const T* k, const T* v, const T* o, const T* lse,
                        const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, int64_t num_docs, T* dq, T* dk, T* dv,
                        int64_t n_q, int64_t n_k, int64_t hq, int64_t hkv, int64_t d, double scale);

// Same boundaries for queries and keys.
template <class T>
void attention_forward(const T* q, const T* k, const T* v, const int32_t* cu_seqlens, int64_t num_docs, T* o, T* lse,
                       int64_t n, int64_t hq, int64_t hkv, int64_t d, double scale) {
  attention_forward<T>(q, k, v, cu_seqlens, cu_seqlens, num_docs, o, lse, n, n, hq, hkv, d, scale);
}
template <class T>
void attention_backward(const T* dout, const T* q, const T* k, const T* v, const T* o, const T* lse,
                        const int32_t* cu_seqlens, int64_t num_docs, T* dq, T* dk, T* dv, int64_t n, int64_t hq,
                        int64_t hkv, int64_t d, double scale) {
  attention_backward<T>(dout, q, k, v, o, lse, cu_seqlens, cu_seqlens, num_docs, dq, dk, dv, n, n, hq, hkv, d, scale);
}
}  // namespace cpu

namespace cuda {
// The simple kernels (any d <= 256). The delta scratch f32 [N_q, Hq] of backward comes from
// cudaMallocAsync on `stream` and is freed on it.
void attention_forward(const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_seqlens_q,
                       const int32_t* cu_seqlens_k, int64_t num_docs, bf16* o, float* lse, int64_t n_q, int64_t n_k,
                       int64_t hq, int64_t hkv, int64_t d, float scale, void* stream);
void attention_backward(const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const bf16* o, const float* lse,
                        const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, int64_t num_docs, bf16* dq, bf16* dk,
                        bf16* dv, int64_t n_q, int64_t n_k, int64_t hq, int64_t hkv, int64_t d, float scale,
                        void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

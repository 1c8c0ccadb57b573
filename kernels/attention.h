// Causal grouped-query softmax attention with document masking: the simple, correct version and
// the reference for the fast kernel. Query head h reads key/value head h / (Hq / Hkv).
// Tokens of a packed batch are laid out [N = sum of document lengths]; document d holds tokens
// [cu_seqlens[d], cu_seqlens[d+1]). Token i attends to tokens j of its own document with j <= i.
//   s_ij = scale * <q_i, k_j>,  lse_i = log sum_j exp(s_ij),  o_i = sum_j exp(s_ij - lse_i) v_j
// backward (P = softmax, D_i = <do_i, o_i>):
//   dv_j = sum_i P_ij do_i,  dS_ij = P_ij (<do_i, v_j> - D_i),  dq_i = scale sum_j dS_ij k_j,
//   dk_j = scale sum_i dS_ij q_i   (summed over the query heads that share a kv head)
// Shapes: q/o/dq/do [N, Hq, d]; k/v/dk/dv [N, Hkv, d]; cu_seqlens i32 [D+1] on the tensors' device
// (cu_seqlens[0] = 0, cu_seqlens[D] = N); lse f32 [N, Hq]. dtypes: CPU f32; CUDA bf16 (math in f32).
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void attention_forward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& cu_seqlens, const Tensor& o, const Tensor& lse, float scale);
void attention_backward(const ExecContext& ctx, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& o, const Tensor& lse, const Tensor& cu_seqlens, const Tensor& dq,
                        const Tensor& dk, const Tensor& dv, float scale);

namespace cpu {
template <class T>
void attention_forward(const T* q, const T* k, const T* v, const int32_t* cu_seqlens, int64_t num_docs, T* o, T* lse,
                       int64_t n, int64_t hq, int64_t hkv, int64_t d, double scale);
template <class T>
void attention_backward(const T* dout, const T* q, const T* k, const T* v, const T* o, const T* lse,
                        const int32_t* cu_seqlens, int64_t num_docs, T* dq, T* dk, T* dv, int64_t n, int64_t hq,
                        int64_t hkv, int64_t d, double scale);
}  // namespace cpu

namespace cuda {
void attention_forward(const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_seqlens, int64_t num_docs,
                       bf16* o, float* lse, int64_t n, int64_t hq, int64_t hkv, int64_t d, float scale, void* stream);
void attention_backward(const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const bf16* o, const float* lse,
                        const int32_t* cu_seqlens, int64_t num_docs, bf16* dq, bf16* dk, bf16* dv, int64_t n,
                        int64_t hq, int64_t hkv, int64_t d, float scale, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

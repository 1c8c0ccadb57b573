// Fast causal grouped-query softmax attention over a packed varlen batch (FlashAttention-2 style on
// CUDA; the CPU path is the reference of kernels/attention.h). Query head h reads key/value head
// h / (Hq / Hkv).
//
// Documents and query offsets (FlashAttention varlen convention): document d's queries are q rows
// [cu_q[d], cu_q[d+1]) and its keys are k/v rows [cu_k[d], cu_k[d+1]). With len_q and len_k its two
// lengths, query i (0-based inside the document) attends keys j (0-based) with
//   j <= i + (len_k - len_q)        (causal, aligned at the end)
// so cu_q == cu_k is the ordinary causal document mask. A query that sees no key (len_q > len_k)
// outputs o = 0, lse = -inf and gets zero gradients; nothing is NaN.
//   s_ij = scale <q_i, k_j>,  lse_i = log sum_j exp(s_ij),  o_i = sum_j exp(s_ij - lse_i) v_j
// backward (P = softmax, D_i = <do_i, o_i>):
//   dv_j = sum_i P_ij do_i,  dS_ij = P_ij (<do_i, v_j> - D_i),  dq_i = scale sum_j dS_ij k_j,
//   dk_j = scale sum_i dS_ij q_i   (summed over the query heads that share a kv head)
// Shapes: q/o/dq/dout [Nq, Hq, d]; k/v/dk/dv [Nk, Hkv, d]; lse f32 [Nq, Hq]; cu_seqlens_q/k i32
// [D+1] on the tensors' device (start at 0, non-decreasing, end at Nq / Nk). max_len_q / max_len_k
// are host-side upper bounds of the per-document lengths (they size the CUDA grid; a bound that is
// too small leaves rows unwritten). dtypes: CPU f32 (the reference, any d); CUDA bf16 with d 64 or
// 128 (flash_attention_supported), math and statistics in f32.
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

// True when the fast kernel handles this head dim and activation dtype on CUDA (bf16, d 64 or 128).
bool flash_attention_supported(int64_t head_dim, DType dtype);

void flash_attention_forward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_len_q,
                             int64_t max_len_k, const Tensor& o, const Tensor& lse, float scale);
void flash_attention_backward(const ExecContext& ctx, const Tensor& dout, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Tensor& o, const Tensor& lse, const Tensor& cu_seqlens_q,
                              const Tensor& cu_seqlens_k, int64_t max_len_q, int64_t max_len_k, const Tensor& dq,
                              const Tensor& dk, const Tensor& dv, float scale);

namespace cpu {
// The reference (cpu::attention_forward/backward with separate query and key boundaries) on host
// arrays, after checking the boundary arrays.
template <class T>
void flash_attention_forward(const T* q, const T* k, const T* v, const int32_t* cu_q, const int32_t* cu_k,
                             int64_t num_docs, T* o, T* lse, int64_t nq, int64_t nk, int64_t hq, int64_t hkv,
                             int64_t d, double scale);
template <class T>
void flash_attention_backward(const T* dout, const T* q, const T* k, const T* v, const T* o, const T* lse,
                              const int32_t* cu_q, const int32_t* cu_k, int64_t num_docs, T* dq, T* dk, T* dv,
                              int64_t nq, int64_t nk, int64_t hq, int64_t hkv, int64_t d, double scale);
}  // namespace cpu

namespace cuda {
// d must be 64 or 128. Scratch (dq accumulator f32 [Nq, Hq, d], D and lse*log2(e) f32 [Hq, Nq]) comes
// from cudaMallocAsync on `stream` and is freed on it.
void flash_attention_forward(const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_q, const int32_t* cu_k,
                             int64_t num_docs, int64_t max_len_q, int64_t max_len_k, bf16* o, float* lse, int64_t nq,
                             int64_t nk, int64_t hq, int64_t hkv, int64_t d, float scale, void* stream);
void flash_attention_backward(const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const bf16* o,
                              const float* lse, const int32_t* cu_q, const int32_t* cu_k, int64_t num_docs,
                              int64_t max_len_q, int64_t max_len_k, bf16* dq, bf16* dk, bf16* dv, int64_t nq,
                              int64_t nk, int64_t hq, int64_t hkv, int64_t d, float scale, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

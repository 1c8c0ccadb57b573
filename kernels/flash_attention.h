// FlashAttention-2 style CUDA kernels for causal GQA attention over a packed varlen batch: the fast
// path behind the attention op of kernels/attention.h, which defines the math, the masks (documents,
// end-aligned query offsets, fully masked rows), the shapes and the CPU reference, validates the
// arguments and runs these kernels on CUDA whenever flash_attention_supported() says they apply
// (the simple kernels of kernels/attention.h otherwise).
// max_len_q / max_len_k are host-side upper bounds of the per-document query / key counts: the
// forward grid covers ceil(max_len_q / query tile) tiles of every document and head, the backward
// grid ceil(max_len_k / key tile) tiles of every document and kv head, so a bound that is too small
// leaves rows unwritten (and a loose one launches blocks that exit at once).
// dtypes: bf16 q/k/v/o/dout/dq/dk/dv, f32 lse [Nq, Hq] (natural log, the layout of kernels/attention.h),
// math and softmax statistics in f32.
#pragma once

#include <cstdint>

#include "trainer/core/tensor.h"

namespace hyd::kernels {

// True when the flash kernels handle this head dim and activation dtype (bf16, d 64 or 128).
inline bool flash_attention_supported(int64_t head_dim, DType dtype) {
  return dtype == DType::bf16 && (head_dim == 64 || head_dim == 128);
}

namespace cuda {
// d must be 64 or 128. Backward scratch (dq accumulator f32 [Nq, Hq, d], D and lse*log2(e) f32
// [Hq, Nq]) comes from cudaMallocAsync on `stream` and is freed on it.
void flash_attention_forward(const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_q, const int32_t* cu_k,
                             int64_t num_docs, int64_t max_len_q, int64_t max_len_k, bf16* o, float* lse, int64_t nq,
                             int64_t nk, int64_t hq, int64_t hkv, int64_t d, float scale, void* stream);
void flash_attention_backward(const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const bf16* o,
                              const float* lse, const int32_t* cu_q, const int32_t* cu_k, int64_t num_docs,
                              int64_t max_len_q, int64_t max_len_k, bf16* dq, bf16* dk, bf16* dv, int64_t nq,
                              int64_t nk, int64_t hq, int64_t hkv, int64_t d, float scale, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

// The flash attention forward on Hopper's warpgroup MMA (kernels/cuda/sm90a/flash_wgmma.cu; HYD_WITH_WGMMA builds
// only), head dim 128: the arguments and results of kernels/flash_attention.h's flash_attention_forward (nq / nk:
// the rows of q / k and v, which the TMA descriptors bound). scale must be positive.
#pragma once

#include <cstdint>

#include "trainer/core/dtype.h"

namespace hyd::kernels::cuda {

// True when the current device can run these kernels: they are built for sm_90a alone, whose code runs on compute
// capability 9.0 only (a build for architecture 90 otherwise runs elsewhere through its compute_90 PTX, which
// these kernels do not have).
bool wgmma_runs_here();

void flash_forward_wgmma(const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_q, const int32_t* cu_k,
                         int64_t num_docs, int64_t max_len_q, int64_t max_len_k, bf16* o, float* lse, int64_t nq,
                         int64_t nk, int64_t hq, int64_t hkv, float scale, void* stream);

// The main pass of the backward, head dim 128 (kernels/cuda/flash_attention.cu runs the preprocess before it and
// the dq conversion after it): dsum / lse2 [Hq, Nq] from the preprocess, dq_acc the zeroed f32 [Nq, Hq, 128]
// accumulator (unscaled dS K is added), dk = scale dS^T Q and dv written; q_bytes_per_group sizes the block order's
// packs (flash_order.cuh). scale must be positive.
void flash_backward_wgmma(const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* dsum,
                          const float* lse2, const int32_t* cu_q, const int32_t* cu_k, int64_t num_docs,
                          int64_t max_len_k, float* dq_acc, bf16* dk, bf16* dv, int64_t nq, int64_t nk, int64_t hq,
                          int64_t hkv, int64_t q_bytes_per_group, float scale, void* stream);

}  // namespace hyd::kernels::cuda

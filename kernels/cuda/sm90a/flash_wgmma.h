// The flash attention forward on Hopper's warpgroup MMA (kernels/cuda/sm90a/flash_wgmma.cu; HYD_WITH_WGMMA builds
// only), head dim 128: the arguments and results of kernels/flash_attention.h's flash_attention_forward (nq / nk:
// the rows of q / k and v). version 1: one or two warpgroups loading K / V with cp.async; 2: two consumer
// warpgroups fed by a TMA producer warp, the next tile's Q K^T overlapping this tile's softmax.
#pragma once

#include <cstdint>

#include "trainer/core/dtype.h"

namespace hyd::kernels::cuda {

void flash_forward_wgmma(const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_q, const int32_t* cu_k,
                         int64_t num_docs, int64_t max_len_q, int64_t max_len_k, bf16* o, float* lse, int64_t nq,
                         int64_t nk, int64_t hq, int64_t hkv, float scale, int version, void* stream);

}  // namespace hyd::kernels::cuda

// The flash attention forward on Hopper's warpgroup MMA (kernels/cuda/sm90a/flash_wgmma.cu; HYD_WITH_WGMMA builds
// only), head dim 128: the arguments and results of kernels/flash_attention.h's flash_attention_forward (nq / nk:
// the rows of q / k and v, which the TMA descriptors bound). scale must be positive.
#pragma once

#include <cstdint>

#include "trainer/core/dtype.h"

namespace hyd::kernels::cuda {

void flash_forward_wgmma(const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_q, const int32_t* cu_k,
                         int64_t num_docs, int64_t max_len_q, int64_t max_len_k, bf16* o, float* lse, int64_t nq,
                         int64_t nk, int64_t hq, int64_t hkv, float scale, void* stream);

}  // namespace hyd::kernels::cuda

// A check of the Hopper wgmma building blocks that a wgmma flash-attention forward would use (kernels/cuda/sm90a/
// wgmma.cuh): the 128-byte-swizzled tile layout, K-major and MN-major shared-memory descriptors, fp32 accumulators
// and their reuse as bf16 A fragments. Built only for Hopper (HYD_WITH_WGMMA: CUDA builds whose HYD_CUDA_ARCH
// is 90). One warpgroup computes, for q, k, v bf16 [64][128] (rows x head dim; k and v rows are keys):
//   s = q k^T (fp32 [64][64], unscaled, the SS product over 8 k16 steps),
//   o = bf16(s) v (fp32 [64][128], the RS product with v read transposed, 4 k16 steps over the keys).
#pragma once

#include "trainer/core/dtype.h"

namespace hyd::kernels::cuda {

void wgmma_probe(const bf16* q, const bf16* k, const bf16* v, float* s, float* o, void* stream);

}  // namespace hyd::kernels::cuda

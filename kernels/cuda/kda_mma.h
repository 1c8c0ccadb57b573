// Tensor-core KDA kernels (version 2 of the CUDA KDA core; kernels/cuda/kda_mma.cu). Internal to
// kernels/cuda/kda.cu, which falls back to the version-1 block programs (kernels/cuda/kda_chunk.cuh)
// where these do not apply.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/kda.h"

namespace hyd::kernels::cuda::kda_mma {

// dk and dv in {64, 128}.
bool supports(const KdaDims& s);

// Bytes of scratch the forward needs (16-byte aligned pieces), beside the chunk table.
size_t forward_scratch_bytes(const KdaDims& s);

// Forward: o and final_state (may be null) of kernels/kda.h. chunk_off is the chunk table of
// cu_seqlens (kda_chunk::ChunkTableProgram), already computed on `stream`.
void forward(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
             const int32_t* cu_seqlens, const int32_t* chunk_off, const float* initial_state, bf16* o,
             float* final_state, void* scratch, cudaStream_t stream);

}  // namespace hyd::kernels::cuda::kda_mma

// Global gradient norm and clipping.
//   sum_squares_accumulate: out[0] += sum_i g[i]^2        (g f32 [n], out f32 [1], same device)
//   clip_scale(norm, max_norm) = max_norm / (norm + 1e-6) when norm > max_norm > 0, else 1; the
//   factor is passed to adamw_update as grad_scale, so gradients are never rewritten.
// The sum is taken in fp64 on the CPU and in fp32 with a per-block tree on CUDA.
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void sum_squares_accumulate(const ExecContext& ctx, const Tensor& grad, const Tensor& out);
float clip_scale(double norm, double max_norm);

namespace cpu {
template <class T>
void sum_squares_accumulate(const T* g, int64_t n, T* out);
}  // namespace cpu

namespace cuda {
void sum_squares_accumulate(const float* g, int64_t n, float* out, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

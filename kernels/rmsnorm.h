// RMSNorm over the last dimension.
//   rstd[r] = 1 / sqrt(mean_j x[r,j]^2 + eps)
//   y[r,j]  = x[r,j] * rstd[r] * w[j]
// backward (with g = dy * w):
//   dx[r,j] = rstd[r] * (g[r,j] - x[r,j] * rstd[r]^2 * mean_k(g[r,k] x[r,k]))
//   dw[j]  += sum_r dy[r,j] * x[r,j] * rstd[r]
// Per-head norm (Qwen3 q/k norm) is the same op on x viewed as [tokens * heads, head_dim].
// Shapes: x, y, dy, dx [rows, dim]; w [dim]; rstd f32 [rows]; dw f32 [dim] (accumulated into).
// backward with `residual` [rows, dim] (same dtype; may be dx itself, not dy): dx = the above + residual,
// the pre-norm block's residual gradient added in the same pass (CUDA: rounded to bf16 once).
// dtypes: CPU all f32; CUDA x/y/dy/dx/w bf16, statistics and dw f32.
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void rmsnorm_forward(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& y, const Tensor& rstd,
                     float eps);
void rmsnorm_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      const Tensor& dx, const Tensor& dw, const Tensor& residual = Tensor{});

namespace cpu {
template <class T>
void rmsnorm_forward(const T* x, const T* w, T* y, T* rstd, int64_t rows, int64_t dim, double eps);
template <class T>
void rmsnorm_backward(const T* dy, const T* x, const T* w, const T* rstd, T* dx, T* dw, int64_t rows, int64_t dim);
}  // namespace cpu

namespace cuda {
void rmsnorm_forward(const bf16* x, const bf16* w, bf16* y, float* rstd, int64_t rows, int64_t dim, float eps,
                     void* stream);
// residual: nullptr or [rows, dim] added to dx (may equal dx).
void rmsnorm_backward(const bf16* dy, const bf16* x, const bf16* w, const float* rstd, bf16* dx, float* dw,
                      int64_t rows, int64_t dim, void* stream, const bf16* residual = nullptr);
}  // namespace cuda

}  // namespace hyd::kernels

// L2 normalisation over the last dimension, with an output scale (the KDA layer's q/k norm: FLA's
// l2norm_fwd with eps = 1e-6 added to the sum of squares inside the square root, then q scaled by
// d_k^-1/2 as chunk_kda's default scale does; k uses scale 1).
//   rstd[r] = 1 / sqrt(sum_j x[r,j]^2 + eps)
//   y[r,j]  = scale * x[r,j] * rstd[r]
// Backward from the output (x is not needed: with yh = y / scale = x rstd),
//   dx[r,j] = rstd[r] * (scale * dy[r,j] - (sum_k y[r,k] dy[r,k]) * y[r,j] / scale)
//           = scale rstd (dy - (yh . dy) yh)                      (exact, eps included)
// Per-head norm is the op on x viewed as [tokens * heads, head_dim].
// Shapes: x, y, dy, dx [rows, dim]; rstd [rows] (f32, or f64 on the f64 CPU path). y may be the same
// tensor as x, and dx the same tensor as dy (each row is read completely before it is written).
// dtypes: CPU f32 or f64 throughout. CUDA: x, y, dy, dx bf16; rstd f32; f32 math.
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

constexpr float kL2NormEps = 1e-6f;

void l2norm_forward(const ExecContext& ctx, const Tensor& x, const Tensor& y, const Tensor& rstd, float scale,
                    float eps = kL2NormEps);
void l2norm_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& y, const Tensor& rstd, const Tensor& dx,
                     float scale);

namespace cpu {
template <class T>
void l2norm_forward(const T* x, T* y, T* rstd, int64_t rows, int64_t dim, double scale, double eps);
template <class T>
void l2norm_backward(const T* dy, const T* y, const T* rstd, T* dx, int64_t rows, int64_t dim, double scale);
}  // namespace cpu

namespace cuda {
void l2norm_forward(const bf16* x, bf16* y, float* rstd, int64_t rows, int64_t dim, float scale, float eps,
                    void* stream);
void l2norm_backward(const bf16* dy, const bf16* y, const float* rstd, bf16* dx, int64_t rows, int64_t dim, float scale,
                     void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

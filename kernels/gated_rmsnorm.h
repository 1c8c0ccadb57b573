// Gated RMSNorm (the KDA layer's o_norm: FLA's FusedRMSNormGated with activation "sigmoid"), per row
// (a token's value head) over the last dimension:
//   rstd[r] = 1 / sqrt(mean_j o[r,j]^2 + eps)
//   y[r,j]  = o[r,j] rstd[r] w[j] sigmoid(gate[r,j])
// Backward, with s = sigmoid(gate), dz = dy s, h = o rstd:
//   dgate[r,j] = dy h w s (1 - s)
//   dw[j]     += sum_r dz[r,j] h[r,j]
//   do[r,j]    = rstd (dz w - h mean_k(dz[r,k] w[k] h[r,k]))
// Shapes: o, gate, y, dy, do, dgate [rows, dim]; w, dw [dim] (dw accumulated into); rstd [rows]
// (f32, or f64 on the f64 CPU path). The layer views [N, HV * dv] as [N * HV, dv].
// dtypes: CPU f32 or f64 throughout. CUDA: o, gate, w, y, dy, do, dgate bf16; rstd, dw f32; f32 math.
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void gated_rmsnorm_forward(const ExecContext& ctx, const Tensor& o, const Tensor& gate, const Tensor& w,
                           const Tensor& y, const Tensor& rstd, float eps);
// do_ and dgate are overwritten; dw is accumulated into.
void gated_rmsnorm_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& o, const Tensor& gate,
                            const Tensor& w, const Tensor& rstd, const Tensor& do_, const Tensor& dgate,
                            const Tensor& dw);

namespace cpu {
template <class T>
void gated_rmsnorm_forward(const T* o, const T* gate, const T* w, T* y, T* rstd, int64_t rows, int64_t dim, double eps);
template <class T>
void gated_rmsnorm_backward(const T* dy, const T* o, const T* gate, const T* w, const T* rstd, T* do_, T* dgate, T* dw,
                            int64_t rows, int64_t dim);
}  // namespace cpu

namespace cuda {
void gated_rmsnorm_forward(const bf16* o, const bf16* gate, const bf16* w, bf16* y, float* rstd, int64_t rows,
                           int64_t dim, float eps, void* stream);
void gated_rmsnorm_backward(const bf16* dy, const bf16* o, const bf16* gate, const bf16* w, const float* rstd,
                            bf16* do_, bf16* dgate, float* dw, int64_t rows, int64_t dim, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

// SwiGLU activation on a fused gate|up projection.
//   in [N, 2F]: columns [0, F) are the gate a, [F, 2F) the up projection b.
//   out[n,j] = silu(a) * b,  silu(a) = a * sigmoid(a)
// backward: da = dout * b * sigmoid(a) * (1 + a * (1 - sigmoid(a))),  db = dout * silu(a); din = [da | db].
// dtypes: CPU f32; CUDA bf16 (math in f32).
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void swiglu_forward(const ExecContext& ctx, const Tensor& in, const Tensor& out);
void swiglu_backward(const ExecContext& ctx, const Tensor& dout, const Tensor& in, const Tensor& din);

namespace cpu {
template <class T>
void swiglu_forward(const T* in, T* out, int64_t n, int64_t f);
template <class T>
void swiglu_backward(const T* dout, const T* in, T* din, int64_t n, int64_t f);
}  // namespace cpu

namespace cuda {
void swiglu_forward(const bf16* in, bf16* out, int64_t n, int64_t f, void* stream);
void swiglu_backward(const bf16* dout, const bf16* in, bf16* din, int64_t n, int64_t f, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

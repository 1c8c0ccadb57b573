// Sigmoid output gate of attention (AFMoE-style gated attention output): the attention output o is
// scaled element-wise by sigmoid of a gate projection computed from the layer input.
//   y = o * sigmoid(g)
// backward (s = sigmoid(g)):  do = dy * s,  dg = dy * o * s * (1 - s)
// Shapes: o, gate, y, dy, do, dgate [N, Hq*d] (all the same). dtypes: CPU f32; CUDA bf16 (math in f32).
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void output_gate_forward(const ExecContext& ctx, const Tensor& o, const Tensor& gate, const Tensor& y);
void output_gate_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& o, const Tensor& gate,
                          const Tensor& d_o, const Tensor& dgate);

namespace cpu {
template <class T>
void output_gate_forward(const T* o, const T* gate, T* y, int64_t n);  // n = number of elements
template <class T>
void output_gate_backward(const T* dy, const T* o, const T* gate, T* d_o, T* dgate, int64_t n);
}  // namespace cpu

namespace cuda {
void output_gate_forward(const bf16* o, const bf16* gate, bf16* y, int64_t n, void* stream);
void output_gate_backward(const bf16* dy, const bf16* o, const bf16* gate, bf16* d_o, bf16* dgate, int64_t n,
                          void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

// Causal depthwise short convolution with a fused SiLU (the q/k/v convolutions of the KDA layer,
// FLA's ShortConvolution with activation "silu", no bias). Per channel c, token t of a document
// starting at token b, kernel size K (4 in the KDA layer, any K >= 1 here):
//   u[t,c] = sum_{j=0..K-1} w[c,j] x[t-K+1+j, c]        (x[s, c] = 0 for s < b: no window crosses a document start)
//   y[t,c] = silu(u[t,c]) = u sigmoid(u)
// w[c, K-1] multiplies the current token (PyTorch Conv1d with K-1 zeros of left padding; the export
// shape of w is [C, 1, K]).
// Backward (u is recomputed from x, the forward saves nothing), with s = sigmoid(u):
//   du[t,c]  = dy[t,c] s (1 + u (1 - s))
//   dx[t,c]  = sum_{j} w[c,j] du[t+K-1-j, c]            (only terms whose token lies in t's document)
//   dw[c,j] += sum_t du[t,c] x[t-K+1+j, c]              (same zero convention as the forward)
// Shapes: x, y, dy, dx [N, C]; w [C, K]; dw [C, K] (accumulated into); cu_seqlens i32 [D+1] with
// cu_seqlens[0] = 0, non-decreasing, cu_seqlens[D] = N. dx must not alias dy or x.
// dtypes: CPU f32 or f64 throughout. CUDA: x, w, y, dy, dx bf16; dw f32; f32 math.
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void short_conv_forward(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& cu_seqlens,
                        const Tensor& y);
// dx is overwritten; dw is accumulated into.
void short_conv_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& x, const Tensor& w,
                         const Tensor& cu_seqlens, const Tensor& dx, const Tensor& dw);

namespace cpu {
template <class T>
void short_conv_forward(const T* x, const T* w, const int32_t* cu_seqlens, int64_t num_docs, T* y, int64_t n,
                        int64_t channels, int64_t kernel);
template <class T>
void short_conv_backward(const T* dy, const T* x, const T* w, const int32_t* cu_seqlens, int64_t num_docs, T* dx, T* dw,
                         int64_t n, int64_t channels, int64_t kernel);
}  // namespace cpu

namespace cuda {
// kernel <= kShortConvMaxKernel.
constexpr int64_t kShortConvMaxKernel = 16;
void short_conv_forward(const bf16* x, const bf16* w, const int32_t* cu_seqlens, int64_t num_docs, bf16* y, int64_t n,
                        int64_t channels, int64_t kernel, void* stream);
void short_conv_backward(const bf16* dy, const bf16* x, const bf16* w, const int32_t* cu_seqlens, int64_t num_docs,
                         bf16* dx, float* dw, int64_t n, int64_t channels, int64_t kernel, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

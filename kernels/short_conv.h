// Causal depthwise short convolution with a fused SiLU (the q/k/v convolutions of the KDA layer,
// FLA's ShortConvolution with activation "silu", no bias). Per channel c, token t of a document
// starting at token b, kernel size K (4 in the KDA layer, any K >= 1 here):
//   u[t,c] = sum_{j=0..K-1} w[c,j] x[t-K+1+j, c]        (x[s, c] = 0 for s < b without a halo, see below:
//                                                         no window crosses a document start)
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
//
// Halo (sequence parallelism: a document continuing from the previous rank's token slice): the K-1
// input rows that precede each document's first token replace the zeros above. With document d
// starting at token b and xx the input extended by its halo,
//   xx[s, c] = x[s, c]                     for b <= s
//   xx[s, c] = halo[d, s - b + K - 1, c]   for b - K + 1 <= s < b   (halo[d, K-2] is the token right before b)
//   u[t,c]   = sum_{j} w[c,j] xx[t-K+1+j, c]
// and the backward adds the halo's terms (du as above):
//   dw[c,j]       += sum_t du[t,c] xx[t-K+1+j, c]
//   dhalo[d,i,c]   = sum_{t = b .. min(e-1, b+i)} w[c, b+i-t] du[t,c]   (e: the document's end; overwritten)
// dx keeps its in-document terms only. Halo rows are used as given (a caller zeroes the rows a
// document must not see); an empty document's dhalo rows are zero. halo, dhalo [D, K-1, C] (zero rows
// for K = 1; such a tensor counts as given even with no data); halo has x's dtype and device, dhalo
// dx's. An absent halo (a default Tensor{}: no data, no shape) is the zero convention; dhalo may be
// absent when halo is given (then it is not computed) and must be absent without a halo. dhalo must
// not alias halo (the CUDA backward zeroes dhalo before it reads the halo).
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void short_conv_forward(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& cu_seqlens,
                        const Tensor& y, const Tensor& halo = Tensor{});
// dx and dhalo are overwritten; dw is accumulated into.
void short_conv_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& x, const Tensor& w,
                         const Tensor& cu_seqlens, const Tensor& dx, const Tensor& dw, const Tensor& halo = Tensor{},
                         const Tensor& dhalo = Tensor{});

// The KDA layer's q / k path in one op: the convolution above, then the l2 norm of every head of head_dim channels
// (kernels/l2norm.h with `scale` and eps kL2NormEps):  y = l2norm(short_conv(x)) over x viewed as
// [n * channels / head_dim, head_dim], rstd [n * channels / head_dim] (f32 on CUDA, x's dtype on the CPU) saved for
// the backward. The backward takes dy (the gradient of y), y and rstd, and does the l2norm backward in place (dy
// is overwritten with the gradient of the conv output), then the convolution's (dx, dw, dhalo as in
// short_conv_backward; dx must not alias dy). The CUDA forward is one kernel for heads of 64 or 128 channels,
// K <= 4 and 16-byte aligned rows (the same results as the two ops, which run otherwise and on the CPU); the
// backward is the two ops' kernels on every device.
void short_conv_l2norm_forward(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& cu_seqlens,
                               const Tensor& y, const Tensor& rstd, int64_t head_dim, float scale,
                               const Tensor& halo = Tensor{});
void short_conv_l2norm_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& y, const Tensor& rstd,
                                int64_t head_dim, float scale, const Tensor& x, const Tensor& w,
                                const Tensor& cu_seqlens, const Tensor& dx, const Tensor& dw,
                                const Tensor& halo = Tensor{}, const Tensor& dhalo = Tensor{});

// halo, dhalo: [num_docs, kernel-1, channels] or nullptr (no halo / dhalo not computed).
namespace cpu {
template <class T>
void short_conv_forward(const T* x, const T* w, const int32_t* cu_seqlens, int64_t num_docs, T* y, int64_t n,
                        int64_t channels, int64_t kernel, const T* halo = nullptr);
template <class T>
void short_conv_backward(const T* dy, const T* x, const T* w, const int32_t* cu_seqlens, int64_t num_docs, T* dx, T* dw,
                         int64_t n, int64_t channels, int64_t kernel, const T* halo = nullptr, T* dhalo = nullptr);
}  // namespace cpu

namespace cuda {
// kernel <= kShortConvMaxKernel.
constexpr int64_t kShortConvMaxKernel = 16;
void short_conv_forward(const bf16* x, const bf16* w, const int32_t* cu_seqlens, int64_t num_docs, bf16* y, int64_t n,
                        int64_t channels, int64_t kernel, const bf16* halo, void* stream);
void short_conv_backward(const bf16* dy, const bf16* x, const bf16* w, const int32_t* cu_seqlens, int64_t num_docs,
                         bf16* dx, float* dw, int64_t n, int64_t channels, int64_t kernel, const bf16* halo,
                         bf16* dhalo, void* stream);
// The q / k path (kernels::short_conv_l2norm_*): the forward one kernel where it applies, else the two ops' kernels
// (HYD_CONV_NORM_FUSED=0: always); the backward the two ops' kernels, the l2norm's in place over dy.
void short_conv_l2norm_forward(const bf16* x, const bf16* w, const int32_t* cu_seqlens, int64_t num_docs, bf16* y,
                               float* rstd, int64_t n, int64_t channels, int64_t kernel, int64_t head_dim, float scale,
                               float eps, const bf16* halo, void* stream);
void short_conv_l2norm_backward(bf16* dy, const bf16* y, const float* rstd, int64_t head_dim, float scale,
                                const bf16* x, const bf16* w, const int32_t* cu_seqlens, int64_t num_docs, bf16* dx,
                                float* dw, int64_t n, int64_t channels, int64_t kernel, const bf16* halo, bf16* dhalo,
                                void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

// Matrix products (row-major everywhere).
//   gemm:   C[M,N] = alpha * op(A) * op(B) + beta * C,  op(A) [M,K] (A is [K,M] when trans_a), op(B) [K,N]
//           (B is [N,K] when trans_b).
//   linear: y[M,N] = x[M,K] * w[N,K]^T (+ bias[N])
//   linear_forward_residual: y[M,N] = x[M,K] * w[N,K]^T + residual[M,N] (y may be residual itself; an empty
//           residual: linear_forward without bias): the residual add of a block's output projection inside the GEMM
//           (on CUDA a cuBLASLt epilogue with C = residual, rounded to bf16 once)
//           dx[M,K] (=, or += when accumulate_dx) dy * w;   dw[N,K] += dy^T * x;   dbias[N] += sum_m dy
// dtypes: CPU f32 (OpenBLAS). CUDA: A, B bf16, C bf16 or f32, fp32 accumulation (cuBLAS). Weight and
// bias gradients are f32 on both devices.
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void gemm(const ExecContext& ctx, bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b, float beta,
          const Tensor& c);

// bias may be empty (Tensor{}); dx, dbias may be empty (not computed).
void linear_forward(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& y);
void linear_forward_residual(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& residual,
                             const Tensor& y);
void linear_backward(const ExecContext& ctx, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& dx,
                     bool accumulate_dx, const Tensor& dw, const Tensor& dbias);
// The bias terms on their own (beside a gemm): y[M,N] += bias[N]; dbias[N] += sum_m dy[M,N] (dbias f32, or f64 on
// the f64 CPU path; y, bias, dy the activations' dtype).
void bias_add(const ExecContext& ctx, const Tensor& y, const Tensor& bias);
void bias_grad(const ExecContext& ctx, const Tensor& dy, const Tensor& dbias);

namespace cpu {
template <class T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, const T* b, T beta, T* c);
template <class T>
void bias_add(T* y, const T* bias, int64_t m, int64_t n);
template <class T>
void bias_grad(const T* dy, T* dbias, int64_t m, int64_t n);  // dbias += column sums
}  // namespace cpu

namespace cuda {
// c_f32 selects the output type (f32 when true, bf16 otherwise).
void gemm(void* cublas, void* stream, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const bf16* a, const bf16* b, float beta, void* c, bool c_f32);
// y[m, n] = x[m, k] w[n, k]^T + residual[m, n] (bf16, fp32 accumulation; y may equal residual), through cuBLASLt
// with the context's workspace (cuBLAS's GEMM with beta = 1 over a copy of the residual where cuBLASLt offers no
// algorithm).
void linear_residual(void* cublas, void* cublaslt, void* stream, void* workspace, size_t workspace_bytes, int64_t m,
                     int64_t n, int64_t k, const bf16* x, const bf16* w, const bf16* residual, bf16* y);
void bias_add(bf16* y, const bf16* bias, int64_t m, int64_t n, void* stream);
void bias_grad(const bf16* dy, float* dbias, int64_t m, int64_t n, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

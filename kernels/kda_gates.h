// The KDA gates (FLA's use_gate_in_kernel / use_beta_sigmoid_in_kernel paths, ../shared/KDA.md step
// 3 and 4). Per token t, value head h, key channel i (c = h * dk + i):
//   z[t,h,i] = f[t,h,i] + dt_bias[c]
//   g[t,h,i] = -exp(A_log[h]) * softplus(z)            softplus(z) = log(1 + exp(z)), so g < 0
//   beta[t,h] = sigmoid(b[t,h])
// Backward from the outputs (f and b are not needed): with a = exp(A_log[h]), softplus(z) = -g / a and
// sigmoid(z) = 1 - exp(-softplus(z)) = -expm1(g / a), so
//   df[t,h,i]    = dg * (-a * sigmoid(z)) = dg * a * expm1(g / a)
//   ddt_bias[c] += sum_t df[t,h,i]
//   dA_log[h]   += sum_{t,i} dg[t,h,i] * g[t,h,i]       (dg/dA_log = -a softplus(z) = g)
//   db[t,h]      = dbeta * beta (1 - beta)
// softplus is the exact log(1 + exp(z)) (PyTorch's F.softplus switches to z above 20, a difference
// below 2e-9 relative).
// Shapes: f, g, dg, df [N, HV, dk]; A_log, dA_log [HV]; dt_bias, ddt_bias [HV * dk]; b, beta, dbeta, db [N, HV].
// dtypes: CPU f32 or f64 throughout. CUDA: f, df, b, db bf16; A_log, dt_bias, g, beta, dg, dbeta, dA_log,
// ddt_bias f32 (the gates and their parameters stay f32); f32 math.
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void kda_gates_forward(const ExecContext& ctx, const Tensor& f, const Tensor& A_log, const Tensor& dt_bias,
                       const Tensor& b, const Tensor& g, const Tensor& beta);
// df and db are overwritten; dA_log and ddt_bias are accumulated into.
void kda_gates_backward(const ExecContext& ctx, const Tensor& dg, const Tensor& dbeta, const Tensor& g,
                        const Tensor& beta, const Tensor& A_log, const Tensor& df, const Tensor& dA_log,
                        const Tensor& ddt_bias, const Tensor& db);

namespace cpu {
template <class T>
void kda_gates_forward(const T* f, const T* A_log, const T* dt_bias, const T* b, T* g, T* beta, int64_t n, int64_t hv,
                       int64_t dk);
template <class T>
void kda_gates_backward(const T* dg, const T* dbeta, const T* g, const T* beta, const T* A_log, T* df, T* dA_log,
                        T* ddt_bias, T* db, int64_t n, int64_t hv, int64_t dk);
}  // namespace cpu

namespace cuda {
void kda_gates_forward(const bf16* f, const float* A_log, const float* dt_bias, const bf16* b, float* g, float* beta,
                       int64_t n, int64_t hv, int64_t dk, void* stream);
void kda_gates_backward(const float* dg, const float* dbeta, const float* g, const float* beta, const float* A_log,
                        bf16* df, float* dA_log, float* ddt_bias, bf16* db, int64_t n, int64_t hv, int64_t dk,
                        void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

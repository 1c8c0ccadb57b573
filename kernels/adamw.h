// AdamW with decoupled weight decay (Loshchilov & Hutter), on fp32 master weights.
//   g  = grad * grad_scale                      (grad_scale carries global-norm clipping)
//   m  = beta1 m + (1 - beta1) g
//   v  = beta2 v + (1 - beta2) g^2
//   p  = p - lr * ( (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * p )
// then, when `working` is given (GPU: the bf16 weights the model computes with), working = bf16(p).
// Shapes: master, grad, m, v f32 [n]; working bf16 [n] or empty. All on one device.
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

struct AdamWStep {
  float lr = 0;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0;
  int64_t step = 1;  // 1-based, for bias correction
  float grad_scale = 1;
};

void adamw_update(const ExecContext& ctx, const Tensor& master, const Tensor& grad, const Tensor& m, const Tensor& v,
                  const Tensor& working, const AdamWStep& s);

namespace cpu {
template <class T>
void adamw_update(T* master, const T* grad, T* m, T* v, int64_t n, const AdamWStep& s);
}  // namespace cpu

namespace cuda {
void adamw_update(float* master, const float* grad, float* m, float* v, bf16* working, int64_t n, const AdamWStep& s,
                  void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

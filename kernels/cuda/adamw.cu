// CUDA AdamW (see kernels/adamw.h): elementwise on the fp32 master, moments and gradient, with the
// bf16 working copy written in the same pass when given. The bias corrections are computed once on
// the host in double and passed as f32 (exactly as the CPU reference rounds them).
#include <cmath>

#include "kernels/adamw.h"
#include "kernels/cuda/common.cuh"

namespace hyd::kernels::cuda {

using namespace cuda_detail;

namespace {

struct AdamWCoeffs {
  float lr, beta1, beta2, eps, weight_decay, grad_scale, bc1, bc2;
};

__global__ void adamw_kernel(float* master, const float* grad, float* m, float* v, __nv_bfloat16* working, int64_t n,
                             AdamWCoeffs k) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = grad[i] * k.grad_scale;
    const float mi = k.beta1 * m[i] + (1.f - k.beta1) * g;
    const float vi = k.beta2 * v[i] + (1.f - k.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float p = master[i];
    const float p_new = p - k.lr * ((mi / k.bc1) / (sqrtf(vi / k.bc2) + k.eps) + k.weight_decay * p);
    master[i] = p_new;
    if (working) working[i] = to_bf(p_new);
  }
}

}  // namespace

void adamw_update(float* master, const float* grad, float* m, float* v, bf16* working, int64_t n, const AdamWStep& s,
                  void* stream) {
  HYD_CHECK(s.step >= 1, "adamw_update: step must be >= 1 (1-based), got ", s.step);
  if (n == 0) return;
  const AdamWCoeffs k{s.lr,
                      s.beta1,
                      s.beta2,
                      s.eps,
                      s.weight_decay,
                      s.grad_scale,
                      static_cast<float>(1.0 - std::pow(static_cast<double>(s.beta1), static_cast<double>(s.step))),
                      static_cast<float>(1.0 - std::pow(static_cast<double>(s.beta2), static_cast<double>(s.step)))};
  constexpr int kThreads = 256;
  adamw_kernel<<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(master, grad, m, v, as_nv(working), n, k);
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

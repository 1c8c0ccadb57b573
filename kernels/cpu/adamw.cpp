// CPU reference for AdamW (see kernels/adamw.h): the header's formula, element by element, in T.
#include "kernels/adamw.h"

#include <cmath>

namespace hyd::kernels::cpu {

template <class T>
void adamw_update(T* master, const T* grad, T* m, T* v, int64_t n, const AdamWStep& s) {
  HYD_CHECK(s.step >= 1, "adamw_update: step must be >= 1 (1-based), got ", s.step);
  // Bias corrections in double, then rounded to T (the CUDA kernel receives the same f32 values).
  const T bc1 = static_cast<T>(1.0 - std::pow(static_cast<double>(s.beta1), static_cast<double>(s.step)));
  const T bc2 = static_cast<T>(1.0 - std::pow(static_cast<double>(s.beta2), static_cast<double>(s.step)));
  const T b1 = s.beta1, b2 = s.beta2, lr = s.lr, eps = s.eps, wd = s.weight_decay, gs = s.grad_scale;
  for (int64_t i = 0; i < n; ++i) {
    const T g = grad[i] * gs;
    m[i] = b1 * m[i] + (T(1) - b1) * g;
    v[i] = b2 * v[i] + (T(1) - b2) * g * g;
    const T p = master[i];
    master[i] = p - lr * ((m[i] / bc1) / (std::sqrt(v[i] / bc2) + eps) + wd * p);
  }
}

template void adamw_update<float>(float*, const float*, float*, float*, int64_t, const AdamWStep&);
template void adamw_update<double>(double*, const double*, double*, double*, int64_t, const AdamWStep&);

}  // namespace hyd::kernels::cpu

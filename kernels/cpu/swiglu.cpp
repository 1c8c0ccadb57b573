// CPU reference for SwiGLU on a fused gate|up input (see kernels/swiglu.h for the math).
#include "kernels/swiglu.h"

#include <cmath>

namespace hyd::kernels::cpu {

namespace {
double sigmoid(double a) { return 1.0 / (1.0 + std::exp(-a)); }
}  // namespace

template <class T>
void swiglu_forward(const T* in, T* out, int64_t n, int64_t f) {
  for (int64_t i = 0; i < n; ++i) {
    const T* a = in + i * 2 * f;
    const T* b = a + f;
    for (int64_t j = 0; j < f; ++j) {
      const double av = static_cast<double>(a[j]);
      out[i * f + j] = static_cast<T>(av * sigmoid(av) * static_cast<double>(b[j]));
    }
  }
}

template <class T>
void swiglu_backward(const T* dout, const T* in, T* din, int64_t n, int64_t f) {
  for (int64_t i = 0; i < n; ++i) {
    const T* a = in + i * 2 * f;
    const T* b = a + f;
    T* da = din + i * 2 * f;
    T* db = da + f;
    for (int64_t j = 0; j < f; ++j) {
      const double av = static_cast<double>(a[j]), bv = static_cast<double>(b[j]);
      const double g = static_cast<double>(dout[i * f + j]);
      const double s = sigmoid(av);
      da[j] = static_cast<T>(g * bv * s * (1.0 + av * (1.0 - s)));
      db[j] = static_cast<T>(g * av * s);
    }
  }
}

template void swiglu_forward<float>(const float*, float*, int64_t, int64_t);
template void swiglu_forward<double>(const double*, double*, int64_t, int64_t);
template void swiglu_backward<float>(const float*, const float*, float*, int64_t, int64_t);
template void swiglu_backward<double>(const double*, const double*, double*, int64_t, int64_t);

}  // namespace hyd::kernels::cpu

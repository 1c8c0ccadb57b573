// CPU reference for the small elementwise ops (see kernels/elementwise.h).
#include "kernels/elementwise.h"

namespace hyd::kernels::cpu {

template <class T>
void add_inplace(T* y, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

template <class T>
void scale_inplace(T* t, T s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) t[i] *= s;
}

template void add_inplace<float>(float*, const float*, int64_t);
template void add_inplace<double>(double*, const double*, int64_t);
template void scale_inplace<float>(float*, float, int64_t);
template void scale_inplace<double>(double*, double, int64_t);

}  // namespace hyd::kernels::cpu

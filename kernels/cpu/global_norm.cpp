// CPU reference for the global gradient norm (see kernels/global_norm.h): fp64 accumulation.
#include "kernels/global_norm.h"

namespace hyd::kernels::cpu {

template <class T>
void sum_squares_accumulate(const T* g, int64_t n, T* out) {
  double acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(g[i]) * static_cast<double>(g[i]);
  out[0] = static_cast<T>(static_cast<double>(out[0]) + acc);
}

template void sum_squares_accumulate<float>(const float*, int64_t, float*);
template void sum_squares_accumulate<double>(const double*, int64_t, double*);

}  // namespace hyd::kernels::cpu

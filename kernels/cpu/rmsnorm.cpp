// CPU reference for RMSNorm (see kernels/rmsnorm.h for the math). Row sums accumulate in double.
#include "kernels/rmsnorm.h"

#include <cmath>
#include <vector>

namespace hyd::kernels::cpu {

template <class T>
void rmsnorm_forward(const T* x, const T* w, T* y, T* rstd, int64_t rows, int64_t dim, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    double ss = 0;
    for (int64_t j = 0; j < dim; ++j) ss += static_cast<double>(xr[j]) * static_cast<double>(xr[j]);
    const double s = 1.0 / std::sqrt(ss / static_cast<double>(dim) + eps);
    rstd[r] = static_cast<T>(s);
    for (int64_t j = 0; j < dim; ++j)
      y[r * dim + j] = static_cast<T>(static_cast<double>(xr[j]) * s * static_cast<double>(w[j]));
  }
}

template <class T>
void rmsnorm_backward(const T* dy, const T* x, const T* w, const T* rstd, T* dx, T* dw, int64_t rows, int64_t dim) {
  std::vector<double> dw_acc(static_cast<size_t>(dim), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    const T* dyr = dy + r * dim;
    const double s = static_cast<double>(rstd[r]);
    double dot = 0;  // sum_k g[k] x[k], g = dy * w
    for (int64_t j = 0; j < dim; ++j) dot += static_cast<double>(dyr[j]) * static_cast<double>(w[j]) * xr[j];
    const double mean_gx = dot / static_cast<double>(dim);
    for (int64_t j = 0; j < dim; ++j) {
      const double g = static_cast<double>(dyr[j]) * static_cast<double>(w[j]);
      dx[r * dim + j] = static_cast<T>(s * (g - static_cast<double>(xr[j]) * s * s * mean_gx));
      dw_acc[j] += static_cast<double>(dyr[j]) * static_cast<double>(xr[j]) * s;
    }
  }
  for (int64_t j = 0; j < dim; ++j) dw[j] = static_cast<T>(static_cast<double>(dw[j]) + dw_acc[j]);
}

template void rmsnorm_forward<float>(const float*, const float*, float*, float*, int64_t, int64_t, double);
template void rmsnorm_forward<double>(const double*, const double*, double*, double*, int64_t, int64_t, double);
template void rmsnorm_backward<float>(const float*, const float*, const float*, const float*, float*, float*, int64_t,
                                      int64_t);
template void rmsnorm_backward<double>(const double*, const double*, const double*, const double*, double*, double*,
                                       int64_t, int64_t);

}  // namespace hyd::kernels::cpu

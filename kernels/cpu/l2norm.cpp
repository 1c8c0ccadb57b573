// CPU reference for the L2 normalisation (see kernels/l2norm.h). Row sums accumulate in double; each
// row is read completely before it is written, so y may alias x and dx may alias dy.
#include "kernels/l2norm.h"

#include <cmath>

namespace hyd::kernels::cpu {

template <class T>
void l2norm_forward(const T* x, T* y, T* rstd, int64_t rows, int64_t dim, double scale, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    double ss = 0;
    for (int64_t j = 0; j < dim; ++j) ss += static_cast<double>(xr[j]) * static_cast<double>(xr[j]);
    const double s = 1.0 / std::sqrt(ss + eps);
    rstd[r] = static_cast<T>(s);
    for (int64_t j = 0; j < dim; ++j) y[r * dim + j] = static_cast<T>(scale * static_cast<double>(xr[j]) * s);
  }
}

template <class T>
void l2norm_backward(const T* dy, const T* y, const T* rstd, T* dx, int64_t rows, int64_t dim, double scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* yr = y + r * dim;
    const T* dyr = dy + r * dim;
    double dot = 0;  // y . dy
    for (int64_t j = 0; j < dim; ++j) dot += static_cast<double>(yr[j]) * static_cast<double>(dyr[j]);
    const double s = static_cast<double>(rstd[r]);
    const double coef = dot / scale;
    for (int64_t j = 0; j < dim; ++j)
      dx[r * dim + j] = static_cast<T>(s * (scale * static_cast<double>(dyr[j]) - coef * static_cast<double>(yr[j])));
  }
}

template void l2norm_forward<float>(const float*, float*, float*, int64_t, int64_t, double, double);
template void l2norm_forward<double>(const double*, double*, double*, int64_t, int64_t, double, double);
template void l2norm_backward<float>(const float*, const float*, const float*, float*, int64_t, int64_t, double);
template void l2norm_backward<double>(const double*, const double*, const double*, double*, int64_t, int64_t, double);

}  // namespace hyd::kernels::cpu

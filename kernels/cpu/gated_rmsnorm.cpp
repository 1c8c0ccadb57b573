// CPU reference for the gated RMSNorm (see kernels/gated_rmsnorm.h). Row and column sums accumulate
// in double.
#include "kernels/gated_rmsnorm.h"

#include <cmath>
#include <vector>

namespace hyd::kernels::cpu {

namespace {

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

}  // namespace

template <class T>
void gated_rmsnorm_forward(const T* o, const T* gate, const T* w, T* y, T* rstd, int64_t rows, int64_t dim,
                           double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* orow = o + r * dim;
    double ss = 0;
    for (int64_t j = 0; j < dim; ++j) ss += static_cast<double>(orow[j]) * static_cast<double>(orow[j]);
    const double s = 1.0 / std::sqrt(ss / static_cast<double>(dim) + eps);
    rstd[r] = static_cast<T>(s);
    for (int64_t j = 0; j < dim; ++j)
      y[r * dim + j] = static_cast<T>(static_cast<double>(orow[j]) * s * static_cast<double>(w[j]) *
                                      sigmoid(static_cast<double>(gate[r * dim + j])));
  }
}

template <class T>
void gated_rmsnorm_backward(const T* dy, const T* o, const T* gate, const T* w, const T* rstd, T* do_, T* dgate, T* dw,
                            int64_t rows, int64_t dim) {
  std::vector<double> dw_acc(static_cast<size_t>(dim), 0.0), dzw(static_cast<size_t>(dim));
  for (int64_t r = 0; r < rows; ++r) {
    const double s = static_cast<double>(rstd[r]);
    double dot = 0;  // sum_k dz w h
    for (int64_t j = 0; j < dim; ++j) {
      const int64_t e = r * dim + j;
      const double sg = sigmoid(static_cast<double>(gate[e])), h = static_cast<double>(o[e]) * s;
      const double wj = static_cast<double>(w[j]), dyv = static_cast<double>(dy[e]);
      const double dz = dyv * sg;
      dgate[e] = static_cast<T>(dyv * h * wj * sg * (1.0 - sg));
      dw_acc[j] += dz * h;
      dzw[j] = dz * wj;
      dot += dzw[j] * h;
    }
    const double mean = dot / static_cast<double>(dim);
    for (int64_t j = 0; j < dim; ++j) {
      const int64_t e = r * dim + j;
      do_[e] = static_cast<T>(s * (dzw[j] - static_cast<double>(o[e]) * s * mean));
    }
  }
  for (int64_t j = 0; j < dim; ++j) dw[j] = static_cast<T>(static_cast<double>(dw[j]) + dw_acc[j]);
}

template void gated_rmsnorm_forward<float>(const float*, const float*, const float*, float*, float*, int64_t, int64_t,
                                           double);
template void gated_rmsnorm_forward<double>(const double*, const double*, const double*, double*, double*, int64_t,
                                            int64_t, double);
template void gated_rmsnorm_backward<float>(const float*, const float*, const float*, const float*, const float*,
                                            float*, float*, float*, int64_t, int64_t);
template void gated_rmsnorm_backward<double>(const double*, const double*, const double*, const double*, const double*,
                                             double*, double*, double*, int64_t, int64_t);

}  // namespace hyd::kernels::cpu

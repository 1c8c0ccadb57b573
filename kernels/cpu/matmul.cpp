// CPU reference for the matrix products (see kernels/matmul.h). float goes through OpenBLAS; double
// uses plain loops (finite-difference tests need the extra precision, not the speed).
#include "kernels/matmul.h"

#include <cblas.h>

#include <vector>

namespace hyd::kernels::cpu {

namespace {

// C = beta * C, with beta == 0 overwriting (C may hold NaN poison, which 0 * NaN would keep).
template <class T>
void scale_output(T* c, int64_t count, T beta) {
  for (int64_t i = 0; i < count; ++i) c[i] = beta == T(0) ? T(0) : beta * c[i];
}

}  // namespace

template <>
void gemm<float>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 const float* b, float beta, float* c) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    scale_output(c, m * n, beta);
    return;
  }
  HYD_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, "gemm: dimensions exceed the BLAS int range");
  if (beta == 0.f) scale_output(c, m * n, 0.f);  // do not rely on BLAS ignoring NaN in C when beta == 0
  const int lda = static_cast<int>(trans_a ? m : k);
  const int ldb = static_cast<int>(trans_b ? k : n);
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a, lda, b, ldb, beta, c,
              static_cast<int>(n));
}

template <>
void gemm<double>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                  const double* b, double beta, double* c) {
  // op(A)[i, p] and op(B)[p, j] for row-major storage.
  auto at = [&](int64_t i, int64_t p) { return trans_a ? a[p * m + i] : a[i * k + p]; };
  auto bt = [&](int64_t p, int64_t j) { return trans_b ? b[j * k + p] : b[p * n + j]; };
  std::vector<double> row(static_cast<size_t>(n));
  for (int64_t i = 0; i < m; ++i) {
    std::fill(row.begin(), row.end(), 0.0);
    for (int64_t p = 0; p < k; ++p) {
      const double aip = at(i, p);
      for (int64_t j = 0; j < n; ++j) row[j] += aip * bt(p, j);
    }
    for (int64_t j = 0; j < n; ++j) {
      const double prev = beta == 0.0 ? 0.0 : beta * c[i * n + j];
      c[i * n + j] = alpha * row[j] + prev;
    }
  }
}

template <class T>
void bias_add(T* y, const T* bias, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) y[i * n + j] += bias[j];
}

template <class T>
void bias_grad(const T* dy, T* dbias, int64_t m, int64_t n) {
  std::vector<double> acc(static_cast<size_t>(n), 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) acc[j] += dy[i * n + j];
  for (int64_t j = 0; j < n; ++j) dbias[j] = static_cast<T>(dbias[j] + acc[j]);
}

template void bias_add<float>(float*, const float*, int64_t, int64_t);
template void bias_add<double>(double*, const double*, int64_t, int64_t);
template void bias_grad<float>(const float*, float*, int64_t, int64_t);
template void bias_grad<double>(const double*, double*, int64_t, int64_t);

}  // namespace hyd::kernels::cpu

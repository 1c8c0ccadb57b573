// CPU reference for the KDA gates (see kernels/kda_gates.h). Parameter-gradient sums accumulate in
// double.
#include "kernels/kda_gates.h"

#include <cmath>
#include <vector>

namespace hyd::kernels::cpu {

namespace {

// log(1 + exp(z)) without overflow for large z or loss of precision for very negative z.
double softplus(double z) { return z > 0 ? z + std::log1p(std::exp(-z)) : std::log1p(std::exp(z)); }

}  // namespace

template <class T>
void kda_gates_forward(const T* f, const T* A_log, const T* dt_bias, const T* b, T* g, T* beta, int64_t n, int64_t hv,
                       int64_t dk) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < hv; ++h) {
      const double a = std::exp(static_cast<double>(A_log[h]));
      for (int64_t i = 0; i < dk; ++i) {
        const int64_t c = h * dk + i, e = (t * hv + h) * dk + i;
        g[e] = static_cast<T>(-a * softplus(static_cast<double>(f[e]) + static_cast<double>(dt_bias[c])));
      }
      beta[t * hv + h] = static_cast<T>(1.0 / (1.0 + std::exp(-static_cast<double>(b[t * hv + h]))));
    }
}

template <class T>
void kda_gates_backward(const T* dg, const T* dbeta, const T* g, const T* beta, const T* A_log, T* df, T* dA_log,
                        T* ddt_bias, T* db, int64_t n, int64_t hv, int64_t dk) {
  std::vector<double> dA(static_cast<size_t>(hv), 0.0), ddt(static_cast<size_t>(hv * dk), 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < hv; ++h) {
      const double a = std::exp(static_cast<double>(A_log[h]));
      for (int64_t i = 0; i < dk; ++i) {
        const int64_t e = (t * hv + h) * dk + i;
        const double gv = static_cast<double>(g[e]), dgv = static_cast<double>(dg[e]);
        const double d = dgv * a * std::expm1(gv / a);  // dg * (-a sigmoid(z))
        df[e] = static_cast<T>(d);
        ddt[h * dk + i] += d;
        dA[h] += dgv * gv;
      }
      const double bt = static_cast<double>(beta[t * hv + h]);
      db[t * hv + h] = static_cast<T>(static_cast<double>(dbeta[t * hv + h]) * bt * (1.0 - bt));
    }
  for (int64_t h = 0; h < hv; ++h) dA_log[h] = static_cast<T>(static_cast<double>(dA_log[h]) + dA[h]);
  for (int64_t c = 0; c < hv * dk; ++c) ddt_bias[c] = static_cast<T>(static_cast<double>(ddt_bias[c]) + ddt[c]);
}

template void kda_gates_forward<float>(const float*, const float*, const float*, const float*, float*, float*, int64_t,
                                       int64_t, int64_t);
template void kda_gates_forward<double>(const double*, const double*, const double*, const double*, double*, double*,
                                        int64_t, int64_t, int64_t);
template void kda_gates_backward<float>(const float*, const float*, const float*, const float*, const float*, float*,
                                        float*, float*, float*, int64_t, int64_t, int64_t);
template void kda_gates_backward<double>(const double*, const double*, const double*, const double*, const double*,
                                         double*, double*, double*, double*, int64_t, int64_t, int64_t);

}  // namespace hyd::kernels::cpu

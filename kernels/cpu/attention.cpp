// CPU reference for causal GQA attention with document masking (see kernels/attention.h). Plain
// loops over documents, tokens and heads; softmax statistics and every sum in double.
#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace hyd::kernels::cpu {

namespace {

void check_cu_seqlens(const int32_t* cu, int64_t num_docs, int64_t n, const char* op) {
  HYD_CHECK(num_docs >= 0 && cu[0] == 0, op, ": argument 'cu_seqlens' must start at 0");
  for (int64_t d = 0; d < num_docs; ++d)
    HYD_CHECK(cu[d + 1] >= cu[d], op, ": argument 'cu_seqlens' is not non-decreasing at document ", d);
  HYD_CHECK(cu[num_docs] == n, op, ": argument 'cu_seqlens' ends at ", cu[num_docs], ", expected the token count ", n);
}

template <class T>
double dot(const T* a, const T* b, int64_t d) {
  double s = 0;
  for (int64_t c = 0; c < d; ++c) s += static_cast<double>(a[c]) * static_cast<double>(b[c]);
  return s;
}

}  // namespace

template <class T>
void attention_forward(const T* q, const T* k, const T* v, const int32_t* cu_seqlens, int64_t num_docs, T* o, T* lse,
                       int64_t n, int64_t hq, int64_t hkv, int64_t d, double scale) {
  check_cu_seqlens(cu_seqlens, num_docs, n, "attention_forward");
  HYD_CHECK(hkv > 0 && hq % hkv == 0, "attention_forward: query heads ", hq, " not a multiple of kv heads ", hkv);
  const int64_t group = hq / hkv;
  std::vector<double> p, acc(static_cast<size_t>(d));
  for (int64_t doc = 0; doc < num_docs; ++doc) {
    const int64_t begin = cu_seqlens[doc], end = cu_seqlens[doc + 1];
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t h = 0; h < hq; ++h) {
        const int64_t kh = h / group;
        const T* qi = q + (i * hq + h) * d;
        p.assign(static_cast<size_t>(i - begin + 1), 0.0);
        double mx = -INFINITY;
        for (int64_t j = begin; j <= i; ++j) {
          p[j - begin] = scale * dot(qi, k + (j * hkv + kh) * d, d);
          mx = std::max(mx, p[j - begin]);
        }
        double sum = 0;
        for (double& x : p) {
          x = std::exp(x - mx);
          sum += x;
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = begin; j <= i; ++j) {
          const T* vj = v + (j * hkv + kh) * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += p[j - begin] * static_cast<double>(vj[c]);
        }
        T* oi = o + (i * hq + h) * d;
        for (int64_t c = 0; c < d; ++c) oi[c] = static_cast<T>(acc[c] / sum);
        lse[i * hq + h] = static_cast<T>(mx + std::log(sum));
      }
    }
  }
}

template <class T>
void attention_backward(const T* dout, const T* q, const T* k, const T* v, const T* o, const T* lse,
                        const int32_t* cu_seqlens, int64_t num_docs, T* dq, T* dk, T* dv, int64_t n, int64_t hq,
                        int64_t hkv, int64_t d, double scale) {
  check_cu_seqlens(cu_seqlens, num_docs, n, "attention_backward");
  HYD_CHECK(hkv > 0 && hq % hkv == 0, "attention_backward: query heads ", hq, " not a multiple of kv heads ", hkv);
  const int64_t group = hq / hkv;
  std::vector<double> gq(static_cast<size_t>(n * hq * d), 0.0), gk(static_cast<size_t>(n * hkv * d), 0.0),
      gv(static_cast<size_t>(n * hkv * d), 0.0);
  for (int64_t doc = 0; doc < num_docs; ++doc) {
    const int64_t begin = cu_seqlens[doc], end = cu_seqlens[doc + 1];
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t h = 0; h < hq; ++h) {
        const int64_t kh = h / group, qrow = (i * hq + h) * d;
        const T* qi = q + qrow;
        const T* doi = dout + qrow;
        const double di = dot(doi, o + qrow, d);  // D_i = <do_i, o_i>
        const double lse_i = static_cast<double>(lse[i * hq + h]);
        for (int64_t j = begin; j <= i; ++j) {
          const int64_t krow = (j * hkv + kh) * d;
          const T* kj = k + krow;
          const T* vj = v + krow;
          const double pij = std::exp(scale * dot(qi, kj, d) - lse_i);
          const double ds = pij * (dot(doi, vj, d) - di);
          for (int64_t c = 0; c < d; ++c) {
            gv[krow + c] += pij * static_cast<double>(doi[c]);
            gq[qrow + c] += scale * ds * static_cast<double>(kj[c]);
            gk[krow + c] += scale * ds * static_cast<double>(qi[c]);
          }
        }
      }
    }
  }
  for (size_t x = 0; x < gq.size(); ++x) dq[x] = static_cast<T>(gq[x]);
  for (size_t x = 0; x < gk.size(); ++x) {
    dk[x] = static_cast<T>(gk[x]);
    dv[x] = static_cast<T>(gv[x]);
  }
}

template void attention_forward<float>(const float*, const float*, const float*, const int32_t*, int64_t, float*,
                                       float*, int64_t, int64_t, int64_t, int64_t, double);
template void attention_forward<double>(const double*, const double*, const double*, const int32_t*, int64_t, double*,
                                        double*, int64_t, int64_t, int64_t, int64_t, double);
template void attention_backward<float>(const float*, const float*, const float*, const float*, const float*,
                                        const float*, const int32_t*, int64_t, float*, float*, float*, int64_t, int64_t,
                                        int64_t, int64_t, double);
template void attention_backward<double>(const double*, const double*, const double*, const double*, const double*,
                                         const double*, const int32_t*, int64_t, double*, double*, double*, int64_t,
                                         int64_t, int64_t, int64_t, double);

}  // namespace hyd::kernels::cpu

// CPU reference for causal GQA attention with document masking and query offset (see
// kernels/attention.h). Plain loops over documents, tokens and heads; softmax statistics and every
// sum in double. Query i (0-based in its document) sees keys [0, visible_keys(i)) of the document.
#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace hyd::kernels::cpu {

void check_cu_seqlens(const int32_t* cu, int64_t num_docs, int64_t n, const char* op, const char* arg) {
  HYD_CHECK(num_docs >= 0 && cu[0] == 0, op, ": argument '", arg, "' must start at 0");
  for (int64_t d = 0; d < num_docs; ++d)
    HYD_CHECK(cu[d + 1] >= cu[d], op, ": argument '", arg, "' is not non-decreasing at document ", d);
  HYD_CHECK(cu[num_docs] == n, op, ": argument '", arg, "' ends at ", cu[num_docs], ", expected the token count ", n);
}

namespace {

// Both boundary arrays; with one array for both (cu_q == cu_k) the messages name 'cu_seqlens'.
void check_boundaries(const int32_t* cu_q, const int32_t* cu_k, int64_t num_docs, int64_t n_q, int64_t n_k,
                      const char* op) {
  if (cu_q == cu_k) {
    HYD_CHECK(n_q == n_k, op, ": one 'cu_seqlens' for queries and keys but ", n_q, " query and ", n_k, " key rows");
    check_cu_seqlens(cu_q, num_docs, n_q, op, "cu_seqlens");
    return;
  }
  check_cu_seqlens(cu_q, num_docs, n_q, op, "cu_seqlens_q");
  check_cu_seqlens(cu_k, num_docs, n_k, op, "cu_seqlens_k");
}

// Keys visible to query i (0-based) of a document with len_q queries and len_k keys:
// j <= i + len_k - len_q, so max(0, i + 1 + len_k - len_q) of them (<= len_k as i < len_q).
int64_t visible_keys(int64_t i, int64_t len_q, int64_t len_k) { return std::max<int64_t>(0, i + 1 + len_k - len_q); }

template <class T>
double dot(const T* a, const T* b, int64_t d) {
  double s = 0;
  for (int64_t c = 0; c < d; ++c) s += static_cast<double>(a[c]) * static_cast<double>(b[c]);
  return s;
}

}  // namespace

template <class T>
void attention_forward(const T* q, const T* k, const T* v, const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
                       int64_t num_docs, T* o, T* lse, int64_t n_q, int64_t n_k, int64_t hq, int64_t hkv, int64_t d,
                       double scale) {
  check_boundaries(cu_seqlens_q, cu_seqlens_k, num_docs, n_q, n_k, "attention_forward");
  HYD_CHECK(hkv > 0 && hq % hkv == 0, "attention_forward: query heads ", hq, " not a multiple of kv heads ", hkv);
  const int64_t group = hq / hkv;
  std::vector<double> p, acc(static_cast<size_t>(d));
  for (int64_t doc = 0; doc < num_docs; ++doc) {
    const int64_t qbegin = cu_seqlens_q[doc], len_q = cu_seqlens_q[doc + 1] - qbegin;
    const int64_t kbegin = cu_seqlens_k[doc], len_k = cu_seqlens_k[doc + 1] - kbegin;
    for (int64_t iq = 0; iq < len_q; ++iq) {
      const int64_t i = qbegin + iq, nvis = visible_keys(iq, len_q, len_k);
      for (int64_t h = 0; h < hq; ++h) {
        const int64_t kh = h / group;
        const T* qi = q + (i * hq + h) * d;
        T* oi = o + (i * hq + h) * d;
        if (nvis == 0) {  // fully masked row
          std::fill(oi, oi + d, T(0));
          lse[i * hq + h] = -std::numeric_limits<T>::infinity();
          continue;
        }
        p.assign(static_cast<size_t>(nvis), 0.0);
        double mx = -INFINITY;
        for (int64_t jk = 0; jk < nvis; ++jk) {
          p[jk] = scale * dot(qi, k + ((kbegin + jk) * hkv + kh) * d, d);
          mx = std::max(mx, p[jk]);
        }
        double sum = 0;
        for (double& x : p) {
          x = std::exp(x - mx);
          sum += x;
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t jk = 0; jk < nvis; ++jk) {
          const T* vj = v + ((kbegin + jk) * hkv + kh) * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += p[jk] * static_cast<double>(vj[c]);
        }
        for (int64_t c = 0; c < d; ++c) oi[c] = static_cast<T>(acc[c] / sum);
        lse[i * hq + h] = static_cast<T>(mx + std::log(sum));
      }
    }
  }
}

template <class T>
void attention_backward(const T* dout, const T* q, const T* k, const T* v, const T* o, const T* lse,
                        const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, int64_t num_docs, T* dq, T* dk, T* dv,
                        int64_t n_q, int64_t n_k, int64_t hq, int64_t hkv, int64_t d, double scale) {
  check_boundaries(cu_seqlens_q, cu_seqlens_k, num_docs, n_q, n_k, "attention_backward");
  HYD_CHECK(hkv > 0 && hq % hkv == 0, "attention_backward: query heads ", hq, " not a multiple of kv heads ", hkv);
  const int64_t group = hq / hkv;
  std::vector<double> gq(static_cast<size_t>(n_q * hq * d), 0.0), gk(static_cast<size_t>(n_k * hkv * d), 0.0),
      gv(static_cast<size_t>(n_k * hkv * d), 0.0);
  for (int64_t doc = 0; doc < num_docs; ++doc) {
    const int64_t qbegin = cu_seqlens_q[doc], len_q = cu_seqlens_q[doc + 1] - qbegin;
    const int64_t kbegin = cu_seqlens_k[doc], len_k = cu_seqlens_k[doc + 1] - kbegin;
    for (int64_t iq = 0; iq < len_q; ++iq) {
      const int64_t i = qbegin + iq, nvis = visible_keys(iq, len_q, len_k);
      // A fully masked row (nvis = 0, lse = -inf) has no terms: its gradients stay 0.
      for (int64_t h = 0; h < hq && nvis > 0; ++h) {
        const int64_t kh = h / group, qrow = (i * hq + h) * d;
        const T* qi = q + qrow;
        const T* doi = dout + qrow;
        const double di = dot(doi, o + qrow, d);  // D_i = <do_i, o_i>
        const double lse_i = static_cast<double>(lse[i * hq + h]);
        for (int64_t jk = 0; jk < nvis; ++jk) {
          const int64_t krow = ((kbegin + jk) * hkv + kh) * d;
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

template void attention_forward<float>(const float*, const float*, const float*, const int32_t*, const int32_t*,
                                       int64_t, float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, double);
template void attention_forward<double>(const double*, const double*, const double*, const int32_t*, const int32_t*,
                                        int64_t, double*, double*, int64_t, int64_t, int64_t, int64_t, int64_t, double);
template void attention_backward<float>(const float*, const float*, const float*, const float*, const float*,
                                        const float*, const int32_t*, const int32_t*, int64_t, float*, float*, float*,
                                        int64_t, int64_t, int64_t, int64_t, int64_t, double);
template void attention_backward<double>(const double*, const double*, const double*, const double*, const double*,
                                         const double*, const int32_t*, const int32_t*, int64_t, double*, double*,
                                         double*, int64_t, int64_t, int64_t, int64_t, int64_t, double);

}  // namespace hyd::kernels::cpu

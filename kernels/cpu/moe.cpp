// CPU reference of the MoE ops (see kernels/moe.h for the math); T = float | double.
#include "kernels/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/matmul.h"

namespace hyd::kernels::cpu {

namespace {
template <class T>
T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}
}  // namespace

template <class T>
void moe_route(const MoeRouterOptions& opt, T* s, const T* b, int64_t N, int64_t E, int64_t K, int32_t* expert,
               T* weight, int32_t* counts, int32_t* offsets, int32_t* order, int32_t* position) {
  std::vector<int64_t> idx(static_cast<size_t>(E));
  std::vector<T> sel(static_cast<size_t>(E));
  for (int64_t t = 0; t < N; ++t) {
    T* st = s + t * E;
    if (opt.sigmoid) {
      for (int64_t e = 0; e < E; ++e) st[e] = sigmoid(st[e]);
    } else {
      const T mx = *std::max_element(st, st + E);
      T sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += (st[e] = std::exp(st[e] - mx));
      for (int64_t e = 0; e < E; ++e) st[e] /= sum;
    }
    for (int64_t e = 0; e < E; ++e) sel[e] = st[e] + (b ? b[e] : T(0));
    std::iota(idx.begin(), idx.end(), int64_t(0));
    std::partial_sort(idx.begin(), idx.begin() + K, idx.end(),
                      [&](int64_t a, int64_t c) { return sel[a] > sel[c] || (sel[a] == sel[c] && a < c); });
    T norm = 0;
    for (int64_t j = 0; j < K; ++j) norm += st[idx[j]];
    const T scale = (opt.norm_topk_prob ? T(1) / norm : T(1)) * static_cast<T>(opt.route_scale);
    for (int64_t j = 0; j < K; ++j) {
      expert[t * K + j] = static_cast<int32_t>(idx[j]);
      weight[t * K + j] = st[idx[j]] * scale;
    }
  }
  // Stable counting sort of the pairs by expert.
  std::fill(counts, counts + E, 0);
  for (int64_t p = 0; p < N * K; ++p) ++counts[expert[p]];
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  std::vector<int32_t> next(offsets, offsets + E);
  for (int64_t p = 0; p < N * K; ++p) {
    const int32_t row = next[expert[p]]++;
    order[row] = static_cast<int32_t>(p);
    position[p] = row;
  }
}

template <class T>
void moe_permute(const int32_t* order, const T* x, T* xp, int64_t n, int64_t k, int64_t d) {
  for (int64_t p = 0; p < n * k; ++p) std::copy_n(x + (order[p] / k) * d, d, xp + p * d);
}

template <class T>
void moe_unpermute(const int32_t* position, const T* xp, T* pairs, int64_t n, int64_t k, int64_t d) {
  for (int64_t q = 0; q < n * k; ++q) std::copy_n(xp + position[q] * d, d, pairs + q * d);
}

template <class T>
void moe_gather_sum(const int32_t* position, const T* weight, const T* rows, T* out, int64_t n, int64_t k, int64_t d,
                    bool accumulate) {
  for (int64_t t = 0; t < n; ++t) {
    T* o = out + t * d;
    if (!accumulate) std::fill(o, o + d, T(0));
    for (int64_t j = 0; j < k; ++j) {
      const T w = weight ? weight[t * k + j] : T(1);
      const T* y = rows + position[t * k + j] * d;
      for (int64_t i = 0; i < d; ++i) o[i] += w * y[i];
    }
  }
}

// Combine: out[t] += w_tj yp[p]  ->  d_yp[p] = w_tj dout[t];  d_w_tj = dout[t] . yp[p].
template <class T>
void moe_combine_backward(const int32_t* order, const T* w, const T* g, const T* yp, T* d_yp, T* dw, int64_t n,
                          int64_t k, int64_t d) {
  for (int64_t p = 0; p < n * k; ++p) {
    const int64_t q = order[p], tok = q / k;
    const T* gt = g + tok * d;
    const T* y = yp + p * d;
    T* dy = d_yp + p * d;
    T dot = 0;
    for (int64_t i = 0; i < d; ++i) {
      dy[i] = w[q] * gt[i];
      dot += gt[i] * y[i];
    }
    dw[q] = dot;
  }
}

// Combine weights -> scores. w_j = rs s_j / Z (Z = sum_i s_i over the chosen; Z = 1 without norm_topk_prob):
//   dL/ds_i = rs / Z (dw_i - sum_j dw_j s_j / Z).  Then L_aux: dL/ds[t, e] += aux_scale f_e. Then the
// softmax / sigmoid Jacobian: scores -> logits.
template <class T>
void moe_router_backward(const MoeRouterOptions& opt, const T* sc, const int32_t* expert, const T* dw,
                         const T* aux_frac, T aux_scale, T* ds, int64_t N, int64_t E, int64_t K) {
  const T rs = static_cast<T>(opt.route_scale);
  for (int64_t tok = 0; tok < N; ++tok) {
    T* dst = ds + tok * E;
    for (int64_t e = 0; e < E; ++e) dst[e] = aux_scale * aux_frac[e];
    const int32_t* ex = expert + tok * K;
    const T* dwt = dw + tok * K;
    if (opt.norm_topk_prob) {
      T z = 0, dot = 0;
      for (int64_t j = 0; j < K; ++j) {
        z += sc[tok * E + ex[j]];
        dot += dwt[j] * sc[tok * E + ex[j]];
      }
      for (int64_t j = 0; j < K; ++j) dst[ex[j]] += rs / z * (dwt[j] - dot / z);
    } else {
      for (int64_t j = 0; j < K; ++j) dst[ex[j]] += rs * dwt[j];
    }
    const T* st = sc + tok * E;
    if (opt.sigmoid) {
      for (int64_t e = 0; e < E; ++e) dst[e] *= st[e] * (T(1) - st[e]);
    } else {
      T dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += st[e] * dst[e];
      for (int64_t e = 0; e < E; ++e) dst[e] = st[e] * (dst[e] - dot);
    }
  }
}

// f_e = count_e / (N k); P_e = mean_t s[t, e] (summed in double).
template <class T>
void moe_aux_stats(const int32_t* counts, const T* scores, T* aux_frac, T* aux_prob, int64_t n, int64_t e, int64_t k) {
  for (int64_t i = 0; i < e; ++i) {
    aux_frac[i] = n > 0 ? static_cast<T>(counts[i]) / static_cast<T>(n * k) : T(0);
    if (aux_prob == nullptr) continue;
    double p = 0;
    for (int64_t t = 0; t < n; ++t) p += static_cast<double>(scores[t * e + i]);
    aux_prob[i] = n > 0 ? static_cast<T>(p / static_cast<double>(n)) : T(0);
  }
}

template <class T>
void moe_grouped_linear_forward(const int32_t* off, const T* x, const T* w, T* y, int64_t e, int64_t n, int64_t k) {
  for (int64_t i = 0; i < e; ++i) {
    const int64_t m = off[i + 1] - off[i];
    if (m == 0) continue;  // an expert without rows does nothing
    gemm<T>(false, true, m, n, k, T(1), x + off[i] * k, w + i * n * k, T(0), y + off[i] * n);
  }
}

template <class T>
void moe_grouped_linear_backward(const int32_t* off, const T* dy, const T* x, const T* w, T* dx, T* dw, int64_t e,
                                 int64_t n, int64_t k) {
  for (int64_t i = 0; i < e; ++i) {
    const int64_t m = off[i + 1] - off[i];
    if (m == 0) continue;  // no rows: dx has none, dw_e gets nothing
    if (dx != nullptr) gemm<T>(false, false, m, k, n, T(1), dy + off[i] * n, w + i * n * k, T(0), dx + off[i] * k);
    if (dw != nullptr) gemm<T>(true, false, n, k, m, T(1), dy + off[i] * n, x + off[i] * k, T(1), dw + i * n * k);
  }
}

#define HYD_MOE_INSTANTIATE(T)                                                                                         \
  template void moe_route<T>(const MoeRouterOptions&, T*, const T*, int64_t, int64_t, int64_t, int32_t*, T*, int32_t*, \
                             int32_t*, int32_t*, int32_t*);                                                            \
  template void moe_permute<T>(const int32_t*, const T*, T*, int64_t, int64_t, int64_t);                               \
  template void moe_unpermute<T>(const int32_t*, const T*, T*, int64_t, int64_t, int64_t);                             \
  template void moe_gather_sum<T>(const int32_t*, const T*, const T*, T*, int64_t, int64_t, int64_t, bool);            \
  template void moe_combine_backward<T>(const int32_t*, const T*, const T*, const T*, T*, T*, int64_t, int64_t,        \
                                        int64_t);                                                                      \
  template void moe_router_backward<T>(const MoeRouterOptions&, const T*, const int32_t*, const T*, const T*, T, T*,   \
                                       int64_t, int64_t, int64_t);                                                     \
  template void moe_aux_stats<T>(const int32_t*, const T*, T*, T*, int64_t, int64_t, int64_t);                         \
  template void moe_grouped_linear_forward<T>(const int32_t*, const T*, const T*, T*, int64_t, int64_t, int64_t);      \
  template void moe_grouped_linear_backward<T>(const int32_t*, const T*, const T*, const T*, T*, T*, int64_t, int64_t, \
                                               int64_t);

HYD_MOE_INSTANTIATE(float)
HYD_MOE_INSTANTIATE(double)
#undef HYD_MOE_INSTANTIATE

}  // namespace hyd::kernels::cpu

// CPU reference for the causal depthwise short convolution with SiLU (see kernels/short_conv.h).
// Sums accumulate in double; u is recomputed in the backward.
#include "kernels/short_conv.h"

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

// Halo row of input token s < begin of document `doc` (begin - kernel + 1 <= s): halo[doc, s - begin + K - 1].
template <class T>
double halo_input(const T* halo, int64_t doc, int64_t begin, int64_t s, int64_t c, int64_t channels, int64_t kernel) {
  return static_cast<double>(halo[(doc * (kernel - 1) + (s - begin + kernel - 1)) * channels + c]);
}

// Pre-activation u[t,c] of token t in document `doc` starting at `begin`; taps before `begin` read the
// halo, or nothing without one.
template <class T>
double pre_activation(const T* x, const T* halo, const T* w, int64_t doc, int64_t begin, int64_t t, int64_t c,
                      int64_t channels, int64_t kernel) {
  double u = 0;
  for (int64_t j = 0; j < kernel; ++j) {
    const int64_t s = t - kernel + 1 + j;
    if (s >= begin) {
      u += static_cast<double>(w[c * kernel + j]) * static_cast<double>(x[s * channels + c]);
    } else if (halo != nullptr) {
      u += static_cast<double>(w[c * kernel + j]) * halo_input(halo, doc, begin, s, c, channels, kernel);
    }
  }
  return u;
}

}  // namespace

template <class T>
void short_conv_forward(const T* x, const T* w, const int32_t* cu_seqlens, int64_t num_docs, T* y, int64_t n,
                        int64_t channels, int64_t kernel, const T* halo) {
  check_cu_seqlens(cu_seqlens, num_docs, n, "short_conv_forward");
  if (kernel == 1) halo = nullptr;  // zero halo rows
  for (int64_t d = 0; d < num_docs; ++d) {
    const int64_t begin = cu_seqlens[d], end = cu_seqlens[d + 1];
    for (int64_t t = begin; t < end; ++t)
      for (int64_t c = 0; c < channels; ++c) {
        const double u = pre_activation(x, halo, w, d, begin, t, c, channels, kernel);
        y[t * channels + c] = static_cast<T>(u / (1.0 + std::exp(-u)));
      }
  }
}

template <class T>
void short_conv_backward(const T* dy, const T* x, const T* w, const int32_t* cu_seqlens, int64_t num_docs, T* dx, T* dw,
                         int64_t n, int64_t channels, int64_t kernel, const T* halo, T* dhalo) {
  check_cu_seqlens(cu_seqlens, num_docs, n, "short_conv_backward");
  HYD_CHECK(dhalo == nullptr || halo != nullptr || kernel == 1,
            "short_conv_backward: argument 'dhalo' given without a halo");
  if (kernel == 1) halo = dhalo = nullptr;  // zero halo rows
  std::vector<double> du(static_cast<size_t>(n * channels));
  std::vector<double> dw_acc(static_cast<size_t>(channels * kernel), 0.0);
  for (int64_t d = 0; d < num_docs; ++d) {
    const int64_t begin = cu_seqlens[d], end = cu_seqlens[d + 1];
    for (int64_t t = begin; t < end; ++t)
      for (int64_t c = 0; c < channels; ++c) {
        const double u = pre_activation(x, halo, w, d, begin, t, c, channels, kernel);
        const double s = 1.0 / (1.0 + std::exp(-u));
        const double g = static_cast<double>(dy[t * channels + c]) * s * (1.0 + u * (1.0 - s));
        du[t * channels + c] = g;
        for (int64_t j = 0; j < kernel; ++j) {
          const int64_t src = t - kernel + 1 + j;
          if (src >= begin) {
            dw_acc[c * kernel + j] += g * static_cast<double>(x[src * channels + c]);
          } else if (halo != nullptr) {
            dw_acc[c * kernel + j] += g * halo_input(halo, d, begin, src, c, channels, kernel);
          }
        }
      }
    for (int64_t t = begin; t < end; ++t)
      for (int64_t c = 0; c < channels; ++c) {
        double acc = 0;
        for (int64_t j = 0; j < kernel; ++j) {
          const int64_t dst = t + kernel - 1 - j;  // the output token whose window puts t at tap j
          if (dst < end) acc += static_cast<double>(w[c * kernel + j]) * du[dst * channels + c];
        }
        dx[t * channels + c] = static_cast<T>(acc);
      }
    if (dhalo != nullptr) {
      // Halo row i is token begin - K + 1 + i: tap j of output token t reads it when t = begin + i - j.
      for (int64_t i = 0; i < kernel - 1; ++i)
        for (int64_t c = 0; c < channels; ++c) {
          double acc = 0;
          for (int64_t t = begin; t < end && t <= begin + i; ++t)
            acc += static_cast<double>(w[c * kernel + (begin + i - t)]) * du[t * channels + c];
          dhalo[(d * (kernel - 1) + i) * channels + c] = static_cast<T>(acc);
        }
    }
  }
  for (int64_t i = 0; i < channels * kernel; ++i) dw[i] = static_cast<T>(static_cast<double>(dw[i]) + dw_acc[i]);
}

template void short_conv_forward<float>(const float*, const float*, const int32_t*, int64_t, float*, int64_t, int64_t,
                                        int64_t, const float*);
template void short_conv_forward<double>(const double*, const double*, const int32_t*, int64_t, double*, int64_t,
                                         int64_t, int64_t, const double*);
template void short_conv_backward<float>(const float*, const float*, const float*, const int32_t*, int64_t, float*,
                                         float*, int64_t, int64_t, int64_t, const float*, float*);
template void short_conv_backward<double>(const double*, const double*, const double*, const int32_t*, int64_t, double*,
                                          double*, int64_t, int64_t, int64_t, const double*, double*);

}  // namespace hyd::kernels::cpu

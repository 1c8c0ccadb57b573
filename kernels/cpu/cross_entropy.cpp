// CPU reference for cross-entropy (see kernels/cross_entropy.h): stable logsumexp accumulated in
// double, loss and (optionally) the in-place gradient row by row.
#include "kernels/cross_entropy.h"

#include <algorithm>
#include <cmath>

namespace hyd::kernels::cpu {

template <class T>
void cross_entropy(T* logits, const int32_t* targets, T* losses, int64_t n, int64_t vocab, bool write_grad,
                   double grad_scale) {
  // Validate every target before anything is written: an out-of-range id is a data error.
  for (int64_t i = 0; i < n; ++i) {
    if (targets[i] >= vocab)
      HYD_THROW("cross_entropy: argument 'targets' holds id ", targets[i], " at row ", i,
                ", outside the vocabulary of ", vocab);
  }
  for (int64_t i = 0; i < n; ++i) {
    T* row = logits + i * vocab;
    const int32_t t = targets[i];
    if (t < 0) {  // ignored token: no loss, no gradient
      losses[i] = T(0);
      if (write_grad) std::fill(row, row + vocab, T(0));
      continue;
    }
    double mx = -INFINITY;
    for (int64_t v = 0; v < vocab; ++v) mx = std::max(mx, static_cast<double>(row[v]));
    double sum = 0;
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - mx);
    const double lse = mx + std::log(sum);
    losses[i] = static_cast<T>(lse - static_cast<double>(row[t]));
    if (write_grad) {
      for (int64_t v = 0; v < vocab; ++v) {
        const double p = std::exp(static_cast<double>(row[v]) - lse);
        row[v] = static_cast<T>(grad_scale * (p - (v == t ? 1.0 : 0.0)));
      }
    }
  }
}

template void cross_entropy<float>(float*, const int32_t*, float*, int64_t, int64_t, bool, double);
template void cross_entropy<double>(double*, const int32_t*, double*, int64_t, int64_t, bool, double);

}  // namespace hyd::kernels::cpu

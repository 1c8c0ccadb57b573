// CPU reference for the fused distillation loss (see kernels/distill_loss.h). Defines the op's
// meaning: every row's statistics are accumulated in double after max subtraction, KL is summed
// term by term from its definition (skipping p_t == 0), and the gradient row is written last, after
// everything that reads the student logits.
#include "kernels/distill_loss.h"

#include <algorithm>
#include <cmath>

namespace hyd::kernels::cpu {

template <class T>
void distill_loss(T* student, const T* teacher, const int32_t* labels, const uint8_t* mask, T* kl, T* ce, uint8_t* top1,
                  int64_t n, int64_t vocab, const DistillLossOptions& opt) {
  // Validate every label before anything is written: an id outside the vocabulary is a data error.
  if (labels) {
    for (int64_t i = 0; i < n; ++i) {
      if (labels[i] >= vocab)
        HYD_THROW("distill_loss: argument 'labels' holds id ", labels[i], " at row ", i, ", outside the vocabulary of ",
                  vocab);
    }
  }
  const double tau = opt.temperature, inv_tau = 1.0 / tau;
  const double w_kl = opt.w_kl, w_ce = opt.w_ce, grad_scale = opt.grad_scale;
  for (int64_t i = 0; i < n; ++i) {
    T* s = student + i * vocab;
    const T* t = teacher + i * vocab;
    if (mask && mask[i] == 0) {  // not a loss token: nothing at all
      kl[i] = T(0);
      ce[i] = T(0);
      if (top1) top1[i] = 0;
      if (opt.write_grad) std::fill(s, s + vocab, T(0));
      continue;
    }
    // Maxima (first index on ties; NaN never wins, it propagates through the sums below).
    int64_t arg_s = 0, arg_t = 0;
    for (int64_t v = 1; v < vocab; ++v) {
      if (s[v] > s[arg_s]) arg_s = v;
      if (t[v] > t[arg_t]) arg_t = v;
    }
    const double ms = s[arg_s], mt = t[arg_t];
    double zs = 0, zs1 = 0, zt = 0;  // sum exp((s - ms) / tau), sum exp(s - ms), sum exp((t - mt) / tau)
    for (int64_t v = 0; v < vocab; ++v) {
      const double ds = static_cast<double>(s[v]) - ms;
      zs += std::exp(ds * inv_tau);
      zs1 += std::exp(ds);
      zt += std::exp((static_cast<double>(t[v]) - mt) * inv_tau);
    }
    const double log_zs = std::log(zs), log_zs1 = std::log(zs1), log_zt = std::log(zt);
    auto log_ps = [&](int64_t v) { return (static_cast<double>(s[v]) - ms) * inv_tau - log_zs; };
    auto log_pt = [&](int64_t v) { return (static_cast<double>(t[v]) - mt) * inv_tau - log_zt; };

    double kl_sum = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      const double lpt = log_pt(v), pt = std::exp(lpt);
      if (pt > 0) kl_sum += pt * (lpt - log_ps(v));  // 0 log 0 = 0
    }
    kl_sum *= tau * tau;
    kl[i] = static_cast<T>(kl_sum < 0 ? 0.0 : kl_sum);  // KL >= 0; rounding may dip below (NaN passes)

    const int32_t label = labels ? labels[i] : -1;
    ce[i] = label >= 0 ? static_cast<T>((ms - static_cast<double>(s[label])) + log_zs1) : T(0);
    if (top1) top1[i] = arg_s == arg_t ? 1 : 0;

    if (opt.write_grad) {
      for (int64_t v = 0; v < vocab; ++v) {
        double g = w_kl * tau * (std::exp(log_ps(v)) - std::exp(log_pt(v)));
        if (label >= 0) {
          const double q = std::exp((static_cast<double>(s[v]) - ms) - log_zs1);
          g += w_ce * (q - (v == label ? 1.0 : 0.0));
        }
        s[v] = static_cast<T>(grad_scale * g);  // s[v] is not read again after this
      }
    }
  }
}

template void distill_loss<float>(float*, const float*, const int32_t*, const uint8_t*, float*, float*, uint8_t*,
                                  int64_t, int64_t, const DistillLossOptions&);
template void distill_loss<double>(double*, const double*, const int32_t*, const uint8_t*, double*, double*, uint8_t*,
                                   int64_t, int64_t, const DistillLossOptions&);

}  // namespace hyd::kernels::cpu

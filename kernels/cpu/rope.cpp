// CPU reference for rotary position embeddings and the HF rope_scaling variants (see kernels/rope.h).
//
// rope_inv_freq follows transformers' modeling_rope_utils semantics, with d = head_dim, i < d/2:
//   default: inv[i] = theta^(-2i/d)
//   linear:  inv[i] / factor
//   llama3:  wavelen = 2 pi / inv[i]; wavelen > L/low: inv/factor; wavelen < L/high: inv; otherwise
//            (1 - s) inv/factor + s inv with s = (L/wavelen - low)/(high - low), L = original max positions
//   yarn:    ramp[i] = clamp((i - lo)/(hi - lo), 0, 1) over the correction range [lo, hi] of dims whose
//            rotation count over L lies between beta_slow and beta_fast (floored/ceiled when truncate);
//            inv = inv/factor * ramp + inv * (1 - ramp); attention factor 0.1 ln(factor) + 1 (factor > 1)
//            unless given.
#include "kernels/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace hyd::kernels {

namespace {

std::vector<double> default_inv_freq(double theta, int head_dim) {
  std::vector<double> inv(static_cast<size_t>(head_dim / 2));
  for (int i = 0; i < head_dim / 2; ++i) inv[i] = 1.0 / std::pow(theta, static_cast<double>(2 * i) / head_dim);
  return inv;
}

// Dimension (in units of head_dim, possibly fractional) at which a frequency makes `rotations` full
// turns over `max_pos` positions.
double yarn_correction_dim(double rotations, int head_dim, double theta, double max_pos) {
  return head_dim * std::log(max_pos / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(theta));
}

}  // namespace

std::vector<double> rope_inv_freq(double theta, int head_dim, const RopeScaling& scaling, double* attention_factor) {
  const char* where = "rope_scaling";
  if (head_dim <= 0 || head_dim % 2 != 0)
    throw Error::at(where, "head_dim", "must be a positive even number, got " + std::to_string(head_dim));
  if (!(theta > 1.0)) throw Error::at(where, "rope_theta", "must be > 1, got " + std::to_string(theta));
  std::vector<double> inv = default_inv_freq(theta, head_dim);
  double af = 1.0;
  const std::string& type = scaling.type;
  if (type != "default") {
    if (!(scaling.factor > 0)) throw Error::at(where, "factor", "must be > 0 for type '" + type + "'");
  }
  if (type == "default") {
    // nothing to do
  } else if (type == "linear") {
    for (double& v : inv) v /= scaling.factor;
  } else if (type == "llama3") {
    const double old_len = scaling.original_max_position_embeddings;
    const double lo = scaling.low_freq_factor, hi = scaling.high_freq_factor;
    if (!(old_len > 0)) throw Error::at(where, "original_max_position_embeddings", "must be > 0 for type 'llama3'");
    if (!(hi > lo)) throw Error::at(where, "high_freq_factor", "must be greater than low_freq_factor");
    const double low_freq_wavelen = old_len / lo, high_freq_wavelen = old_len / hi;
    for (double& v : inv) {
      const double wavelen = 2.0 * std::numbers::pi / v;
      if (wavelen > low_freq_wavelen) {
        v = v / scaling.factor;
      } else if (wavelen >= high_freq_wavelen) {
        const double s = (old_len / wavelen - lo) / (hi - lo);
        v = (1.0 - s) * v / scaling.factor + s * v;
      }
    }
  } else if (type == "yarn") {
    const double old_len = scaling.original_max_position_embeddings;
    if (!(old_len > 0)) throw Error::at(where, "original_max_position_embeddings", "must be > 0 for type 'yarn'");
    double lo = yarn_correction_dim(scaling.beta_fast, head_dim, theta, old_len);
    double hi = yarn_correction_dim(scaling.beta_slow, head_dim, theta, old_len);
    if (scaling.truncate) {
      lo = std::floor(lo);
      hi = std::ceil(hi);
    }
    lo = std::max(lo, 0.0);
    hi = std::min(hi, static_cast<double>(head_dim - 1));
    if (lo == hi) hi += 0.001;  // as HF: avoid a zero-width ramp
    for (size_t i = 0; i < inv.size(); ++i) {
      const double ramp = std::clamp((static_cast<double>(i) - lo) / (hi - lo), 0.0, 1.0);
      inv[i] = inv[i] / scaling.factor * ramp + inv[i] * (1.0 - ramp);
    }
    if (scaling.attention_factor > 0) {
      af = scaling.attention_factor;
    } else {
      af = scaling.factor > 1.0 ? 0.1 * std::log(scaling.factor) + 1.0 : 1.0;
    }
  } else {
    throw Error::at(where, "type", "unknown rope scaling type '" + type + "' (expected default, linear, llama3, yarn)");
  }
  if (attention_factor) *attention_factor = af;
  return inv;
}

void rope_build_tables(const std::vector<double>& inv_freq, double attention_factor, int64_t max_pos, float* cos_out,
                       float* sin_out) {
  const int64_t half = static_cast<int64_t>(inv_freq.size());
  for (int64_t p = 0; p < max_pos; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(p) * inv_freq[i];
      cos_out[p * half + i] = static_cast<float>(std::cos(angle) * attention_factor);
      sin_out[p * half + i] = static_cast<float>(std::sin(angle) * attention_factor);
    }
  }
}

namespace cpu {

template <class T>
void rope_apply(T* x, const int32_t* positions, const float* cos, const float* sin, int64_t n, int64_t heads,
                int64_t head_dim, int sign) {
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < n; ++t) {
    const float* c = cos + static_cast<int64_t>(positions[t]) * half;
    const float* s = sin + static_cast<int64_t>(positions[t]) * half;
    for (int64_t h = 0; h < heads; ++h) {
      T* xh = x + (t * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const double ci = c[i], si = sign * static_cast<double>(s[i]);
        const double x1 = static_cast<double>(xh[i]), x2 = static_cast<double>(xh[i + half]);
        xh[i] = static_cast<T>(x1 * ci - x2 * si);
        xh[i + half] = static_cast<T>(x2 * ci + x1 * si);
      }
    }
  }
}

template void rope_apply<float>(float*, const int32_t*, const float*, const float*, int64_t, int64_t, int64_t, int);
template void rope_apply<double>(double*, const int32_t*, const float*, const float*, int64_t, int64_t, int64_t, int);

}  // namespace cpu

}  // namespace hyd::kernels

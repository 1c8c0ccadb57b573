#include "kernels/kda_compose.h"

#include <algorithm>
#include <vector>

namespace hyd::kernels::cpu {

namespace {

// next = op(M) cur + add for one state: op(M) = M (transpose false) or M^T; [dk, dk] x [dk, dv].
void affine_step(const float* M, bool transpose, const double* cur, const float* add, int64_t dk, int64_t dv,
                 double* next) {
  for (int64_t i = 0; i < dk * dv; ++i) next[i] = add[i];
  for (int64_t i = 0; i < dk; ++i) {
    for (int64_t j = 0; j < dk; ++j) {
      const double m = transpose ? M[j * dk + i] : M[i * dk + j];
      if (m == 0.0) continue;
      const double* src = cur + j * dv;
      double* dst = next + i * dv;
      for (int64_t c = 0; c < dv; ++c) dst[c] += m * src[c];
    }
  }
}

}  // namespace

void kda_compose_prefix(const float* trans, int64_t ranks, int64_t rows, int64_t dk, int64_t dv, int rank, float* out) {
  const int64_t per = dk * (dk + dv), mb = dk * dv;
  (void)ranks;
  std::vector<double> cur(mb), next(mb);
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(cur.begin(), cur.end(), 0.0);
    for (int p = 0; p < rank; ++p) {
      const float* t = trans + (p * rows + r) * per;
      affine_step(t, false, cur.data(), t + dk * dk, dk, dv, next.data());
      cur.swap(next);
    }
    for (int64_t i = 0; i < mb; ++i) out[r * mb + i] = static_cast<float>(cur[i]);
  }
}

void kda_compose_suffix(const float* trans, const float* adj, int64_t ranks, int64_t rows, int64_t dk, int64_t dv,
                        int rank, float* out) {
  const int64_t per = dk * (dk + dv), mb = dk * dv;
  std::vector<double> cur(mb), next(mb);
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(cur.begin(), cur.end(), 0.0);
    for (int64_t p = ranks - 1; p > rank; --p) {
      affine_step(trans + (p * rows + r) * per, true, cur.data(), adj + (p * rows + r) * mb, dk, dv, next.data());
      cur.swap(next);
    }
    for (int64_t i = 0; i < mb; ++i) out[r * mb + i] = static_cast<float>(cur[i]);
  }
}

}  // namespace hyd::kernels::cpu

// Rotary position embedding, HF "rotate_half" layout (the two halves of each head are the pair).
//   for i < d/2, with c = cos[pos, i], s = sin[pos, i]:
//     y[i]       = x[i] * c - x[i + d/2] * s
//     y[i + d/2] = x[i + d/2] * c + x[i] * s
// backward is the inverse rotation (s -> -s). Applied in place on x [N, H, d] with positions
// i32 [N] (position within the token's document). cos/sin are f32 tables [max_pos, d/2] that
// already include the scaling variant's attention factor (YaRN's mscale).
// dtypes: CPU f32; CUDA bf16 x (math in f32).
#pragma once

#include <string>
#include <vector>

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

// HF rope_scaling variants: "default", "linear", "llama3", "yarn".
struct RopeScaling {
  std::string type = "default";
  double factor = 1.0;
  double low_freq_factor = 1.0;                 // llama3
  double high_freq_factor = 4.0;                // llama3
  double original_max_position_embeddings = 0;  // llama3, yarn
  double beta_fast = 32.0;                      // yarn
  double beta_slow = 1.0;                       // yarn
  double attention_factor = 0.0;                // yarn; 0 = derived from factor (0.1 ln(factor) + 1)
  bool truncate = true;                         // yarn: round the correction range to whole dims
};

// Inverse frequencies [d/2] and the attention factor applied to cos/sin, as HF computes them.
std::vector<double> rope_inv_freq(double theta, int head_dim, const RopeScaling& scaling, double* attention_factor);
// Fills host tables cos/sin [max_pos, head_dim/2].
void rope_build_tables(const std::vector<double>& inv_freq, double attention_factor, int64_t max_pos, float* cos_out,
                       float* sin_out);

void rope_forward(const ExecContext& ctx, const Tensor& x, const Tensor& positions, const Tensor& cos,
                  const Tensor& sin);
void rope_backward(const ExecContext& ctx, const Tensor& dx, const Tensor& positions, const Tensor& cos,
                   const Tensor& sin);

namespace cpu {
// sign = +1 forward, -1 backward.
template <class T>
void rope_apply(T* x, const int32_t* positions, const float* cos, const float* sin, int64_t n, int64_t heads,
                int64_t head_dim, int sign);
}  // namespace cpu

namespace cuda {
void rope_apply(bf16* x, const int32_t* positions, const float* cos, const float* sin, int64_t n, int64_t heads,
                int64_t head_dim, int sign, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

// The per-token programs of the CUDA router (kernels/cuda/moe.cu: one thread per token), host-callable so
// that the emulation test (tests/gpu/test_gpu_moe.cpp, MoeRouterEmulation) checks them against the CPU
// reference (kernels/cpu/moe.cpp) without a GPU. The math is kernels/moe.h's; f32 throughout.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/moe.h"

#if defined(__CUDACC__)
#define HYD_MOE_ROUTER_HD __host__ __device__ __forceinline__
#else
#define HYD_MOE_ROUTER_HD inline
#endif

namespace hyd::kernels::moe_router {

// st [E]: the token's logits in, its scores out (softmax | sigmoid). The k choices by repeated argmax of
// st + bias (a strictly greater value replaces the best, so a tie goes to the lower expert index: the CPU's
// order); combine weights w_j = st[e_j] (/ sum_i st[e_i]) * route_scale. k <= kMoeMaxTopK.
HYD_MOE_ROUTER_HD void route_token(float* st, const float* bias, int e_num, int k, bool use_sigmoid, bool norm_topk,
                                   float route_scale, int32_t* expert, float* weight) {
  if (use_sigmoid) {
    for (int e = 0; e < e_num; ++e) st[e] = 1.f / (1.f + expf(-st[e]));
  } else {
    float mx = st[0];
    for (int e = 1; e < e_num; ++e) mx = fmaxf(mx, st[e]);
    float sum = 0.f;
    for (int e = 0; e < e_num; ++e) {
      const float v = expf(st[e] - mx);
      st[e] = v;
      sum += v;
    }
    for (int e = 0; e < e_num; ++e) st[e] /= sum;
  }
  int chosen[kMoeMaxTopK];
  for (int j = 0; j < k; ++j) {
    int best = -1;
    float best_v = 0.f;
    for (int e = 0; e < e_num; ++e) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken |= chosen[i] == e;
      if (taken) continue;
      const float v = st[e] + (bias != nullptr ? bias[e] : 0.f);
      if (best < 0 || v > best_v) {  // strict: the lower index keeps a tie
        best = e;
        best_v = v;
      }
    }
    chosen[j] = best;
  }
  float norm = 0.f;
  for (int j = 0; j < k; ++j) norm += st[chosen[j]];
  const float scale = (norm_topk ? 1.f / norm : 1.f) * route_scale;
  for (int j = 0; j < k; ++j) {
    expert[j] = chosen[j];
    weight[j] = st[chosen[j]] * scale;
  }
}

// One token's d_logits [E] (overwritten) from its scores st [E], experts ex [k], combine-weight gradient
// dw [k] and the aux term aux_scale * aux_frac [E].
HYD_MOE_ROUTER_HD void router_backward_token(const float* st, const int32_t* ex, const float* dw, const float* aux_frac,
                                             float aux_scale, float* ds, int e_num, int k, bool use_sigmoid,
                                             bool norm_topk, float route_scale) {
  for (int e = 0; e < e_num; ++e) ds[e] = aux_scale * aux_frac[e];
  if (norm_topk) {
    float z = 0.f, dot = 0.f;
    for (int j = 0; j < k; ++j) {
      z += st[ex[j]];
      dot += dw[j] * st[ex[j]];
    }
    for (int j = 0; j < k; ++j) ds[ex[j]] += route_scale / z * (dw[j] - dot / z);
  } else {
    for (int j = 0; j < k; ++j) ds[ex[j]] += route_scale * dw[j];
  }
  if (use_sigmoid) {
    for (int e = 0; e < e_num; ++e) ds[e] *= st[e] * (1.f - st[e]);
  } else {
    float dot = 0.f;
    for (int e = 0; e < e_num; ++e) dot += st[e] * ds[e];
    for (int e = 0; e < e_num; ++e) ds[e] = st[e] * (ds[e] - dot);
  }
}

}  // namespace hyd::kernels::moe_router

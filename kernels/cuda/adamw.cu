// CUDA AdamW (see kernels/adamw.h): elementwise on the fp32 master, moments and gradient, with the
// bf16 working copy written in the same pass when given. The bias corrections are computed once on
// the host in double and passed as f32 (exactly as the CPU reference rounds them).
#include <climits>
#include <cmath>

#include "kernels/adamw.h"
#include "kernels/cuda/common.cuh"

namespace hyd::kernels::cuda {

using namespace cuda_detail;

namespace {

struct AdamWCoeffs {
  float lr, beta1, beta2, eps, weight_decay, grad_scale, bc1, bc2;
};

// One element: m, v and the master updated in place; returns the new master. Every kernel here uses it, with
// every rounding spelled out (no contraction left to the compiler), so an element's result does not depend on the
// kernel or on the vector or scalar path that updates it (a ZeRO-1 shard boundary moves elements between them).
__device__ __forceinline__ float adamw_element(float& m, float& v, float& master, float grad, float weight_decay,
                                               const AdamWCoeffs& k) {
  const float g = __fmul_rn(grad, k.grad_scale);
  const float mi = __fmaf_rn(k.beta1, m, __fmul_rn(1.f - k.beta1, g));
  const float vi = __fmaf_rn(k.beta2, v, __fmul_rn(__fmul_rn(1.f - k.beta2, g), g));
  m = mi;
  v = vi;
  const float p = master;
  const float step = __fdiv_rn(__fdiv_rn(mi, k.bc1), __fadd_rn(__fsqrt_rn(__fdiv_rn(vi, k.bc2)), k.eps));
  master = __fsub_rn(p, __fmul_rn(k.lr, __fmaf_rn(weight_decay, p, step)));
  return master;
}

__global__ void adamw_kernel(float* master, const float* grad, float* m, float* v, __nv_bfloat16* working, int64_t n,
                             AdamWCoeffs k) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float mi = m[i], vi = v[i], p = master[i];
    const float p_new = adamw_element(mi, vi, p, grad[i], k.weight_decay, k);
    m[i] = mi;
    v[i] = vi;
    master[i] = p_new;
    if (working) working[i] = to_bf(p_new);
  }
}

constexpr int kTableThreads = 256;

// One block per chunk of kAdamWChunk elements of one segment: 4 consecutive elements per thread and step (16-byte
// f32 / 8-byte bf16 accesses) when the segment allows, else one.
__global__ void __launch_bounds__(kTableThreads)
    adamw_table_kernel(const AdamWSegment* __restrict__ segs, const int32_t* __restrict__ chunks, AdamWCoeffs k) {
  const AdamWSegment sg = segs[chunks[2 * blockIdx.x]];
  __nv_bfloat16* working = reinterpret_cast<__nv_bfloat16*>(sg.working);
  const int64_t begin = int64_t(chunks[2 * blockIdx.x + 1]) * kAdamWChunk;
  const int64_t end = min(sg.n, begin + kAdamWChunk);
  if (sg.vec4) {
    for (int64_t i = begin + 4 * int64_t(threadIdx.x); i < end; i += 4 * kTableThreads) {
      if (i + 4 <= end) {
        float4 m4 = *reinterpret_cast<const float4*>(sg.m + i), v4 = *reinterpret_cast<const float4*>(sg.v + i);
        float4 p4 = *reinterpret_cast<const float4*>(sg.master + i);
        const float4 g4 = *reinterpret_cast<const float4*>(sg.grad + i);
        adamw_element(m4.x, v4.x, p4.x, g4.x, sg.weight_decay, k);
        adamw_element(m4.y, v4.y, p4.y, g4.y, sg.weight_decay, k);
        adamw_element(m4.z, v4.z, p4.z, g4.z, sg.weight_decay, k);
        adamw_element(m4.w, v4.w, p4.w, g4.w, sg.weight_decay, k);
        *reinterpret_cast<float4*>(sg.m + i) = m4;
        *reinterpret_cast<float4*>(sg.v + i) = v4;
        *reinterpret_cast<float4*>(sg.master + i) = p4;
        if (working) {
          Pack<__nv_bfloat16, 4> w;
          w.v[0] = to_bf(p4.x), w.v[1] = to_bf(p4.y), w.v[2] = to_bf(p4.z), w.v[3] = to_bf(p4.w);
          *reinterpret_cast<Pack<__nv_bfloat16, 4>*>(working + i) = w;
        }
      } else {
        for (int64_t e = i; e < end; ++e) {
          const float p_new = adamw_element(sg.m[e], sg.v[e], sg.master[e], sg.grad[e], sg.weight_decay, k);
          if (working) working[e] = to_bf(p_new);
        }
      }
    }
  } else {
    for (int64_t e = begin + threadIdx.x; e < end; e += kTableThreads) {
      const float p_new = adamw_element(sg.m[e], sg.v[e], sg.master[e], sg.grad[e], sg.weight_decay, k);
      if (working) working[e] = to_bf(p_new);
    }
  }
}

AdamWCoeffs coeffs(const AdamWStep& s) {
  return AdamWCoeffs{s.lr,
                     s.beta1,
                     s.beta2,
                     s.eps,
                     s.weight_decay,
                     s.grad_scale,
                     static_cast<float>(1.0 - std::pow(static_cast<double>(s.beta1), static_cast<double>(s.step))),
                     static_cast<float>(1.0 - std::pow(static_cast<double>(s.beta2), static_cast<double>(s.step)))};
}

}  // namespace

void adamw_update(float* master, const float* grad, float* m, float* v, bf16* working, int64_t n, const AdamWStep& s,
                  void* stream) {
  HYD_CHECK(s.step >= 1, "adamw_update: step must be >= 1 (1-based), got ", s.step);
  if (n == 0) return;
  const AdamWCoeffs k = coeffs(s);
  constexpr int kThreads = 256;
  adamw_kernel<<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(master, grad, m, v, as_nv(working), n, k);
  CHECK_LAUNCH();
}

void adamw_update_table(const AdamWSegment* segments, const int32_t* chunks, int64_t num_chunks, const AdamWStep& s,
                        void* stream) {
  HYD_CHECK(s.step >= 1, "adamw_update_table: step must be >= 1 (1-based), got ", s.step);
  HYD_CHECK(num_chunks <= INT32_MAX, "adamw_update_table: ", num_chunks, " chunks exceed the grid");
  if (num_chunks == 0) return;
  adamw_table_kernel<<<static_cast<unsigned>(num_chunks), kTableThreads, 0, as_stream(stream)>>>(segments, chunks,
                                                                                                 coeffs(s));
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

// CUDA rotary position embedding (see kernels/rope.h), in place on bf16 x [N, H, d], f32 math.
//   for i < d/2, c = cos[pos, i], s = sign * sin[pos, i]:
//     y[i] = x[i] c - x[i + d/2] s,   y[i + d/2] = x[i + d/2] c + x[i] s
// One thread per VEC consecutive pairs (VEC = 4 when d/2 % 4 == 0 and the pointers are aligned for
// 8-byte bf16 and 16-byte f32 accesses, else 1); grid-stride over N * H * d/2 / VEC. Positions are
// trusted to lie in [0, max_pos) (the dispatcher checks them on the CPU only).
#include "kernels/cuda/common.cuh"
#include "kernels/rope.h"

namespace hyd::kernels::cuda {

namespace {

using namespace cuda_detail;

template <int VEC>
__global__ void rope_kernel(__nv_bfloat16* x, const int32_t* __restrict__ positions, const float* __restrict__ cos,
                            const float* __restrict__ sin, int64_t n, int64_t heads, int64_t half, float sign) {
  using BPack = Pack<__nv_bfloat16, VEC>;
  using FPack = Pack<float, VEC>;
  const int64_t packs = half / VEC, total = n * heads * packs;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t th = k / packs;  // token * heads + head
    const int64_t i = (k - th * packs) * VEC;
    const int64_t pos = positions[th / heads];
    __nv_bfloat16* xh = x + th * 2 * half;
    const BPack x1 = *reinterpret_cast<const BPack*>(xh + i);
    const BPack x2 = *reinterpret_cast<const BPack*>(xh + i + half);
    const FPack c = *reinterpret_cast<const FPack*>(cos + pos * half + i);
    const FPack s = *reinterpret_cast<const FPack*>(sin + pos * half + i);
    BPack y1, y2;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float a = to_f(x1.v[e]), b = to_f(x2.v[e]), ss = sign * s.v[e];
      y1.v[e] = to_bf(a * c.v[e] - b * ss);
      y2.v[e] = to_bf(b * c.v[e] + a * ss);
    }
    *reinterpret_cast<BPack*>(xh + i) = y1;
    *reinterpret_cast<BPack*>(xh + i + half) = y2;
  }
}

}  // namespace

void rope_apply(bf16* x, const int32_t* positions, const float* cos, const float* sin, int64_t n, int64_t heads,
                int64_t head_dim, int sign, void* stream) {
  const int64_t half = head_dim / 2;
  if (n == 0 || heads == 0 || half == 0) return;
  const int threads = 256;
  const float sg = sign >= 0 ? 1.f : -1.f;
  const bool vec4 = half % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 8 == 0 && aligned16(cos) && aligned16(sin);
  if (vec4) {
    rope_kernel<4><<<grid_for(n * heads * half / 4, threads), threads, 0, as_stream(stream)>>>(as_nv(x), positions, cos,
                                                                                               sin, n, heads, half, sg);
  } else {
    rope_kernel<1><<<grid_for(n * heads * half, threads), threads, 0, as_stream(stream)>>>(as_nv(x), positions, cos,
                                                                                           sin, n, heads, half, sg);
  }
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

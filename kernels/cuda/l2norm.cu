// CUDA L2 normalisation (see kernels/l2norm.h): bf16 x, y, dy, dx; f32 rstd; f32 math.
//   rstd = 1 / sqrt(sum x^2 + eps),  y = scale x rstd;   dx = rstd (scale dy - (y . dy) y / scale)
// Rows of 32, 64, 128 or 256 (16-byte aligned): dim / 8 lanes per row, 8 elements per lane read once into
// registers (RowLanes, kernels/cuda/common.cuh; before 2026-11-28 one warp per row, half its lanes idle at dim 128
// and the row read twice). Other dims: one warp per row, 8 warps per block, grid-stride over rows; 16-byte accesses
// when dim % 8 == 0 and the pointers are aligned. A row is read completely (and reduced with shuffles, which
// synchronise the lanes) before any lane writes it, and each lane rewrites only the elements it read, so y may
// alias x and dx may alias dy.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/l2norm.h"

namespace hyd::kernels::cuda {

namespace {

using namespace cuda_detail;

constexpr int kWarpsPerBlock = 8;

template <int VEC>
__global__ void l2norm_forward_kernel(const __nv_bfloat16* x, __nv_bfloat16* y, float* __restrict__ rstd, int64_t rows,
                                      int64_t dim, float scale, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const __nv_bfloat16* xr = x + r * dim;
    float ss = 0.f;
    for (int64_t c = int64_t(lane) * VEC; c < dim; c += 32 * VEC) {
      const auto v = load_pack<VEC>(xr + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) ss += to_f(v.v[e]) * to_f(v.v[e]);
    }
    ss = warp_sum(ss);
    const float s = rsqrtf(ss + eps);
    if (lane == 0) rstd[r] = s;
    const float m = scale * s;
    for (int64_t c = int64_t(lane) * VEC; c < dim; c += 32 * VEC) {
      const auto v = load_pack<VEC>(xr + c);
      Bf16Pack<VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = to_bf(to_f(v.v[e]) * m);
      *reinterpret_cast<Bf16Pack<VEC>*>(y + r * dim + c) = o;
    }
  }
}

template <int VEC>
__global__ void l2norm_backward_kernel(const __nv_bfloat16* dy, const __nv_bfloat16* __restrict__ y,
                                       const float* __restrict__ rstd, __nv_bfloat16* dx, int64_t rows, int64_t dim,
                                       float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const __nv_bfloat16* yr = y + r * dim;
    const __nv_bfloat16* dyr = dy + r * dim;
    float dot = 0.f;
    for (int64_t c = int64_t(lane) * VEC; c < dim; c += 32 * VEC) {
      const auto yv = load_pack<VEC>(yr + c), gv = load_pack<VEC>(dyr + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) dot += to_f(yv.v[e]) * to_f(gv.v[e]);
    }
    dot = warp_sum(dot);
    const float s = rstd[r];
    const float a = s * scale, b = s * dot / scale;
    for (int64_t c = int64_t(lane) * VEC; c < dim; c += 32 * VEC) {
      const auto yv = load_pack<VEC>(yr + c), gv = load_pack<VEC>(dyr + c);
      Bf16Pack<VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = to_bf(a * to_f(gv.v[e]) - b * to_f(yv.v[e]));
      *reinterpret_cast<Bf16Pack<VEC>*>(dx + r * dim + c) = o;
    }
  }
}

template <int LPR>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    l2norm_forward_rows_kernel(const __nv_bfloat16* x, __nv_bfloat16* y, float* __restrict__ rstd, int64_t rows,
                               float scale, float eps) {
  constexpr int64_t dim = LPR * 8;
  const RowLanes<LPR, kWarpsPerBlock> at;
  for (int64_t rw = at.r0; rw < rows; rw += at.step) {
    const int64_t r = rw + at.seg, e0 = r * dim + 8 * at.sl;
    const bool valid = r < rows;
    const Bf16Pack<8> v = valid ? load_pack<8>(x + e0) : zero_pack();
    float ss = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) ss += to_f(v.v[e]) * to_f(v.v[e]);
    const float s = rsqrtf(row_sum<LPR>(ss) + eps);
    if (!valid) continue;
    if (at.sl == 0) rstd[r] = s;
    const float m = scale * s;
    Bf16Pack<8> o;
#pragma unroll
    for (int e = 0; e < 8; ++e) o.v[e] = to_bf(to_f(v.v[e]) * m);
    *reinterpret_cast<Bf16Pack<8>*>(y + e0) = o;
  }
}

template <int LPR>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    l2norm_backward_rows_kernel(const __nv_bfloat16* dy, const __nv_bfloat16* __restrict__ y,
                                const float* __restrict__ rstd, __nv_bfloat16* dx, int64_t rows, float scale) {
  constexpr int64_t dim = LPR * 8;
  const RowLanes<LPR, kWarpsPerBlock> at;
  for (int64_t rw = at.r0; rw < rows; rw += at.step) {
    const int64_t r = rw + at.seg, e0 = r * dim + 8 * at.sl;
    const bool valid = r < rows;
    const Bf16Pack<8> yv = valid ? load_pack<8>(y + e0) : zero_pack(), gv = valid ? load_pack<8>(dy + e0) : zero_pack();
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) dot += to_f(yv.v[e]) * to_f(gv.v[e]);
    dot = row_sum<LPR>(dot);
    if (!valid) continue;
    const float s = rstd[r];
    const float a = s * scale, b = s * dot / scale;
    Bf16Pack<8> o;
#pragma unroll
    for (int e = 0; e < 8; ++e) o.v[e] = to_bf(a * to_f(gv.v[e]) - b * to_f(yv.v[e]));
    *reinterpret_cast<Bf16Pack<8>*>(dx + e0) = o;
  }
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::clamp<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, 65535LL * 16));
}

}  // namespace

void l2norm_forward(const bf16* x, bf16* y, float* rstd, int64_t rows, int64_t dim, float scale, float eps,
                    void* stream) {
  if (rows == 0) return;
  HYD_CHECK(dim > 0, "l2norm_forward: dim must be positive");
  if (aligned16(x) && aligned16(y) && with_row_lanes(dim, [&](auto lpr) {
        constexpr int LPR = decltype(lpr)::value;
        l2norm_forward_rows_kernel<LPR>
            <<<row_lane_blocks(rows, LPR, kWarpsPerBlock), kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
                as_nv(x), as_nv(y), rstd, rows, scale, eps);
      })) {
    CHECK_LAUNCH();
    return;
  }
  if (dim % 8 == 0 && aligned16(x) && aligned16(y)) {
    l2norm_forward_kernel<8><<<row_blocks(rows), kWarpsPerBlock * 32, 0, as_stream(stream)>>>(as_nv(x), as_nv(y), rstd,
                                                                                              rows, dim, scale, eps);
  } else {
    l2norm_forward_kernel<1><<<row_blocks(rows), kWarpsPerBlock * 32, 0, as_stream(stream)>>>(as_nv(x), as_nv(y), rstd,
                                                                                              rows, dim, scale, eps);
  }
  CHECK_LAUNCH();
}

void l2norm_backward(const bf16* dy, const bf16* y, const float* rstd, bf16* dx, int64_t rows, int64_t dim, float scale,
                     void* stream) {
  if (rows == 0) return;
  HYD_CHECK(dim > 0, "l2norm_backward: dim must be positive");
  if (aligned16(dy) && aligned16(y) && aligned16(dx) && with_row_lanes(dim, [&](auto lpr) {
        constexpr int LPR = decltype(lpr)::value;
        l2norm_backward_rows_kernel<LPR>
            <<<row_lane_blocks(rows, LPR, kWarpsPerBlock), kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
                as_nv(dy), as_nv(y), rstd, as_nv(dx), rows, scale);
      })) {
    CHECK_LAUNCH();
    return;
  }
  if (dim % 8 == 0 && aligned16(dy) && aligned16(y) && aligned16(dx)) {
    l2norm_backward_kernel<8><<<row_blocks(rows), kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
        as_nv(dy), as_nv(y), rstd, as_nv(dx), rows, dim, scale);
  } else {
    l2norm_backward_kernel<1><<<row_blocks(rows), kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
        as_nv(dy), as_nv(y), rstd, as_nv(dx), rows, dim, scale);
  }
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

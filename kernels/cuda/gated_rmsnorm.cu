// CUDA gated RMSNorm (see kernels/gated_rmsnorm.h): bf16 o, gate, w, y, dy, do, dgate; f32 rstd and
// dw; f32 math.
//   rstd = 1 / sqrt(mean o^2 + eps),  y = o rstd w sigmoid(gate)
//   dgate = dy h w s (1 - s),  do = rstd (dz w - h mean(dz w h)),  dw += sum_r dz h   (h = o rstd, s = sigmoid(gate),
//   dz = dy s)
// Rows of 32, 64, 128 or 256 (value heads; 16-byte aligned): LPR = dim / 8 lanes per row, each lane 8 elements held
// in registers (every input read once), 32 / LPR rows per warp, the row sums over the LPR lanes by shuffles; the
// backward adds each lane's dw terms over the rows it visits, per block into a row of partial sums that column_sum
// (common.cuh) adds to dw in a fixed order (deterministic). (Before, 2026-11-28: one warp per row, half its lanes
// idle at dim 128, o / gate / dy read twice, and dw in a second kernel re-reading dy, o and gate: 72 + 115 + 63 us
// per KDA layer at B8xT2048 x 8 heads on an H200.) Other dims: one warp per row, 8 warps per block, grid-stride over
// rows; 16-byte accesses when dim % 8 == 0 and the pointers are aligned; dw: a column kernel, 32 columns x 16 row
// lanes per block, rows split into chunks over gridDim.y whose partial sums are added to dw with f32 atomicAdd.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/gated_rmsnorm.h"

namespace hyd::kernels::cuda {

namespace {

using namespace cuda_detail;

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float sigmoidf(float a) { return 1.f / (1.f + __expf(-a)); }

template <int VEC>
__global__ void gated_rmsnorm_forward_kernel(const __nv_bfloat16* __restrict__ o,
                                             const __nv_bfloat16* __restrict__ gate,
                                             const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,
                                             float* __restrict__ rstd, int64_t rows, int64_t dim, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const __nv_bfloat16* orow = o + r * dim;
    float ss = 0.f;
    for (int64_t c = int64_t(lane) * VEC; c < dim; c += 32 * VEC) {
      const auto v = load_pack<VEC>(orow + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) ss += to_f(v.v[e]) * to_f(v.v[e]);
    }
    ss = warp_sum(ss);
    const float s = rsqrtf(ss / static_cast<float>(dim) + eps);
    if (lane == 0) rstd[r] = s;
    for (int64_t c = int64_t(lane) * VEC; c < dim; c += 32 * VEC) {
      const auto ov = load_pack<VEC>(orow + c), gv = load_pack<VEC>(gate + r * dim + c), wv = load_pack<VEC>(w + c);
      Bf16Pack<VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) out.v[e] = to_bf(to_f(ov.v[e]) * s * to_f(wv.v[e]) * sigmoidf(to_f(gv.v[e])));
      *reinterpret_cast<Bf16Pack<VEC>*>(y + r * dim + c) = out;
    }
  }
}

template <int VEC>
__global__ void gated_rmsnorm_dx_kernel(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ o,
                                        const __nv_bfloat16* __restrict__ gate, const __nv_bfloat16* __restrict__ w,
                                        const float* __restrict__ rstd, __nv_bfloat16* __restrict__ d_o,
                                        __nv_bfloat16* __restrict__ dgate, int64_t rows, int64_t dim) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const int64_t base = r * dim;
    const float s = rstd[r];
    float dot = 0.f;  // sum_k dz w h
    for (int64_t c = int64_t(lane) * VEC; c < dim; c += 32 * VEC) {
      const auto ov = load_pack<VEC>(o + base + c), gv = load_pack<VEC>(gate + base + c), wv = load_pack<VEC>(w + c);
      const auto dv = load_pack<VEC>(dy + base + c);
      Bf16Pack<VEC> dg;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float sg = sigmoidf(to_f(gv.v[e])), h = to_f(ov.v[e]) * s, wj = to_f(wv.v[e]), d = to_f(dv.v[e]);
        dot += d * sg * wj * h;
        dg.v[e] = to_bf(d * h * wj * sg * (1.f - sg));
      }
      *reinterpret_cast<Bf16Pack<VEC>*>(dgate + base + c) = dg;
    }
    dot = warp_sum(dot);
    const float mean = dot / static_cast<float>(dim);
    for (int64_t c = int64_t(lane) * VEC; c < dim; c += 32 * VEC) {
      const auto ov = load_pack<VEC>(o + base + c), gv = load_pack<VEC>(gate + base + c), wv = load_pack<VEC>(w + c);
      const auto dv = load_pack<VEC>(dy + base + c);
      Bf16Pack<VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float sg = sigmoidf(to_f(gv.v[e])), h = to_f(ov.v[e]) * s;
        out.v[e] = to_bf(s * (to_f(dv.v[e]) * sg * to_f(wv.v[e]) - h * mean));
      }
      *reinterpret_cast<Bf16Pack<VEC>*>(d_o + base + c) = out;
    }
  }
}

constexpr int kDwCols = 32;      // threadIdx.x: one column each
constexpr int kDwRowLanes = 16;  // threadIdx.y: rows r, r + 16, ... within the block's chunk

__global__ void gated_rmsnorm_dw_kernel(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ o,
                                        const __nv_bfloat16* __restrict__ gate, const float* __restrict__ rstd,
                                        float* __restrict__ dw, int64_t rows, int64_t dim, int64_t rows_per_chunk) {
  __shared__ float part[kDwRowLanes][kDwCols + 1];
  const int64_t col = int64_t(blockIdx.x) * kDwCols + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = std::min(rows, r0 + rows_per_chunk);
  float acc = 0.f;
  if (col < dim) {
#pragma unroll 4
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kDwRowLanes) {
      const int64_t e = r * dim + col;
      acc += to_f(dy[e]) * sigmoidf(to_f(gate[e])) * to_f(o[e]) * rstd[r];
    }
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < dim) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kDwRowLanes; ++k) s += part[k][threadIdx.x];
    if (gridDim.y == 1) {
      dw[col] += s;
    } else {
      atomicAdd(dw + col, s);
    }
  }
}

// ---- rows of LPR * 8 elements (RowLanes, kernels/cuda/common.cuh).

template <int LPR>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    gated_rmsnorm_forward_rows_kernel(const __nv_bfloat16* __restrict__ o, const __nv_bfloat16* __restrict__ gate,
                                      const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,
                                      float* __restrict__ rstd, int64_t rows, float eps) {
  constexpr int64_t dim = LPR * 8;
  const RowLanes<LPR, kWarpsPerBlock> at;
  const auto wv = load_pack<8>(w + 8 * at.sl);
  for (int64_t rw = at.r0; rw < rows; rw += at.step) {  // warp-uniform: every lane takes part in the shuffles
    const int64_t r = rw + at.seg, e0 = r * dim + 8 * at.sl;
    const bool valid = r < rows;
    Bf16Pack<8> ov = zero_pack(), gv = zero_pack();  // (a row past the end: zeros, no loads)
    if (valid) {
      ov = load_pack<8>(o + e0);
      gv = load_pack<8>(gate + e0);
    }
    float ss = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) ss += to_f(ov.v[e]) * to_f(ov.v[e]);
    const float s = rsqrtf(row_sum<LPR>(ss) / static_cast<float>(dim) + eps);
    if (!valid) continue;
    if (at.sl == 0) rstd[r] = s;
    Bf16Pack<8> out;
#pragma unroll
    for (int e = 0; e < 8; ++e) out.v[e] = to_bf(to_f(ov.v[e]) * s * to_f(wv.v[e]) * sigmoidf(to_f(gv.v[e])));
    *reinterpret_cast<Bf16Pack<8>*>(y + e0) = out;
  }
}

// do, dgate and the dw terms in one pass; each block writes its column sums to partial[blockIdx.x][dim]
// (column_sum adds them to dw in a fixed order).
template <int LPR>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    gated_rmsnorm_backward_rows_kernel(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ o,
                                       const __nv_bfloat16* __restrict__ gate, const __nv_bfloat16* __restrict__ w,
                                       const float* __restrict__ rstd, __nv_bfloat16* __restrict__ d_o,
                                       __nv_bfloat16* __restrict__ dgate, float* __restrict__ partial, int64_t rows) {
  constexpr int64_t dim = LPR * 8;
  __shared__ float part[kWarpsPerBlock][dim];
  const RowLanes<LPR, kWarpsPerBlock> at;
  const auto wv = load_pack<8>(w + 8 * at.sl);
  float dwp[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t rw = at.r0; rw < rows; rw += at.step) {
    const int64_t r = rw + at.seg, e0 = r * dim + 8 * at.sl;
    const bool valid = r < rows;
    Bf16Pack<8> ov = zero_pack(), gv = zero_pack(), dv = zero_pack();  // (past the end: zero terms)
    float s = 0.f;
    if (valid) {
      ov = load_pack<8>(o + e0);
      gv = load_pack<8>(gate + e0);
      dv = load_pack<8>(dy + e0);
      s = rstd[r];
    }
    float sg[8], dot = 0.f;  // dot: sum_k dz w h
    Bf16Pack<8> dg;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      sg[e] = sigmoidf(to_f(gv.v[e]));
      const float h = to_f(ov.v[e]) * s, wj = to_f(wv.v[e]), d = to_f(dv.v[e]);
      dot += d * sg[e] * wj * h;
      dg.v[e] = to_bf(d * h * wj * sg[e] * (1.f - sg[e]));
      dwp[e] += d * sg[e] * to_f(ov.v[e]) * s;
    }
    const float mean = row_sum<LPR>(dot) / static_cast<float>(dim);
    if (!valid) continue;
    *reinterpret_cast<Bf16Pack<8>*>(dgate + e0) = dg;
    Bf16Pack<8> out;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float h = to_f(ov.v[e]) * s;
      out.v[e] = to_bf(s * (to_f(dv.v[e]) * sg[e] * to_f(wv.v[e]) - h * mean));
    }
    *reinterpret_cast<Bf16Pack<8>*>(d_o + e0) = out;
  }
  // dw: over the warp's rows (lanes sl, sl + LPR, ...), then over the block's warps in order, into this block's row
  // of `partial`.
#pragma unroll
  for (int e = 0; e < 8; ++e) {
#pragma unroll
    for (int off = LPR; off < 32; off <<= 1) dwp[e] += __shfl_xor_sync(0xffffffffu, dwp[e], off);
  }
  const int warp = threadIdx.x >> 5;
  if (at.seg == 0)
#pragma unroll
    for (int e = 0; e < 8; ++e) part[warp][8 * at.sl + e] = dwp[e];
  __syncthreads();
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < kWarpsPerBlock; ++k) t += part[k][c];
    partial[int64_t(blockIdx.x) * dim + c] = t;
  }
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::clamp<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, 65535LL * 16));
}

}  // namespace

void gated_rmsnorm_forward(const bf16* o, const bf16* gate, const bf16* w, bf16* y, float* rstd, int64_t rows,
                           int64_t dim, float eps, void* stream) {
  if (rows == 0) return;
  HYD_CHECK(dim > 0, "gated_rmsnorm_forward: dim must be positive");
  const bool aligned = aligned16(o) && aligned16(gate) && aligned16(w) && aligned16(y);
  if (aligned && with_row_lanes(dim, [&](auto lpr) {
        constexpr int LPR = decltype(lpr)::value;
        gated_rmsnorm_forward_rows_kernel<LPR>
            <<<row_lane_blocks(rows, LPR, kWarpsPerBlock), kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
                as_nv(o), as_nv(gate), as_nv(w), as_nv(y), rstd, rows, eps);
      })) {
    CHECK_LAUNCH();
    return;
  }
  const unsigned blocks = row_blocks(rows);
  if (dim % 8 == 0 && aligned) {
    gated_rmsnorm_forward_kernel<8><<<blocks, kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
        as_nv(o), as_nv(gate), as_nv(w), as_nv(y), rstd, rows, dim, eps);
  } else {
    gated_rmsnorm_forward_kernel<1><<<blocks, kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
        as_nv(o), as_nv(gate), as_nv(w), as_nv(y), rstd, rows, dim, eps);
  }
  CHECK_LAUNCH();
}

void gated_rmsnorm_backward(const bf16* dy, const bf16* o, const bf16* gate, const bf16* w, const float* rstd,
                            bf16* do_, bf16* dgate, float* dw, int64_t rows, int64_t dim, void* stream) {
  if (rows == 0) return;
  HYD_CHECK(dim > 0, "gated_rmsnorm_backward: dim must be positive");
  if (aligned16(dy) && aligned16(o) && aligned16(gate) && aligned16(w) && aligned16(do_) && aligned16(dgate) &&
      with_row_lanes(dim, [&](auto lpr) {
        constexpr int LPR = decltype(lpr)::value;
        const unsigned blocks = row_lane_blocks(rows, LPR, kWarpsPerBlock);
        const cudaStream_t st = as_stream(stream);
        StreamScratch partial(size_t{blocks} * static_cast<size_t>(dim), st);
        gated_rmsnorm_backward_rows_kernel<LPR><<<blocks, kWarpsPerBlock * 32, 0, st>>>(
            as_nv(dy), as_nv(o), as_nv(gate), as_nv(w), rstd, as_nv(do_), as_nv(dgate), partial.get(), rows);
        CHECK_LAUNCH();
        column_sum(partial.get(), blocks, dim, dw, st);
      })) {
    CHECK_LAUNCH();
    return;
  }
  {
    const int64_t col_blocks = (dim + kDwCols - 1) / kDwCols;
    // Aim for ~1024 blocks in all, each chunk at least 256 rows.
    const int64_t max_chunks = std::max<int64_t>(1, (rows + 255) / 256);
    const int64_t chunks =
        std::clamp<int64_t>((1024 + col_blocks - 1) / col_blocks, 1, std::min<int64_t>(max_chunks, 65535));
    const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
    const dim3 grid(static_cast<unsigned>(col_blocks),
                    static_cast<unsigned>((rows + rows_per_chunk - 1) / rows_per_chunk));
    gated_rmsnorm_dw_kernel<<<grid, dim3(kDwCols, kDwRowLanes), 0, as_stream(stream)>>>(
        as_nv(dy), as_nv(o), as_nv(gate), rstd, dw, rows, dim, rows_per_chunk);
    CHECK_LAUNCH();
  }
  const unsigned blocks = row_blocks(rows);
  if (dim % 8 == 0 && aligned16(dy) && aligned16(o) && aligned16(gate) && aligned16(w) && aligned16(do_) &&
      aligned16(dgate)) {
    gated_rmsnorm_dx_kernel<8><<<blocks, kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
        as_nv(dy), as_nv(o), as_nv(gate), as_nv(w), rstd, as_nv(do_), as_nv(dgate), rows, dim);
  } else {
    gated_rmsnorm_dx_kernel<1><<<blocks, kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
        as_nv(dy), as_nv(o), as_nv(gate), as_nv(w), rstd, as_nv(do_), as_nv(dgate), rows, dim);
  }
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

// CUDA RMSNorm (see kernels/rmsnorm.h): bf16 x, w, y, dy, dx; f32 rstd and dw; f32 math.
//   rstd[r] = 1 / sqrt(mean_j x[r,j]^2 + eps),  y = x rstd w
//   dx[r,j] = rstd (g - x rstd^2 mean_k(g x)),  g = dy w;   dw[j] += sum_r dy x rstd
// forward and dx: one block per row (grid-stride over rows), 16-byte loads when dim % 8 == 0 and the
// pointers are aligned. Backward when dim is a multiple of 256 (at most 8192) and the rows 16-byte aligned: dx and
// the dw terms in one pass, one row of dw partial sums per block, added to dw in a fixed order (column_sum,
// common.cuh; deterministic). Otherwise dw: a column kernel, 32 columns x 16 row lanes per block, rows split into
// chunks over gridDim.y whose partial sums are added to dw with f32 atomicAdd (so the summation
// order, not the result up to rounding, varies from run to run). dw runs before dx so that dx may
// alias dy.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/rmsnorm.h"

namespace hyd::kernels::cuda {

namespace {

using namespace cuda_detail;

template <int VEC>
__global__ void rmsnorm_forward_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                       __nv_bfloat16* __restrict__ y, float* __restrict__ rstd, int64_t rows,
                                       int64_t dim, float eps) {
  __shared__ float red[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const __nv_bfloat16* xr = x + r * dim;
    float ss = 0.f;
    for (int64_t c = threadIdx.x * VEC; c < dim; c += int64_t(blockDim.x) * VEC) {
      const auto xv = load_pack<VEC>(xr + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) ss += to_f(xv.v[e]) * to_f(xv.v[e]);
    }
    ss = block_sum(ss, red);
    const float s = rsqrtf(ss / static_cast<float>(dim) + eps);
    if (threadIdx.x == 0) rstd[r] = s;
    for (int64_t c = threadIdx.x * VEC; c < dim; c += int64_t(blockDim.x) * VEC) {
      const auto xv = load_pack<VEC>(xr + c);
      const auto wv = load_pack<VEC>(w + c);
      Bf16Pack<VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = to_bf(to_f(xv.v[e]) * s * to_f(wv.v[e]));
      *reinterpret_cast<Bf16Pack<VEC>*>(y + r * dim + c) = o;
    }
  }
}

template <int VEC>
__global__ void rmsnorm_dx_kernel(const __nv_bfloat16* dy, const __nv_bfloat16* __restrict__ x,
                                  const __nv_bfloat16* __restrict__ w, const float* __restrict__ rstd,
                                  __nv_bfloat16* dx, int64_t rows, int64_t dim, const __nv_bfloat16* res) {
  __shared__ float red[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const __nv_bfloat16* xr = x + r * dim;
    const __nv_bfloat16* dyr = dy + r * dim;
    float dot = 0.f;  // sum_k dy w x
    for (int64_t c = threadIdx.x * VEC; c < dim; c += int64_t(blockDim.x) * VEC) {
      const auto xv = load_pack<VEC>(xr + c), gv = load_pack<VEC>(dyr + c), wv = load_pack<VEC>(w + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) dot += to_f(gv.v[e]) * to_f(wv.v[e]) * to_f(xv.v[e]);
    }
    dot = block_sum(dot, red);  // also orders every read of dy before any write of dx (aliasing)
    const float s = rstd[r];
    const float coef = s * s * dot / static_cast<float>(dim);
    for (int64_t c = threadIdx.x * VEC; c < dim; c += int64_t(blockDim.x) * VEC) {
      const auto xv = load_pack<VEC>(xr + c), gv = load_pack<VEC>(dyr + c), wv = load_pack<VEC>(w + c);
      float d[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) d[e] = s * (to_f(gv.v[e]) * to_f(wv.v[e]) - to_f(xv.v[e]) * coef);
      if (res != nullptr) {  // may be dx: this thread reads its elements before writing them
        const auto rv = load_pack<VEC>(res + r * dim + c);
#pragma unroll
        for (int e = 0; e < VEC; ++e) d[e] += to_f(rv.v[e]);
      }
      Bf16Pack<VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = to_bf(d[e]);
      *reinterpret_cast<Bf16Pack<VEC>*>(dx + r * dim + c) = o;
    }
  }
}

// dx and the dw terms in one pass, for rows of exactly blockDim.x packs of 8 (dim a multiple of 256, at most 8192):
// each thread keeps its 8 columns' dw terms over the block's rows (r = blockIdx.x, + gridDim.x, ...) and writes
// them to partial[blockIdx.x][dim]; column_sum adds the blocks' rows to dw in a fixed order. (The column kernel
// below re-read dy and x and summed with atomics in scheduling order.) dx may alias dy, as in rmsnorm_dx_kernel.
__global__ void rmsnorm_backward_rows_kernel(const __nv_bfloat16* dy, const __nv_bfloat16* __restrict__ x,
                                             const __nv_bfloat16* __restrict__ w, const float* __restrict__ rstd,
                                             __nv_bfloat16* dx, float* __restrict__ partial, int64_t rows, int64_t dim,
                                             const __nv_bfloat16* res) {
  __shared__ float red[32];
  const int64_t c = int64_t(threadIdx.x) * 8;
  const auto wv = load_pack<8>(w + c);
  float dwp[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const auto xv = load_pack<8>(x + r * dim + c), gv = load_pack<8>(dy + r * dim + c);
    float dot = 0.f;  // sum_k dy w x
#pragma unroll
    for (int e = 0; e < 8; ++e) dot += to_f(gv.v[e]) * to_f(wv.v[e]) * to_f(xv.v[e]);
    dot = block_sum(dot, red);  // also orders every read of dy before any write of dx (aliasing)
    const float s = rstd[r];
    const float coef = s * s * dot / static_cast<float>(dim);
    float d[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      d[e] = s * (to_f(gv.v[e]) * to_f(wv.v[e]) - to_f(xv.v[e]) * coef);
      dwp[e] += to_f(gv.v[e]) * to_f(xv.v[e]) * s;
    }
    if (res != nullptr) {  // may be dx: this thread reads its elements before writing them
      const auto rv = load_pack<8>(res + r * dim + c);
#pragma unroll
      for (int e = 0; e < 8; ++e) d[e] += to_f(rv.v[e]);
    }
    Bf16Pack<8> o;
#pragma unroll
    for (int e = 0; e < 8; ++e) o.v[e] = to_bf(d[e]);
    *reinterpret_cast<Bf16Pack<8>*>(dx + r * dim + c) = o;
  }
  float* pr = partial + int64_t(blockIdx.x) * dim + c;
  *reinterpret_cast<float4*>(pr) = make_float4(dwp[0], dwp[1], dwp[2], dwp[3]);
  *reinterpret_cast<float4*>(pr + 4) = make_float4(dwp[4], dwp[5], dwp[6], dwp[7]);
}

constexpr int kDwCols = 32;      // threadIdx.x: one column each (coalesced 64-byte row segments)
constexpr int kDwRowLanes = 16;  // threadIdx.y: rows r, r + 16, ... within the block's chunk

__global__ void rmsnorm_dw_kernel(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ x,
                                  const float* __restrict__ rstd, float* __restrict__ dw, int64_t rows, int64_t dim,
                                  int64_t rows_per_chunk) {
  __shared__ float part[kDwRowLanes][kDwCols + 1];
  const int64_t col = int64_t(blockIdx.x) * kDwCols + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = std::min(rows, r0 + rows_per_chunk);
  float acc = 0.f;
  if (col < dim) {
#pragma unroll 4
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kDwRowLanes)
      acc += to_f(dy[r * dim + col]) * to_f(x[r * dim + col]) * rstd[r];
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

// Threads per row block: enough for one pack per thread, a multiple of 32, at most 1024.
int row_threads(int64_t dim, int vec) {
  const int64_t packs = (dim + vec - 1) / vec;
  return static_cast<int>(std::clamp<int64_t>((packs + 31) / 32 * 32, 32, 1024));
}

}  // namespace

void rmsnorm_forward(const bf16* x, const bf16* w, bf16* y, float* rstd, int64_t rows, int64_t dim, float eps,
                     void* stream) {
  if (rows == 0) return;
  HYD_CHECK(dim > 0, "rmsnorm_forward: dim must be positive");
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(rows, 65535LL * 32));
  if (dim % 8 == 0 && aligned16(x) && aligned16(w) && aligned16(y)) {
    rmsnorm_forward_kernel<8>
        <<<blocks, row_threads(dim, 8), 0, as_stream(stream)>>>(as_nv(x), as_nv(w), as_nv(y), rstd, rows, dim, eps);
  } else {
    rmsnorm_forward_kernel<1>
        <<<blocks, row_threads(dim, 1), 0, as_stream(stream)>>>(as_nv(x), as_nv(w), as_nv(y), rstd, rows, dim, eps);
  }
  CHECK_LAUNCH();
}

void rmsnorm_backward(const bf16* dy, const bf16* x, const bf16* w, const float* rstd, bf16* dx, float* dw,
                      int64_t rows, int64_t dim, void* stream, const bf16* residual) {
  if (rows == 0) return;
  HYD_CHECK(dim > 0, "rmsnorm_backward: dim must be positive");
  if (dim % 256 == 0 && dim <= 8192 && aligned16(dy) && aligned16(x) && aligned16(w) && aligned16(dx) &&
      (residual == nullptr || aligned16(residual))) {
    // One pass, dw deterministic: blocks as many as fit on the GPU at once (2048 threads per SM), each over
    // every blocks-th row.
    const int threads = static_cast<int>(dim / 8);
    const int64_t blocks = std::min<int64_t>(rows, int64_t{current_sm_count()} * std::max(1, 2048 / threads));
    const cudaStream_t st = as_stream(stream);
    StreamScratch partial(static_cast<size_t>(blocks * dim), st);
    rmsnorm_backward_rows_kernel<<<static_cast<unsigned>(blocks), threads, 0, st>>>(
        as_nv(dy), as_nv(x), as_nv(w), rstd, as_nv(dx), partial.get(), rows, dim, as_nv(residual));
    CHECK_LAUNCH();
    column_sum(partial.get(), blocks, dim, dw, st);
    return;
  }
  // dw first: it reads dy, which dx may overwrite.
  {
    const int64_t col_blocks = (dim + kDwCols - 1) / kDwCols;
    // Aim for ~1024 blocks in all, each chunk at least 256 rows.
    const int64_t max_chunks = std::max<int64_t>(1, (rows + 255) / 256);
    const int64_t chunks =
        std::clamp<int64_t>((1024 + col_blocks - 1) / col_blocks, 1, std::min<int64_t>(max_chunks, 65535));
    const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
    const dim3 grid(static_cast<unsigned>(col_blocks),
                    static_cast<unsigned>((rows + rows_per_chunk - 1) / rows_per_chunk));
    rmsnorm_dw_kernel<<<grid, dim3(kDwCols, kDwRowLanes), 0, as_stream(stream)>>>(as_nv(dy), as_nv(x), rstd, dw, rows,
                                                                                  dim, rows_per_chunk);
    CHECK_LAUNCH();
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(rows, 65535LL * 32));
  if (dim % 8 == 0 && aligned16(dy) && aligned16(x) && aligned16(w) && aligned16(dx) &&
      (residual == nullptr || aligned16(residual))) {
    rmsnorm_dx_kernel<8><<<blocks, row_threads(dim, 8), 0, as_stream(stream)>>>(as_nv(dy), as_nv(x), as_nv(w), rstd,
                                                                                as_nv(dx), rows, dim, as_nv(residual));
  } else {
    rmsnorm_dx_kernel<1><<<blocks, row_threads(dim, 1), 0, as_stream(stream)>>>(as_nv(dy), as_nv(x), as_nv(w), rstd,
                                                                                as_nv(dx), rows, dim, as_nv(residual));
  }
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

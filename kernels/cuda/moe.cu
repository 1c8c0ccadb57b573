// CUDA MoE ops (see kernels/moe.h for the math): f32 router, bf16 rows with f32 math, grouped expert GEMMs
// on bf16 tensor cores (WMMA 16x16x16, f32 accumulation).
//
// Routing is built on the device, deterministically, with no host synchronisation:
//   route_topk:   one thread per token: scores (softmax | sigmoid, in place), top-k by repeated argmax (a
//                 strictly greater value replaces the best, so ties go to the lower expert index: the CPU's
//                 order), combine weights.
//   count:        one block per expert counts its pairs (__syncthreads_count over chunks of pairs).
//   sort:         one block per expert e: offsets[e] = sum of the lower counts, then a pass over the pairs in
//                 pair order, a block-wide prefix count of "pair has expert e" (warp ballots) giving each such
//                 pair its row: the pairs of one expert in token order, i.e. the CPU's stable counting sort.
// The grouped GEMMs (block programs in moe_gemm.cuh, emulated on the host by the tests) read the device
// offsets too: no host synchronisation and no per-expert launches. Forward / dX kernel: the grid's x
// dimension enumerates (expert, 64-row tile) pairs, bounded on the host by ceil(R / 64) + E without knowing
// the counts (a block past the last tile exits). dW kernel: one block per (expert, 64x64 tile of dW_e),
// summing over that expert's rows; an expert without rows returns at once, leaving dW_e untouched. Each
// output element has exactly one writer: deterministic, no atomics.
// Every gather (combine, permute backward) is a row gather over the k slots of a token in slot order.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/moe_gemm.cuh"
#include "kernels/cuda/moe_router.cuh"
#include "kernels/moe.h"

namespace hyd::kernels::cuda {

namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;

// ------------------------------------------------------------------------------------------- routing

// One thread per token (moe_router.cuh).
__global__ void route_topk_kernel(float* __restrict__ scores, const float* __restrict__ bias, int64_t n, int e_num,
                                  int k, bool use_sigmoid, bool norm_topk, float route_scale,
                                  int32_t* __restrict__ expert, float* __restrict__ weight) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= n) return;
  moe_router::route_token(scores + t * e_num, bias, e_num, k, use_sigmoid, norm_topk, route_scale, expert + t * k,
                          weight + t * k);
}

// counts[e] = #{p : expert[p] == e}; one block per expert.
__global__ void count_kernel(const int32_t* __restrict__ expert, int64_t pairs, int32_t* __restrict__ counts) {
  const int e = blockIdx.x;
  int total = 0;
  for (int64_t base = 0; base < pairs; base += blockDim.x) {
    const int64_t p = base + threadIdx.x;
    total += __syncthreads_count(p < pairs && expert[p] == e);
  }
  if (threadIdx.x == 0) counts[e] = total;
}

// One block per expert (blockDim = kThreads, a multiple of 32): offsets, then the rows of its pairs.
__global__ void sort_kernel(const int32_t* __restrict__ expert, const int32_t* __restrict__ counts, int64_t pairs,
                            int e_num, int32_t* __restrict__ offsets, int32_t* __restrict__ order,
                            int32_t* __restrict__ position) {
  __shared__ int warp_count[kThreads / 32];
  __shared__ int s_offset;
  const int e = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (threadIdx.x == 0) {
    int off = 0;
    for (int i = 0; i < e; ++i) off += counts[i];
    s_offset = off;
    offsets[e] = off;
    if (e == e_num - 1) offsets[e_num] = off + counts[e];
  }
  __syncthreads();
  int next = s_offset;  // the row of the next pair of expert e
  for (int64_t base = 0; base < pairs; base += blockDim.x) {
    const int64_t p = base + threadIdx.x;
    const bool mine = p < pairs && expert[p] == e;
    const unsigned ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < nwarps; ++w) {
      before += w < warp ? warp_count[w] : 0;
      total += warp_count[w];
    }
    if (mine) {
      const int row = next + before + __popc(ballot & ((1u << lane) - 1u));
      order[row] = static_cast<int32_t>(p);
      position[p] = row;
    }
    next += total;
    __syncthreads();  // warp_count is rewritten by the next chunk
  }
}

// ------------------------------------------------------------------------------------------- row moves

// dst[r] = src[index[r] / div] for r < rows (permute: index = order, div = k; unpermute: index = position,
// div = 1). VEC bf16 per access.
template <int VEC>
__global__ void gather_rows_kernel(const int32_t* __restrict__ index, int div, const __nv_bfloat16* __restrict__ src,
                                   __nv_bfloat16* __restrict__ dst, int64_t rows, int64_t d) {
  const int64_t packs = d / VEC, total = rows * packs;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / packs, c = (i - r * packs) * VEC;
    const int64_t s = index[r] / div;
    *reinterpret_cast<Bf16Pack<VEC>*>(dst + r * d + c) = *reinterpret_cast<const Bf16Pack<VEC>*>(src + s * d + c);
  }
}

// out[t, i] (= | +=) sum_j w_tj rows[position[t k + j], i] (w = 1 when weight is null), f32 sum in slot order.
__global__ void gather_sum_kernel(const int32_t* __restrict__ position, const float* __restrict__ weight,
                                  const __nv_bfloat16* __restrict__ rows, __nv_bfloat16* __restrict__ out, int64_t n,
                                  int k, int64_t d, bool accumulate) {
  const int64_t total = n * d;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / d, c = i - t * d;
    float acc = 0.f;
    for (int j = 0; j < k; ++j) {
      const float w = weight != nullptr ? weight[t * k + j] : 1.f;
      acc += w * to_f(rows[int64_t(position[t * k + j]) * d + c]);
    }
    out[i] = to_bf(accumulate ? to_f(out[i]) + acc : acc);
  }
}

// One warp per permuted row p (pair q = order[p], token q / k): d_yp[p] = w_q dout[tok];
// d_weight[q] = dout[tok] . yp[p] (lane-strided partial sums, then a fixed butterfly).
__global__ void combine_backward_kernel(const int32_t* __restrict__ order, const float* __restrict__ weight,
                                        const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ yp,
                                        __nv_bfloat16* __restrict__ d_yp, float* __restrict__ d_weight, int64_t pairs,
                                        int k, int64_t d) {
  const int64_t p = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (p >= pairs) return;  // whole warps leave together (p is uniform over a warp)
  const int64_t q = order[p], tok = q / k;
  const float w = weight[q];
  const __nv_bfloat16* g = dout + tok * d;
  const __nv_bfloat16* y = yp + p * d;
  __nv_bfloat16* dy = d_yp + p * d;
  float dot = 0.f;
  for (int64_t i = lane; i < d; i += 32) {
    const float gv = to_f(g[i]);
    dy[i] = to_bf(w * gv);
    dot += gv * to_f(y[i]);
  }
  dot = warp_sum(dot);
  if (lane == 0) d_weight[q] = dot;
}

// One thread per token (moe_router.cuh).
__global__ void router_backward_kernel(const float* __restrict__ scores, const int32_t* __restrict__ expert,
                                       const float* __restrict__ d_weight, const float* __restrict__ aux_frac,
                                       float aux_scale, float* __restrict__ d_logits, int64_t n, int e_num, int k,
                                       bool use_sigmoid, bool norm_topk, float route_scale) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= n) return;
  moe_router::router_backward_token(scores + t * e_num, expert + t * k, d_weight + t * k, aux_frac, aux_scale,
                                    d_logits + t * e_num, e_num, k, use_sigmoid, norm_topk, route_scale);
}

// One block per expert: aux_frac[e] = counts[e] / (N k); aux_prob[e] = mean_t scores[t, e] (block_sum).
__global__ void aux_stats_kernel(const int32_t* __restrict__ counts, const float* __restrict__ scores,
                                 float* __restrict__ aux_frac, float* __restrict__ aux_prob, int64_t n, int e_num,
                                 int k) {
  __shared__ float shared[32];
  const int e = blockIdx.x;
  if (aux_prob != nullptr) {
    float acc = 0.f;
    for (int64_t t = threadIdx.x; t < n; t += blockDim.x) acc += scores[t * e_num + e];
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) aux_prob[e] = n > 0 ? acc / static_cast<float>(n) : 0.f;
  }
  if (threadIdx.x == 0) aux_frac[e] = n > 0 ? static_cast<float>(counts[e]) / static_cast<float>(n * k) : 0.f;
}

// ------------------------------------------------------------------------------------------- grouped GEMMs

using moe_gemm::BM;
using moe_gemm::BN;

// The programs of moe_gemm.cuh on the device. Shared memory as raw bytes (see GemmSmem).
template <bool B_TRANS, int V>
__global__ void __launch_bounds__(moe_gemm::kThreads)
    grouped_rows_kernel(const int32_t* __restrict__ offsets, int e_num, const bf16* a, const bf16* w, bf16* c,
                        int64_t kdim, int64_t ncols) {
  __shared__ __align__(128) unsigned char smem[sizeof(moe_gemm::GemmSmem)];
  __shared__ moe_gemm::RowTile tile;
  moe_gemm::DeviceExec ex;
  moe_gemm::grouped_rows_program<B_TRANS, V>(ex, blockIdx.x, blockIdx.y, offsets, e_num, a, w, c, kdim, ncols,
                                             *reinterpret_cast<moe_gemm::GemmSmem*>(smem), tile);
}

template <int V>
__global__ void __launch_bounds__(moe_gemm::kThreads)
    grouped_wgrad_kernel(const int32_t* __restrict__ offsets, const bf16* dy, const bf16* x, float* dw, int64_t n,
                         int64_t k) {
  __shared__ __align__(128) unsigned char smem[sizeof(moe_gemm::GemmSmem)];
  moe_gemm::DeviceExec ex;
  moe_gemm::grouped_wgrad_program<V>(ex, blockIdx.x, blockIdx.y, blockIdx.z, offsets, dy, x, dw, n, k,
                                     *reinterpret_cast<moe_gemm::GemmSmem*>(smem));
}

void launch_gather_rows(const int32_t* index, int div, const bf16* src, bf16* dst, int64_t rows, int64_t d,
                        void* stream) {
  if (rows == 0 || d == 0) return;
  if (d % 8 == 0 && aligned16(src) && aligned16(dst)) {
    gather_rows_kernel<8><<<grid_for(rows * d / 8, kThreads), kThreads, 0, as_stream(stream)>>>(index, div, as_nv(src),
                                                                                                as_nv(dst), rows, d);
  } else {
    gather_rows_kernel<1>
        <<<grid_for(rows * d, kThreads), kThreads, 0, as_stream(stream)>>>(index, div, as_nv(src), as_nv(dst), rows, d);
  }
  CHECK_LAUNCH();
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

void moe_route(const MoeRouterOptions& opt, float* scores, const float* bias, int64_t n, int64_t e, int64_t k,
               int32_t* expert, float* weight, int32_t* counts, int32_t* offsets, int32_t* order, int32_t* position,
               void* stream) {
  HYD_CHECK(k >= 1 && k <= kMoeMaxTopK && k <= e, "moe_route: top_k ", k, " with ", e, " experts");
  HYD_CHECK(n * k <= INT32_MAX && e <= 65535, "moe_route: ", n, " tokens x ", k, " slots, ", e,
            " experts exceed the i32 indices");
  cudaStream_t s = as_stream(stream);
  if (n > 0) {
    route_topk_kernel<<<blocks_for(n, 128), 128, 0, s>>>(scores, bias, n, static_cast<int>(e), static_cast<int>(k),
                                                         opt.sigmoid, opt.norm_topk_prob, opt.route_scale, expert,
                                                         weight);
    CHECK_LAUNCH();
  }
  count_kernel<<<static_cast<unsigned>(e), kThreads, 0, s>>>(expert, n * k, counts);
  CHECK_LAUNCH();
  sort_kernel<<<static_cast<unsigned>(e), kThreads, 0, s>>>(expert, counts, n * k, static_cast<int>(e), offsets, order,
                                                            position);
  CHECK_LAUNCH();
}

void moe_permute(const int32_t* order, const bf16* x, bf16* xp, int64_t n, int64_t k, int64_t d, void* stream) {
  launch_gather_rows(order, static_cast<int>(k), x, xp, n * k, d, stream);
}

void moe_unpermute(const int32_t* position, const bf16* xp, bf16* pairs, int64_t n, int64_t k, int64_t d,
                   void* stream) {
  launch_gather_rows(position, 1, xp, pairs, n * k, d, stream);
}

void moe_gather_sum(const int32_t* position, const float* weight, const bf16* rows, bf16* out, int64_t n, int64_t k,
                    int64_t d, bool accumulate, void* stream) {
  if (n == 0 || d == 0) return;
  gather_sum_kernel<<<grid_for(n * d, kThreads), kThreads, 0, as_stream(stream)>>>(
      position, weight, as_nv(rows), as_nv(out), n, static_cast<int>(k), d, accumulate);
  CHECK_LAUNCH();
}

void moe_combine_backward(const int32_t* order, const float* weight, const bf16* dout, const bf16* yp, bf16* d_yp,
                          float* d_weight, int64_t n, int64_t k, int64_t d, void* stream) {
  const int64_t pairs = n * k;
  if (pairs == 0) return;
  combine_backward_kernel<<<blocks_for(pairs * 32, kThreads), kThreads, 0, as_stream(stream)>>>(
      order, weight, as_nv(dout), as_nv(yp), as_nv(d_yp), d_weight, pairs, static_cast<int>(k), d);
  CHECK_LAUNCH();
}

void moe_router_backward(const MoeRouterOptions& opt, const float* scores, const int32_t* expert, const float* d_weight,
                         const float* aux_frac, float aux_scale, float* d_logits, int64_t n, int64_t e, int64_t k,
                         void* stream) {
  if (n == 0) return;
  router_backward_kernel<<<blocks_for(n, 128), 128, 0, as_stream(stream)>>>(
      scores, expert, d_weight, aux_frac, aux_scale, d_logits, n, static_cast<int>(e), static_cast<int>(k), opt.sigmoid,
      opt.norm_topk_prob, opt.route_scale);
  CHECK_LAUNCH();
}

void moe_aux_stats(const int32_t* counts, const float* scores, float* aux_frac, float* aux_prob, int64_t n, int64_t e,
                   int64_t k, void* stream) {
  if (e == 0) return;
  aux_stats_kernel<<<static_cast<unsigned>(e), kThreads, 0, as_stream(stream)>>>(
      counts, scores, aux_frac, aux_prob, n, static_cast<int>(e), static_cast<int>(k));
  CHECK_LAUNCH();
}

void moe_grouped_linear_forward(const int32_t* offsets, const bf16* x, const bf16* w, bf16* y, int64_t rows, int64_t e,
                                int64_t n, int64_t k, void* stream) {
  if (rows == 0 || n == 0) return;
  HYD_CHECK(e <= 65535 && (n + BN - 1) / BN <= 65535, "moe_grouped_linear_forward: grid too large (E=", e, ", n=", n,
            ")");
  if (k == 0) HYD_THROW("moe_grouped_linear_forward: k = 0");
  const dim3 grid(static_cast<unsigned>((rows + BM - 1) / BM + e), static_cast<unsigned>((n + BN - 1) / BN));
  const cudaStream_t s = as_stream(stream);
  if (moe_gemm::rows_vec8(x, w, k, n, true))
    grouped_rows_kernel<true, 8><<<grid, moe_gemm::kThreads, 0, s>>>(offsets, static_cast<int>(e), x, w, y, k, n);
  else
    grouped_rows_kernel<true, 1><<<grid, moe_gemm::kThreads, 0, s>>>(offsets, static_cast<int>(e), x, w, y, k, n);
  CHECK_LAUNCH();
}

void moe_grouped_linear_backward(const int32_t* offsets, const bf16* dy, const bf16* x, const bf16* w, bf16* dx,
                                 float* dw, int64_t rows, int64_t e, int64_t n, int64_t k, void* stream) {
  if (rows == 0) return;  // no rows: dx has none, dw gets nothing
  const cudaStream_t s = as_stream(stream);
  HYD_CHECK(e <= 65535 && (n + BM - 1) / BM <= 65535 && (k + BN - 1) / BN <= 65535,
            "moe_grouped_linear_backward: grid too large (E=", e, ", n=", n, ", k=", k, ")");
  if (dx != nullptr && k > 0) {
    // dx[R_e] = dy[R_e] W_e with W_e [n, k]: reduction over n, k output columns.
    const dim3 grid(static_cast<unsigned>((rows + BM - 1) / BM + e), static_cast<unsigned>((k + BN - 1) / BN));
    if (moe_gemm::rows_vec8(dy, w, n, k, false))
      grouped_rows_kernel<false, 8><<<grid, moe_gemm::kThreads, 0, s>>>(offsets, static_cast<int>(e), dy, w, dx, n, k);
    else
      grouped_rows_kernel<false, 1><<<grid, moe_gemm::kThreads, 0, s>>>(offsets, static_cast<int>(e), dy, w, dx, n, k);
    CHECK_LAUNCH();
  }
  if (dw != nullptr && n > 0 && k > 0) {
    const dim3 grid(static_cast<unsigned>((k + BN - 1) / BN), static_cast<unsigned>((n + BM - 1) / BM),
                    static_cast<unsigned>(e));
    if (moe_gemm::wgrad_vec8(dy, x, n, k))
      grouped_wgrad_kernel<8><<<grid, moe_gemm::kThreads, 0, s>>>(offsets, dy, x, dw, n, k);
    else
      grouped_wgrad_kernel<1><<<grid, moe_gemm::kThreads, 0, s>>>(offsets, dy, x, dw, n, k);
    CHECK_LAUNCH();
  }
}

}  // namespace hyd::kernels::cuda

// Shared device helpers for the CUDA kernels: bf16 conversion, warp/block reductions, launch sizes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "trainer/core/dtype.h"
#include "trainer/core/error.h"

namespace hyd::kernels::cuda_detail {

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }
inline __nv_bfloat16* as_nv(bf16* p) { return reinterpret_cast<__nv_bfloat16*>(p); }
inline const __nv_bfloat16* as_nv(const bf16* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }

__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ __nv_bfloat16 to_bf(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `shared` must hold 32 floats. Contains __syncthreads: call from all threads.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < nwarps ? shared[lane] : 0.f;
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < nwarps ? shared[lane] : -INFINITY;
  return warp_max(v);
}

// VEC consecutive elements moved as one aligned access (16 bytes: 8 bf16 or 4 f32); a pointer cast
// to a Pack must be aligned to sizeof(Pack).
template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};
template <int VEC>
using Bf16Pack = Pack<__nv_bfloat16, VEC>;

template <int VEC>
__device__ __forceinline__ Bf16Pack<VEC> load_pack(const __nv_bfloat16* p) {
  return *reinterpret_cast<const Bf16Pack<VEC>*>(p);
}

__device__ __forceinline__ Bf16Pack<8> zero_pack() {
  Bf16Pack<8> p;
#pragma unroll
  for (int e = 0; e < 8; ++e) p.v[e] = __float2bfloat16(0.f);
  return p;
}

// Row kernels for rows of LPR * 8 elements (LPR = 4, 8, 16, 32: head-sized rows of 32..256): LPR lanes per row, 8
// consecutive elements per lane (one 16-byte access each, kept in registers), 32 / LPR rows per warp, WARPS warps
// per block, grid-stride over the rows. A thread's rows are r0 + seg, r0 + seg + step, ...; its columns 8 sl ..
// 8 sl + 7. The loop over r0 is warp-uniform so every lane takes part in the row sums' shuffles.
template <int LPR, int WARPS>
struct RowLanes {
  static constexpr int kRowsPerWarp = 32 / LPR;
  int seg, sl;
  int64_t r0, step;
  __device__ __forceinline__ RowLanes() {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    seg = lane / LPR;
    sl = lane % LPR;
    r0 = (int64_t(blockIdx.x) * WARPS + warp) * kRowsPerWarp;
    step = int64_t(gridDim.x) * WARPS * kRowsPerWarp;
  }
};

// Sum over the LPR lanes of a row (an aligned group of LPR lanes). For LPR = 16 the same additions in the same
// order as warp_sum over a warp whose other 16 lanes hold zeros.
template <int LPR>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int o = LPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Deterministic column sums of per-block partials: dw[c] += sum_b partial[b * dim + c] for b = 0 .. blocks - 1,
// in a fixed order (32 row lanes per column each add every 32nd block in order, then the 32 lane sums are added in
// lane order). For the weight gradients of norms whose kernels write one partial row per block instead of
// f32 atomics (whose order follows thread scheduling).
// (Internal linkage: a __global__ defined in a header included by several .cu files.)
static __global__ void __launch_bounds__(1024)
    column_sum_kernel(const float* __restrict__ partial, int64_t blocks, int64_t dim, float* __restrict__ dw) {
  __shared__ float lanes[32][33];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (c < dim)
    for (int64_t b = threadIdx.y; b < blocks; b += 32) acc += partial[b * dim + c];
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < dim) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 32; ++k) t += lanes[k][threadIdx.x];
    dw[c] += t;
  }
}
inline void column_sum(const float* partial, int64_t blocks, int64_t dim, float* dw, cudaStream_t stream) {
  column_sum_kernel<<<static_cast<unsigned>((dim + 31) / 32), dim3(32, 32), 0, stream>>>(partial, blocks, dim, dw);
  CHECK_LAUNCH();
}

// Stream-ordered scratch of one call, `count` elements of T: allocated on the stream, freed on it when the scope
// ends (after every kernel that uses it has been enqueued).
template <class T>
class StreamScratchOf {
 public:
  StreamScratchOf(size_t count, cudaStream_t stream) : stream_(stream) {
    CHECK_CUDA(cudaMallocAsync(reinterpret_cast<void**>(&ptr_), count * sizeof(T), stream));
  }
  ~StreamScratchOf() { (void)cudaFreeAsync(ptr_, stream_); }  // a destructor must not throw
  StreamScratchOf(const StreamScratchOf&) = delete;
  StreamScratchOf& operator=(const StreamScratchOf&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
  cudaStream_t stream_;
};
using StreamScratch = StreamScratchOf<float>;

// Calls f(std::integral_constant<int, LPR>) for dims 32, 64, 128, 256 and returns true; false (f not called) for
// other dims.
template <class F>
bool with_row_lanes(int64_t dim, F&& f) {
  if (dim == 32)
    f(std::integral_constant<int, 4>{});
  else if (dim == 64)
    f(std::integral_constant<int, 8>{});
  else if (dim == 128)
    f(std::integral_constant<int, 16>{});
  else if (dim == 256)
    f(std::integral_constant<int, 32>{});
  return dim == 32 || dim == 64 || dim == 128 || dim == 256;
}

// The current device's SM count (queried once per device and kept).
inline int current_sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> counts[kMaxDevices] = {};
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  HYD_CHECK(dev >= 0 && dev < kMaxDevices, "device ", dev, " beyond ", kMaxDevices);
  int sms = counts[dev].load(std::memory_order_relaxed);
  if (sms == 0) {
    CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    counts[dev].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// Blocks for a RowLanes kernel: enough for the rows, at most 4 per SM of the current device (the grid-stride loop
// covers the rest; fewer blocks also mean fewer per-block atomics where a kernel reduces over rows).
inline unsigned row_lane_blocks(int64_t rows, int lpr, int warps) {
  const int64_t per_block = int64_t(warps) * (32 / lpr);
  const int sms = current_sm_count();
  const int64_t want = (rows + per_block - 1) / per_block, cap = int64_t{4} * sms;
  return static_cast<unsigned>(want < 1 ? 1 : (want > cap ? cap : want));
}

// Whether p may be read / written with 16-byte vector accesses.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline unsigned grid_for(int64_t n, int threads) {
  int64_t g = (n + threads - 1) / threads;
  return static_cast<unsigned>(g < 1 ? 1 : (g > 65535LL * 32 ? 65535LL * 32 : g));
}

}  // namespace hyd::kernels::cuda_detail

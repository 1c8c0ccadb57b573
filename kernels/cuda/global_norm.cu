// CUDA sum of squares for the global gradient norm (see kernels/global_norm.h): grid-stride fp32
// partial sums per thread, a block tree reduction, one atomicAdd per block into out[0].
#include "kernels/cuda/common.cuh"
#include "kernels/global_norm.h"

namespace hyd::kernels::cuda {

using namespace cuda_detail;

namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxBlocks = 1024;

__global__ void __launch_bounds__(kThreads) sum_squares_kernel(const float* g, int64_t n, float* out) {
  __shared__ float red[32];
  float acc = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    acc += g[i] * g[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) atomicAdd(out, acc);
}

}  // namespace

void sum_squares_accumulate(const float* g, int64_t n, float* out, void* stream) {
  if (n == 0) return;
  unsigned blocks = grid_for(n, kThreads);
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  sum_squares_kernel<<<blocks, kThreads, 0, as_stream(stream)>>>(g, n, out);
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

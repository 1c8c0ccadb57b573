// CUDA token embedding (see kernels/embedding.h).
//   forward:  out[i, :] = table[ids[i], :]        one block per token row, 16-byte copies when aligned
//   backward: dtable[ids[i], :] += dout[i, :]     one thread per element, f32 atomicAdd (repeated ids)
// Ids outside [0, vocab) cannot be reported from the device without a sync: forward writes a NaN row
// (so the loss turns NaN and the step is skipped) and backward skips the token. The CPU reference
// throws instead. The vocabulary size is not passed, so only negative ids are detectable here; the
// data loader guarantees ids < vocab.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/embedding.h"

namespace hyd::kernels::cuda {

namespace {

using namespace cuda_detail;

template <int VEC>
__global__ void embedding_forward_kernel(const int32_t* __restrict__ ids, const __nv_bfloat16* __restrict__ table,
                                         __nv_bfloat16* __restrict__ out, int64_t n, int64_t dim) {
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const int32_t id = ids[row];
    __nv_bfloat16* dst = out + row * dim;
    if (id < 0) {
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) dst[j] = __float2bfloat16_rn(__int_as_float(0x7fc00000));
      continue;
    }
    const __nv_bfloat16* src = table + static_cast<int64_t>(id) * dim;
    if constexpr (VEC == 8) {
      const Bf16Pack<8>* s8 = reinterpret_cast<const Bf16Pack<8>*>(src);
      Bf16Pack<8>* d8 = reinterpret_cast<Bf16Pack<8>*>(dst);
      for (int64_t j = threadIdx.x; j < dim / 8; j += blockDim.x) d8[j] = s8[j];
    } else {
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) dst[j] = src[j];
    }
  }
}

__global__ void embedding_backward_kernel(const int32_t* __restrict__ ids, const __nv_bfloat16* __restrict__ dout,
                                          float* __restrict__ dtable, int64_t n, int64_t dim) {
  const int64_t total = n * dim;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = k / dim, j = k - row * dim;
    const int32_t id = ids[row];
    if (id < 0) continue;
    atomicAdd(dtable + static_cast<int64_t>(id) * dim + j, to_f(dout[k]));
  }
}

}  // namespace

void embedding_forward(const int32_t* ids, const bf16* table, bf16* out, int64_t n, int64_t dim, void* stream) {
  if (n == 0 || dim == 0) return;
  const bool vec8 = dim % 8 == 0 && aligned16(table) && aligned16(out);
  const int64_t work = vec8 ? dim / 8 : dim;
  const int threads = static_cast<int>(std::min<int64_t>(256, (work + 31) / 32 * 32));
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(n, 65535LL * 32));
  if (vec8) {
    embedding_forward_kernel<8><<<blocks, threads, 0, as_stream(stream)>>>(ids, as_nv(table), as_nv(out), n, dim);
  } else {
    embedding_forward_kernel<1><<<blocks, threads, 0, as_stream(stream)>>>(ids, as_nv(table), as_nv(out), n, dim);
  }
  CHECK_LAUNCH();
}

void embedding_backward(const int32_t* ids, const bf16* dout, float* dtable, int64_t n, int64_t dim, void* stream) {
  if (n == 0 || dim == 0) return;
  const int threads = 256;
  embedding_backward_kernel<<<grid_for(n * dim, threads), threads, 0, as_stream(stream)>>>(ids, as_nv(dout), dtable, n,
                                                                                           dim);
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

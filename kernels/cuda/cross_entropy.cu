// CUDA cross-entropy (see kernels/cross_entropy.h): one block per row. Pass 1 keeps a per-thread
// online (max, sum of exp) over a strided slice of the vocabulary, merged across the block into
// lse = M + log S; pass 2 (write_grad) overwrites the row with grad_scale (softmax - onehot) in bf16.
// All math in fp32. Ignored rows (target < 0) get loss 0 and a zero gradient row. A target >= vocab
// cannot be reported from here: its loss is NaN (and its row is left unchanged), which the
// trainer's non-finite-loss check turns into an error; the CPU path throws.
#include <cmath>
#include <cstdint>

#include "kernels/cross_entropy.h"
#include "kernels/cuda/common.cuh"

namespace hyd::kernels::cuda {

using namespace cuda_detail;

namespace {

constexpr int kThreads = 512;

// VEC-wide bf16 loads (8 when the row is 16-byte aligned and V % 8 == 0). The exponentials use the
// hardware exp2 (__expf: arguments <= 0 after the max shift, relative error ~1e-6): the kernel is bound
// by them, not by memory.
template <int VEC>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_kernel(__nv_bfloat16* logits, const int32_t* targets, float* losses, int64_t vocab, bool write_grad,
                         float grad_scale) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  __nv_bfloat16* x = logits + row * vocab;
  using P = Pack<__nv_bfloat16, VEC>;
  P* packs = reinterpret_cast<P*>(x);
  const int64_t npacks = vocab / VEC;
  const int32_t t = targets[row];  // the same for the whole block: the early returns are uniform
  if (t < 0) {
    if (threadIdx.x == 0) losses[row] = 0.f;
    if (write_grad) {
      P zero;
#pragma unroll
      for (int j = 0; j < VEC; ++j) zero.v[j] = to_bf(0.f);
      for (int64_t p = threadIdx.x; p < npacks; p += blockDim.x) packs[p] = zero;
    }
    return;
  }
  if (t >= vocab) {
    if (threadIdx.x == 0) losses[row] = NAN;
    return;
  }
  const float xt = to_f(x[t]);  // read before any thread overwrites the row (barriers below)

  float m = -INFINITY, s = 0.f;
  for (int64_t p = threadIdx.x; p < npacks; p += blockDim.x) {
    const P xp = packs[p];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xv = to_f(xp.v[j]);
      if (xv > m) {
        s = s * __expf(m - xv) + 1.f;
        m = xv;
      } else if (xv > -INFINITY) {
        s += __expf(xv - m);
      }
    }
  }
  const float big = block_max(m, red);
  const float total = block_sum(m > -INFINITY ? s * expf(m - big) : 0.f, red);
  const float lse = big + logf(total);
  if (threadIdx.x == 0) losses[row] = lse - xt;
  if (write_grad) {
    for (int64_t p = threadIdx.x; p < npacks; p += blockDim.x) {
      P xp = packs[p];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float prob = __expf(to_f(xp.v[j]) - lse);
        xp.v[j] = to_bf(grad_scale * (prob - (p * VEC + j == t ? 1.f : 0.f)));
      }
      packs[p] = xp;
    }
  }
}

}  // namespace

void cross_entropy(bf16* logits, const int32_t* targets, float* losses, int64_t n, int64_t vocab, bool write_grad,
                   float grad_scale, void* stream) {
  if (n == 0) return;
  HYD_CHECK(n <= INT32_MAX, "cross_entropy: ", n, " rows exceed the grid limit");
  const bool vec = vocab % 8 == 0 && aligned16(logits);
  if (vec)
    cross_entropy_kernel<8><<<static_cast<unsigned>(n), kThreads, 0, as_stream(stream)>>>(
        as_nv(logits), targets, losses, vocab, write_grad, grad_scale);
  else
    cross_entropy_kernel<1><<<static_cast<unsigned>(n), kThreads, 0, as_stream(stream)>>>(
        as_nv(logits), targets, losses, vocab, write_grad, grad_scale);
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

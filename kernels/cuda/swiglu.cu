// CUDA SwiGLU on a fused gate|up input (see kernels/swiglu.h), bf16 in/out, f32 math.
//   out[n,j] = silu(a) b;   da = dout b s (1 + a (1 - s)),  db = dout silu(a),  s = sigmoid(a)
// Grid-stride over packs of VEC consecutive columns (VEC = 8 with 16-byte accesses when F % 8 == 0
// and the pointers are aligned, else 1). Each element is read before it is written by the same
// thread, so din may alias in.
#include "kernels/cuda/common.cuh"
#include "kernels/swiglu.h"

namespace hyd::kernels::cuda {

namespace {

using namespace cuda_detail;

__device__ __forceinline__ float sigmoidf(float a) { return 1.f / (1.f + __expf(-a)); }

template <int VEC>
__global__ void swiglu_forward_kernel(const __nv_bfloat16* __restrict__ in, __nv_bfloat16* __restrict__ out, int64_t n,
                                      int64_t f) {
  const int64_t packs_per_row = f / VEC, total = n * packs_per_row;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = k / packs_per_row, j = (k - row * packs_per_row) * VEC;
    const auto a = *reinterpret_cast<const Bf16Pack<VEC>*>(in + row * 2 * f + j);
    const auto b = *reinterpret_cast<const Bf16Pack<VEC>*>(in + row * 2 * f + f + j);
    Bf16Pack<VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float av = to_f(a.v[e]);
      o.v[e] = to_bf(av * sigmoidf(av) * to_f(b.v[e]));
    }
    *reinterpret_cast<Bf16Pack<VEC>*>(out + row * f + j) = o;
  }
}

template <int VEC>
__global__ void swiglu_backward_kernel(const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* in,
                                       __nv_bfloat16* din, int64_t n, int64_t f) {
  const int64_t packs_per_row = f / VEC, total = n * packs_per_row;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = k / packs_per_row, j = (k - row * packs_per_row) * VEC;
    const auto a = *reinterpret_cast<const Bf16Pack<VEC>*>(in + row * 2 * f + j);
    const auto b = *reinterpret_cast<const Bf16Pack<VEC>*>(in + row * 2 * f + f + j);
    const auto g = *reinterpret_cast<const Bf16Pack<VEC>*>(dout + row * f + j);
    Bf16Pack<VEC> da, db;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float av = to_f(a.v[e]), bv = to_f(b.v[e]), gv = to_f(g.v[e]);
      const float s = sigmoidf(av);
      da.v[e] = to_bf(gv * bv * s * (1.f + av * (1.f - s)));
      db.v[e] = to_bf(gv * av * s);
    }
    *reinterpret_cast<Bf16Pack<VEC>*>(din + row * 2 * f + j) = da;
    *reinterpret_cast<Bf16Pack<VEC>*>(din + row * 2 * f + f + j) = db;
  }
}

}  // namespace

void swiglu_forward(const bf16* in, bf16* out, int64_t n, int64_t f, void* stream) {
  if (n == 0 || f == 0) return;
  const int threads = 256;
  if (f % 8 == 0 && aligned16(in) && aligned16(out)) {
    swiglu_forward_kernel<8>
        <<<grid_for(n * f / 8, threads), threads, 0, as_stream(stream)>>>(as_nv(in), as_nv(out), n, f);
  } else {
    swiglu_forward_kernel<1><<<grid_for(n * f, threads), threads, 0, as_stream(stream)>>>(as_nv(in), as_nv(out), n, f);
  }
  CHECK_LAUNCH();
}

void swiglu_backward(const bf16* dout, const bf16* in, bf16* din, int64_t n, int64_t f, void* stream) {
  if (n == 0 || f == 0) return;
  const int threads = 256;
  if (f % 8 == 0 && aligned16(dout) && aligned16(in) && aligned16(din)) {
    swiglu_backward_kernel<8>
        <<<grid_for(n * f / 8, threads), threads, 0, as_stream(stream)>>>(as_nv(dout), as_nv(in), as_nv(din), n, f);
  } else {
    swiglu_backward_kernel<1>
        <<<grid_for(n * f, threads), threads, 0, as_stream(stream)>>>(as_nv(dout), as_nv(in), as_nv(din), n, f);
  }
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

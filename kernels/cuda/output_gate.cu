// CUDA sigmoid output gate (see kernels/output_gate.h), bf16 in/out, f32 math:
//   y = o s,  do = dy s,  dg = dy o s (1 - s),  s = sigmoid(g)
// Grid-stride over packs of VEC consecutive elements (VEC = 8 with 16-byte accesses when n % 8 == 0
// and every pointer is 16-byte aligned, else 1). Each element is read before the same thread writes
// it, so outputs may alias inputs.
#include "kernels/cuda/common.cuh"
#include "kernels/output_gate.h"

namespace hyd::kernels::cuda {

namespace {

using namespace cuda_detail;

// 1 / (1 + e^-g): __expf(-g) overflows to inf for g < -88, giving 0, the correct limit.
__device__ __forceinline__ float gate_sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

template <int VEC>
__global__ void output_gate_forward_kernel(const __nv_bfloat16* o, const __nv_bfloat16* gate, __nv_bfloat16* y,
                                           int64_t packs) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < packs; p += int64_t(gridDim.x) * blockDim.x) {
    const auto ov = reinterpret_cast<const Bf16Pack<VEC>*>(o)[p];
    const auto gv = reinterpret_cast<const Bf16Pack<VEC>*>(gate)[p];
    Bf16Pack<VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) out.v[e] = to_bf(to_f(ov.v[e]) * gate_sigmoid(to_f(gv.v[e])));
    reinterpret_cast<Bf16Pack<VEC>*>(y)[p] = out;
  }
}

template <int VEC>
__global__ void output_gate_backward_kernel(const __nv_bfloat16* dy, const __nv_bfloat16* o, const __nv_bfloat16* gate,
                                            __nv_bfloat16* d_o, __nv_bfloat16* dgate, int64_t packs) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < packs; p += int64_t(gridDim.x) * blockDim.x) {
    const auto dyv = reinterpret_cast<const Bf16Pack<VEC>*>(dy)[p];
    const auto ov = reinterpret_cast<const Bf16Pack<VEC>*>(o)[p];
    const auto gv = reinterpret_cast<const Bf16Pack<VEC>*>(gate)[p];
    Bf16Pack<VEC> dov, dgv;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float s = gate_sigmoid(to_f(gv.v[e])), g = to_f(dyv.v[e]);
      dov.v[e] = to_bf(g * s);
      dgv.v[e] = to_bf(g * to_f(ov.v[e]) * s * (1.f - s));
    }
    reinterpret_cast<Bf16Pack<VEC>*>(d_o)[p] = dov;
    reinterpret_cast<Bf16Pack<VEC>*>(dgate)[p] = dgv;
  }
}

}  // namespace

void output_gate_forward(const bf16* o, const bf16* gate, bf16* y, int64_t n, void* stream) {
  if (n == 0) return;
  const int threads = 256;
  if (n % 8 == 0 && aligned16(o) && aligned16(gate) && aligned16(y)) {
    output_gate_forward_kernel<8>
        <<<grid_for(n / 8, threads), threads, 0, as_stream(stream)>>>(as_nv(o), as_nv(gate), as_nv(y), n / 8);
  } else {
    output_gate_forward_kernel<1>
        <<<grid_for(n, threads), threads, 0, as_stream(stream)>>>(as_nv(o), as_nv(gate), as_nv(y), n);
  }
  CHECK_LAUNCH();
}

void output_gate_backward(const bf16* dy, const bf16* o, const bf16* gate, bf16* d_o, bf16* dgate, int64_t n,
                          void* stream) {
  if (n == 0) return;
  const int threads = 256;
  if (n % 8 == 0 && aligned16(dy) && aligned16(o) && aligned16(gate) && aligned16(d_o) && aligned16(dgate)) {
    output_gate_backward_kernel<8><<<grid_for(n / 8, threads), threads, 0, as_stream(stream)>>>(
        as_nv(dy), as_nv(o), as_nv(gate), as_nv(d_o), as_nv(dgate), n / 8);
  } else {
    output_gate_backward_kernel<1><<<grid_for(n, threads), threads, 0, as_stream(stream)>>>(
        as_nv(dy), as_nv(o), as_nv(gate), as_nv(d_o), as_nv(dgate), n);
  }
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

// CUDA elementwise ops (see kernels/elementwise.h): grid-stride loops, f32 math.
#include "kernels/cuda/common.cuh"
#include "kernels/elementwise.h"

namespace hyd::kernels::cuda {

namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;

// Grid-stride loop bounds: thread k handles k, k + stride, ...
__device__ __forceinline__ int64_t first_index() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

__global__ void add_bf16_kernel(__nv_bfloat16* y, const __nv_bfloat16* x, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) y[i] = to_bf(to_f(y[i]) + to_f(x[i]));
}
__global__ void add_f32_kernel(float* y, const float* x, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) y[i] += x[i];
}
__global__ void f32_to_bf16_kernel(__nv_bfloat16* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) dst[i] = to_bf(src[i]);
}
__global__ void bf16_to_f32_kernel(float* __restrict__ dst, const __nv_bfloat16* __restrict__ src, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) dst[i] = to_f(src[i]);
}
// t[0, head) and the elements after the last whole 16-byte vector one by one, the rest as float4 (the gradient
// buffer's 0.9 GB zeroing per step of issue 9's student: 573 us with 4-byte stores).
__global__ void fill_f32_kernel(float* t, float value, int64_t n, int64_t head) {
  const int64_t n4 = (n - head) / 4, tail = head + 4 * n4;
  float4* body = reinterpret_cast<float4*>(t + head);
  const float4 v = make_float4(value, value, value, value);
  for (int64_t i = first_index(); i < n4; i += grid_stride()) body[i] = v;
  const int64_t i = first_index();
  if (i < head) t[i] = value;
  if (i < n - tail) t[tail + i] = value;
}
__global__ void fill_bf16_kernel(__nv_bfloat16* t, float value, int64_t n) {
  const __nv_bfloat16 v = to_bf(value);
  for (int64_t i = first_index(); i < n; i += grid_stride()) t[i] = v;
}
__global__ void scale_f32_kernel(float* t, float s, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) t[i] *= s;
}

}  // namespace

void add_inplace_bf16(bf16* y, const bf16* x, int64_t n, void* stream) {
  if (n <= 0) return;
  add_bf16_kernel<<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(as_nv(y), as_nv(x), n);
  CHECK_LAUNCH();
}

void add_inplace_f32(float* y, const float* x, int64_t n, void* stream) {
  if (n <= 0) return;
  add_f32_kernel<<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(y, x, n);
  CHECK_LAUNCH();
}

void convert_f32_to_bf16(bf16* dst, const float* src, int64_t n, void* stream) {
  if (n <= 0) return;
  f32_to_bf16_kernel<<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(as_nv(dst), src, n);
  CHECK_LAUNCH();
}

void convert_bf16_to_f32(float* dst, const bf16* src, int64_t n, void* stream) {
  if (n <= 0) return;
  bf16_to_f32_kernel<<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(dst, as_nv(src), n);
  CHECK_LAUNCH();
}

void fill_f32(float* t, float value, int64_t n, void* stream) {
  if (n <= 0) return;
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((16 - reinterpret_cast<uintptr_t>(t) % 16) % 16 / 4));
  fill_f32_kernel<<<grid_for((n - head) / 4, kThreads), kThreads, 0, as_stream(stream)>>>(t, value, n, head);
  CHECK_LAUNCH();
}

void fill_bf16(bf16* t, float value, int64_t n, void* stream) {
  if (n <= 0) return;
  fill_bf16_kernel<<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(as_nv(t), value, n);
  CHECK_LAUNCH();
}

void scale_f32(float* t, float s, int64_t n, void* stream) {
  if (n <= 0) return;
  scale_f32_kernel<<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(t, s, n);
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

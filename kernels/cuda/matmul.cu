// CUDA matrix products (see kernels/matmul.h): cuBLAS GEMM with bf16 inputs and fp32 accumulation,
// plus the bias kernels of the linear layer.
//
// cuBLAS is column-major. A row-major [r, c] matrix is the column-major [c, r] matrix, so the
// row-major product C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T: swap the
// operands, keep each operand's transpose flag, and pass n, m, k.
#include <cublas_v2.h>

#include "kernels/cuda/common.cuh"
#include "kernels/matmul.h"

namespace hyd::kernels::cuda {

using namespace cuda_detail;

void gemm(void* cublas, void* stream, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const bf16* a, const bf16* b, float beta, void* c, bool c_f32) {
  if (m == 0 || n == 0) return;
  HYD_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, "gemm: dimensions exceed the cuBLAS int range");
  cublasHandle_t h = static_cast<cublasHandle_t>(cublas);
  // The context binds its handle to its stream (and workspace); cublasSetStream would reset the
  // workspace to the default pool, so only rebind when a different stream is passed.
  cudaStream_t bound = nullptr;
  CHECK_CUBLAS(cublasGetStream(h, &bound));
  if (bound != as_stream(stream)) CHECK_CUBLAS(cublasSetStream(h, as_stream(stream)));
  // Leading dimensions are the row lengths of the row-major storage.
  const int lda = static_cast<int>(trans_a ? m : k);
  const int ldb = static_cast<int>(trans_b ? k : n);
  const int ldc = static_cast<int>(n);
  // cuBLAS requires ld >= 1 even for empty operands (k == 0 leaves C = beta C).
  CHECK_CUBLAS(cublasGemmEx(h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                            static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b, CUDA_R_16BF,
                            ldb > 0 ? ldb : 1, a, CUDA_R_16BF, lda > 0 ? lda : 1, &beta, c,
                            c_f32 ? CUDA_R_32F : CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

namespace {

// y[i, j] += bias[j], in f32 then rounded once.
__global__ void bias_add_kernel(__nv_bfloat16* y, const __nv_bfloat16* bias, int64_t m, int64_t n) {
  const int64_t total = m * n;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    y[idx] = to_bf(to_f(y[idx]) + to_f(bias[idx % n]));
  }
}

// dbias[j] += sum_i dy[i, j]. Block (32, 32): threadIdx.x picks a column of a 32-column slab (so a
// warp reads 32 consecutive bf16), threadIdx.y strides over rows; the 32 partial sums of a column
// are added in shared memory in a fixed order, so the result is deterministic (no atomics).
__global__ void bias_grad_kernel(const __nv_bfloat16* dy, float* dbias, int64_t m, int64_t n) {
  __shared__ float partial[32][33];
  const int64_t col = blockIdx.x * 32LL + threadIdx.x;
  float acc = 0.f;
  if (col < n)
    for (int64_t row = threadIdx.y; row < m; row += 32) acc += to_f(dy[row * n + col]);
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float s = 0.f;
    for (int r = 0; r < 32; ++r) s += partial[r][threadIdx.x];
    dbias[col] += s;
  }
}

}  // namespace

void bias_add(bf16* y, const bf16* bias, int64_t m, int64_t n, void* stream) {
  if (m == 0 || n == 0) return;
  constexpr int kThreads = 256;
  bias_add_kernel<<<grid_for(m * n, kThreads), kThreads, 0, as_stream(stream)>>>(as_nv(y), as_nv(bias), m, n);
  CHECK_LAUNCH();
}

void bias_grad(const bf16* dy, float* dbias, int64_t m, int64_t n, void* stream) {
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>((n + 31) / 32);
  bias_grad_kernel<<<blocks, dim3(32, 32), 0, as_stream(stream)>>>(as_nv(dy), dbias, m, n);
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

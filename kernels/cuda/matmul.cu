// CUDA matrix products (see kernels/matmul.h): cuBLAS GEMM with bf16 inputs and fp32 accumulation,
// plus the bias kernels of the linear layer.
//
// cuBLAS is column-major. A row-major [r, c] matrix is the column-major [c, r] matrix, so the
// row-major product C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T: swap the
// operands, keep each operand's transpose flag, and pass n, m, k.
#include <cublasLt.h>
#include <cublas_v2.h>

#include <map>
#include <mutex>
#include <tuple>

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

// The cuBLASLt algorithm for y = x w^T + residual per (device, m, n, k, pointer alignment), from the heuristic
// once; `ok` false when it offered none (then the plain GEMM with beta = 1 over a copy of the residual).
struct LtChoice {
  bool ok = false;
  cublasLtMatmulAlgo_t algo{};
};

// Largest power of two (<= 256) dividing every pointer's address.
int common_alignment(std::initializer_list<const void*> ptrs) {
  int align = 256;
  for (const void* p : ptrs)
    while (align > 1 && reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(align) != 0) align /= 2;
  return align;
}

// The descriptors of one call: row-major y[m, n] = x[m, k] w[n, k]^T is the column-major
// y^T[n, m] = (w as k x n)^T (x as k x m), as in gemm() above.
struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  LtDescs(int64_t m, int64_t n, int64_t k) {
    CHECK_CUBLAS(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, static_cast<uint64_t>(k), static_cast<uint64_t>(n), k));
    CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, static_cast<uint64_t>(k), static_cast<uint64_t>(m), k));
    CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&c, CUDA_R_16BF, static_cast<uint64_t>(n), static_cast<uint64_t>(m), n));
  }
  ~LtDescs() {
    cublasLtMatrixLayoutDestroy(c);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatmulDescDestroy(op);
  }
  LtDescs(const LtDescs&) = delete;
  LtDescs& operator=(const LtDescs&) = delete;
};

LtChoice lt_choice(cublasLtHandle_t lt, const LtDescs& d, int64_t m, int64_t n, int64_t k, int align,
                   size_t workspace_bytes) {
  static std::mutex mu;
  static std::map<std::tuple<int, int64_t, int64_t, int64_t, int, size_t>, LtChoice> cache;
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  const auto key = std::make_tuple(dev, m, n, k, align, workspace_bytes);
  std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cublasLtMatmulPreference_t pref = nullptr;
  CHECK_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = workspace_bytes;
  const uint32_t al = static_cast<uint32_t>(align);
  CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, attr, &al, sizeof(al)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt, d.op, d.a, d.b, d.c, d.c, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  LtChoice choice;
  choice.ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
  if (choice.ok) choice.algo = result.algo;
  cache.emplace(key, choice);
  return choice;
}

}  // namespace

void linear_residual(void* cublas, void* cublaslt, void* stream, void* workspace, size_t workspace_bytes, int64_t m,
                     int64_t n, int64_t k, const bf16* x, const bf16* w, const bf16* residual, bf16* y) {
  if (m == 0 || n == 0) return;
  HYD_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, "linear_residual: dimensions exceed the cuBLAS range");
  const cudaStream_t st = as_stream(stream);
  const size_t bytes = static_cast<size_t>(m * n) * sizeof(bf16);
  if (k == 0) {  // y = residual
    if (y != residual) CHECK_CUDA(cudaMemcpyAsync(y, residual, bytes, cudaMemcpyDeviceToDevice, st));
    return;
  }
  const cublasLtHandle_t lt = static_cast<cublasLtHandle_t>(cublaslt);
  const LtDescs d(m, n, k);
  const LtChoice choice = lt_choice(lt, d, m, n, k, common_alignment({x, w, residual, y}), workspace_bytes);
  const float alpha = 1.f, beta = 1.f;
  if (choice.ok) {
    CHECK_CUBLAS(cublasLtMatmul(lt, d.op, &alpha, w, d.a, x, d.b, &beta, residual, d.c, y, d.c, &choice.algo, workspace,
                                workspace_bytes, st));
    return;
  }
  // No cuBLASLt algorithm for this shape / alignment: a copy of the residual, then the plain GEMM adding into it.
  if (y != residual) CHECK_CUDA(cudaMemcpyAsync(y, residual, bytes, cudaMemcpyDeviceToDevice, st));
  gemm(cublas, stream, false, true, m, n, k, 1.f, x, w, 1.f, y, false);
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

// CUDA matrix products (see kernels/matmul.h): cuBLAS GEMM with bf16 inputs and fp32 accumulation,
// plus the bias kernels of the linear layer.
//
// cuBLAS is column-major. A row-major [r, c] matrix is the column-major [c, r] matrix, so the
// row-major product C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T: swap the
// operands, keep each operand's transpose flag, and pass n, m, k.
#include <cublasLt.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "kernels/cuda/common.cuh"
#include "kernels/matmul.h"

namespace hyd::kernels::cuda {

using namespace cuda_detail;

namespace {

// HYD_GEMM_LOG=FILE: every product's shape appended to FILE, one line per call in call order ("gemm ta tb m n k
// beta c_f32" or "residual m n k"), for bench/gemm to replay. Unset (the default): one cached getenv per call.
void log_shape(const char* line_fmt, ...) __attribute__((format(printf, 1, 2)));
void log_shape(const char* line_fmt, ...) {
  static std::mutex mu;
  static FILE* f = [] {
    const char* path = std::getenv("HYD_GEMM_LOG");
    return path && *path ? std::fopen(path, "a") : nullptr;
  }();
  if (!f) return;
  std::lock_guard<std::mutex> lock(mu);
  va_list args;
  va_start(args, line_fmt);
  std::vfprintf(f, line_fmt, args);
  va_end(args);
  std::fflush(f);
}

}  // namespace

void gemm(void* cublas, void* stream, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const bf16* a, const bf16* b, float beta, void* c, bool c_f32) {
  if (m == 0 || n == 0) return;
  HYD_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, "gemm: dimensions exceed the cuBLAS int range");
  log_shape("gemm %d %d %lld %lld %lld %g %d\n", int(trans_a), int(trans_b), static_cast<long long>(m),
            static_cast<long long>(n), static_cast<long long>(k), double(beta), int(c_f32));
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
  log_shape("residual %lld %lld %lld\n", static_cast<long long>(m), static_cast<long long>(n),
            static_cast<long long>(k));
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

constexpr int kBiasRows = 16;  // rows per block of bias_add_kernel

// y[i, j] += bias[j], in f32 then rounded once. A block takes kBiasRows rows; each thread a column pack of VEC
// (its bias pack loaded once), so no index division per element.
template <int VEC>
__global__ void bias_add_kernel(__nv_bfloat16* y, const __nv_bfloat16* bias, int64_t m, int64_t n) {
  using P = Pack<__nv_bfloat16, VEC>;
  const int64_t packs = n / VEC, r0 = int64_t(blockIdx.x) * kBiasRows, r1 = min(m, r0 + kBiasRows);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const P b = reinterpret_cast<const P*>(bias)[p];
    for (int64_t r = r0; r < r1; ++r) {
      P* row = reinterpret_cast<P*>(y + r * n);
      P v = row[p];
#pragma unroll
      for (int e = 0; e < VEC; ++e) v.v[e] = to_bf(to_f(v.v[e]) + to_f(b.v[e]));
      row[p] = v;
    }
  }
}

// Partial column sums of dy for bias_grad: block (32, 8) takes 32 column packs of VEC (threadIdx.x) over the rows
// [blockIdx.y seg, (blockIdx.y + 1) seg), 8 row lanes (threadIdx.y) each adding every 8th row in order, then the 8
// lane sums in lane order: partial[blockIdx.y][column]. Fixed order throughout (deterministic, no atomics).
template <int VEC>
__global__ void __launch_bounds__(256)
    bias_grad_partial_kernel(const __nv_bfloat16* dy, float* partial, int64_t m, int64_t n, int64_t seg) {
  using P = Pack<__nv_bfloat16, VEC>;
  __shared__ float lanes[8][32 * VEC + 1];
  const int64_t pack = int64_t(blockIdx.x) * 32 + threadIdx.x, packs = n / VEC;
  const int64_t r0 = int64_t(blockIdx.y) * seg, r1 = min(m, r0 + seg);
  float acc[VEC] = {};
  if (pack < packs)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const P v = reinterpret_cast<const P*>(dy + r * n)[pack];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += to_f(v.v[e]);
    }
#pragma unroll
  for (int e = 0; e < VEC; ++e) lanes[threadIdx.y][threadIdx.x * VEC + e] = acc[e];
  __syncthreads();
  const int tid = threadIdx.y * 32 + threadIdx.x;
  for (int c = tid; c < 32 * VEC; c += 256) {
    const int64_t col = int64_t(blockIdx.x) * 32 * VEC + c;
    if (col >= n) continue;
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += lanes[k][c];
    partial[int64_t(blockIdx.y) * n + col] = t;
  }
}

template <class F>
void with_bias_vec(const void* a, const void* b, int64_t n, F&& f) {
  if (n % 8 == 0 && aligned16(a) && aligned16(b))
    f(std::integral_constant<int, 8>{});
  else
    f(std::integral_constant<int, 1>{});
}

}  // namespace

void bias_add(bf16* y, const bf16* bias, int64_t m, int64_t n, void* stream) {
  if (m == 0 || n == 0) return;
  with_bias_vec(y, bias, n, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const int threads = static_cast<int>(std::min<int64_t>(256, (n / VEC + 31) / 32 * 32));
    bias_add_kernel<VEC><<<static_cast<unsigned>((m + kBiasRows - 1) / kBiasRows), threads, 0, as_stream(stream)>>>(
        as_nv(y), as_nv(bias), m, n);
  });
  CHECK_LAUNCH();
}

void bias_grad(const bf16* dy, float* dbias, int64_t m, int64_t n, void* stream) {
  if (n == 0 || m == 0) return;
  const cudaStream_t st = as_stream(stream);
  // Row segments of >= 128 rows, at most 128 of them: enough blocks to fill the GPU at [16384, 1024].
  const int64_t segs = std::clamp<int64_t>(m / 128, 1, 128), seg = (m + segs - 1) / segs;
  const int64_t used = (m + seg - 1) / seg;
  StreamScratch partial(static_cast<size_t>(used * n), st);
  with_bias_vec(dy, dy, n, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const dim3 grid(static_cast<unsigned>((n / VEC + 31) / 32), static_cast<unsigned>(used));
    bias_grad_partial_kernel<VEC><<<grid, dim3(32, 8), 0, st>>>(as_nv(dy), partial.get(), m, n, seg);
  });
  CHECK_LAUNCH();
  column_sum(partial.get(), used, n, dbias, st);
}

}  // namespace hyd::kernels::cuda

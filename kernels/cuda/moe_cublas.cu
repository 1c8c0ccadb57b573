// The cuBLAS implementations of the MoE grouped expert GEMMs (kernels/moe.h, MoeGemm::grouped and
// MoeGemm::loop): bf16 operands, f32 accumulation, outputs bf16 (y, dx) or f32 (dW, accumulated into).
// Expert e owns the rows [off_e, off_e + c_e) of the row-major activations, off_e = c_0 + ... + c_{e-1}
// from the host counts c; an expert with c_e = 0 gets no GEMM at all (its dW_e is never written).
//
// Row-major [r, c] storage is the column-major [c, r] matrix (ld = c), so with W_e [n, k] (row-major):
//   forward  y_e [m, n] = x_e [m, k] W_e^T    column-major: y_e^T = op_T(W_e) x_e^T
//            cuBLAS (T, N, M = n, N = m, K = k, A = W_e ld k, B = x_e ld k, C = y_e ld n), beta 0
//   dX       dx_e [m, k] = dy_e [m, n] W_e    column-major: dx_e^T = W_e^T dy_e^T
//            cuBLAS (N, N, M = k, N = m, K = n, A = W_e ld k, B = dy_e ld n, C = dx_e ld k), beta 0
//   dW       dW_e [n, k] += dy_e^T x_e        column-major: dW_e^T += x_e^T op_T(dy_e^T)
//            cuBLAS (N, T, M = k, N = n, K = m, A = x_e ld k, B = dy_e ld n, C = dW_e ld k, f32), beta 1
// loop: one cublasGemmEx per expert with rows and product (cuda::gemm of kernels/cuda/matmul.cu, which
// makes exactly these calls from the row-major description). grouped: one cublasGemmGroupedBatchedEx per
// product, one group (of one problem) per expert with rows; its m/n/k/ld/op/alpha/beta arrays live on the
// host, its A/B/C pointer arrays on the device: a small kernel writes them from its launch parameters (which
// the launch copies, so no host buffer has to outlive an asynchronous copy and nothing synchronises) into
// stream-ordered memory, freed behind the GEMM.
// The grouped kernels cannot see the alignment of pointers that live on the device, so the grouped path
// runs only where every expert's pointers are 16-byte aligned (bases aligned, n and k multiples of 8);
// otherwise the product takes the loop, whose cublasGemmEx sees its pointers.
// cuBLAS documents cublasGemmGroupedBatchedEx for bf16 -> bf16 with CUBLAS_COMPUTE_32F but not for
// bf16 -> f32: the dW product is tried grouped once per process and, where cuBLAS refuses it
// (CUBLAS_STATUS_NOT_SUPPORTED / INVALID_VALUE, returned before anything runs), takes the loop from then on
// (reported once on stderr and by moe_grouped_dw_path()). A refusal of the bf16-output products throws.
#include <cublas_v2.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/matmul.h"
#include "kernels/moe.h"

namespace hyd::kernels::cuda {

namespace {

using namespace cuda_detail;

// ------------------------------------------------------------------------------------------- pointer arrays

constexpr int kPointersPerLaunch = 256;  // 2 KiB: well inside the 4 KiB of kernel parameters

struct PointerBatch {
  void* p[kPointersPerLaunch];
};

__global__ void store_pointers_kernel(PointerBatch batch, int count, void** dst) {
  const int i = static_cast<int>(threadIdx.x);
  if (i < count) dst[i] = batch.p[i];
}

// ------------------------------------------------------------------------------------------- grouped call

void bind_stream(cublasHandle_t h, cudaStream_t s) {
  // As cuda::gemm: cublasSetStream would reset the context's workspace, so rebind only on a change.
  cudaStream_t bound = nullptr;
  CHECK_CUBLAS(cublasGetStream(h, &bound));
  if (bound != s) CHECK_CUBLAS(cublasSetStream(h, s));
}

// One problem of a grouped call, in cuBLAS (column-major) terms.
struct Problem {
  int m, n, k;
  const void* a;
  const void* b;
  void* c;
};

// C_i = op_a(A_i) op_b(B_i) + beta C_i for every problem: one cublasGemmGroupedBatchedEx, a group per
// problem (ops, leading dimensions and beta shared). Returns cuBLAS's status (the caller decides whether
// a refusal is an error); CUDA errors of the preparation throw.
cublasStatus_t grouped_gemm(cublasHandle_t h, cudaStream_t s, cublasOperation_t op_a, cublasOperation_t op_b, int lda,
                            int ldb, int ldc, float beta, cudaDataType_t c_type, const std::vector<Problem>& problems) {
  const int groups = static_cast<int>(problems.size());
  if (groups == 0) return CUBLAS_STATUS_SUCCESS;
  StreamScratchOf<void*> arrays(3 * problems.size(), s);
  void** dev = arrays.get();  // [A pointers | B pointers | C pointers]
  std::vector<void*> host(3 * problems.size());
  for (int g = 0; g < groups; ++g) {
    host[g] = const_cast<void*>(problems[g].a);
    host[groups + g] = const_cast<void*>(problems[g].b);
    host[2 * groups + g] = problems[g].c;
  }
  for (size_t base = 0; base < host.size(); base += kPointersPerLaunch) {
    PointerBatch batch{};
    const int count = static_cast<int>(std::min<size_t>(kPointersPerLaunch, host.size() - base));
    for (int i = 0; i < count; ++i) batch.p[i] = host[base + i];
    store_pointers_kernel<<<1, kPointersPerLaunch, 0, s>>>(batch, count, dev + base);
    CHECK_LAUNCH();
  }
  const std::vector<cublasOperation_t> ops_a(groups, op_a), ops_b(groups, op_b);
  std::vector<int> ms(groups), ns(groups), ks(groups);
  for (int g = 0; g < groups; ++g) {
    ms[g] = problems[g].m;
    ns[g] = problems[g].n;
    ks[g] = problems[g].k;
  }
  const std::vector<int> ldas(groups, lda), ldbs(groups, ldb), ldcs(groups, ldc), sizes(groups, 1);
  const std::vector<float> alphas(groups, 1.f), betas(groups, beta);
  bind_stream(h, s);
  return cublasGemmGroupedBatchedEx(h, ops_a.data(), ops_b.data(), ms.data(), ns.data(), ks.data(), alphas.data(),
                                    const_cast<const void* const*>(dev), CUDA_R_16BF, ldas.data(),
                                    const_cast<const void* const*>(dev + groups), CUDA_R_16BF, ldbs.data(),
                                    betas.data(), dev + 2 * groups, c_type, ldcs.data(), groups, sizes.data(),
                                    CUBLAS_COMPUTE_32F);
}

// Every expert's slice of these operands starts 16-byte aligned (see the top of the file).
bool grouped_aligned(int64_t n, int64_t k, std::initializer_list<const void*> bases) {
  if (n % 8 != 0 || k % 8 != 0) return false;
  for (const void* p : bases)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

// -1: untried, 0: cuBLAS refused bf16 -> f32 (the loop computes dW), 1: grouped.
std::atomic<int> g_dw_grouped{-1};

void check_dims(int64_t e, int64_t n, int64_t k, const char* op) {
  HYD_CHECK(n <= INT32_MAX && k <= INT32_MAX && e <= INT32_MAX, op, ": dimensions exceed the cuBLAS int range (E=", e,
            ", n=", n, ", k=", k, ")");
}

}  // namespace

const char* moe_grouped_dw_path() {
  const int s = g_dw_grouped.load();
  return s < 0 ? "untried" : s == 0 ? "loop" : "grouped";
}

void moe_grouped_linear_forward_cublas(void* cublas, void* stream, bool grouped, const int32_t* counts, const bf16* x,
                                       const bf16* w, bf16* y, int64_t e, int64_t n, int64_t k) {
  check_dims(e, n, k, "moe_grouped_linear_forward");
  if (n == 0) return;
  const cudaStream_t s = as_stream(stream);
  // k = 0 (an empty reduction) leaves y = 0: cuda::gemm handles it; the grouped path does not take it.
  if (grouped && k > 0 && grouped_aligned(n, k, {x, w, y})) {
    std::vector<Problem> problems;
    int64_t row = 0;
    for (int64_t i = 0; i < e; ++i) {
      const int64_t m = counts[i];
      if (m > 0)
        problems.push_back(
            {static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), w + i * n * k, x + row * k, y + row * n});
      row += m;
    }
    CHECK_CUBLAS(grouped_gemm(static_cast<cublasHandle_t>(cublas), s, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(k),
                              static_cast<int>(k), static_cast<int>(n), 0.f, CUDA_R_16BF, problems));
    return;
  }
  int64_t row = 0;
  for (int64_t i = 0; i < e; ++i) {
    const int64_t m = counts[i];
    if (m > 0) gemm(cublas, stream, false, true, m, n, k, 1.f, x + row * k, w + i * n * k, 0.f, y + row * n, false);
    row += m;
  }
}

void moe_grouped_linear_backward_cublas(void* cublas, void* stream, bool grouped, const int32_t* counts, const bf16* dy,
                                        const bf16* x, const bf16* w, bf16* dx, float* dw, int64_t e, int64_t n,
                                        int64_t k) {
  check_dims(e, n, k, "moe_grouped_linear_backward");
  const cudaStream_t s = as_stream(stream);
  const cublasHandle_t h = static_cast<cublasHandle_t>(cublas);
  const bool aligned = grouped_aligned(n, k, {dy, x, w, dx, dw});
  // dx[R_e] = dy[R_e] W_e (reduction over n).
  if (dx != nullptr && k > 0) {
    if (grouped && n > 0 && aligned) {
      std::vector<Problem> problems;
      int64_t row = 0;
      for (int64_t i = 0; i < e; ++i) {
        const int64_t m = counts[i];
        if (m > 0)
          problems.push_back({static_cast<int>(k), static_cast<int>(m), static_cast<int>(n), w + i * n * k,
                              dy + row * n, dx + row * k});
        row += m;
      }
      CHECK_CUBLAS(grouped_gemm(h, s, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(k), static_cast<int>(n),
                                static_cast<int>(k), 0.f, CUDA_R_16BF, problems));
    } else {
      int64_t row = 0;
      for (int64_t i = 0; i < e; ++i) {
        const int64_t m = counts[i];
        if (m > 0)
          gemm(cublas, stream, false, false, m, k, n, 1.f, dy + row * n, w + i * n * k, 0.f, dx + row * k, false);
        row += m;
      }
    }
  }
  // dW_e += dy[R_e]^T x[R_e] (reduction over the expert's rows; f32, accumulated).
  if (dw == nullptr || n == 0 || k == 0) return;
  if (grouped && aligned && g_dw_grouped.load() != 0) {
    std::vector<Problem> problems;
    int64_t row = 0;
    for (int64_t i = 0; i < e; ++i) {
      const int64_t m = counts[i];
      if (m > 0)
        problems.push_back(
            {static_cast<int>(k), static_cast<int>(n), static_cast<int>(m), x + row * k, dy + row * n, dw + i * n * k});
      row += m;
    }
    const cublasStatus_t st = grouped_gemm(h, s, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(k), static_cast<int>(n),
                                           static_cast<int>(k), 1.f, CUDA_R_32F, problems);
    if (st == CUBLAS_STATUS_SUCCESS) {
      if (!problems.empty()) g_dw_grouped.store(1);
      return;
    }
    const bool refused = st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE;
    if (!refused || g_dw_grouped.load() == 1)
      ::hyd::detail::throw_cublas_error(st, "cublasGemmGroupedBatchedEx (bf16 -> f32, MoE weight gradients)", __FILE__,
                                        __LINE__);
    if (g_dw_grouped.exchange(0) != 0)
      std::fprintf(stderr,
                   "hydistill: cublasGemmGroupedBatchedEx refused bf16 inputs with an f32 output (status %d); the MoE "
                   "weight gradients use one cublasGemmEx per expert (HYD_MOE_GEMM=grouped keeps the grouped forward "
                   "and input gradients)\n",
                   static_cast<int>(st));
  }
  int64_t row = 0;
  for (int64_t i = 0; i < e; ++i) {
    const int64_t m = counts[i];
    if (m > 0) gemm(cublas, stream, true, false, n, k, m, 1.f, dy + row * n, x + row * k, 1.f, dw + i * n * k, true);
    row += m;
  }
}

}  // namespace hyd::kernels::cuda

// LASP-2 composition on the GPU (kernels/kda_compose.h): per rank step, the addend (B_p or L_p) is copied
// into the next buffer, then one strided batched fp32 GEMM over the R * HV states adds op(M_p) times the
// current state. Row-major [dk, dv] states are column-major [dv, dk], so S' = M S is S'^T = S^T M^T:
// gemm(N, N) with A = S (ld dv) and B = M (ld dk); for M^T G, B is read transposed.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "kernels/kda_compose.h"
#include "trainer/core/error.h"

namespace hyd::kernels::cuda {

namespace {

// next = op(M_p) cur + next (next already holds the addend), for `rows` states.
void gemm_step(cublasHandle_t h, const float* M, int64_t m_stride, bool transpose, const float* cur, float* next,
               int64_t rows, int64_t dk, int64_t dv) {
  const float one = 1.0f;
  CHECK_CUBLAS(cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, transpose ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(dv),
                                          static_cast<int>(dk), static_cast<int>(dk), &one, cur, CUDA_R_32F,
                                          static_cast<int>(dv), dk * dv, M, CUDA_R_32F, static_cast<int>(dk), m_stride,
                                          &one, next, CUDA_R_32F, static_cast<int>(dv), dk * dv, static_cast<int>(rows),
                                          CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
}

template <class Addend, class MOf>
void compose(void* cublas, void* stream, int64_t rows, int64_t dk, int64_t dv, int first, int last, int step,
             Addend addend, MOf m_of, bool transpose, int64_t m_stride, float* out, float* work) {
  auto s = static_cast<cudaStream_t>(stream);
  auto h = static_cast<cublasHandle_t>(cublas);
  CHECK_CUBLAS(cublasSetStream(h, s));
  const size_t state_bytes = static_cast<size_t>(rows * dk * dv) * sizeof(float);
  float* cur = nullptr;
  float* bufs[2] = {out, work};
  int which = 0;
  for (int p = first; p != last; p += step) {
    float* next = bufs[which];
    addend(p, next, s);
    if (cur != nullptr) gemm_step(h, m_of(p), m_stride, transpose, cur, next, rows, dk, dv);
    cur = next;
    which ^= 1;
  }
  if (cur == nullptr) {
    CHECK_CUDA(cudaMemsetAsync(out, 0, state_bytes, s));
  } else if (cur != out) {
    CHECK_CUDA(cudaMemcpyAsync(out, cur, state_bytes, cudaMemcpyDeviceToDevice, s));
  }
}

}  // namespace

void kda_compose_prefix(void* cublas, void* stream, const float* trans, int64_t ranks, int64_t rows, int64_t dk,
                        int64_t dv, int rank, float* out, float* work) {
  (void)ranks;
  const int64_t per = dk * (dk + dv);
  // B_p of every state: rows blocks of dk * dv floats, per floats apart.
  auto addend = [&](int p, float* dst, cudaStream_t s) {
    const float* src = trans + static_cast<int64_t>(p) * rows * per + dk * dk;
    CHECK_CUDA(cudaMemcpy2DAsync(dst, dk * dv * sizeof(float), src, per * sizeof(float), dk * dv * sizeof(float), rows,
                                 cudaMemcpyDeviceToDevice, s));
  };
  auto m_of = [&](int p) { return trans + static_cast<int64_t>(p) * rows * per; };
  compose(cublas, stream, rows, dk, dv, 0, rank, 1, addend, m_of, false, per, out, work);
}

void kda_compose_suffix(void* cublas, void* stream, const float* trans, const float* adj, int64_t ranks, int64_t rows,
                        int64_t dk, int64_t dv, int rank, float* out, float* work) {
  const int64_t per = dk * (dk + dv), mb = dk * dv;
  auto addend = [&](int p, float* dst, cudaStream_t s) {
    CHECK_CUDA(cudaMemcpyAsync(dst, adj + static_cast<int64_t>(p) * rows * mb, rows * mb * sizeof(float),
                               cudaMemcpyDeviceToDevice, s));
  };
  auto m_of = [&](int p) { return trans + static_cast<int64_t>(p) * rows * per; };
  compose(cublas, stream, rows, dk, dv, static_cast<int>(ranks) - 1, rank, -1, addend, m_of, true, per, out, work);
}

}  // namespace hyd::kernels::cuda

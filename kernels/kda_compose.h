// LASP-2's composition of the KDA chunk transitions of the P ranks of a sequence-parallel group
// (PARALLEL.md "LASP-2 for KDA layers", trainer/lasp.h). With S_out = M S_in + B the affine map of a rank's
// slice (KDA.md "Chunk transition"):
//   trans [P, S, dk, dk + dv] f32, S independent states (rows x value heads): for rank p and state s, the
//       first dk * dk values are M_p (row-major [dk, dk]) and the next dk * dv are B_p (row-major [dk, dv]).
//   adj [P, S, dk, dv] f32: L_p, rank p's incoming-state adjoint computed with a zero outgoing adjoint.
//   kda_compose_prefix:  X = 0;  for p = 0 .. rank - 1:            X = M_p X + B_p       (the incoming state)
//   kda_compose_suffix:  X = 0;  for p = P - 1 down to rank + 1:   X = M_p^T X + L_p     (the outgoing adjoint)
// out [S, dk, dv] f32, overwritten; work: scratch of the same shape (CUDA ping-pong buffer;
// unused on the CPU, may be empty there). CPU: f32 values, double accumulation. CUDA: cuBLAS strided
// batched fp32 GEMMs (CUBLAS_COMPUTE_32F_PEDANTIC: no TF32), asynchronous on the context's stream.
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void kda_compose_prefix(const ExecContext& ctx, const Tensor& trans, int rank, const Tensor& out, const Tensor& work);
void kda_compose_suffix(const ExecContext& ctx, const Tensor& trans, const Tensor& adj, int rank, const Tensor& out,
                        const Tensor& work);

namespace cpu {
// rows = S (the batch of independent states).
void kda_compose_prefix(const float* trans, int64_t ranks, int64_t rows, int64_t dk, int64_t dv, int rank, float* out);
void kda_compose_suffix(const float* trans, const float* adj, int64_t ranks, int64_t rows, int64_t dk, int64_t dv,
                        int rank, float* out);
}  // namespace cpu

namespace cuda {
void kda_compose_prefix(void* cublas, void* stream, const float* trans, int64_t ranks, int64_t rows, int64_t dk,
                        int64_t dv, int rank, float* out, float* work);
void kda_compose_suffix(void* cublas, void* stream, const float* trans, const float* adj, int64_t ranks, int64_t rows,
                        int64_t dk, int64_t dv, int rank, float* out, float* work);
}  // namespace cuda

}  // namespace hyd::kernels

// Token embedding lookup.
//   forward:  out[i, :] = table[ids[i], :]
//   backward: dtable[ids[i], :] += dout[i, :]      (dtable is f32 and accumulated into)
// Shapes: ids i32 [N]; table [V, D]; out/dout [N, D]. Activations and table are f32 on the CPU,
// bf16 on CUDA; dtable is f32 on both. Ids must lie in [0, V): the data loader guarantees it, the
// CPU reference checks it.
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void embedding_forward(const ExecContext& ctx, const Tensor& ids, const Tensor& table, const Tensor& out);
void embedding_backward(const ExecContext& ctx, const Tensor& ids, const Tensor& dout, const Tensor& dtable);

namespace cpu {
template <class T>
void embedding_forward(const int32_t* ids, const T* table, T* out, int64_t n, int64_t vocab, int64_t dim);
template <class T>
void embedding_backward(const int32_t* ids, const T* dout, T* dtable, int64_t n, int64_t vocab, int64_t dim);
}  // namespace cpu

namespace cuda {
void embedding_forward(const int32_t* ids, const bf16* table, bf16* out, int64_t n, int64_t dim, void* stream);
void embedding_backward(const int32_t* ids, const bf16* dout, float* dtable, int64_t n, int64_t dim, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

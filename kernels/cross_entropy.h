// Cross-entropy over the vocabulary for one chunk of tokens. The trainer computes logits chunk by
// chunk (a few thousand tokens at a time) so full-batch fp32 logits never exist.
//   loss[i] = logsumexp_v(logits[i, v]) - logits[i, target[i]]      (0 where target[i] < 0: ignored)
// When write_grad, logits are overwritten in place with dloss/dlogits * grad_scale:
//   dlogits[i, v] = grad_scale * (softmax(logits[i])_v - [v == target[i]])   (0 rows for ignored tokens)
// Shapes: logits [n, V]; targets i32 [n]; losses f32 [n]. dtypes: CPU f32; CUDA bf16 logits (f32 math).
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void cross_entropy(const ExecContext& ctx, const Tensor& logits, const Tensor& targets, const Tensor& losses,
                   bool write_grad, float grad_scale);

namespace cpu {
template <class T>
void cross_entropy(T* logits, const int32_t* targets, T* losses, int64_t n, int64_t vocab, bool write_grad,
                   double grad_scale);
}  // namespace cpu

namespace cuda {
void cross_entropy(bf16* logits, const int32_t* targets, float* losses, int64_t n, int64_t vocab, bool write_grad,
                   float grad_scale, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

// Fused distillation loss for one chunk of tokens: KL(teacher || student) at temperature tau plus
// cross-entropy against the data labels, reading both models' logits once per pass and writing the
// student's dlogits in place. The trainer loops over token chunks, so full [tokens x vocab] logits
// of both models never exist at the same time.
//
// For token i with mask[i] != 0 (s = student logits row, t = teacher logits row, length V):
//   p_t = softmax(t / tau),  p_s = softmax(s / tau),  q = softmax(s)
//   kl[i] = tau^2 * sum_v p_t[v] (log p_t[v] - log p_s[v])   (terms with p_t[v] == 0 contribute 0;
//                                                              clamped at 0 against rounding)
//   ce[i] = logsumexp(s) - s[label[i]]                         (temperature 1; 0 when label[i] < 0)
//   top1[i] = (argmax_v s == argmax_v t)                       (first index wins ties)
// and the token's loss is w_kl * kl[i] + w_ce * ce[i]. kl and ce are always written, whatever the
// weights (they are what gets logged); the weights only enter the gradient. When write_grad, the
// student logits are overwritten with
//   ds[i, v] = grad_scale * ( w_kl * tau * (p_s[v] - p_t[v]) + w_ce * (q[v] - [v == label[i]]) )
// (d(tau^2 KL)/ds = tau (p_s - p_t); the CE term is absent when label[i] < 0).
// Masked tokens (mask[i] == 0) contribute nothing: kl = ce = 0, top1 = 0 (so summing top1 counts
// agreeing loss tokens) and, when write_grad, a zero dlogits row.
//
// Shapes: student, teacher [n, V]; labels i32 [n] or empty (no CE term anywhere); mask u8 [n] or
// empty (every token counts); kl, ce f32 [n]; top1 u8 [n] or empty (not computed). All on one
// device. dtypes of the logits: CPU f32, CUDA bf16 (math and statistics in f32 on CUDA, double
// accumulation on the CPU). Teacher logits are read only and must not alias the student's.
// Labels >= V are a data error: the CPU path throws before writing anything; the CUDA kernel cannot
// throw and writes ce = NaN for that token (its gradient row keeps only the KL term), which the
// trainer's non-finite-loss check catches.
#pragma once

#include <cstdint>

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

struct DistillLossOptions {
  float temperature = 1;  // tau > 0
  float w_kl = 1;
  float w_ce = 0;
  float grad_scale = 1;  // e.g. 1 / (number of loss tokens in the whole batch)
  bool write_grad = false;
};

void distill_loss(const ExecContext& ctx, const Tensor& student, const Tensor& teacher, const Tensor& labels,
                  const Tensor& mask, const Tensor& kl, const Tensor& ce, const Tensor& top1,
                  const DistillLossOptions& opt);

namespace cpu {
// labels, mask, top1 may be nullptr (see above).
template <class T>
void distill_loss(T* student, const T* teacher, const int32_t* labels, const uint8_t* mask, T* kl, T* ce, uint8_t* top1,
                  int64_t n, int64_t vocab, const DistillLossOptions& opt);
}  // namespace cpu

namespace cuda {
// One block per token row; labels, mask, top1 may be nullptr.
void distill_loss(bf16* student, const bf16* teacher, const int32_t* labels, const uint8_t* mask, float* kl, float* ce,
                  uint8_t* top1, int64_t n, int64_t vocab, const DistillLossOptions& opt, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

// What the dense model's layers share: a weight with its gradient, the packed-sequence description
// attention reads, and an allocation counter that lets arena capacities be computed by running the
// very code that allocates (so the sizes on paper and in memory cannot drift apart).
#pragma once

#include <cstddef>
#include <initializer_list>

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd {

class SequenceParallel;  // parallel/sequence_parallel.h

// A parameter and its gradient: views into the model's flat buffers. value is f32 (CPU) or bf16
// (CUDA); grad is f32 on both and is always accumulated into (+=), never overwritten.
struct WeightRef {
  Tensor value;
  Tensor grad;
};

// The packed micro-batch as the attention layers see it. Positions index the RoPE tables.
struct PackedSequence {
  int64_t num_tokens = 0;
  int64_t num_docs = 0;
  // The longest document's token count (host-side: it sizes the CUDA attention kernels' grids).
  int64_t max_doc_len = 0;
  Tensor positions;   // i32 [N]
  Tensor cu_seqlens;  // i32 [D+1]
  Tensor rope_cos;    // f32 [max_pos, head_dim / 2]
  Tensor rope_sin;    // f32 [max_pos, head_dim / 2]
  // Sequence parallelism: this is one rank's slice of the micro-batch (its layout and the SP group's
  // collectives); null for a whole batch. KDA layers run LASP-2, attention layers LASP-2H (trainer/lasp.h).
  const SequenceParallel* sp = nullptr;
};

// Backward through the input side of a pre-norm residual block, out = in + f(RMSNorm(in)), given
// dnormed = dL/dRMSNorm(in):  din = dout + RMSNorm'(in)^T dnormed, and norm.grad accumulates.
// din may be the same tensor as dout (one pass: the norm's backward adds dout).
void prenorm_residual_backward(const ExecContext& ctx, const Tensor& dnormed, const Tensor& in, const WeightRef& norm,
                               const Tensor& rstd, const Tensor& dout, const Tensor& din);

// Stands in for an Arena in the layers' alloc_* templates: counts bytes with Arena's rounding
// (every allocation padded to 256 bytes) and hands out tensors without memory.
class ArenaSizer {
 public:
  static constexpr size_t kAlign = 256;  // must match trainer/core/arena.cpp
  Tensor alloc(std::initializer_list<int64_t> dims, DType dtype) {
    Tensor t(nullptr, dtype, Device::cpu(), dims);
    used_ += (t.nbytes() + kAlign - 1) / kAlign * kAlign;
    return t;
  }
  size_t used() const { return used_; }

 private:
  size_t used_ = 0;
};

}  // namespace hyd

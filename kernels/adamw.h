// AdamW with decoupled weight decay (Loshchilov & Hutter), on fp32 master weights.
//   g  = grad * grad_scale                      (grad_scale carries global-norm clipping)
//   m  = beta1 m + (1 - beta1) g
//   v  = beta2 v + (1 - beta2) g^2
//   p  = p - lr * ( (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * p )
// then, when `working` is given (GPU: the bf16 weights the model computes with), working = bf16(p).
// Shapes: master, grad, m, v f32 [n]; working bf16 [n] or empty. All on one device.
#pragma once

#include <vector>

#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

struct AdamWStep {
  float lr = 0;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0;
  int64_t step = 1;  // 1-based, for bias correction
  float grad_scale = 1;
};

void adamw_update(const ExecContext& ctx, const Tensor& master, const Tensor& grad, const Tensor& m, const Tensor& v,
                  const Tensor& working, const AdamWStep& s);

// Many tensors updated as adamw_update would, each with its own weight decay (AdamWStep::weight_decay is not
// used): on CUDA in one launch over a device table of the tensors built once (the per-tensor launches of a model's
// 200 parameters cost time in launches and in small grids); on the CPU one adamw_update per item. The results are
// those of adamw_update bit for bit (the same per-element code).
class AdamWGroup {
 public:
  struct Item {
    Tensor master, grad, m, v, working;  // as adamw_update's arguments (working may be empty)
    float weight_decay = 0;
  };
  AdamWGroup() = default;
  AdamWGroup(Device device, std::vector<Item> items);
  void update(const ExecContext& ctx, const AdamWStep& s) const;
  size_t memory_bytes() const { return table_.capacity(); }

 private:
  Device device_{};
  std::vector<Item> items_;
  Arena table_;  // CUDA: the segments, then the chunks (cuda::adamw_update_table)
  Tensor segments_, chunks_;
};

namespace cpu {
template <class T>
void adamw_update(T* master, const T* grad, T* m, T* v, int64_t n, const AdamWStep& s);
}  // namespace cpu

namespace cuda {
void adamw_update(float* master, const float* grad, float* m, float* v, bf16* working, int64_t n, const AdamWStep& s,
                  void* stream);

// One tensor of a table update: its pointers and length, its weight decay, and whether all five pointers allow
// 16-byte (f32) / 8-byte (bf16) vector accesses.
struct AdamWSegment {
  float* master;
  const float* grad;
  float* m;
  float* v;
  bf16* working;
  int64_t n;
  float weight_decay;
  int32_t vec4;
};
// Elements per chunk of the table: chunk c = {segment, first element / kAdamWChunk} as two int32.
constexpr int64_t kAdamWChunk = 4096;
// Updates every chunk of `chunks` (device arrays; one block per chunk). s.weight_decay is not used.
void adamw_update_table(const AdamWSegment* segments, const int32_t* chunks, int64_t num_chunks, const AdamWStep& s,
                        void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

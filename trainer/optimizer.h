// AdamW over a model's flat parameter and gradient buffers, with global-norm gradient clipping.
//
// Master weights are f32. On the CPU the parameters are f32 already and are the masters; on CUDA the
// optimizer keeps an f32 master copy in its own arena next to m and v, and every update also writes
// the bf16 working weights the model computes with (kernels::adamw_update's `working`).
// Weight decay is applied only to parameters whose ParamInfo.weight_decay is set (matrices,
// embeddings), never to norms and biases.
// Gradients are never rewritten: clipping travels as grad_scale = clip_scale(||g||, grad_clip).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/adamw.h"
#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/model.h"

namespace hyd {

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // max global gradient norm; 0 = no clipping
};

class AdamW {
 public:
  // params: views into one flat parameter buffer (f32 on the CPU, bf16 on CUDA) and one flat f32
  // gradient buffer, all on one device. The views must stay valid for the optimizer's lifetime.
  AdamW(std::vector<ParamInfo> params, Device device, const AdamWConfig& cfg);
  AdamW(DenseModel& model, const AdamWConfig& cfg);

  // Global L2 norm of all gradients (sum_squares_accumulate over every parameter's gradient).
  double grad_norm(ExecContext& ctx);
  // ZeRO-1: the optimizer holds one shard of the gradients; `reduce` maps this shard's sum of squares
  // to the sum over all shards (an all-reduce), so clipping uses the norm of the full gradient.
  void set_sum_squares_reduction(std::function<double(double)> reduce) { reduce_sum_squares_ = std::move(reduce); }
  // One update with learning rate lr. Returns the global gradient norm before clipping. When the
  // norm is not finite (NaN/Inf gradients) nothing is updated, the step counter does not advance
  // and skipped_steps() grows.
  double step(ExecContext& ctx, double lr);

  // CUDA: re-reads the f32 masters from the working weights (after parameters were set from outside,
  // e.g. loaded). A no-op on the CPU, where the parameters are the masters.
  void sync_masters(ExecContext& ctx);

  int64_t steps_taken() const { return t_; }  // updates applied (the bias-correction t of the last one)
  int64_t skipped_steps() const { return skipped_; }
  // Resuming from a checkpoint: the counters as they were (the moments and masters are written through
  // first_moments(), second_moments() and masters(), which view the optimizer's own buffers).
  void restore_counters(int64_t steps_taken, int64_t skipped_steps);
  const AdamWConfig& config() const { return cfg_; }
  size_t memory_bytes() const { return state_.capacity() + group_.memory_bytes(); }

  const std::vector<ParamInfo>& params() const { return params_; }
  Device device() const { return device_; }
  // Whether the f32 masters are buffers of their own (CUDA) rather than the parameters (CPU).
  bool separate_masters() const { return device_.is_cuda(); }

  // Optimizer state views (f32 [numel] per parameter, in params order), for tests and checkpoints.
  const std::vector<Tensor>& first_moments() const { return m_; }
  const std::vector<Tensor>& second_moments() const { return v_; }
  const std::vector<Tensor>& masters() const { return master_; }

 private:
  std::vector<ParamInfo> params_;
  Device device_;
  AdamWConfig cfg_;
  Arena state_;  // m, v, f32 masters (CUDA only) and the norm accumulator
  std::vector<Tensor> master_, m_, v_;
  Tensor norm_acc_;  // f32 [1] on the device
  kernels::AdamWGroup group_;  // every parameter's update: one launch on CUDA
  int64_t t_ = 0;
  int64_t skipped_ = 0;
  std::function<double(double)> reduce_sum_squares_;
};

}  // namespace hyd

#include "trainer/optimizer.h"

#include <cmath>
#include <utility>

#include "kernels/adamw.h"
#include "kernels/elementwise.h"
#include "kernels/global_norm.h"

namespace hyd {

namespace {
constexpr size_t kAlign = 256;  // Arena's alignment: every alloc is rounded up to it
size_t padded_bytes(int64_t numel) { return (static_cast<size_t>(numel) * 4 + kAlign - 1) / kAlign * kAlign; }
}  // namespace

AdamW::AdamW(std::vector<ParamInfo> params, Device device, const AdamWConfig& cfg)
    : params_(std::move(params)), device_(device), cfg_(cfg) {
  HYD_CHECK(cfg.beta1 >= 0 && cfg.beta1 < 1, "AdamW: beta1 must lie in [0, 1), got ", cfg.beta1);
  HYD_CHECK(cfg.beta2 >= 0 && cfg.beta2 < 1, "AdamW: beta2 must lie in [0, 1), got ", cfg.beta2);
  HYD_CHECK(cfg.eps > 0, "AdamW: eps must be > 0, got ", cfg.eps);
  HYD_CHECK(cfg.weight_decay >= 0, "AdamW: weight_decay must be >= 0, got ", cfg.weight_decay);
  HYD_CHECK(cfg.grad_clip >= 0, "AdamW: grad_clip must be >= 0, got ", cfg.grad_clip);
  const bool separate_master = separate_masters();
  size_t bytes = kAlign;  // norm accumulator
  for (const ParamInfo& p : params_) {
    HYD_CHECK(p.value.numel() == p.numel && p.grad.numel() == p.numel, "AdamW: parameter '", p.name,
              "' views do not hold numel = ", p.numel, " elements");
    HYD_CHECK(p.value.device == device && p.grad.device == device, "AdamW: parameter '", p.name, "' is not on ",
              device.str());
    HYD_CHECK(p.grad.dtype == DType::f32, "AdamW: gradient of '", p.name, "' must be f32, is ",
              dtype_name(p.grad.dtype));
    HYD_CHECK(p.value.dtype == (separate_master ? DType::bf16 : DType::f32), "AdamW: parameter '", p.name,
              "' has dtype ", dtype_name(p.value.dtype), " on ", device.str());
    bytes += padded_bytes(p.numel) * (separate_master ? 3 : 2);
  }
  state_ = Arena("optimizer", device, bytes);
  norm_acc_ = state_.alloc({1}, DType::f32);
  for (const ParamInfo& p : params_) {
    m_.push_back(state_.alloc({p.numel}, DType::f32));
    v_.push_back(state_.alloc({p.numel}, DType::f32));
    master_.push_back(separate_master ? state_.alloc({p.numel}, DType::f32) : p.value.view({p.numel}));
  }
  // m = v = 0, on the stream the updates will use (a plain memset would not be ordered with it).
  ExecContext ctx(device);
  for (size_t i = 0; i < params_.size(); ++i) {
    kernels::fill(ctx, m_[i], 0.0f);
    kernels::fill(ctx, v_[i], 0.0f);
  }
  sync_masters(ctx);
  ctx.synchronize();
  std::vector<kernels::AdamWGroup::Item> items;
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamInfo& p = params_[i];
    const Tensor working = device_.is_cuda() ? p.value.view({p.numel}) : Tensor();
    items.push_back({master_[i], p.grad.view({p.numel}), m_[i], v_[i], working,
                     p.weight_decay ? static_cast<float>(cfg_.weight_decay) : 0.0f});
  }
  group_ = kernels::AdamWGroup(device_, std::move(items));
}

AdamW::AdamW(DenseModel& model, const AdamWConfig& cfg) : AdamW(model.params(), model.device(), cfg) {}

void AdamW::sync_masters(ExecContext& ctx) {
  if (!device_.is_cuda()) return;
  for (size_t i = 0; i < params_.size(); ++i)
    kernels::convert(ctx, master_[i], params_[i].value.view({params_[i].numel}));
}

void AdamW::restore_counters(int64_t steps_taken, int64_t skipped_steps) {
  HYD_CHECK(steps_taken >= 0 && skipped_steps >= 0, "AdamW::restore_counters: negative counters (", steps_taken, ", ",
            skipped_steps, ")");
  t_ = steps_taken;
  skipped_ = skipped_steps;
}

double AdamW::grad_norm(ExecContext& ctx) {
  kernels::fill(ctx, norm_acc_, 0.0f);
  // One launch per run of gradients that lie back to back in memory (a model's flat buffer, a ZeRO-1
  // shard): hundreds of small launches become a few large ones.
  for (size_t i = 0; i < params_.size();) {
    const Tensor& first = params_[i].grad;
    int64_t n = params_[i].numel;
    size_t j = i + 1;
    for (; j < params_.size(); ++j) {
      const Tensor& g = params_[j].grad;
      if (g.dtype != first.dtype || g.device != first.device ||
          g.data != static_cast<const char*>(first.data) + static_cast<size_t>(n) * dtype_size(first.dtype))
        break;
      n += params_[j].numel;
    }
    kernels::sum_squares_accumulate(ctx, Tensor(first.data, first.dtype, first.device, {n}), norm_acc_);
    i = j;
  }
  HostTensor host({1}, DType::f32);
  ctx.synchronize();  // copy_tensor does not order with the context's (non-blocking) stream
  copy_tensor(host.t, norm_acc_);
  double sum_squares = static_cast<double>(*host.ptr<float>());
  if (reduce_sum_squares_) sum_squares = reduce_sum_squares_(sum_squares);
  return std::sqrt(sum_squares);
}

double AdamW::step(ExecContext& ctx, double lr) {
  const double norm = grad_norm(ctx);
  if (!std::isfinite(norm)) {
    ++skipped_;
    return norm;
  }
  ++t_;
  kernels::AdamWStep s;
  s.lr = static_cast<float>(lr);
  s.beta1 = static_cast<float>(cfg_.beta1);
  s.beta2 = static_cast<float>(cfg_.beta2);
  s.eps = static_cast<float>(cfg_.eps);
  s.step = t_;
  s.grad_scale = kernels::clip_scale(norm, cfg_.grad_clip);
  group_.update(ctx, s);  // each parameter with its own weight decay
  return norm;
}

}  // namespace hyd

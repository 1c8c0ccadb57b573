#include "trainer/zero1.h"

#include <chrono>

#include <algorithm>
#include <span>
#include <string>
#include <utility>

#include "kernels/elementwise.h"
#include "parallel/comm.h"
#include "parallel/nccl_comm.h"

namespace hyd {

Zero1::Zero1(const Communicator& group, const std::vector<ParamInfo>& params, const Tensor& flat_params,
             const Tensor& flat_grads)
    : group_(&group), rank_(group.rank()), size_(group.size()), flat_params_(flat_params), flat_grads_(flat_grads) {
  const Device device = flat_params.device;
  const DType pdt = device.is_cuda() ? DType::bf16 : DType::f32;
  HYD_CHECK(flat_params.numel() == flat_grads.numel(), "Zero1: ", flat_params.numel(), " parameters but ",
            flat_grads.numel(), " gradients");
  HYD_CHECK(flat_params.dtype == pdt && flat_grads.dtype == DType::f32, "Zero1: flat parameters ",
            dtype_name(flat_params.dtype), " and gradients ", dtype_name(flat_grads.dtype), " on ", device.str(),
            " (expected ", dtype_name(pdt), " and f32)");
  HYD_CHECK(flat_grads.device == device, "Zero1: parameters on ", device.str(), ", gradients on ",
            flat_grads.device.str());
  numel_ = flat_params.numel();
  shard_numel_ = (numel_ + size_ - 1) / size_;
  shard_lo_ = static_cast<int64_t>(rank_) * shard_numel_;
  const int64_t S = shard_numel_, R = size_;
  const size_t pbytes = dtype_size(pdt);
  buffers_ = Arena("zero1", device,
                   static_cast<size_t>(S * (R + 1)) * (4 + pbytes) + 4 * 256);
  grad_send_ = buffers_.alloc({S * R}, DType::f32);
  grad_shard_ = buffers_.alloc({S}, DType::f32);
  param_shard_ = buffers_.alloc({S}, pdt);
  param_full_ = buffers_.alloc({S * R}, pdt);
  buffers_.zero();  // the padding past P stays zero
  if (device.is_cuda()) nccl_ = std::make_unique<NcclCommunicator>(group);

  const Tensor flat_p = flat_params.view({numel_});
  for (const ParamInfo& p : params) {
    const int64_t a = std::max(p.offset, shard_lo_), b = std::min(p.offset + p.numel, shard_lo_ + S);
    if (a >= b) continue;
    ParamInfo q = p;
    q.name = p.name + "[" + std::to_string(a - p.offset) + ":" + std::to_string(b - p.offset) + "]";
    q.shape = {b - a};
    q.offset = a;
    q.numel = b - a;
    q.value = flat_p.slice0(a, b);
    q.grad = grad_shard_.slice0(a - shard_lo_, b - shard_lo_);
    shard_params_.push_back(std::move(q));
  }
}

Zero1::~Zero1() = default;

std::vector<ParamInfo> Zero1::shard_params_of(const std::vector<ParamInfo>& trained) const {
  std::vector<ParamInfo> out;
  for (const ParamInfo& q : shard_params_) {
    const std::string base = q.name.substr(0, q.name.find('['));
    for (const ParamInfo& p : trained)
      if (p.name == base) {
        out.push_back(q);
        break;
      }
  }
  return out;
}

template <class F>
void Zero1::timed(const ExecContext& ctx, F&& exchange) {
  if (!timing_) {
    exchange();
    return;
  }
  ctx.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  exchange();
  ctx.synchronize();
  seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void Zero1::reduce_gradients(const ExecContext& ctx) {
  NvtxRange range("zero1.reduce_scatter");
  timed(ctx, [&] {
    kernels::convert(ctx, grad_send_.slice0(0, numel_), flat_grads_.view({numel_}));
    const auto S = static_cast<size_t>(shard_numel_), R = static_cast<size_t>(size_);
    if (nccl_) {
      nccl_->reduce_scatter<float>({grad_send_.ptr<float>(), S * R}, {grad_shard_.ptr<float>(), S}, ctx.stream());
    } else {
      group_->reduce_scatter<float>({grad_send_.ptr<float>(), S * R}, {grad_shard_.ptr<float>(), S});
    }
  });
}

void Zero1::gather_parameters(const ExecContext& ctx) {
  NvtxRange range("zero1.all_gather");
  timed(ctx, [&] {
    const int64_t n = std::max<int64_t>(0, std::min(shard_numel_, numel_ - shard_lo_));
    const Tensor flat = flat_params_.view({numel_});
    if (n > 0) kernels::convert(ctx, param_shard_.slice0(0, n), flat.slice0(shard_lo_, shard_lo_ + n));
    const auto S = static_cast<size_t>(shard_numel_), R = static_cast<size_t>(size_);
    if (nccl_) {
      nccl_->all_gather<bf16>({param_shard_.ptr<bf16>(), S}, {param_full_.ptr<bf16>(), S * R}, ctx.stream());
    } else {
      group_->all_gather<float>({param_shard_.ptr<float>(), S}, {param_full_.ptr<float>(), S * R});
    }
    kernels::convert(ctx, flat, param_full_.slice0(0, numel_));
  });
}

double Zero1::all_reduce_sum(double x) const {
  group_->all_reduce(std::span<double>(&x, 1), ReduceOp::kSum);
  return x;
}

}  // namespace hyd

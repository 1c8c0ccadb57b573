#include "trainer/zero1.h"

#include <algorithm>
#include <chrono>
#include <span>
#include <string>
#include <utility>

#include "kernels/elementwise.h"
#include "parallel/comm.h"
#include "parallel/nccl_comm.h"

namespace hyd {

// One region of the flat buffers, [lo, lo + numel), sharded over `group`: this rank's shard is region
// elements [rank S, rank S + S) (S = ceil(numel / ranks), padded with zeros past the region's end).
struct Zero1::Region {
  const Communicator* group = nullptr;
  std::unique_ptr<NcclCommunicator> nccl;  // CUDA only
  int rank = 0, size = 1;
  int64_t lo = 0, numel = 0, shard_numel = 0;
  Tensor grad_send, grad_shard, param_shard, param_full;
  int64_t shard_lo() const { return lo + static_cast<int64_t>(rank) * shard_numel; }  // flat index
  // Elements of this rank's shard that lie inside the region.
  int64_t shard_len() const { return std::max<int64_t>(0, std::min(shard_numel, lo + numel - shard_lo())); }
};

Zero1::Zero1(const Communicator& group, const std::vector<ParamInfo>& params, const Tensor& flat_params,
             const Tensor& flat_grads, const ExpertRegion* experts)
    : group_(&group), flat_params_(flat_params), flat_grads_(flat_grads) {
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
  const int64_t split = experts ? experts->offset : numel_;
  HYD_CHECK(split >= 0 && split <= numel_, "Zero1: expert region at ", split, " outside the ", numel_,
            " flat elements");
  regions_.resize(experts ? 2 : 1);
  regions_[0].group = &group;
  regions_[0].numel = split;
  if (experts) {
    HYD_CHECK(experts->group != nullptr, "Zero1: expert region without a group");
    regions_[1].group = experts->group;
    regions_[1].lo = split;
    regions_[1].numel = numel_ - split;
  }
  const size_t pbytes = dtype_size(pdt);
  size_t bytes = 0;
  for (Region& g : regions_) {
    g.rank = g.group->rank();
    g.size = g.group->size();
    g.shard_numel = (g.numel + g.size - 1) / g.size;
    bytes += static_cast<size_t>(g.shard_numel * (g.size + 1)) * (4 + pbytes) + 4 * 256;
  }
  buffers_ = Arena("zero1", device, bytes);
  for (Region& g : regions_) {
    const int64_t S = g.shard_numel, R = g.size;
    g.grad_send = buffers_.alloc({S * R}, DType::f32);
    g.grad_shard = buffers_.alloc({S}, DType::f32);
    g.param_shard = buffers_.alloc({S}, pdt);
    g.param_full = buffers_.alloc({S * R}, pdt);
  }
  buffers_.zero();  // the padding past each region stays zero
  if (device.is_cuda())
    for (Region& g : regions_) g.nccl = std::make_unique<NcclCommunicator>(*g.group);

  const Tensor flat_p = flat_params.view({numel_});
  for (const ParamInfo& p : params) {
    HYD_CHECK(p.offset + p.numel <= split || p.offset >= split, "Zero1: parameter ", p.name,
              " straddles the expert region's start ", split);
    const Region& g = regions_[p.offset >= split && experts ? 1 : 0];
    const int64_t s_lo = g.shard_lo();
    const int64_t a = std::max(p.offset, s_lo), b = std::min(p.offset + p.numel, s_lo + g.shard_len());
    if (a >= b) continue;
    ParamInfo q = p;
    // Named and placed in the elements of the whole tensor (an expert-sharded parameter is itself a piece).
    q.global_shape = p.full_shape();
    q.global_begin = p.global_begin + (a - p.offset);
    q.name = p.name + "[" + std::to_string(q.global_begin) + ":" + std::to_string(q.global_begin + (b - a)) + "]";
    q.shape = {b - a};
    q.offset = a;
    q.numel = b - a;
    q.value = flat_p.slice0(a, b);
    q.grad = g.grad_shard.slice0(a - s_lo, b - s_lo);
    shard_params_.push_back(std::move(q));
  }
}

Zero1::~Zero1() = default;

int Zero1::rank() const { return regions_[0].rank; }
int Zero1::size() const { return regions_[0].size; }
int64_t Zero1::shard_numel() const { return regions_[0].shard_numel; }
int64_t Zero1::shard_begin() const { return regions_[0].shard_lo(); }

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
    const Tensor flat = flat_grads_.view({numel_});
    for (Region& g : regions_) {
      if (g.numel > 0) kernels::convert(ctx, g.grad_send.slice0(0, g.numel), flat.slice0(g.lo, g.lo + g.numel));
      const auto S = static_cast<size_t>(g.shard_numel), R = static_cast<size_t>(g.size);
      if (g.nccl) {
        g.nccl->reduce_scatter<float>({g.grad_send.ptr<float>(), S * R}, {g.grad_shard.ptr<float>(), S}, ctx.stream());
      } else {
        g.group->reduce_scatter<float>({g.grad_send.ptr<float>(), S * R}, {g.grad_shard.ptr<float>(), S});
      }
    }
  });
}

void Zero1::gather_parameters(const ExecContext& ctx) {
  NvtxRange range("zero1.all_gather");
  timed(ctx, [&] {
    const Tensor flat = flat_params_.view({numel_});
    for (Region& g : regions_) {
      const int64_t n = g.shard_len(), s_lo = g.shard_lo();
      if (n > 0) kernels::convert(ctx, g.param_shard.slice0(0, n), flat.slice0(s_lo, s_lo + n));
      const auto S = static_cast<size_t>(g.shard_numel), R = static_cast<size_t>(g.size);
      if (g.nccl) {
        g.nccl->all_gather<bf16>({g.param_shard.ptr<bf16>(), S}, {g.param_full.ptr<bf16>(), S * R}, ctx.stream());
      } else {
        g.group->all_gather<float>({g.param_shard.ptr<float>(), S}, {g.param_full.ptr<float>(), S * R});
      }
      if (g.numel > 0) kernels::convert(ctx, flat.slice0(g.lo, g.lo + g.numel), g.param_full.slice0(0, g.numel));
    }
  });
}

double Zero1::all_reduce_sum(double x) const {
  group_->all_reduce(std::span<double>(&x, 1), ReduceOp::kSum);
  return x;
}

}  // namespace hyd

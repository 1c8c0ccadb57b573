#include "parallel/sequence_parallel.h"

#include <mpi.h>

#include <chrono>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "parallel/checks.h"
#include "parallel/comm.h"
#include "parallel/nccl_comm.h"

namespace hyd {

namespace {

int byte_count(size_t n, const char* what) {
  HYD_CHECK(n <= static_cast<size_t>(std::numeric_limits<int>::max()), "SequenceParallel::", what, ": ", n,
            " bytes, more than one MPI call moves");
  return static_cast<int>(n);
}

// Host view of t: t itself on the CPU, a staged copy (HostTensor) on CUDA.
struct HostSide {
  HostTensor staged;
  Tensor t;
  HostSide(const Tensor& src, bool fill) {
    if (src.device.is_cpu()) {
      t = src;
      return;
    }
    staged = HostTensor({src.numel()}, src.dtype);
    t = staged.t;
    if (fill) copy_tensor(t, src.view({src.numel()}));
  }
  void write_back(const Tensor& dst) const {
    if (!dst.device.is_cpu()) copy_tensor(dst.view({dst.numel()}), t);
  }
};

}  // namespace

const char* sp_traffic_name(SpTraffic kind) {
  switch (kind) {
    case SpTraffic::kda_state:
      return "kda_state";
    case SpTraffic::conv_halo:
      return "conv_halo";
    case SpTraffic::attention_kv:
      return "attention_kv";
  }
  return "?";
}

SequenceParallel::SequenceParallel(const Communicator& group, Device device)
    : group_(&group), device_(device), rank_(group.rank()), size_(group.size()) {
  HYD_CHECK(size_ >= 1, "SequenceParallel: empty group");
  const char* staged = std::getenv("HYD_SP_STAGED");
  if (device.is_cuda() && !(staged != nullptr && std::string(staged) == "1"))
    nccl_ = std::make_unique<NcclCommunicator>(group);
}

SequenceParallel::~SequenceParallel() = default;

void SequenceParallel::set_layout(SpLayout layout) {
  HYD_CHECK(layout.size == size_ && layout.rank == rank_, "SequenceParallel::set_layout: layout for rank ", layout.rank,
            " of ", layout.size, ", this is rank ", rank_, " of ", size_);
  HYD_CHECK(layout.cu_q.size() == layout.cu_k.size() && !layout.cu_q.empty(),
            "SequenceParallel::set_layout: cu_q and cu_k must have the same, nonzero length");
  layout_ = std::move(layout);
  const auto n = static_cast<int64_t>(layout_.cu_q.size());
  if (layout_arena_.capacity() < 2 * (static_cast<size_t>(n) * 4 + 256))
    layout_arena_ = Arena("sp_layout", device_, 2 * (static_cast<size_t>(n) * 4 + 256) + 4096);
  layout_arena_.reset();
  cu_q_ = layout_arena_.alloc({n}, DType::i32);
  cu_k_ = layout_arena_.alloc({n}, DType::i32);
  copy_tensor(cu_q_, Tensor(layout_.cu_q.data(), DType::i32, Device::cpu(), {n}));
  copy_tensor(cu_k_, Tensor(layout_.cu_k.data(), DType::i32, Device::cpu(), {n}));
}

Tensor SequenceParallel::buffer(const void* owner, int slot, std::initializer_list<int64_t> dims, DType dtype) const {
  Tensor probe(nullptr, dtype, device_, dims);
  const size_t need = probe.nbytes() + 256;
  Arena& a = buffers_[{owner, slot}];
  if (a.capacity() < need) a = Arena("sp_buffer", device_, need);
  a.reset();
  return a.alloc(dims, dtype);
}

Tensor SequenceParallel::on_device(const Tensor& t, int slot) const {
  if (t.device.is_cuda()) return t.view({t.numel()});
  const Tensor d = buffer(this, slot, {t.numel()}, t.dtype);
  copy_tensor(d, t.view({t.numel()}));
  return d;
}

void SequenceParallel::count(SpTraffic kind, const Tensor& in, double seconds) const {
  Traffic& t = traffic_[static_cast<int>(kind)];
  t.calls += 1;
  t.bytes += static_cast<int64_t>(in.nbytes());
  t.seconds += seconds;
}

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

void SequenceParallel::reset_traffic() {
  for (Traffic& t : traffic_) t = Traffic{};
}

void SequenceParallel::all_gather(const ExecContext& ctx, const Tensor& in, const Tensor& out, SpTraffic kind) const {
  HYD_CHECK(in.dtype == out.dtype, "SequenceParallel::all_gather: dtypes ", dtype_name(in.dtype), " and ",
            dtype_name(out.dtype));
  HYD_CHECK(out.numel() == in.numel() * size_, "SequenceParallel::all_gather: out has ", out.numel(),
            " elements, expected ", size_, " x ", in.numel());
  ctx.synchronize();
  group_->barrier();  // waiting for peers' compute is not communication time
  const auto t0 = std::chrono::steady_clock::now();
  if (nccl_) {
    const Tensor din = on_device(in, -1),
                 dout = out.device.is_cuda() ? out : buffer(this, -2, {out.numel()}, out.dtype);
    const auto n = static_cast<size_t>(in.numel());
    switch (in.dtype) {
      case DType::f32:
        nccl_->all_gather<float>({din.ptr<float>(), n}, {dout.ptr<float>(), n * size_}, ctx.stream());
        break;
      case DType::bf16:
        nccl_->all_gather<bf16>({din.ptr<bf16>(), n}, {dout.ptr<bf16>(), n * size_}, ctx.stream());
        break;
      case DType::i32:
        nccl_->all_gather<int32_t>({din.ptr<int32_t>(), n}, {dout.ptr<int32_t>(), n * size_}, ctx.stream());
        break;
      case DType::f64:
        nccl_->all_gather<double>({din.ptr<double>(), n}, {dout.ptr<double>(), n * size_}, ctx.stream());
        break;
      default:
        HYD_THROW("SequenceParallel::all_gather: dtype ", dtype_name(in.dtype), " on CUDA");
    }
    if (!out.device.is_cuda()) copy_tensor(out.view({out.numel()}), dout);
    ctx.synchronize();
    count(kind, in, seconds_since(t0));
    return;
  }
  const HostSide src(in, true);
  HostSide dst(out, false);
  const int n = byte_count(in.nbytes(), "all_gather");
  CHECK_MPI(MPI_Allgather(src.t.data, n, MPI_BYTE, dst.t.data, n, MPI_BYTE, group_->handle()));
  dst.write_back(out);
  count(kind, in, seconds_since(t0));
}

void SequenceParallel::reduce_scatter(const ExecContext& ctx, const Tensor& in, const Tensor& out,
                                      SpTraffic kind) const {
  HYD_CHECK(in.dtype == out.dtype, "SequenceParallel::reduce_scatter: dtypes ", dtype_name(in.dtype), " and ",
            dtype_name(out.dtype));
  HYD_CHECK(in.numel() == out.numel() * size_, "SequenceParallel::reduce_scatter: in has ", in.numel(),
            " elements, expected ", size_, " x ", out.numel());
  ctx.synchronize();
  group_->barrier();  // waiting for peers' compute is not communication time
  const auto t0 = std::chrono::steady_clock::now();
  if (nccl_) {
    const Tensor din = on_device(in, -1),
                 dout = out.device.is_cuda() ? out : buffer(this, -2, {out.numel()}, out.dtype);
    const auto n = static_cast<size_t>(out.numel());
    switch (in.dtype) {
      case DType::f32:
        nccl_->reduce_scatter<float>({din.ptr<float>(), n * size_}, {dout.ptr<float>(), n}, ctx.stream());
        break;
      case DType::bf16:
        nccl_->reduce_scatter<bf16>({din.ptr<bf16>(), n * size_}, {dout.ptr<bf16>(), n}, ctx.stream());
        break;
      case DType::f64:
        nccl_->reduce_scatter<double>({din.ptr<double>(), n * size_}, {dout.ptr<double>(), n}, ctx.stream());
        break;
      default:
        HYD_THROW("SequenceParallel::reduce_scatter: dtype ", dtype_name(in.dtype), " on CUDA");
    }
    if (!out.device.is_cuda()) copy_tensor(out.view({out.numel()}), dout);
    ctx.synchronize();
    count(kind, in, seconds_since(t0));
    return;
  }
  const HostSide src(in, true);
  HostSide dst(out, false);
  const auto n = static_cast<size_t>(out.numel());
  switch (in.dtype) {
    case DType::f32:
      group_->reduce_scatter<float>({src.t.ptr<float>(), n * size_}, {dst.t.ptr<float>(), n});
      break;
    case DType::f64:
      group_->reduce_scatter<double>({src.t.ptr<double>(), n * size_}, {dst.t.ptr<double>(), n});
      break;
    case DType::bf16: {
      std::vector<float> a(n * size_), b(n);
      const bf16* s = src.t.ptr<bf16>();
      for (size_t i = 0; i < a.size(); ++i) a[i] = bf16_to_float(s[i]);
      group_->reduce_scatter<float>(a, b);
      bf16* d = dst.t.ptr<bf16>();
      for (size_t i = 0; i < n; ++i) d[i] = float_to_bf16(b[i]);
      break;
    }
    default:
      HYD_THROW("SequenceParallel::reduce_scatter: dtype ", dtype_name(in.dtype), " (f32, f64 or bf16)");
  }
  dst.write_back(out);
  count(kind, in, seconds_since(t0));
}

}  // namespace hyd

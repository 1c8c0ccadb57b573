#include "parallel/sequence_parallel.h"

#include <mpi.h>

#include <chrono>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
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
  const char* e = std::getenv("HYD_SP_ASYNC");  // 0: synchronised, timed collectives
  async_ = nccl_ != nullptr && !(e != nullptr && std::string(e) == "0");
}

SequenceParallel::~SequenceParallel() = default;

const ExecContext* SequenceParallel::side_context(bool by_default) const {
  // An empty value counts as unset: bench/scaling/run.sh exports every switch it forwards, empty when not given (an
  // empty value used to turn the side stream off: LASP-2 with the correction ran its transition passes after the
  // zero-state passes, K x 12 SP2 117.5 ms instead of ~100 on 2 x H200).
  static const char* const e = std::getenv("HYD_SP_CONCURRENT");
  const bool on = e != nullptr && e[0] != '\0' ? e[0] == '1' : by_default;
  if (!device_.is_cuda() || !on) return nullptr;
  if (!side_) side_ = std::make_unique<ExecContext>(device_);
  return side_.get();
}

void SequenceParallel::set_layout(SpLayout layout) {
  HYD_CHECK(layout.size == size_ && layout.rank == rank_, "SequenceParallel::set_layout: layout for rank ", layout.rank,
            " of ", layout.size, ", this is rank ", rank_, " of ", size_);
  HYD_CHECK(layout.cu_q.size() == layout.cu_k.size() && !layout.cu_q.empty(),
            "SequenceParallel::set_layout: cu_q and cu_k must have the same, nonzero length");
  layout_ = std::move(layout);
  std::vector<std::vector<int32_t>*> arrays = {&layout_.cu_q, &layout_.cu_k};
  if (layout_.balanced)
    for (SpLayout::Work& w : layout_.work) {
      HYD_CHECK(w.cu_q.size() == w.cu_k.size() && !w.cu_q.empty(),
                "SequenceParallel::set_layout: the balanced work's cu_q and cu_k must have the same, nonzero length");
      arrays.push_back(&w.cu_q);
      arrays.push_back(&w.cu_k);
    }
  size_t need = 4096;
  for (const std::vector<int32_t>* a : arrays) need += a->size() * 4 + 256;
  if (layout_arena_.capacity() < need) layout_arena_ = Arena("sp_layout", device_, need);
  layout_arena_.reset();
  std::vector<Tensor> up;
  for (std::vector<int32_t>* a : arrays) {
    const auto n = static_cast<int64_t>(a->size());
    up.push_back(layout_arena_.alloc({n}, DType::i32));
    copy_tensor(up.back(), Tensor(a->data(), DType::i32, Device::cpu(), {n}));
  }
  cu_q_ = up[0];
  cu_k_ = up[1];
  for (size_t i = 2; i < up.size(); ++i) work_cu_[i - 2] = up[i];
}

Tensor SequenceParallel::buffer(const void* owner, int slot, std::initializer_list<int64_t> dims, DType dtype) const {
  Tensor probe(nullptr, dtype, device_, dims);
  const size_t need = probe.nbytes() + 256;
  Arena& a = buffers_[{owner, slot}];
  if (a.capacity() < need) {
    a = Arena("sp_buffer", device_, need);
    buffer_keys_[{owner, slot}].clear();
  }
  a.reset();
  return a.alloc(dims, dtype);
}

std::vector<int64_t>& SequenceParallel::buffer_key(const void* owner, int slot) const {
  return buffer_keys_[{owner, slot}];
}

Tensor SequenceParallel::on_device(const Tensor& t, int slot) const {
  if (t.device.is_cuda()) return t.view({t.numel()});
  const Tensor d = buffer(this, slot, {t.numel()}, t.dtype);
  copy_tensor(d, t.view({t.numel()}));
  return d;
}

void SequenceParallel::count(SpTraffic kind, int64_t bytes, double seconds) const {
  Traffic& t = traffic_[static_cast<int>(kind)];
  t.calls += 1;
  t.bytes += bytes;
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

namespace {

// Calls f(T{}) with T the C++ type of `dt` (f32, bf16, i32, f64); `what` names the caller in the error.
template <class F>
void with_type(DType dt, const char* what, F&& f) {
  switch (dt) {
    case DType::f32:
      return f(float{});
    case DType::bf16:
      return f(bf16{});
    case DType::i32:
      return f(int32_t{});
    case DType::f64:
      return f(double{});
    default:
      HYD_THROW("SequenceParallel::", what, ": dtype ", dtype_name(dt));
  }
}

}  // namespace

void SequenceParallel::collective(const ExecContext& ctx, const Tensor& in, const Tensor& out, SpTraffic kind,
                                  const std::function<void(const Tensor&, const Tensor&)>& run, bool partial,
                                  int64_t bytes) const {
  if (bytes < 0) bytes = static_cast<int64_t>(in.nbytes());
  if (!async_) {
    ctx.synchronize();
    group_->barrier();  // waiting for peers' compute is not communication time
  }
  const auto t0 = std::chrono::steady_clock::now();
  if (nccl_) {
    // NCCL on device memory, ordered on ctx's stream; host tensors are staged through device buffers.
    const Tensor din = on_device(in, -1);
    const Tensor dout = out.device.is_cuda() ? out.view({out.numel()}) : buffer(this, -2, {out.numel()}, out.dtype);
    if (partial && !out.device.is_cuda()) copy_tensor(dout, out.view({out.numel()}));
    run(din, dout);
    if (!out.device.is_cuda()) copy_tensor(out.view({out.numel()}), dout);
    if (async_) {  // only queued: no time to count
      count(kind, bytes, 0.0);
      return;
    }
    ctx.synchronize();
  } else {
    // MPI on host memory; CUDA tensors (HYD_SP_STAGED=1) are staged through host copies.
    const HostSide src(in, true);
    HostSide dst(out, partial);
    run(src.t, dst.t);
    dst.write_back(out);
  }
  count(kind, bytes, seconds_since(t0));
}

void SequenceParallel::all_gather(const ExecContext& ctx, const Tensor& in, const Tensor& out, SpTraffic kind) const {
  HYD_CHECK(in.dtype == out.dtype, "SequenceParallel::all_gather: dtypes ", dtype_name(in.dtype), " and ",
            dtype_name(out.dtype));
  HYD_CHECK(out.numel() == in.numel() * size_, "SequenceParallel::all_gather: out has ", out.numel(),
            " elements, expected ", size_, " x ", in.numel());
  collective(ctx, in, out, kind, [&](const Tensor& a, const Tensor& b) {
    if (!nccl_) {
      const int n = byte_count(in.nbytes(), "all_gather");
      CHECK_MPI(MPI_Allgather(a.data, n, MPI_BYTE, b.data, n, MPI_BYTE, group_->handle()));
      return;
    }
    with_type(in.dtype, "all_gather", [&]<class T>(T) {
      const auto n = static_cast<size_t>(a.numel());
      nccl_->all_gather<T>({a.ptr<T>(), n}, {b.ptr<T>(), n * size_}, ctx.stream());
    });
  });
}

void SequenceParallel::reduce_scatter(const ExecContext& ctx, const Tensor& in, const Tensor& out,
                                      SpTraffic kind) const {
  HYD_CHECK(in.dtype == out.dtype, "SequenceParallel::reduce_scatter: dtypes ", dtype_name(in.dtype), " and ",
            dtype_name(out.dtype));
  HYD_CHECK(in.numel() == out.numel() * size_, "SequenceParallel::reduce_scatter: in has ", in.numel(),
            " elements, expected ", size_, " x ", out.numel());
  HYD_CHECK(in.dtype != DType::i32, "SequenceParallel::reduce_scatter: dtype i32 (f32, f64 or bf16)");
  collective(ctx, in, out, kind, [&](const Tensor& a, const Tensor& b) {
    const auto n = static_cast<size_t>(out.numel());
    if (nccl_) {
      with_type(in.dtype, "reduce_scatter", [&]<class T>(T) {
        nccl_->reduce_scatter<T>({a.ptr<T>(), n * size_}, {b.ptr<T>(), n}, ctx.stream());
      });
    } else if (in.dtype == DType::bf16) {  // summed in f32
      std::vector<float> x(n * size_), y(n);
      for (size_t i = 0; i < x.size(); ++i) x[i] = bf16_to_float(a.ptr<bf16>()[i]);
      group_->reduce_scatter<float>(x, y);
      for (size_t i = 0; i < n; ++i) b.ptr<bf16>()[i] = float_to_bf16(y[i]);
    } else {
      with_type(in.dtype, "reduce_scatter", [&]<class T>(T) {
        if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
          group_->reduce_scatter<T>({a.ptr<T>(), n * size_}, {b.ptr<T>(), n});
      });
    }
  });
}

void SequenceParallel::exchange(const ExecContext& ctx, const Tensor& in, const std::vector<CommBlock>& sends,
                                const Tensor& out, const std::vector<CommBlock>& recvs, SpTraffic kind) const {
  HYD_CHECK(in.dtype == out.dtype, "SequenceParallel::exchange: dtypes ", dtype_name(in.dtype), " and ",
            dtype_name(out.dtype));
  int64_t sent = 0;
  auto check = [&](const std::vector<CommBlock>& blocks, int64_t size, const char* what) {
    for (size_t i = 0; i < blocks.size(); ++i) {
      const CommBlock& b = blocks[i];
      HYD_CHECK(b.peer >= 0 && b.peer < size_, "SequenceParallel::exchange: ", what, " block ", i, " has peer ", b.peer,
                ", the group has ", size_, " ranks");
      HYD_CHECK(b.offset >= 0 && b.count >= 0 && b.offset + b.count <= size, "SequenceParallel::exchange: ", what,
                " block ", i, " [", b.offset, ", ", b.offset + b.count, ") is outside the ", size, " elements");
    }
  };
  check(sends, in.numel(), "send");
  check(recvs, out.numel(), "receive");
  for (const CommBlock& b : sends) sent += b.count;
  const int64_t elem = static_cast<int64_t>(dtype_size(in.dtype));
  collective(
      ctx, in, out, kind,
      [&](const Tensor& a, const Tensor& b) {
        if (nccl_) {
          with_type(in.dtype, "exchange", [&]<class T>(T) {
            nccl_->all_to_all_blocks<T>({a.ptr<T>(), static_cast<size_t>(a.numel())}, sends,
                                        {b.ptr<T>(), static_cast<size_t>(b.numel())}, recvs, ctx.stream());
          });
          return;
        }
        // MPI keeps the order of messages with one source, tag and communicator: list order matches.
        std::vector<MPI_Request> req;
        req.reserve(sends.size() + recvs.size());
        for (const CommBlock& r : recvs) {
          if (r.count == 0) continue;
          req.emplace_back();
          CHECK_MPI(MPI_Irecv(static_cast<char*>(b.data) + r.offset * elem, byte_count(r.count * elem, "exchange"),
                              MPI_BYTE, r.peer, 0, group_->handle(), &req.back()));
        }
        for (const CommBlock& s : sends) {
          if (s.count == 0) continue;
          req.emplace_back();
          CHECK_MPI(MPI_Isend(static_cast<const char*>(a.data) + s.offset * elem,
                              byte_count(s.count * elem, "exchange"), MPI_BYTE, s.peer, 0, group_->handle(),
                              &req.back()));
        }
        CHECK_MPI(MPI_Waitall(static_cast<int>(req.size()), req.data(), MPI_STATUSES_IGNORE));
      },
      true, sent * elem);
}

}  // namespace hyd

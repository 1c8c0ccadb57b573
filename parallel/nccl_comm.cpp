#include "parallel/nccl_comm.h"

#include <utility>

#include "trainer/core/error.h"

#ifdef HYD_WITH_CUDA

#include <cuda_runtime.h>
#include <nccl.h>

#include <string>
#include <vector>

#include "parallel/checks.h"

namespace hyd {

namespace {

template <class T>
ncclDataType_t nccl_type();
template <>
ncclDataType_t nccl_type<float>() {
  return ncclFloat32;
}
template <>
ncclDataType_t nccl_type<bf16>() {
  return ncclBfloat16;
}
template <>
ncclDataType_t nccl_type<int32_t>() {
  return ncclInt32;
}
template <>
ncclDataType_t nccl_type<int64_t>() {
  return ncclInt64;
}
template <>
ncclDataType_t nccl_type<double>() {
  return ncclFloat64;
}

ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::kSum ? ncclSum : ncclMax; }

}  // namespace

// Everything below is created in the constructor and released in ~Impl, in reverse order.
struct NcclCommunicator::Impl {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;  // the comm stream: non-blocking, highest priority
  cudaEvent_t ready = nullptr;    // recorded on the caller stream, waited on by the comm stream
  cudaEvent_t done = nullptr;     // recorded on the comm stream, waited on by the caller stream
  // Operations started without the caller waiting (all_to_all_blocks_start): ticket t's done event is
  // pending[t % kMaxPending]; `issued` tickets so far.
  std::vector<cudaEvent_t> pending;
  uint64_t issued = 0;
  int32_t* barrier_word = nullptr;  // one device int32 = 0, barrier()'s all-reduce operand (a sum of zeros stays 0)
  // Set by any failed NCCL / CUDA call of an operation: the communicator may be half-way through a
  // collective that its peers never finish, so it is aborted, not destroyed collectively.
  bool failed = false;

  ~Impl() {
    if (comm) {
      ncclResult_t async = ncclSuccess;
      if (ncclCommGetAsyncError(comm, &async) != ncclSuccess) async = ncclInternalError;
      if (failed || async != ncclSuccess) {
        ncclCommAbort(comm);
      } else {
        if (stream) cudaStreamSynchronize(stream);  // nothing of ours still reads or writes buffers
        ncclCommDestroy(comm);
      }
    }
    if (barrier_word) cudaFree(barrier_word);
    if (done) cudaEventDestroy(done);
    for (cudaEvent_t e : pending) cudaEventDestroy(e);
    if (ready) cudaEventDestroy(ready);
    if (stream) cudaStreamDestroy(stream);
  }

  // The failure of a call made for operation `op` (all_reduce, ...): mark the communicator broken and
  // throw with the library's text, the operation and the call.
  [[noreturn]] void fail_nccl(ncclResult_t r, const char* op, const char* expr, const char* file, int line) {
    failed = true;
    const std::string what = std::string(op) + ": " + expr;
    detail::throw_nccl_error(r, what.c_str(), file, line);
  }
  [[noreturn]] void fail_cuda(cudaError_t e, const char* op, const char* expr, const char* file, int line) {
    failed = true;
    const std::string what = std::string(op) + ": " + expr;
    detail::throw_cuda_error(e, what.c_str(), file, line);
  }
};

}  // namespace hyd

// Inside an operation named `op` of a communicator whose Impl is `s`.
#define HYD_NCCL_OP_CHECK(s, op, expr)                                                                 \
  do {                                                                                                 \
    ncclResult_t hyd_nccl_op_rc_ = (expr);                                                             \
    if (hyd_nccl_op_rc_ != ncclSuccess) (s).fail_nccl(hyd_nccl_op_rc_, op, #expr, __FILE__, __LINE__); \
  } while (0)
#define HYD_CUDA_OP_CHECK(s, op, expr)                                                                 \
  do {                                                                                                 \
    cudaError_t hyd_cuda_op_rc_ = (expr);                                                              \
    if (hyd_cuda_op_rc_ != cudaSuccess) (s).fail_cuda(hyd_cuda_op_rc_, op, #expr, __FILE__, __LINE__); \
  } while (0)

namespace hyd {

namespace {

// The stream protocol of nccl_comm.h: comm stream after the caller's earlier work, `enqueue` (the NCCL
// calls) on the comm stream, the caller's later work after it. With `done_event` the caller does not wait:
// the event is recorded after the operation for a later wait (all_to_all_blocks_start).
template <class F>
void run_ordered(NcclCommunicator::Impl& s, const char* op, void* caller_stream, F&& enqueue,
                 cudaEvent_t done_event = nullptr) {
  cudaStream_t caller = static_cast<cudaStream_t>(caller_stream);
  HYD_CUDA_OP_CHECK(s, op, cudaEventRecord(s.ready, caller));
  HYD_CUDA_OP_CHECK(s, op, cudaStreamWaitEvent(s.stream, s.ready, 0));
  enqueue(s.comm, s.stream);
  HYD_CUDA_OP_CHECK(s, op, cudaEventRecord(done_event ? done_event : s.done, s.stream));
  if (!done_event) HYD_CUDA_OP_CHECK(s, op, cudaStreamWaitEvent(caller, s.done, 0));
}

}  // namespace

int bind_local_gpu(const MpiRuntime& rt) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    HYD_THROW("bind_local_gpu: rank ", rt.rank(), " (local rank ", rt.local_rank(), " of ", rt.local_size(),
              " on its node) sees no CUDA device",
              e != cudaSuccess ? std::string(" (cudaGetDeviceCount: ") + cudaGetErrorString(e) + ")" : std::string(),
              "; a GPU run needs one GPU per rank (check CUDA_VISIBLE_DEVICES and the driver)");
  }
  const int device = rt.local_rank() % count;
  CHECK_CUDA(cudaSetDevice(device));
  return device;
}

NcclCommunicator::NcclCommunicator(const Communicator& mpi_group)
    : impl_(std::make_unique<Impl>()), rank_(mpi_group.rank()), size_(mpi_group.size()) {
  HYD_CHECK(mpi_group.handle() != MPI_COMM_NULL, "NcclCommunicator: the MPI group is an empty communicator");
  CHECK_CUDA(cudaGetDevice(&device_));
  Impl& s = *impl_;
  int least = 0, greatest = 0;
  CHECK_CUDA(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  CHECK_CUDA(cudaStreamCreateWithPriority(&s.stream, cudaStreamNonBlocking, greatest));
  CHECK_CUDA(cudaEventCreateWithFlags(&s.ready, cudaEventDisableTiming));
  CHECK_CUDA(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
  s.pending.assign(kMaxPending, nullptr);
  for (cudaEvent_t& e : s.pending) CHECK_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  CHECK_CUDA(cudaMalloc(&s.barrier_word, sizeof(int32_t)));
  CHECK_CUDA(cudaMemsetAsync(s.barrier_word, 0, sizeof(int32_t), s.stream));  // ordered before every barrier

  // Rank 0 makes the id and broadcasts it with its status, so a failure there fails every rank
  // instead of leaving the others in ncclCommInitRank.
  struct Bootstrap {
    int32_t status = ncclSuccess;
    ncclUniqueId id{};
  } boot;
  if (rank_ == 0) boot.status = ncclGetUniqueId(&boot.id);
  CHECK_MPI(MPI_Bcast(&boot, static_cast<int>(sizeof(boot)), MPI_BYTE, 0, mpi_group.handle()));
  if (boot.status != ncclSuccess) {
    HYD_THROW("NcclCommunicator: ncclGetUniqueId failed on rank 0 of the group: ",
              ncclGetErrorString(static_cast<ncclResult_t>(boot.status)));
  }
  // A failed init leaves no usable communicator: whatever it returned is aborted, not destroyed.
  const ncclResult_t init = ncclCommInitRank(&s.comm, size_, boot.id, rank_);
  if (init != ncclSuccess)
    s.fail_nccl(init, "NcclCommunicator", "ncclCommInitRank(&comm, size, id, rank)", __FILE__, __LINE__);
  int nccl_rank = -1, nccl_size = -1;
  CHECK_NCCL(ncclCommUserRank(s.comm, &nccl_rank));
  CHECK_NCCL(ncclCommCount(s.comm, &nccl_size));
  HYD_CHECK(nccl_rank == rank_ && nccl_size == size_, "NcclCommunicator: NCCL rank/size ", nccl_rank, "/", nccl_size,
            " differ from the MPI group's ", rank_, "/", size_);
}

NcclCommunicator::~NcclCommunicator() = default;

NcclCommunicator::NcclCommunicator(NcclCommunicator&& o) noexcept
    : impl_(std::move(o.impl_)),
      rank_(o.rank_),
      size_(o.size_),
      device_(o.device_),
      counters_(std::exchange(o.counters_, CommCounters{})) {}

NcclCommunicator& NcclCommunicator::operator=(NcclCommunicator&& o) noexcept {
  if (this != &o) {
    impl_ = std::move(o.impl_);
    rank_ = o.rank_;
    size_ = o.size_;
    device_ = o.device_;
    counters_ = std::exchange(o.counters_, CommCounters{});
  }
  return *this;
}

void* NcclCommunicator::comm_stream() const { return impl_ ? impl_->stream : nullptr; }

void NcclCommunicator::check_peer(int peer, const char* what) const {
  HYD_CHECK(impl_ != nullptr, "NcclCommunicator used after it was moved from");
  HYD_CHECK(peer >= 0 && peer < size_, what, " = ", peer, " is not a rank of this communicator of size ", size_);
}

template <class T>
void NcclCommunicator::all_reduce(std::span<T> buf, ReduceOp op, void* stream) const {
  HYD_CHECK(impl_ != nullptr, "all_reduce: NcclCommunicator used after it was moved from");
  run_ordered(*impl_, "all_reduce", stream, [&](ncclComm_t comm, cudaStream_t s) {
    HYD_NCCL_OP_CHECK(*impl_, "all_reduce",
                      ncclAllReduce(buf.data(), buf.data(), buf.size(), nccl_type<T>(), nccl_op(op), comm, s));
  });
  count(buf.size_bytes());
}

template <class T>
void NcclCommunicator::reduce_scatter(std::span<const T> in, std::span<T> out, void* stream) const {
  HYD_CHECK(impl_ != nullptr, "reduce_scatter: NcclCommunicator used after it was moved from");
  HYD_CHECK(in.size() % static_cast<size_t>(size_) == 0, "reduce_scatter: in has ", in.size(),
            " elements, not divisible by the group size ", size_);
  HYD_CHECK(out.size() * static_cast<size_t>(size_) == in.size(), "reduce_scatter: out has ", out.size(),
            " elements, expected in.size() / group size = ", in.size() / static_cast<size_t>(size_));
  run_ordered(*impl_, "reduce_scatter", stream, [&](ncclComm_t comm, cudaStream_t s) {
    HYD_NCCL_OP_CHECK(*impl_, "reduce_scatter",
                      ncclReduceScatter(in.data(), out.data(), out.size(), nccl_type<T>(), ncclSum, comm, s));
  });
  count(in.size_bytes());
}

template <class T>
void NcclCommunicator::all_gather(std::span<const T> in, std::span<T> out, void* stream) const {
  HYD_CHECK(impl_ != nullptr, "all_gather: NcclCommunicator used after it was moved from");
  HYD_CHECK(out.size() == in.size() * static_cast<size_t>(size_), "all_gather: out has ", out.size(),
            " elements, expected in.size() * group size = ", in.size() * static_cast<size_t>(size_));
  run_ordered(*impl_, "all_gather", stream, [&](ncclComm_t comm, cudaStream_t s) {
    HYD_NCCL_OP_CHECK(*impl_, "all_gather", ncclAllGather(in.data(), out.data(), in.size(), nccl_type<T>(), comm, s));
  });
  count(in.size_bytes());
}

template <class T>
void NcclCommunicator::all_to_all(std::span<const T> in, std::span<T> out, void* stream) const {
  HYD_CHECK(impl_ != nullptr, "all_to_all: NcclCommunicator used after it was moved from");
  HYD_CHECK(in.size() % static_cast<size_t>(size_) == 0, "all_to_all: in has ", in.size(),
            " elements, not divisible by the group size ", size_);
  HYD_CHECK(out.size() == in.size(), "all_to_all: out has ", out.size(), " elements, expected in.size() = ", in.size());
  const size_t block = in.size() / static_cast<size_t>(size_);
  run_ordered(*impl_, "all_to_all", stream, [&](ncclComm_t comm, cudaStream_t s) {
    if (block == 0) return;
    // One group: NCCL schedules every pair's send and receive together (no ordering deadlock).
    HYD_NCCL_OP_CHECK(*impl_, "all_to_all", ncclGroupStart());
    for (int p = 0; p < size_; ++p) {
      const size_t at = static_cast<size_t>(p) * block;
      HYD_NCCL_OP_CHECK(*impl_, "all_to_all", ncclSend(in.data() + at, block, nccl_type<T>(), p, comm, s));
      HYD_NCCL_OP_CHECK(*impl_, "all_to_all", ncclRecv(out.data() + at, block, nccl_type<T>(), p, comm, s));
    }
    HYD_NCCL_OP_CHECK(*impl_, "all_to_all", ncclGroupEnd());
  });
  count(in.size_bytes());
}

template <class T>
void NcclCommunicator::all_to_all_v(std::span<const T> in, std::span<const int64_t> send_counts, std::span<T> out,
                                    std::span<const int64_t> recv_counts, void* stream) const {
  HYD_CHECK(impl_ != nullptr, "all_to_all_v: NcclCommunicator used after it was moved from");
  const size_t p = static_cast<size_t>(size_);
  HYD_CHECK(send_counts.size() == p, "all_to_all_v: send_counts has ", send_counts.size(),
            " entries, expected the group size ", size_);
  HYD_CHECK(recv_counts.size() == p, "all_to_all_v: recv_counts has ", recv_counts.size(),
            " entries, expected the group size ", size_);
  int64_t s_total = 0, r_total = 0;
  for (size_t i = 0; i < p; ++i) {
    HYD_CHECK(send_counts[i] >= 0, "all_to_all_v: send_counts[", i, "] = ", send_counts[i], " is negative");
    HYD_CHECK(recv_counts[i] >= 0, "all_to_all_v: recv_counts[", i, "] = ", recv_counts[i], " is negative");
    s_total += send_counts[i];
    r_total += recv_counts[i];
  }
  HYD_CHECK(static_cast<size_t>(s_total) == in.size(), "all_to_all_v: in has ", in.size(),
            " elements, send_counts sum to ", s_total);
  HYD_CHECK(static_cast<size_t>(r_total) == out.size(), "all_to_all_v: out has ", out.size(),
            " elements, recv_counts sum to ", r_total);
  run_ordered(*impl_, "all_to_all_v", stream, [&](ncclComm_t comm, cudaStream_t s) {
    if (s_total == 0 && r_total == 0) return;
    HYD_NCCL_OP_CHECK(*impl_, "all_to_all_v", ncclGroupStart());
    size_t s_at = 0, r_at = 0;
    for (int q = 0; q < size_; ++q) {
      const size_t sn = static_cast<size_t>(send_counts[q]), rn = static_cast<size_t>(recv_counts[q]);
      // Empty blocks are skipped on both sides (the counts agree pairwise), so an expert or rank that
      // receives nothing costs no message.
      if (sn > 0) HYD_NCCL_OP_CHECK(*impl_, "all_to_all_v", ncclSend(in.data() + s_at, sn, nccl_type<T>(), q, comm, s));
      if (rn > 0)
        HYD_NCCL_OP_CHECK(*impl_, "all_to_all_v", ncclRecv(out.data() + r_at, rn, nccl_type<T>(), q, comm, s));
      s_at += sn;
      r_at += rn;
    }
    HYD_NCCL_OP_CHECK(*impl_, "all_to_all_v", ncclGroupEnd());
  });
  count(in.size_bytes());  // == sum(send_counts) * sizeof(T), checked above
}

template <class T>
uint64_t NcclCommunicator::all_to_all_blocks_start(std::span<const T> in, std::span<const CommBlock> sends,
                                                   std::span<T> out, std::span<const CommBlock> recvs,
                                                   void* stream) const {
  HYD_CHECK(impl_ != nullptr, "all_to_all_blocks: NcclCommunicator used after it was moved from");
  uint64_t sent = 0;
  auto check = [&](std::span<const CommBlock> blocks, size_t size, const char* what) {
    for (size_t i = 0; i < blocks.size(); ++i) {
      const CommBlock& b = blocks[i];
      check_peer(b.peer, what);
      HYD_CHECK(b.offset >= 0 && b.count >= 0 && static_cast<uint64_t>(b.offset + b.count) <= size,
                "all_to_all_blocks: ", what, " block ", i, " [", b.offset, ", ", b.offset + b.count,
                ") is outside the buffer of ", size, " elements");
    }
  };
  check(sends, in.size(), "sends");
  check(recvs, out.size(), "recvs");
  for (const CommBlock& b : sends) sent += static_cast<uint64_t>(b.count);
  const uint64_t ticket = impl_->issued;
  run_ordered(
      *impl_, "all_to_all_blocks", stream,
      [&](ncclComm_t comm, cudaStream_t s) {
        HYD_NCCL_OP_CHECK(*impl_, "all_to_all_blocks", ncclGroupStart());
        for (const CommBlock& b : sends)
          if (b.count > 0)
            HYD_NCCL_OP_CHECK(
                *impl_, "all_to_all_blocks",
                ncclSend(in.data() + b.offset, static_cast<size_t>(b.count), nccl_type<T>(), b.peer, comm, s));
        for (const CommBlock& b : recvs)
          if (b.count > 0)
            HYD_NCCL_OP_CHECK(
                *impl_, "all_to_all_blocks",
                ncclRecv(out.data() + b.offset, static_cast<size_t>(b.count), nccl_type<T>(), b.peer, comm, s));
        HYD_NCCL_OP_CHECK(*impl_, "all_to_all_blocks", ncclGroupEnd());
      },
      impl_->pending[ticket % kMaxPending]);
  impl_->issued += 1;
  count(sent * sizeof(T));
  return ticket;
}

template <class T>
void NcclCommunicator::all_to_all_blocks(std::span<const T> in, std::span<const CommBlock> sends, std::span<T> out,
                                         std::span<const CommBlock> recvs, void* stream) const {
  wait(all_to_all_blocks_start(in, sends, out, recvs, stream), stream);
}

void NcclCommunicator::wait(uint64_t ticket, void* stream) const {
  HYD_CHECK(impl_ != nullptr, "wait: NcclCommunicator used after it was moved from");
  HYD_CHECK(ticket < impl_->issued, "wait: ticket ", ticket, " was never issued (", impl_->issued, " so far)");
  HYD_CHECK(impl_->issued - ticket <= kMaxPending, "wait: ticket ", ticket, " is older than the last ", kMaxPending,
            " started operations (its event has been reused)");
  HYD_CUDA_OP_CHECK(*impl_, "wait",
                    cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), impl_->pending[ticket % kMaxPending], 0));
}

template <class T>
void NcclCommunicator::send(std::span<const T> buf, int dest, void* stream) const {
  check_peer(dest, "send: dest");
  run_ordered(*impl_, "send", stream, [&](ncclComm_t comm, cudaStream_t s) {
    HYD_NCCL_OP_CHECK(*impl_, "send", ncclSend(buf.data(), buf.size(), nccl_type<T>(), dest, comm, s));
  });
  count(buf.size_bytes());
}

template <class T>
void NcclCommunicator::recv(std::span<T> buf, int source, void* stream) const {
  check_peer(source, "recv: source");
  run_ordered(*impl_, "recv", stream, [&](ncclComm_t comm, cudaStream_t s) {
    HYD_NCCL_OP_CHECK(*impl_, "recv", ncclRecv(buf.data(), buf.size(), nccl_type<T>(), source, comm, s));
  });
  count(0);
}

template <class T>
void NcclCommunicator::broadcast(std::span<T> buf, int root, void* stream) const {
  check_peer(root, "broadcast: root");
  run_ordered(*impl_, "broadcast", stream, [&](ncclComm_t comm, cudaStream_t s) {
    HYD_NCCL_OP_CHECK(*impl_, "broadcast",
                      ncclBroadcast(buf.data(), buf.data(), buf.size(), nccl_type<T>(), root, comm, s));
  });
  count(rank_ == root ? buf.size_bytes() : 0);
}

void NcclCommunicator::barrier(void* stream) const {
  HYD_CHECK(impl_ != nullptr, "barrier: NcclCommunicator used after it was moved from");
  Impl& s = *impl_;
  run_ordered(s, "barrier", stream, [&](ncclComm_t comm, cudaStream_t cs) {
    HYD_NCCL_OP_CHECK(s, "barrier", ncclAllReduce(s.barrier_word, s.barrier_word, 1, ncclInt32, ncclSum, comm, cs));
  });
  HYD_CUDA_OP_CHECK(s, "barrier", cudaStreamSynchronize(s.stream));
  count(0);
}

}  // namespace hyd

#else  // CPU-only build: no NCCL. Constructing a communicator or binding a GPU says so.

namespace hyd {

namespace {
[[noreturn]] void no_cuda(const char* what) {
  HYD_THROW(what, ": this build has no CUDA support (configure with -DHYD_CUDA=ON for the NCCL backend)");
}
}  // namespace

struct NcclCommunicator::Impl {};

int bind_local_gpu(const MpiRuntime&) { no_cuda("bind_local_gpu"); }

NcclCommunicator::NcclCommunicator(const Communicator&) { no_cuda("NcclCommunicator"); }
NcclCommunicator::~NcclCommunicator() = default;
NcclCommunicator::NcclCommunicator(NcclCommunicator&& o) noexcept = default;
NcclCommunicator& NcclCommunicator::operator=(NcclCommunicator&& o) noexcept = default;
void* NcclCommunicator::comm_stream() const { return nullptr; }
void NcclCommunicator::check_peer(int, const char*) const { no_cuda("NcclCommunicator"); }

// Unreachable (no communicator can exist), defined so that callers link in both builds.
template <class T>
void NcclCommunicator::all_reduce(std::span<T>, ReduceOp, void*) const {
  no_cuda("all_reduce");
}
template <class T>
void NcclCommunicator::reduce_scatter(std::span<const T>, std::span<T>, void*) const {
  no_cuda("reduce_scatter");
}
template <class T>
void NcclCommunicator::all_gather(std::span<const T>, std::span<T>, void*) const {
  no_cuda("all_gather");
}
template <class T>
void NcclCommunicator::all_to_all(std::span<const T>, std::span<T>, void*) const {
  no_cuda("all_to_all");
}
template <class T>
void NcclCommunicator::all_to_all_v(std::span<const T>, std::span<const int64_t>, std::span<T>,
                                    std::span<const int64_t>, void*) const {
  no_cuda("all_to_all_v");
}
template <class T>
void NcclCommunicator::all_to_all_blocks(std::span<const T>, std::span<const CommBlock>, std::span<T>,
                                         std::span<const CommBlock>, void*) const {
  no_cuda("all_to_all_blocks");
}
template <class T>
uint64_t NcclCommunicator::all_to_all_blocks_start(std::span<const T>, std::span<const CommBlock>, std::span<T>,
                                                   std::span<const CommBlock>, void*) const {
  no_cuda("all_to_all_blocks_start");
}
void NcclCommunicator::wait(uint64_t, void*) const { no_cuda("wait"); }
template <class T>
void NcclCommunicator::send(std::span<const T>, int, void*) const {
  no_cuda("send");
}
template <class T>
void NcclCommunicator::recv(std::span<T>, int, void*) const {
  no_cuda("recv");
}
template <class T>
void NcclCommunicator::broadcast(std::span<T>, int, void*) const {
  no_cuda("broadcast");
}
void NcclCommunicator::barrier(void*) const { no_cuda("barrier"); }

}  // namespace hyd

#endif  // HYD_WITH_CUDA

namespace hyd {

#define HYD_NCCL_COMM_INSTANTIATE(T)                                                                                 \
  template void NcclCommunicator::all_reduce<T>(std::span<T>, ReduceOp, void*) const;                                \
  template void NcclCommunicator::reduce_scatter<T>(std::span<const T>, std::span<T>, void*) const;                  \
  template void NcclCommunicator::all_gather<T>(std::span<const T>, std::span<T>, void*) const;                      \
  template void NcclCommunicator::all_to_all<T>(std::span<const T>, std::span<T>, void*) const;                      \
  template void NcclCommunicator::all_to_all_v<T>(std::span<const T>, std::span<const int64_t>, std::span<T>,        \
                                                  std::span<const int64_t>, void*) const;                            \
  template void NcclCommunicator::all_to_all_blocks<T>(std::span<const T>, std::span<const CommBlock>, std::span<T>, \
                                                       std::span<const CommBlock>, void*) const;                     \
  template uint64_t NcclCommunicator::all_to_all_blocks_start<T>(                                                    \
      std::span<const T>, std::span<const CommBlock>, std::span<T>, std::span<const CommBlock>, void*) const;        \
  template void NcclCommunicator::send<T>(std::span<const T>, int, void*) const;                                     \
  template void NcclCommunicator::recv<T>(std::span<T>, int, void*) const;                                           \
  template void NcclCommunicator::broadcast<T>(std::span<T>, int, void*) const;

HYD_NCCL_COMM_INSTANTIATE(float)
HYD_NCCL_COMM_INSTANTIATE(bf16)
HYD_NCCL_COMM_INSTANTIATE(int32_t)
HYD_NCCL_COMM_INSTANTIATE(int64_t)
HYD_NCCL_COMM_INSTANTIATE(double)
#undef HYD_NCCL_COMM_INSTANTIATE

}  // namespace hyd

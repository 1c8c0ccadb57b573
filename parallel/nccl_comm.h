// The NCCL backend of PARALLEL.md: the collectives of Communicator (parallel/comm.h) on device buffers.
//
// NcclCommunicator is created collectively from an MPI Communicator: rank 0 of that group makes the
// ncclUniqueId, MPI broadcasts it, every rank joins with ncclCommInitRank under its rank in the group.
// So NCCL groups are exactly the MPI groups (Communicator::world(), ProcessGrid's dp/sp splits), split
// once at start-up, and rank() / size() agree with the MPI group it came from.
//
// Streams: each communicator owns one non-blocking CUDA stream of the highest priority (so a
// collective is not queued behind long compute kernels). Every operation takes the caller's stream
// (the opaque void* of ExecContext::stream(); nullptr is the legacy default stream) and
//   1. records an event on the caller stream; the comm stream waits for it (ordered after the producer),
//   2. runs the NCCL call on the comm stream,
//   3. records an event on the comm stream; the caller stream waits for it (ordered before the consumer).
// The host does not wait (barrier() excepted), and work on other streams overlaps the communication.
// Buffers must stay valid until the caller stream reaches the point after the call: memory freed in
// stream order on the caller stream is safe, a host-side free right after the call is not.
//
// Arguments: the same conventions as Communicator (blocks in rank order, counts as int64 host arrays,
// the same checks and messages), with spans over DEVICE memory of the current device (the device
// that was current at construction: bind_local_gpu). Element types: float, bf16, int32, int64, double.
// Every rank of the group makes the same collective calls in the same order (as with MPI); NCCL matches
// send/recv by order per peer pair (no tags), and a send and its recv block each other on their comm
// streams: order them so that no cycle waits (even ranks send first, odd ranks receive first).
//
// Counters: the CommCounters of comm.h, with the same definition as the MPI backend.
// Threads: one host thread issues the operations of a communicator (the counters, the events and
// NCCL's ordering rules assume it), as with MPI_THREAD_FUNNELED.
// Errors: argument checks throw hyd::Error naming the argument; a failing NCCL or CUDA call throws
// hyd::Error with the library's error text and the operation ("all_reduce: ncclAllReduce(...)"). After
// such an error the destructor aborts the communicator (ncclCommAbort) instead of the collective
// ncclCommDestroy, which could wait forever on peers that are gone.
//
// This header has no CUDA includes. The implementation exists in CUDA builds (HYD_WITH_CUDA); in a
// CPU-only build constructing a NcclCommunicator and bind_local_gpu throw hyd::Error saying so.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "parallel/comm.h"
#include "trainer/core/dtype.h"

namespace hyd {

// Selects this rank's GPU: device local_rank % device_count (cudaSetDevice) and returns its index.
// Throws hyd::Error naming the rank when no CUDA device is visible (or the build has no CUDA). Prints
// nothing. Call it before creating NCCL communicators, ExecContexts or device buffers.
int bind_local_gpu(const MpiRuntime& rt);

class NcclCommunicator {
 public:
  // Collective over mpi_group (every rank calls it, with its GPU already bound). Uses only mpi_group's
  // MPI handle for the bootstrap broadcast; its counters are not touched.
  explicit NcclCommunicator(const Communicator& mpi_group);
  ~NcclCommunicator();
  NcclCommunicator(NcclCommunicator&&) noexcept;
  NcclCommunicator& operator=(NcclCommunicator&&) noexcept;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }  // the CUDA device of this communicator
  void* comm_stream() const;              // cudaStream_t of the communication stream

  // In place: buf becomes the element-wise sum / max over the ranks.
  template <class T>
  void all_reduce(std::span<T> buf, ReduceOp op, void* stream) const;
  // in: size() equal blocks of out.size(); out = the sum over ranks of block rank().
  template <class T>
  void reduce_scatter(std::span<const T> in, std::span<T> out, void* stream) const;
  // out: size() blocks of in.size(), block r = rank r's in.
  template <class T>
  void all_gather(std::span<const T> in, std::span<T> out, void* stream) const;
  // in and out: size() equal blocks; block p of in goes to rank p, block p of out came from rank p.
  template <class T>
  void all_to_all(std::span<const T> in, std::span<T> out, void* stream) const;
  // Blocks of variable length, packed in rank order: send_counts[p] elements of in go to rank p,
  // recv_counts[p] elements of out come from rank p. The counts are HOST arrays and must agree
  // pairwise across ranks (NCCL cannot check it: a mismatch hangs or corrupts).
  template <class T>
  void all_to_all_v(std::span<const T> in, std::span<const int64_t> send_counts, std::span<T> out,
                    std::span<const int64_t> recv_counts, void* stream) const;
  // A scattered all-to-all: every block of `sends` (elements [offset, offset + count) of in) goes to its
  // peer, every block of `recvs` is filled from its peer, all in one NCCL group (no staging copies: the
  // blocks land where the caller wants them, e.g. expert-major rows out of several sources). Blocks between
  // one pair of ranks are matched in list order: rank a's i-th send to b is b's i-th receive from a, with
  // the same count (not checkable with NCCL: a mismatch hangs or corrupts). Zero-count blocks are skipped
  // and may be listed or not on either side. Blocks must lie inside in / out (checked) and receives must
  // not overlap each other (not checked). A rank may exchange blocks with itself.
  template <class T>
  void all_to_all_blocks(std::span<const T> in, std::span<const CommBlock> sends, std::span<T> out,
                         std::span<const CommBlock> recvs, void* stream) const;
  // The same without ordering the caller stream's later work after it (so compute queued meanwhile
  // overlaps the exchange): returns a ticket, and wait(ticket, stream) orders a stream's later work after
  // the exchange. Until then `in` must not be overwritten nor `out` read. Started operations run one after
  // another on the comm stream; at most kMaxPending of them may be started before a wait for the oldest
  // (an older ticket's event has been reused: wait throws).
  static constexpr uint64_t kMaxPending = 16;
  template <class T>
  uint64_t all_to_all_blocks_start(std::span<const T> in, std::span<const CommBlock> sends, std::span<T> out,
                                   std::span<const CommBlock> recvs, void* stream) const;
  void wait(uint64_t ticket, void* stream) const;
  // Point to point; the receiver's buf.size() must equal the sender's (not checkable with NCCL).
  template <class T>
  void send(std::span<const T> buf, int dest, void* stream) const;
  template <class T>
  void recv(std::span<T> buf, int source, void* stream) const;
  // In place: buf on every rank becomes root's buf.
  template <class T>
  void broadcast(std::span<T> buf, int root, void* stream) const;
  // NCCL has no barrier: a one-element all-reduce on the comm stream (ordered after the caller stream's
  // earlier work), then the host waits for it. On return every rank has reached the barrier.
  void barrier(void* stream) const;

  const CommCounters& counters() const { return counters_; }
  void reset_counters() { counters_ = {}; }

  struct Impl;  // CUDA / NCCL handles, defined in nccl_comm.cpp

 private:
  void check_peer(int peer, const char* what) const;
  void count(uint64_t bytes) const {
    counters_.calls += 1;
    counters_.bytes += bytes;
  }
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, size_ = 0, device_ = -1;
  mutable CommCounters counters_;
};

}  // namespace hyd

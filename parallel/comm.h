// MPI bootstrap and the host-buffer communicator (the MPI backend of PARALLEL.md).
//
// MpiRuntime: RAII MPI_Init_thread (FUNNELED or better: only the thread that initialised MPI calls it)
// / MPI_Finalize, with rank, world size and the node-local rank (MPI_Comm_split_type SHARED), which
// later binds rank -> GPU.
// Communicator: owns one MPI_Comm (errors returned, not fatal, so CHECK_MPI turns them into
// hyd::Error) and runs the collectives of the trainer on host buffers of float, double, int32, int64.
// Every collective is called by all ranks of the communicator with the same sizes; the argument checks
// below name the argument that is wrong. Each communicator counts its traffic (CommCounters) so tests
// can assert communication volumes (PARALLEL.md: the KDA exchange must not grow with T).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <span>

namespace hyd {

class MpiRuntime {
 public:
  // Initialises MPI unless it already is (then it neither initialises nor finalises).
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int local_rank() const { return local_rank_; }  // rank among the processes of this node
  int local_size() const { return local_size_; }

 private:
  bool owns_ = false;
  int rank_ = 0, world_size_ = 1, local_rank_ = 0, local_size_ = 1;
};

// Runs `body` and returns its exit code; an exception is printed once (by the failing rank, with its
// rank) and ends the whole job through MPI_Abort, so the other ranks never wait in a collective.
int run_or_abort(const std::function<int()>& body);

enum class ReduceOp { kSum, kMax };

// Traffic of one communicator as seen by one rank, the same definition for every backend (MPI here,
// NCCL in parallel/nccl_comm.h):
//   calls: +1 per completed operation: all_reduce, reduce_scatter, all_gather, all_to_all, all_to_all_v,
//          all_to_all_blocks, send, recv, broadcast, barrier (split, construction and the NCCL bootstrap
//          are not traffic and are not counted; a call rejected by its argument checks counts nothing).
//   bytes: + the bytes THIS rank hands over as input, whatever the algorithm moves underneath:
//          all_reduce: buf; reduce_scatter, all_gather, all_to_all: in (all blocks, its own included);
//          all_to_all_v: the sum of send_counts; all_to_all_blocks (NCCL only): the send blocks' counts;
//          send: buf; broadcast: buf on the root, 0 elsewhere; recv and barrier: 0.
// So the bytes summed over the ranks of a group are the volume the group put into the operation.
struct CommCounters {
  uint64_t calls = 0;
  uint64_t bytes = 0;
};

// One block of a block exchange (NcclCommunicator::all_to_all_blocks): `count` elements at element offset
// `offset` of the local buffer, sent to / received from rank `peer` of the group.
struct CommBlock {
  int peer = 0;
  int64_t offset = 0;
  int64_t count = 0;
};

class Communicator {
 public:
  // A duplicate of MPI_COMM_WORLD (so library traffic never matches user traffic).
  static Communicator world();
  Communicator() = default;
  ~Communicator();
  Communicator(Communicator&& o) noexcept;
  Communicator& operator=(Communicator&& o) noexcept;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  // Ranks with the same color form one new communicator, ordered by key (MPI_Comm_split).
  Communicator split(int color, int key) const;

  int rank() const { return rank_; }
  int size() const { return size_; }
  MPI_Comm handle() const { return comm_; }

  // In place: buf becomes the element-wise sum / max over the ranks.
  template <class T>
  void all_reduce(std::span<T> buf, ReduceOp op) const;
  // in: size() equal blocks of out.size(); out = the sum over ranks of block rank().
  template <class T>
  void reduce_scatter(std::span<const T> in, std::span<T> out) const;
  // out: size() blocks of in.size(), block r = rank r's in.
  template <class T>
  void all_gather(std::span<const T> in, std::span<T> out) const;
  // in and out: size() equal blocks; block p of in goes to rank p, block p of out came from rank p.
  template <class T>
  void all_to_all(std::span<const T> in, std::span<T> out) const;
  // Blocks of variable length, packed in rank order: send_counts[p] elements of in go to rank p,
  // recv_counts[p] elements of out come from rank p (the counts must agree pairwise across ranks).
  template <class T>
  void all_to_all_v(std::span<const T> in, std::span<const int64_t> send_counts, std::span<T> out,
                    std::span<const int64_t> recv_counts) const;
  template <class T>
  void send(std::span<const T> buf, int dest, int tag) const;
  template <class T>
  void recv(std::span<T> buf, int source, int tag) const;  // exactly buf.size() elements
  template <class T>
  void broadcast(std::span<T> buf, int root) const;
  void barrier() const;

  // Since construction or the last reset_counters(); a moved-from communicator keeps nothing, a split
  // starts at zero.
  const CommCounters& counters() const { return counters_; }
  void reset_counters() { counters_ = {}; }

 private:
  Communicator(MPI_Comm comm);  // takes ownership
  void check_peer(int peer, const char* what) const;
  void count(uint64_t bytes) const {
    counters_.calls += 1;
    counters_.bytes += bytes;
  }
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 0;
  // The collectives are const (they do not change which group this is); their traffic still counts.
  mutable CommCounters counters_;
};

}  // namespace hyd

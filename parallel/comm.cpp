#include "parallel/comm.h"

#include <cstdio>
#include <exception>
#include <limits>
#include <utility>
#include <vector>

#include "parallel/checks.h"

namespace hyd {

namespace {

template <class T>
MPI_Datatype mpi_type();
template <>
MPI_Datatype mpi_type<float>() {
  return MPI_FLOAT;
}
template <>
MPI_Datatype mpi_type<double>() {
  return MPI_DOUBLE;
}
template <>
MPI_Datatype mpi_type<int32_t>() {
  return MPI_INT32_T;
}
template <>
MPI_Datatype mpi_type<int64_t>() {
  return MPI_INT64_T;
}

MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::kSum ? MPI_SUM : MPI_MAX; }

// MPI counts are int: larger buffers must be split by the caller (none is, today).
int mpi_count(size_t n, const char* what) {
  HYD_CHECK(n <= static_cast<size_t>(std::numeric_limits<int>::max()), what, " has ", n,
            " elements, more than an MPI count (int) holds");
  return static_cast<int>(n);
}

bool mpi_live() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  CHECK_MPI(MPI_Initialized(&initialized));
  if (!initialized) {
    int provided = 0;
    CHECK_MPI(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
    owns_ = true;
    if (provided < MPI_THREAD_FUNNELED) {
      MPI_Finalize();
      owns_ = false;
      HYD_THROW("MPI provides thread level ", provided, ", HyDistill needs MPI_THREAD_FUNNELED or better");
    }
  }
  CHECK_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
  CHECK_MPI(MPI_Comm_size(MPI_COMM_WORLD, &world_size_));
  MPI_Comm node = MPI_COMM_NULL;
  CHECK_MPI(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node));
  CHECK_MPI(MPI_Comm_rank(node, &local_rank_));
  CHECK_MPI(MPI_Comm_size(node, &local_size_));
  CHECK_MPI(MPI_Comm_free(&node));
}

MpiRuntime::~MpiRuntime() {
  if (owns_ && mpi_live()) MPI_Finalize();
}

int run_or_abort(const std::function<int()>& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    int rank = -1;
    if (mpi_live()) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    std::fprintf(stderr, "hydistill: error on rank %d: %s\n", rank, e.what());
    std::fflush(stderr);
    if (mpi_live()) MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
}

Communicator::Communicator(MPI_Comm comm) : comm_(comm) {
  CHECK_MPI(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  CHECK_MPI(MPI_Comm_rank(comm_, &rank_));
  CHECK_MPI(MPI_Comm_size(comm_, &size_));
}

Communicator Communicator::world() {
  MPI_Comm dup = MPI_COMM_NULL;
  CHECK_MPI(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
  return Communicator(dup);
}

Communicator::~Communicator() {
  if (comm_ != MPI_COMM_NULL && mpi_live()) MPI_Comm_free(&comm_);
}

Communicator::Communicator(Communicator&& o) noexcept
    : comm_(std::exchange(o.comm_, MPI_COMM_NULL)),
      rank_(o.rank_),
      size_(o.size_),
      counters_(std::exchange(o.counters_, CommCounters{})) {}

Communicator& Communicator::operator=(Communicator&& o) noexcept {
  if (this != &o) {
    if (comm_ != MPI_COMM_NULL && mpi_live()) MPI_Comm_free(&comm_);
    comm_ = std::exchange(o.comm_, MPI_COMM_NULL);
    rank_ = o.rank_;
    size_ = o.size_;
    counters_ = std::exchange(o.counters_, CommCounters{});
  }
  return *this;
}

Communicator Communicator::split(int color, int key) const {
  HYD_CHECK(comm_ != MPI_COMM_NULL, "split on an empty communicator");
  HYD_CHECK(color >= 0, "split: color must be >= 0, got ", color);
  MPI_Comm out = MPI_COMM_NULL;
  CHECK_MPI(MPI_Comm_split(comm_, color, key, &out));
  return Communicator(out);
}

void Communicator::check_peer(int peer, const char* what) const {
  HYD_CHECK(peer >= 0 && peer < size_, what, " = ", peer, " is not a rank of this communicator of size ", size_);
}

template <class T>
void Communicator::all_reduce(std::span<T> buf, ReduceOp op) const {
  CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, buf.data(), mpi_count(buf.size(), "all_reduce: buf"), mpi_type<T>(), mpi_op(op),
                          comm_));
  count(buf.size_bytes());
}

template <class T>
void Communicator::reduce_scatter(std::span<const T> in, std::span<T> out) const {
  HYD_CHECK(in.size() % static_cast<size_t>(size_) == 0, "reduce_scatter: in has ", in.size(),
            " elements, not divisible by the group size ", size_);
  HYD_CHECK(out.size() * static_cast<size_t>(size_) == in.size(), "reduce_scatter: out has ", out.size(),
            " elements, expected in.size() / group size = ", in.size() / static_cast<size_t>(size_));
  CHECK_MPI(MPI_Reduce_scatter_block(in.data(), out.data(), mpi_count(out.size(), "reduce_scatter: out"), mpi_type<T>(),
                                     MPI_SUM, comm_));
  count(in.size_bytes());
}

template <class T>
void Communicator::all_gather(std::span<const T> in, std::span<T> out) const {
  HYD_CHECK(out.size() == in.size() * static_cast<size_t>(size_), "all_gather: out has ", out.size(),
            " elements, expected in.size() * group size = ", in.size() * static_cast<size_t>(size_));
  const int n = mpi_count(in.size(), "all_gather: in");
  mpi_count(out.size(), "all_gather: out");
  CHECK_MPI(MPI_Allgather(in.data(), n, mpi_type<T>(), out.data(), n, mpi_type<T>(), comm_));
  count(in.size_bytes());
}

template <class T>
void Communicator::all_to_all(std::span<const T> in, std::span<T> out) const {
  HYD_CHECK(in.size() % static_cast<size_t>(size_) == 0, "all_to_all: in has ", in.size(),
            " elements, not divisible by the group size ", size_);
  HYD_CHECK(out.size() == in.size(), "all_to_all: out has ", out.size(), " elements, expected in.size() = ", in.size());
  const int n = mpi_count(in.size() / static_cast<size_t>(size_), "all_to_all: in block");
  mpi_count(in.size(), "all_to_all: in");
  CHECK_MPI(MPI_Alltoall(in.data(), n, mpi_type<T>(), out.data(), n, mpi_type<T>(), comm_));
  count(in.size_bytes());
}

template <class T>
void Communicator::all_to_all_v(std::span<const T> in, std::span<const int64_t> send_counts, std::span<T> out,
                                std::span<const int64_t> recv_counts) const {
  const size_t p = static_cast<size_t>(size_);
  HYD_CHECK(send_counts.size() == p, "all_to_all_v: send_counts has ", send_counts.size(),
            " entries, expected the group size ", size_);
  HYD_CHECK(recv_counts.size() == p, "all_to_all_v: recv_counts has ", recv_counts.size(),
            " entries, expected the group size ", size_);
  std::vector<int> sc(p), sd(p), rc(p), rd(p);
  int64_t s_total = 0, r_total = 0;
  for (size_t i = 0; i < p; ++i) {
    HYD_CHECK(send_counts[i] >= 0, "all_to_all_v: send_counts[", i, "] = ", send_counts[i], " is negative");
    HYD_CHECK(recv_counts[i] >= 0, "all_to_all_v: recv_counts[", i, "] = ", recv_counts[i], " is negative");
    sd[i] = mpi_count(static_cast<size_t>(s_total), "all_to_all_v: in");
    rd[i] = mpi_count(static_cast<size_t>(r_total), "all_to_all_v: out");
    sc[i] = mpi_count(static_cast<size_t>(send_counts[i]), "all_to_all_v: send_counts entry");
    rc[i] = mpi_count(static_cast<size_t>(recv_counts[i]), "all_to_all_v: recv_counts entry");
    s_total += send_counts[i];
    r_total += recv_counts[i];
  }
  HYD_CHECK(static_cast<size_t>(s_total) == in.size(), "all_to_all_v: in has ", in.size(),
            " elements, send_counts sum to ", s_total);
  HYD_CHECK(static_cast<size_t>(r_total) == out.size(), "all_to_all_v: out has ", out.size(),
            " elements, recv_counts sum to ", r_total);
  CHECK_MPI(MPI_Alltoallv(in.data(), sc.data(), sd.data(), mpi_type<T>(), out.data(), rc.data(), rd.data(),
                          mpi_type<T>(), comm_));
  count(in.size_bytes());  // == sum(send_counts) * sizeof(T), checked above
}

template <class T>
void Communicator::send(std::span<const T> buf, int dest, int tag) const {
  check_peer(dest, "send: dest");
  CHECK_MPI(MPI_Send(buf.data(), mpi_count(buf.size(), "send: buf"), mpi_type<T>(), dest, tag, comm_));
  count(buf.size_bytes());
}

template <class T>
void Communicator::recv(std::span<T> buf, int source, int tag) const {
  check_peer(source, "recv: source");
  MPI_Status status;
  CHECK_MPI(MPI_Recv(buf.data(), mpi_count(buf.size(), "recv: buf"), mpi_type<T>(), source, tag, comm_, &status));
  int got = 0;
  CHECK_MPI(MPI_Get_count(&status, mpi_type<T>(), &got));
  HYD_CHECK(static_cast<size_t>(got) == buf.size(), "recv: buf expects ", buf.size(), " elements from rank ", source,
            ", received ", got);
  count(0);
}

template <class T>
void Communicator::broadcast(std::span<T> buf, int root) const {
  check_peer(root, "broadcast: root");
  CHECK_MPI(MPI_Bcast(buf.data(), mpi_count(buf.size(), "broadcast: buf"), mpi_type<T>(), root, comm_));
  count(rank_ == root ? buf.size_bytes() : 0);
}

void Communicator::barrier() const {
  CHECK_MPI(MPI_Barrier(comm_));
  count(0);
}

#define HYD_COMM_INSTANTIATE(T)                                                                           \
  template void Communicator::all_reduce<T>(std::span<T>, ReduceOp) const;                                \
  template void Communicator::reduce_scatter<T>(std::span<const T>, std::span<T>) const;                  \
  template void Communicator::all_gather<T>(std::span<const T>, std::span<T>) const;                      \
  template void Communicator::all_to_all<T>(std::span<const T>, std::span<T>) const;                      \
  template void Communicator::all_to_all_v<T>(std::span<const T>, std::span<const int64_t>, std::span<T>, \
                                              std::span<const int64_t>) const;                            \
  template void Communicator::send<T>(std::span<const T>, int, int) const;                                \
  template void Communicator::recv<T>(std::span<T>, int, int) const;                                      \
  template void Communicator::broadcast<T>(std::span<T>, int) const;

HYD_COMM_INSTANTIATE(float)
HYD_COMM_INSTANTIATE(double)
HYD_COMM_INSTANTIATE(int32_t)
HYD_COMM_INSTANTIATE(int64_t)
#undef HYD_COMM_INSTANTIATE

}  // namespace hyd

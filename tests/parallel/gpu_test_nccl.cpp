// NCCL backend (parallel/nccl_comm.h) against the MPI backend (parallel/comm.h): every operation on the
// same random data per rank, for float, bf16, int32, int64, double, plus the byte counters and the
// stream protocol. Label `gpu_parallel`, run by ctest under mpirun -np 2 with one GPU per rank
// (NCCL_NVLS_ENABLE=0, PARALLEL.md); exit code 77 (skipped) on every rank when a node has fewer visible
// GPUs than ranks. Its own main (not mpi_test_main.cpp): the skip is decided before any test runs.
//
// Tolerances: results that only move data, integer sums and every max are exact; float / double sums
// may differ in summation order (rel 1e-5 / 1e-12 of the sum of magnitudes); bf16 sums are rounded to
// bf16 inside NCCL (compared with the float sum of the same bf16 inputs, rel 1e-2 of the sum of
// magnitudes). MPI has no bf16: its reference runs on the inputs converted to float (exact), and
// moved bf16 values are compared bit for bit with float_to_bf16 of the float reference.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "parallel/checks.h"
#include "parallel/comm.h"
#include "parallel/nccl_comm.h"
#include "trainer/core/dtype.h"
#include "trainer/core/error.h"

namespace hyd {
namespace {

// What every test uses: set up in main before RUN_ALL_TESTS, torn down before MPI_Finalize.
struct Backends {
  const Communicator* mpi = nullptr;
  NcclCommunicator* nccl = nullptr;
  cudaStream_t stream = nullptr;  // the "compute" stream of the caller
  int device = -1;
};
Backends g;

// Host type of the MPI reference for element type T (MPI has no bf16).
template <class T>
using RefT = std::conditional_t<std::is_same_v<T, bf16>, float, T>;

template <class T>
RefT<T> to_ref(T x) {
  if constexpr (std::is_same_v<T, bf16>) {
    return bf16_to_float(x);
  } else {
    return x;
  }
}
template <class T>
T from_ref(RefT<T> x) {
  if constexpr (std::is_same_v<T, bf16>) {
    return float_to_bf16(x);
  } else {
    return x;
  }
}
template <class T>
std::vector<RefT<T>> to_ref_all(const std::vector<T>& v) {
  std::vector<RefT<T>> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_ref(v[i]);
  return out;
}
template <class T>
double as_double(T x) {
  return static_cast<double>(to_ref(x));
}

// n random values of T, different per rank and per `salt`; bf16 values are exactly representable.
template <class T>
std::vector<T> random_values(size_t n, int rank, int salt) {
  std::mt19937_64 rng(0x5eedULL * 1000003ULL + static_cast<uint64_t>(rank) * 7919ULL + static_cast<uint64_t>(salt));
  std::vector<T> v(n);
  for (auto& x : v) {
    if constexpr (std::is_integral_v<T>) {
      const int64_t span = std::is_same_v<T, int32_t> ? 1000000 : int64_t(1) << 40;
      x = static_cast<T>(std::uniform_int_distribution<int64_t>(-span, span)(rng));
    } else {
      const double u = std::uniform_real_distribution<double>(-1.0, 1.0)(rng);
      x = from_ref<T>(static_cast<RefT<T>>(u));
    }
  }
  return v;
}

// RAII device array of T.
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    if (n_ > 0) CHECK_CUDA(cudaMalloc(&p_, n_ * sizeof(T)));
  }
  ~DeviceArray() {
    if (p_) cudaFree(p_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  std::span<T> span() { return {p_, n_}; }
  std::span<const T> cspan() const { return {p_, n_}; }
  // Stream-ordered on the caller stream, like a producer kernel would be.
  void upload(const std::vector<T>& h) {
    EXPECT_EQ(h.size(), n_);
    if (n_ > 0) CHECK_CUDA(cudaMemcpyAsync(p_, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice, g.stream));
  }
  // Ordered after the communication on the caller stream (its consumer), then the host waits.
  std::vector<T> download() const {
    std::vector<T> h(n_);
    if (n_ > 0) CHECK_CUDA(cudaMemcpyAsync(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost, g.stream));
    CHECK_CUDA(cudaStreamSynchronize(g.stream));
    return h;
  }
  // Garbage in the output, so an operation that writes nothing shows.
  void poison() {
    if (n_ > 0) CHECK_CUDA(cudaMemsetAsync(p_, 0x7f, n_ * sizeof(T), g.stream));
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// Exact equality (data movement, integer sums, max): bits of T against T of the reference.
template <class T>
void expect_exact(const std::vector<T>& got, const std::vector<RefT<T>>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const T w = from_ref<T>(want[i]);
    if (std::memcmp(&got[i], &w, sizeof(T)) != 0 && bad++ < 5)
      ADD_FAILURE() << what << ": element " << i << " is " << as_double(got[i]) << ", MPI gives " << as_double(w);
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements differ";
}

template <class T>
double sum_tolerance() {
  if constexpr (std::is_same_v<T, bf16>) return 1e-2;
  if constexpr (std::is_same_v<T, float>) return 1e-5;
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  return 0.0;  // integers: exact
}

// Sums: |got - want| <= tol * max(|want|, sum of |inputs|) (magnitudes from the MPI sum of |x|).
template <class T>
void expect_sum(const std::vector<T>& got, const std::vector<RefT<T>>& want, const std::vector<RefT<T>>& abs_sum,
                const std::string& what) {
  if constexpr (std::is_integral_v<T>) {
    expect_exact(got, want, what);
  } else {
    ASSERT_EQ(got.size(), want.size()) << what;
    const double tol = sum_tolerance<T>();
    size_t bad = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double g_i = as_double(got[i]), w = static_cast<double>(want[i]);
      const double scale = std::max(std::abs(w), static_cast<double>(abs_sum[i]));
      if (!(std::abs(g_i - w) <= tol * scale) && bad++ < 5)
        ADD_FAILURE() << what << ": element " << i << " is " << g_i << ", MPI gives " << w << " (tolerance "
                      << tol * scale << ")";
    }
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements out of tolerance";
  }
}

template <class T>
std::vector<T> abs_values(std::vector<T> v) {
  for (auto& x : v) x = x < 0 ? -x : x;
  return v;
}

template <class T>
class NcclTyped : public ::testing::Test {};
using NcclTypes = ::testing::Types<float, bf16, int32_t, int64_t, double>;
TYPED_TEST_SUITE(NcclTyped, NcclTypes);

TYPED_TEST(NcclTyped, AllReduceSumAndMaxMatchMpi) {
  using T = TypeParam;
  using R = RefT<T>;
  const Communicator& mpi = *g.mpi;
  const NcclCommunicator& nccl = *g.nccl;
  const size_t n = 1031;  // not a multiple of anything NCCL likes
  const std::vector<T> x = random_values<T>(n, mpi.rank(), 1);
  DeviceArray<T> d(n);
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
    const std::string what = std::string("all_reduce ") + (op == ReduceOp::kSum ? "sum" : "max");
    std::vector<R> want = to_ref_all(x), mags = abs_values(to_ref_all(x));
    mpi.all_reduce(std::span<R>(want), op);
    mpi.all_reduce(std::span<R>(mags), ReduceOp::kSum);
    d.upload(x);
    nccl.all_reduce(d.span(), op, g.stream);
    const std::vector<T> got = d.download();
    if (op == ReduceOp::kMax)
      expect_exact(got, want, what);
    else
      expect_sum(got, want, mags, what);
  }
}

TYPED_TEST(NcclTyped, ReduceScatterMatchesMpi) {
  using T = TypeParam;
  using R = RefT<T>;
  const Communicator& mpi = *g.mpi;
  const size_t P = static_cast<size_t>(mpi.size()), B = 257;
  const std::vector<T> x = random_values<T>(P * B, mpi.rank(), 2);
  std::vector<R> want(B), mags(B);
  mpi.reduce_scatter(std::span<const R>(to_ref_all(x)), std::span<R>(want));
  const std::vector<R> ax = abs_values(to_ref_all(x));
  mpi.reduce_scatter(std::span<const R>(ax), std::span<R>(mags));
  DeviceArray<T> in(P * B), out(B);
  in.upload(x);
  out.poison();
  g.nccl->reduce_scatter(in.cspan(), out.span(), g.stream);
  expect_sum(out.download(), want, mags, "reduce_scatter");
}

TYPED_TEST(NcclTyped, AllGatherMatchesMpi) {
  using T = TypeParam;
  using R = RefT<T>;
  const Communicator& mpi = *g.mpi;
  const size_t P = static_cast<size_t>(mpi.size()), n = 333;
  const std::vector<T> x = random_values<T>(n, mpi.rank(), 3);
  std::vector<R> want(P * n);
  mpi.all_gather(std::span<const R>(to_ref_all(x)), std::span<R>(want));
  DeviceArray<T> in(n), out(P * n);
  in.upload(x);
  out.poison();
  g.nccl->all_gather(in.cspan(), out.span(), g.stream);
  expect_exact(out.download(), want, "all_gather");
}

TYPED_TEST(NcclTyped, AllToAllMatchesMpi) {
  using T = TypeParam;
  using R = RefT<T>;
  const Communicator& mpi = *g.mpi;
  const size_t P = static_cast<size_t>(mpi.size()), B = 129;
  const std::vector<T> x = random_values<T>(P * B, mpi.rank(), 4);
  std::vector<R> want(P * B);
  mpi.all_to_all(std::span<const R>(to_ref_all(x)), std::span<R>(want));
  DeviceArray<T> in(P * B), out(P * B);
  in.upload(x);
  out.poison();
  g.nccl->all_to_all(in.cspan(), out.span(), g.stream);
  expect_exact(out.download(), want, "all_to_all");
}

// Counts from src to dst, the same function on every rank so that they agree pairwise. Patterns: mixed
// (some pairs empty), everything to rank 0 (a router sending all tokens to one expert), nothing at all.
int64_t pair_count(int pattern, int src, int dst) {
  switch (pattern) {
    case 0:
      return (src * 7 + dst * 3) % 5 == 0 ? 0 : 10 + (src * 31 + dst * 17) % 90;
    case 1:
      return dst == 0 ? 100 + src : 0;
    default:
      return 0;
  }
}

TYPED_TEST(NcclTyped, AllToAllVMatchesMpiIncludingEmptyBlocks) {
  using T = TypeParam;
  using R = RefT<T>;
  const Communicator& mpi = *g.mpi;
  const int P = mpi.size(), r = mpi.rank();
  for (int pattern = 0; pattern < 3; ++pattern) {
    std::vector<int64_t> sc(P), rc(P);
    int64_t s_total = 0, r_total = 0;
    for (int q = 0; q < P; ++q) {
      sc[q] = pair_count(pattern, r, q);
      rc[q] = pair_count(pattern, q, r);
      s_total += sc[q];
      r_total += rc[q];
    }
    const std::vector<T> x = random_values<T>(static_cast<size_t>(s_total), r, 10 + pattern);
    std::vector<R> want(static_cast<size_t>(r_total));
    mpi.all_to_all_v(std::span<const R>(to_ref_all(x)), std::span<const int64_t>(sc), std::span<R>(want),
                     std::span<const int64_t>(rc));
    DeviceArray<T> in(x.size()), out(want.size());
    in.upload(x);
    out.poison();
    g.nccl->all_to_all_v(in.cspan(), std::span<const int64_t>(sc), out.span(), std::span<const int64_t>(rc), g.stream);
    expect_exact(out.download(), want, "all_to_all_v pattern " + std::to_string(pattern));
  }
}

TYPED_TEST(NcclTyped, SendRecvRingMatchesMpi) {
  using T = TypeParam;
  using R = RefT<T>;
  const Communicator& mpi = *g.mpi;
  const int P = mpi.size(), r = mpi.rank();
  if (P % 2 != 0) GTEST_SKIP() << "the even/odd ring needs an even number of ranks";
  const int next = (r + 1) % P, prev = (r + P - 1) % P;
  const size_t n = 515;
  const std::vector<T> mine = random_values<T>(n, r, 5);
  std::vector<R> want(n);
  DeviceArray<T> d_mine(n), d_got(n);
  d_mine.upload(mine);
  d_got.poison();
  // Even ranks send first, odd ranks receive first: no cycle of blocked sends, with MPI or with NCCL.
  if (r % 2 == 0) {
    mpi.send(std::span<const R>(to_ref_all(mine)), next, 11);
    mpi.recv(std::span<R>(want), prev, 11);
    g.nccl->send(d_mine.cspan(), next, g.stream);
    g.nccl->recv(d_got.span(), prev, g.stream);
  } else {
    mpi.recv(std::span<R>(want), prev, 11);
    mpi.send(std::span<const R>(to_ref_all(mine)), next, 11);
    g.nccl->recv(d_got.span(), prev, g.stream);
    g.nccl->send(d_mine.cspan(), next, g.stream);
  }
  expect_exact(d_got.download(), want, "send/recv ring");
}

TYPED_TEST(NcclTyped, BroadcastFromLastRankMatchesMpi) {
  using T = TypeParam;
  using R = RefT<T>;
  const Communicator& mpi = *g.mpi;
  const int root = mpi.size() - 1;
  const std::vector<T> x = random_values<T>(777, mpi.rank(), 6);  // differs per rank: only root's survives
  std::vector<R> want = to_ref_all(x);
  mpi.broadcast(std::span<R>(want), root);
  DeviceArray<T> d(x.size());
  d.upload(x);
  g.nccl->broadcast(d.span(), root, g.stream);
  expect_exact(d.download(), want, "broadcast");
}

// The same float sequence through both backends: identical counters, and the hand-computed values of
// comm.h's definition.
TEST(NcclCounters, MatchTheMpiBackendAndTheDefinition) {
  const int P = g.mpi->size(), r = g.mpi->rank();
  const uint64_t p = static_cast<uint64_t>(P);
  Communicator mpi = Communicator::world();  // fresh counters
  NcclCommunicator& nccl = *g.nccl;
  nccl.reset_counters();

  std::vector<float> h(8 * P, 1.0f), h_out(8 * P);
  DeviceArray<float> d(8 * P), d_out(8 * P);
  d.upload(h);
  std::vector<int64_t> sc(P), rc(P);
  int64_t s_total = 0, r_total = 0;
  for (int q = 0; q < P; ++q) {
    sc[q] = pair_count(0, r, q);
    rc[q] = pair_count(0, q, r);
    s_total += sc[q];
    r_total += rc[q];
  }
  std::vector<float> hv_in(s_total), hv_out(r_total);
  DeviceArray<float> dv_in(s_total), dv_out(r_total);

  mpi.all_reduce(std::span<float>(h).first(5), ReduceOp::kSum);
  nccl.all_reduce(d.span().first(5), ReduceOp::kSum, g.stream);
  mpi.reduce_scatter(std::span<const float>(h), std::span<float>(h_out).first(8));
  nccl.reduce_scatter(d.cspan(), d_out.span().first(8), g.stream);
  mpi.all_gather(std::span<const float>(h).first(3), std::span<float>(h_out).first(3 * P));
  nccl.all_gather(d.cspan().first(3), d_out.span().first(3 * P), g.stream);
  mpi.all_to_all(std::span<const float>(h), std::span<float>(h_out));
  nccl.all_to_all(d.cspan(), d_out.span(), g.stream);
  mpi.all_to_all_v(std::span<const float>(hv_in), std::span<const int64_t>(sc), std::span<float>(hv_out),
                   std::span<const int64_t>(rc));
  nccl.all_to_all_v(dv_in.cspan(), std::span<const int64_t>(sc), dv_out.span(), std::span<const int64_t>(rc), g.stream);
  mpi.broadcast(std::span<float>(h).first(6), 0);
  nccl.broadcast(d.span().first(6), 0, g.stream);
  mpi.barrier();
  nccl.barrier(g.stream);
  CHECK_CUDA(cudaStreamSynchronize(g.stream));

  const uint64_t want_bytes = 4 * (5 + 8 * p + 3 + 8 * p + static_cast<uint64_t>(s_total) + (r == 0 ? 6 : 0));
  EXPECT_EQ(mpi.counters().calls, 7u);
  EXPECT_EQ(mpi.counters().bytes, want_bytes);
  EXPECT_EQ(nccl.counters().calls, mpi.counters().calls);
  EXPECT_EQ(nccl.counters().bytes, mpi.counters().bytes);

  nccl.reset_counters();
  EXPECT_EQ(nccl.counters().calls, 0u);
  EXPECT_EQ(nccl.counters().bytes, 0u);
}

// The stream protocol: a communicator's stream is its own, of the highest priority; a producer queued
// on the caller stream before the call is seen by it, and the caller's consumer sees its result
// (upload/download above rely on the same), here with a large buffer whose copy is still running.
TEST(NcclStreams, CommStreamIsHighPriorityAndOrderedWithTheCaller) {
  int least = 0, greatest = 0, prio = 1;
  CHECK_CUDA(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  auto cs = static_cast<cudaStream_t>(g.nccl->comm_stream());
  ASSERT_NE(cs, nullptr);
  EXPECT_NE(cs, g.stream);
  CHECK_CUDA(cudaStreamGetPriority(cs, &prio));
  EXPECT_EQ(prio, greatest);
  unsigned flags = 0;
  CHECK_CUDA(cudaStreamGetFlags(cs, &flags));
  EXPECT_EQ(flags & cudaStreamNonBlocking, static_cast<unsigned>(cudaStreamNonBlocking));
  EXPECT_EQ(g.nccl->device(), g.device);

  const size_t n = size_t(32) << 20;  // 128 MiB: the device-to-device copy takes a while
  const int P = g.mpi->size(), r = g.mpi->rank();
  DeviceArray<int32_t> src(n), buf(n);
  std::vector<int32_t> ones(n, r + 1);
  src.upload(ones);
  buf.poison();
  CHECK_CUDA(cudaStreamSynchronize(g.stream));
  // Producer (copy) -> all_reduce -> consumer (download), all queued without host waits.
  CHECK_CUDA(
      cudaMemcpyAsync(buf.span().data(), src.span().data(), n * sizeof(int32_t), cudaMemcpyDeviceToDevice, g.stream));
  g.nccl->all_reduce(buf.span(), ReduceOp::kSum, g.stream);
  const std::vector<int32_t> got = buf.download();
  const int32_t want = P * (P + 1) / 2;
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad += got[i] != want;
  EXPECT_EQ(bad, 0u) << "elements of the all-reduce that missed the producer's copy (want " << want << ")";
}

TEST(NcclArguments, BadSizesNameTheArgumentAndLeaveTheCommunicatorUsable) {
  const int P = g.nccl->size();
  DeviceArray<float> in(P * 2 + 1), out(3);
  auto error_of = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  std::string e = error_of([&] { g.nccl->reduce_scatter(in.cspan(), out.span().first(2), g.stream); });
  EXPECT_NE(e.find("reduce_scatter: in has " + std::to_string(P * 2 + 1)), std::string::npos) << e;
  DeviceArray<float> wide(P + 1);  // one element more than an all_gather of 1 element gives
  e = error_of([&] { g.nccl->all_gather(out.cspan().first(1), wide.span(), g.stream); });
  EXPECT_NE(e.find("all_gather: out has " + std::to_string(P + 1)), std::string::npos) << e;
  std::vector<int64_t> short_counts(P - 1, 0), counts(P, 0);
  e = error_of([&] {
    g.nccl->all_to_all_v(in.cspan().first(0), std::span<const int64_t>(short_counts), out.span().first(0),
                         std::span<const int64_t>(counts), g.stream);
  });
  EXPECT_NE(e.find("all_to_all_v: send_counts has"), std::string::npos) << e;
  e = error_of([&] { g.nccl->send(out.cspan(), P, g.stream); });
  EXPECT_NE(e.find("send: dest = " + std::to_string(P)), std::string::npos) << e;
  e = error_of([&] { g.nccl->broadcast(out.span(), -1, g.stream); });
  EXPECT_NE(e.find("broadcast: root = -1"), std::string::npos) << e;
  g.nccl->barrier(g.stream);  // the rejected calls enqueued nothing: all ranks still agree
}

}  // namespace
}  // namespace hyd

int main(int argc, char** argv) {
  hyd::MpiRuntime mpi(&argc, &argv);
  setenv("NCCL_NVLS_ENABLE", "0", 0);  // PARALLEL.md: NVLink multicast off on the lent machines
  ::testing::InitGoogleTest(&argc, argv);

  // Skip on every rank, or on none: the fewest visible GPUs on any node against that node's ranks.
  int visible = 0;
  if (cudaGetDeviceCount(&visible) != cudaSuccess) visible = 0;
  int short_by = std::max(0, mpi.local_size() - visible), worst_short = 0;
  CHECK_MPI(MPI_Allreduce(&short_by, &worst_short, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  if (worst_short > 0) {
    if (mpi.rank() == 0)
      std::printf("SKIP: %d rank(s) per node but only %d GPU(s) visible here; the NCCL test needs one GPU per rank\n",
                  mpi.local_size(), visible);
    return 77;
  }

  // A set-up failure on one rank (binding, NCCL init) ends the job instead of leaving the others waiting.
  const int rc = hyd::run_or_abort([&]() -> int {
    const int device = hyd::bind_local_gpu(mpi);
    hyd::Communicator world = hyd::Communicator::world();
    hyd::NcclCommunicator nccl(world);
    cudaStream_t stream = nullptr;
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    hyd::g = {&world, &nccl, stream, device};
    const int tests_rc = RUN_ALL_TESTS() == 0 ? 0 : 1;
    CHECK_CUDA(cudaStreamSynchronize(stream));
    hyd::g = {};
    CHECK_CUDA(cudaStreamDestroy(stream));
    return tests_rc;
  });  // the communicators are gone before MPI_Finalize
  int worst = rc;
  CHECK_MPI(MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  if (worst != 0 && rc == 0) std::printf("[rank %d] passed here, but another rank failed\n", mpi.rank());
  return worst;
}

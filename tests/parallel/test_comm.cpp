// MPI backend of the communicator and the dp x sp grid, checked against hand-computed values on
// every rank. Runs under mpirun -np 2 and -np 4 (CMakeLists.txt); P below is the world size.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel/comm.h"
#include "parallel/grid.h"
#include "trainer/core/error.h"

namespace hyd {
namespace {

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(MpiRuntime, RankSizeAndNodeLocalRank) {
  int rank = -1, size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int argc = 0;
  char** argv = nullptr;
  MpiRuntime again(&argc, &argv);  // MPI is already up: reads the ranks, neither inits nor finalizes
  EXPECT_EQ(again.rank(), rank);
  EXPECT_EQ(again.world_size(), size);
  // The CI job runs on one node: the node-local ranks are the world ranks.
  EXPECT_EQ(again.local_size(), size);
  EXPECT_EQ(again.local_rank(), rank);
}

template <class T>
class CommTyped : public ::testing::Test {};
using CommTypes = ::testing::Types<float, double, int32_t, int64_t>;
TYPED_TEST_SUITE(CommTyped, CommTypes);

TYPED_TEST(CommTyped, AllReduceSumAndMax) {
  using T = TypeParam;
  Communicator c = Communicator::world();
  const int P = c.size(), r = c.rank();
  std::vector<T> sum(5), mx(5);
  for (int i = 0; i < 5; ++i) {
    sum[i] = T((r + 1) * (i + 1));
    mx[i] = T(i % 2 ? -(r + 1) * (i + 1) : (r + 1) * (i + 1));  // odd entries: the max is rank 0's
  }
  c.all_reduce(std::span<T>(sum), ReduceOp::kSum);
  c.all_reduce(std::span<T>(mx), ReduceOp::kMax);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(sum[i], T((i + 1) * P * (P + 1) / 2)) << "i=" << i;
    EXPECT_EQ(mx[i], T(i % 2 ? -(i + 1) : P * (i + 1))) << "i=" << i;
  }
}

TYPED_TEST(CommTyped, ReduceScatterSumsBlockOfOwnRank) {
  using T = TypeParam;
  Communicator c = Communicator::world();
  const int P = c.size(), r = c.rank(), B = 3;
  std::vector<T> in(P * B), out(B, T(-7));
  for (int j = 0; j < P * B; ++j) in[j] = T(r * 100 + j);
  c.reduce_scatter(std::span<const T>(in), std::span<T>(out));
  for (int k = 0; k < B; ++k) EXPECT_EQ(out[k], T(100 * P * (P - 1) / 2 + P * (r * B + k))) << "k=" << k;
}

TYPED_TEST(CommTyped, AllGatherConcatenatesInRankOrder) {
  using T = TypeParam;
  Communicator c = Communicator::world();
  const int P = c.size(), r = c.rank();
  std::vector<T> in = {T(r * 10), T(r * 10 + 1)}, out(2 * P, T(-1));
  c.all_gather(std::span<const T>(in), std::span<T>(out));
  for (int q = 0; q < P; ++q)
    for (int k = 0; k < 2; ++k) EXPECT_EQ(out[q * 2 + k], T(q * 10 + k)) << "q=" << q << " k=" << k;
}

TYPED_TEST(CommTyped, AllToAllTransposesBlocks) {
  using T = TypeParam;
  Communicator c = Communicator::world();
  const int P = c.size(), r = c.rank(), B = 2;
  std::vector<T> in(P * B), out(P * B, T(-1));
  for (int p = 0; p < P; ++p)
    for (int k = 0; k < B; ++k) in[p * B + k] = T(r * 100 + p * 10 + k);
  c.all_to_all(std::span<const T>(in), std::span<T>(out));
  for (int p = 0; p < P; ++p)
    for (int k = 0; k < B; ++k) EXPECT_EQ(out[p * B + k], T(p * 100 + r * 10 + k)) << "p=" << p << " k=" << k;
}

TYPED_TEST(CommTyped, AllToAllVWithZeroCounts) {
  using T = TypeParam;
  Communicator c = Communicator::world();
  const int P = c.size(), r = c.rank();
  // Rank r sends (r + p) % 3 elements to p: some pairs exchange nothing.
  std::vector<int64_t> sc(P), rc(P);
  std::vector<T> in;
  for (int p = 0; p < P; ++p) {
    sc[p] = (r + p) % 3;
    rc[p] = (p + r) % 3;
    for (int k = 0; k < sc[p]; ++k) in.push_back(T(r * 1000 + p * 10 + k));
  }
  int64_t total = 0;
  for (int64_t n : rc) total += n;
  std::vector<T> out(static_cast<size_t>(total), T(-1));
  c.all_to_all_v(std::span<const T>(in), std::span<const int64_t>(sc), std::span<T>(out), std::span<const int64_t>(rc));
  size_t at = 0;
  for (int p = 0; p < P; ++p)
    for (int k = 0; k < rc[p]; ++k, ++at) EXPECT_EQ(out[at], T(p * 1000 + r * 10 + k)) << "p=" << p << " k=" << k;
}

TYPED_TEST(CommTyped, SendRecvRing) {
  using T = TypeParam;
  Communicator c = Communicator::world();
  const int P = c.size(), r = c.rank();
  if (P % 2 != 0) GTEST_SKIP() << "the even/odd ring needs an even number of ranks";
  const int next = (r + 1) % P, prev = (r + P - 1) % P;
  std::vector<T> mine = {T(r), T(r * 2 + 1), T(-r)}, got(3, T(-9));
  if (r % 2 == 0) {
    c.send(std::span<const T>(mine), next, 7);
    c.recv(std::span<T>(got), prev, 7);
  } else {
    c.recv(std::span<T>(got), prev, 7);
    c.send(std::span<const T>(mine), next, 7);
  }
  EXPECT_EQ(got[0], T(prev));
  EXPECT_EQ(got[1], T(prev * 2 + 1));
  EXPECT_EQ(got[2], T(-prev));
}

TYPED_TEST(CommTyped, BroadcastFromLastRank) {
  using T = TypeParam;
  Communicator c = Communicator::world();
  const int P = c.size(), root = P - 1;
  std::vector<T> buf(4, T(0));
  if (c.rank() == root) buf = {T(3), T(-1), T(4), T(1)};
  c.broadcast(std::span<T>(buf), root);
  EXPECT_EQ(buf, (std::vector<T>{T(3), T(-1), T(4), T(1)}));
  c.barrier();
}

TEST(Comm, BadSizesNameTheArgument) {
  Communicator c = Communicator::world();
  const int P = c.size();
  std::vector<float> in(P * 2 + 1), out(2);
  std::string e = error_of([&] { c.reduce_scatter(std::span<const float>(in), std::span<float>(out)); });
  EXPECT_NE(e.find("reduce_scatter: in has " + std::to_string(P * 2 + 1)), std::string::npos) << e;
  EXPECT_NE(e.find("not divisible by the group size " + std::to_string(P)), std::string::npos) << e;

  std::vector<float> in2(P * 2), out3(3);
  e = error_of([&] { c.reduce_scatter(std::span<const float>(in2), std::span<float>(out3)); });
  EXPECT_NE(e.find("reduce_scatter: out has 3"), std::string::npos) << e;

  std::vector<double> g_in(2), g_out(2 * P + 1);
  e = error_of([&] { c.all_gather(std::span<const double>(g_in), std::span<double>(g_out)); });
  EXPECT_NE(e.find("all_gather: out has"), std::string::npos) << e;

  std::vector<int32_t> a_in(P + 1), a_out(P + 1);
  e = error_of([&] { c.all_to_all(std::span<const int32_t>(a_in), std::span<int32_t>(a_out)); });
  EXPECT_NE(e.find("all_to_all: in has"), std::string::npos) << e;

  std::vector<int64_t> v(4), counts(P, 1), short_counts(P - 1, 1);
  e = error_of([&] {
    c.all_to_all_v(std::span<const int64_t>(v), std::span<const int64_t>(short_counts), std::span<int64_t>(v),
                   std::span<const int64_t>(counts));
  });
  EXPECT_NE(e.find("all_to_all_v: send_counts has"), std::string::npos) << e;
  std::vector<int64_t> v_in(P + 1), v_out(P);
  e = error_of([&] {
    c.all_to_all_v(std::span<const int64_t>(v_in), std::span<const int64_t>(counts), std::span<int64_t>(v_out),
                   std::span<const int64_t>(counts));
  });
  EXPECT_NE(e.find("all_to_all_v: in has " + std::to_string(P + 1)), std::string::npos) << e;

  e = error_of([&] { c.send(std::span<const float>(out), P, 0); });
  EXPECT_NE(e.find("send: dest = " + std::to_string(P)), std::string::npos) << e;
  e = error_of([&] { c.broadcast(std::span<float>(out), -1); });
  EXPECT_NE(e.find("broadcast: root = -1"), std::string::npos) << e;
  c.barrier();  // all ranks still agree after the failed calls
}

// CommCounters (comm.h): one call per operation, the bytes this rank hands over as input.
TEST(CommCounters, ExactCallsAndBytesPerOperation) {
  Communicator c = Communicator::world();
  const int P = c.size(), r = c.rank();
  const uint64_t p = static_cast<uint64_t>(P);
  auto expect = [&](uint64_t calls, uint64_t bytes, const char* after) {
    EXPECT_EQ(c.counters().calls, calls) << "after " << after;
    EXPECT_EQ(c.counters().bytes, bytes) << "after " << after;
  };
  expect(0, 0, "construction");

  std::vector<float> f(5, 1.0f);
  c.all_reduce(std::span<float>(f), ReduceOp::kSum);
  expect(1, 20, "all_reduce of 5 floats");
  std::vector<double> rs_in(P * 3, 1.0), rs_out(3);
  c.reduce_scatter(std::span<const double>(rs_in), std::span<double>(rs_out));
  expect(2, 20 + 24 * p, "reduce_scatter of 3P doubles");
  std::vector<int32_t> g_in(2, r), g_out(2 * P);
  c.all_gather(std::span<const int32_t>(g_in), std::span<int32_t>(g_out));
  expect(3, 28 + 24 * p, "all_gather of 2 int32");
  std::vector<int64_t> a_in(2 * P, r), a_out(2 * P);
  c.all_to_all(std::span<const int64_t>(a_in), std::span<int64_t>(a_out));
  expect(4, 28 + 40 * p, "all_to_all of 2P int64");

  // all_to_all_v: rank r sends (r + q) % 3 floats to q; its bytes are 4 * that sum, the receive side adds nothing.
  std::vector<int64_t> sc(P), rc(P);
  int64_t s_total = 0, r_total = 0;
  for (int q = 0; q < P; ++q) {
    sc[q] = (r + q) % 3;
    rc[q] = (q + r) % 3;
    s_total += sc[q];
    r_total += rc[q];
  }
  std::vector<float> v_in(static_cast<size_t>(s_total)), v_out(static_cast<size_t>(r_total));
  c.all_to_all_v(std::span<const float>(v_in), std::span<const int64_t>(sc), std::span<float>(v_out),
                 std::span<const int64_t>(rc));
  const uint64_t before_bcast = 28 + 40 * p + 4 * static_cast<uint64_t>(s_total);
  expect(5, before_bcast, "all_to_all_v");

  std::vector<int64_t> b(4, 0);
  c.broadcast(std::span<int64_t>(b), P - 1);  // only the root sends
  const uint64_t after_bcast = before_bcast + (r == P - 1 ? 32 : 0);
  expect(6, after_bcast, "broadcast of 4 int64 from the last rank");
  c.barrier();
  expect(7, after_bcast, "barrier");

  // send counts its buffer, recv nothing (even/odd ring as in SendRecvRing).
  uint64_t calls = 7, bytes = after_bcast;
  if (P % 2 == 0) {
    const int next = (r + 1) % P, prev = (r + P - 1) % P;
    std::vector<double> mine(3, r), got(3);
    if (r % 2 == 0) {
      c.send(std::span<const double>(mine), next, 3);
      c.recv(std::span<double>(got), prev, 3);
    } else {
      c.recv(std::span<double>(got), prev, 3);
      c.send(std::span<const double>(mine), next, 3);
    }
    calls += 2;
    bytes += 24;
    expect(calls, bytes, "send + recv of 3 doubles");
  }

  // The bytes summed over the group are the volume put in: all_reduce of 5 floats on every rank = 20 P.
  c.reset_counters();
  expect(0, 0, "reset_counters");
  c.all_reduce(std::span<float>(f), ReduceOp::kMax);
  std::vector<int64_t> mine = {static_cast<int64_t>(c.counters().bytes)};
  Communicator probe = Communicator::world();  // its own counters, so the check does not count itself in c
  probe.all_reduce(std::span<int64_t>(mine), ReduceOp::kSum);
  EXPECT_EQ(mine[0], int64_t(20) * P);
  expect(1, 20, "all_reduce after reset (the probe communicator counts separately)");
  EXPECT_EQ(probe.counters().calls, 1u);
  EXPECT_EQ(probe.counters().bytes, 8u);
}

TEST(CommCounters, RejectedCallsCountNothingAndMovesCarryTheCounts) {
  Communicator c = Communicator::world();
  const int P = c.size();
  std::vector<float> in(P * 2 + 1), out(2);
  EXPECT_NE(error_of([&] { c.reduce_scatter(std::span<const float>(in), std::span<float>(out)); }), "");
  EXPECT_NE(error_of([&] { c.send(std::span<const float>(out), P, 0); }), "");
  EXPECT_EQ(c.counters().calls, 0u);
  EXPECT_EQ(c.counters().bytes, 0u);

  std::vector<int32_t> x(3, 1);
  c.all_reduce(std::span<int32_t>(x), ReduceOp::kSum);
  Communicator moved = std::move(c);
  EXPECT_EQ(moved.counters().calls, 1u);
  EXPECT_EQ(moved.counters().bytes, 12u);
  // The moved-from communicator holds nothing.
  EXPECT_EQ(c.counters().calls, 0u);  // NOLINT(bugprone-use-after-move,clang-analyzer-cplusplus.Move)

  Communicator half = moved.split(moved.rank() % 2, moved.rank());  // split is not traffic, on either side
  EXPECT_EQ(half.counters().calls, 0u);
  EXPECT_EQ(moved.counters().calls, 1u);
  half.barrier();
  EXPECT_EQ(half.counters().calls, 1u);
  EXPECT_EQ(half.counters().bytes, 0u);
  moved.barrier();
}

TEST(ProcessGrid, ValidationNamesTheOptionAndWorldSize) {
  std::string e = error_of([] { validate_grid(3, 1, 4); });
  EXPECT_NE(e.find("parallel.dp * parallel.sp = 3 * 1 = 3"), std::string::npos) << e;
  EXPECT_NE(e.find("world size 4"), std::string::npos) << e;
  e = error_of([] { validate_grid(0, 4, 4); });
  EXPECT_NE(e.find("parallel.dp = 0 must be >= 1 (world size 4)"), std::string::npos) << e;
  e = error_of([] { validate_grid(2, -1, 2); });
  EXPECT_NE(e.find("parallel.sp = -1 must be >= 1"), std::string::npos) << e;
  EXPECT_EQ(error_of([] { validate_grid(2, 2, 4); }), "");

  Communicator w = Communicator::world();
  e = error_of([&] { ProcessGrid g(w, w.size(), 2); });  // 2 * P ranks asked, P present: no split happens
  EXPECT_NE(e.find("world size " + std::to_string(w.size())), std::string::npos) << e;
}

TEST(ProcessGrid, SpFastestSplits) {
  Communicator w = Communicator::world();
  const int P = w.size(), r = w.rank();
  for (int sp = 1; sp <= P; ++sp) {
    if (P % sp != 0) continue;
    const int dp = P / sp;
    ProcessGrid g(w, dp, sp);
    EXPECT_EQ(g.dp(), dp);
    EXPECT_EQ(g.sp(), sp);
    EXPECT_EQ(g.dp_rank(), r / sp) << "dp=" << dp << " sp=" << sp;
    EXPECT_EQ(g.sp_rank(), r % sp) << "dp=" << dp << " sp=" << sp;
    EXPECT_EQ(g.sp_group().size(), sp);
    EXPECT_EQ(g.dp_group().size(), dp);
    EXPECT_EQ(g.sp_group().rank(), g.sp_rank());
    EXPECT_EQ(g.dp_group().rank(), g.dp_rank());
    // The SP group holds consecutive world ranks; the DP group strides by sp.
    std::vector<int32_t> me = {r}, sp_members(sp), dp_members(dp);
    g.sp_group().all_gather(std::span<const int32_t>(me), std::span<int32_t>(sp_members));
    g.dp_group().all_gather(std::span<const int32_t>(me), std::span<int32_t>(dp_members));
    for (int j = 0; j < sp; ++j) EXPECT_EQ(sp_members[j], g.dp_rank() * sp + j) << "dp=" << dp << " sp=" << sp;
    for (int j = 0; j < dp; ++j) EXPECT_EQ(dp_members[j], j * sp + g.sp_rank()) << "dp=" << dp << " sp=" << sp;
    // A reduction inside the SP group sums only its members.
    std::vector<int64_t> s = {r};
    g.sp_group().all_reduce(std::span<int64_t>(s), ReduceOp::kSum);
    EXPECT_EQ(s[0], int64_t(g.dp_rank() * sp * sp + sp * (sp - 1) / 2));
  }
}

// Run only by tests/parallel/check_abort.sh (HYD_TEST_ABORT=1): rank 1 throws while the others wait in
// a barrier; run_or_abort must end the whole job with a nonzero status instead of a hang.
TEST(RunOrAbort, ExceptionOnOneRankEndsTheJob) {
  if (!std::getenv("HYD_TEST_ABORT")) GTEST_SKIP() << "run by check_abort.sh";
  Communicator w = Communicator::world();
  const int rank = w.rank();
  run_or_abort([&]() -> int {
    if (rank == 1) throw Error("deliberate failure for the abort test");
    w.barrier();
    return 0;
  });
  ADD_FAILURE() << "rank " << rank << " returned from a job that should have been aborted";
}

}  // namespace
}  // namespace hyd

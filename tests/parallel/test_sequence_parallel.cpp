// Sequence parallelism on the CPU (PARALLEL.md tests): the hybrid student (KDA, NoPE and RoPE attention
// layers) run as SP = P slices of one micro-batch gives the loss and every gradient of the whole batch in
// one process (fp32, relative error < 1e-5), with documents that cross one or several rank boundaries,
// documents shorter than a KDA chunk, a document of one token at a slice start and one ending exactly on a
// slice boundary. Also: SP = 2 groups inside a 4-rank world (dp 2 x sp 2), the slicing itself, and the
// per-layer traffic of the KDA layers (state transitions, conv halos), which does not change with T.
// Runs under mpirun -np 2 and -np 4.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/kda.h"
#include "parallel/comm.h"
#include "parallel/grid.h"
#include "parallel/sequence_parallel.h"
#include "tests/common/tiny_model.h"
#include "tests/parallel/sp_test_util.h"
#include "trainer/batch_upload.h"
#include "trainer/hybrid_model.h"
#include "trainer/lasp.h"

namespace hyd {
namespace {

// A CPU Batch viewing hb's vectors.
Batch view(HostBatch& hb, const SequenceParallel* sp) {
  const auto n = static_cast<int64_t>(hb.tokens.size());
  Batch b;
  b.tokens = Tensor(hb.tokens.data(), DType::i32, Device::cpu(), {n});
  b.targets = Tensor(hb.targets.data(), DType::i32, Device::cpu(), {n});
  b.positions = Tensor(hb.positions.data(), DType::i32, Device::cpu(), {n});
  b.cu_seqlens = Tensor(hb.cu_seqlens.data(), DType::i32, Device::cpu(), {hb.num_docs + 1});
  b.num_tokens = n;
  b.num_docs = hb.num_docs;
  b.max_doc_len = max_doc_len(hb.cu_seqlens);
  b.num_targets = hb.num_targets;
  b.sp = sp;
  return b;
}

struct Grads {
  double loss = 0;
  std::vector<std::vector<float>> g;  // per parameter
};

Grads grads_of(HybridModel& m, double loss) {
  Grads out;
  out.loss = loss;
  for (const ParamInfo& p : m.params()) out.g.push_back(m.get_grad(p.name));
  return out;
}

// ||a - b|| / ||b|| over every gradient (all parameters as one vector), and the largest of the same per
// parameter (with its index in *worst).
std::pair<double, double> rel_errors(const Grads& a, const Grads& b, size_t* worst) {
  double w = 0, num_all = 0, den_all = 0;
  for (size_t i = 0; i < a.g.size(); ++i) {
    double num = 0, den = 0;
    for (size_t j = 0; j < a.g[i].size(); ++j) {
      const double d = static_cast<double>(a.g[i][j]) - b.g[i][j];
      num += d * d;
      den += static_cast<double>(b.g[i][j]) * b.g[i][j];
    }
    num_all += num;
    den_all += den;
    const double r = std::sqrt(num) / std::max(std::sqrt(den), 1e-20);
    if (r > w) {
      w = r;
      *worst = i;
    }
  }
  return {std::sqrt(num_all) / std::max(std::sqrt(den_all), 1e-20), w};
}

// Weights as the model initialises them (std 0.1, FLA's A_log / dt_bias), from a fresh seed per run,
// rank 0's everywhere. (test::randomize_hybrid's O(1) weights make a 4-layer fp32 network chaotic enough
// that two summation orders differ by ~1e-5 in the gradients: an amplification that would test rounding,
// not the algorithm, which the KDA-core test above pins at ~1e-8.)
void same_weights(const Communicator& group, HybridModel& m) {
  std::vector<int64_t> seed{static_cast<int64_t>(test::rng()() >> 1)};
  group.broadcast(std::span<int64_t>(seed), 0);
  m.init_random(static_cast<uint64_t>(seed[0]), 0.1f);
  const Tensor flat = m.flat_params();
  group.broadcast(std::span<float>(flat.ptr<float>(), static_cast<size_t>(flat.numel())), 0);
}

// The whole batch in one process vs the SP group's slices: loss and summed gradients.
void check_equivalence(const Communicator& group, const std::string& pattern, const std::string& variant,
                       int32_t slice) {
  const int P = group.size(), r = group.rank();
  const HybridConfig cfg = test::tiny_hybrid_config(pattern, static_cast<int64_t>(pattern.size()), variant);
  const int64_t T = static_cast<int64_t>(P) * slice, rows = 2;
  HostBatch global = test::make_global(T, test::doc_plan(P, slice), cfg.model.vocab_size, 77);
  HybridModel model(cfg, Device::cpu(), rows * T);
  same_weights(group, model);
  ExecContext ctx(Device::cpu());

  model.zero_grad();
  const Grads ref = grads_of(model, model.forward_backward(ctx, view(global, nullptr)));

  SequenceParallel sp(group, Device::cpu());
  SpLayout layout;
  HostBatch local = slice_batch_for_sp(global, rows, T, r, P, layout);
  sp.set_layout(layout);
  // Every rank's loss is its share of the group's mean: gradients of all ranks add up to the whole batch's.
  const double share = static_cast<double>(local.num_targets) / static_cast<double>(global.num_targets);
  model.zero_grad();
  const double local_mean = model.forward_backward(ctx, view(local, &sp), static_cast<float>(share));
  Grads got = grads_of(model, local_mean * share);
  std::vector<double> loss{got.loss};
  group.all_reduce(std::span<double>(loss), ReduceOp::kSum);
  got.loss = loss[0];
  for (auto& g : got.g) group.all_reduce(std::span<float>(g), ReduceOp::kSum);

  EXPECT_NEAR(got.loss, ref.loss, 1e-5 * std::abs(ref.loss)) << pattern << " rank " << r;
  size_t worst = 0;
  const auto [rel, rel_param] = rel_errors(got, ref, &worst);
  const std::string worst_name = model.params()[worst].name;
  if (r == 0)
    std::printf("SP %d %s/%s slice %d: loss %.9g vs %.9g; gradient rel. err %.3g, worst parameter %.3g (%s)\n", P,
                pattern.c_str(), variant.c_str(), slice, got.loss, ref.loss, rel, rel_param, worst_name.c_str());
  // fp32 on both sides, different summation orders (the state enters through M and B, weight gradients are
  // summed per rank): the whole gradient within 1e-5, each parameter's within 1e-4.
  EXPECT_LT(rel, 1e-5) << pattern << " rank " << r;
  EXPECT_LT(rel_param, 1e-4) << pattern << " rank " << r << ": parameter " << worst_name;
}

TEST(SequenceParallel, SliceLayoutOfTheDocumentPlan) {
  Communicator world = Communicator::world();
  const int P = world.size();
  const int32_t slice = 32;
  const int64_t T = P * slice;
  HostBatch global = test::make_global(T, test::doc_plan(P, slice), 50, 1);
  int64_t targets = 0;
  for (int r = 0; r < P; ++r) {
    SpLayout L;
    HostBatch local = slice_batch_for_sp(global, 2, T, r, P, L);
    targets += local.num_targets;
    ASSERT_EQ(local.tokens.size(), static_cast<size_t>(2 * slice));
    // Row 0: the long document continues into and out of every middle rank.
    EXPECT_EQ(L.lead[0], r == 0 ? 0 : r * slice - 3) << "rank " << r;
    EXPECT_EQ(L.cont_out[0], r + 1 < P ? 1 : 0) << "rank " << r;
    if (r > 0 && r + 1 < P) {
      EXPECT_EQ(L.first_doc[0], L.last_doc[0]);
    }
    // Row 1: a document ends exactly at the first boundary; nothing continues across it.
    if (r == 0) {
      EXPECT_EQ(L.cont_out[1], 0);
    }
    if (r == 1) {
      EXPECT_EQ(L.lead[1], 0);
    }
    // LASP-2H key ranges partition the gathered keys; query ranges partition the local tokens.
    EXPECT_EQ(L.cu_k.back(), 2 * T);
    EXPECT_EQ(L.cu_q.back(), 2 * slice);
    for (size_t d = 1; d < L.cu_k.size(); ++d) {
      EXPECT_LE(L.cu_k[d - 1], L.cu_k[d]);
      EXPECT_LE(L.cu_q[d - 1], L.cu_q[d]);
      // Causal alignment at the end: a document never has more queries than keys.
      EXPECT_LE(L.cu_q[d] - L.cu_q[d - 1], L.cu_k[d] - L.cu_k[d - 1]);
    }
  }
  EXPECT_EQ(targets, global.num_targets);

  // Balanced LASP-2H: the ranks' two half-slices cover every half-slice once, rank r's are r and 2P - 1 - r,
  // and their boundaries partition the packed queries and the gathered keys like the slice's; an odd slice
  // (or HYD_SP_ATTN_BALANCE=0) keeps every rank on its own slice.
  const test::ScopedEnv balance("HYD_SP_ATTN_BALANCE");  // put back at the end
  ::unsetenv("HYD_SP_ATTN_BALANCE");
  std::vector<int> covered(2 * P, 0);
  for (int r = 0; r < P; ++r) {
    SpLayout L;
    slice_batch_for_sp(global, 2, T, r, P, L);
    ASSERT_TRUE(L.balanced);
    EXPECT_EQ(L.work[0].chunk, r);
    EXPECT_EQ(L.work[1].chunk, 2 * P - 1 - r);
    for (const SpLayout::Work& w : L.work) {
      ++covered[static_cast<size_t>(w.chunk)];
      EXPECT_EQ(w.cu_q.back(), 2 * slice / 2);
      EXPECT_EQ(w.cu_k.back(), 2 * T);
      for (size_t d = 1; d < w.cu_k.size(); ++d) {
        EXPECT_LE(w.cu_k[d - 1], w.cu_k[d]);
        EXPECT_LE(w.cu_q[d - 1], w.cu_q[d]);
        EXPECT_LE(w.cu_q[d] - w.cu_q[d - 1], w.cu_k[d] - w.cu_k[d - 1]);
      }
      EXPECT_LE(w.max_len_q, slice / 2);
    }
  }
  for (int c = 0; c < 2 * P; ++c) EXPECT_EQ(covered[static_cast<size_t>(c)], 1) << "half-slice " << c;
  SpLayout odd;
  HostBatch g_odd = test::make_global(P * 31, test::doc_plan(P, 31), 50, 1);
  slice_batch_for_sp(g_odd, 2, P * 31, 0, P, odd);
  EXPECT_FALSE(odd.balanced) << "slice 31 cannot be halved";
  balance.set("0");
  SpLayout off;
  slice_batch_for_sp(global, 2, T, 0, P, off);
  EXPECT_FALSE(off.balanced);
}

// The KDA core alone: LASP-2 over the slices equals the whole sequences (outputs and every input gradient,
// compared on this rank's tokens), for gates from near 0 to strong decay.
// Plans: the crossing documents of test::doc_plan, and documents that end on every slice boundary (no rank
// passes a state on: each rank then runs its single forward and backward).
// `plan` (two rows of P x 32 tokens) over the group of `sp`, which takes the plan's layout.
void check_core(const Communicator& world, SequenceParallel& sp, const std::vector<std::vector<int32_t>>& plan,
                const char* what) {
  const int P = world.size(), r = world.rank();
  const int32_t slice = 32;
  const int64_t T = static_cast<int64_t>(P) * slice, rows = 2, N = rows * T, H = 2, HV = 4, dk = 8, dv = 8;
  HostBatch global = test::make_global(T, plan, 10, 3);
  std::mt19937_64 gen(11);  // the same inputs on every rank
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  auto fill = [&](int64_t n, auto f) {
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = f();
    return v;
  };
  auto unit_rows = [&](std::vector<float> v) {  // q, k are L2-normalised per head in the layer
    for (size_t i = 0; i < v.size(); i += dk) {
      double n2 = 0;
      for (int64_t c = 0; c < dk; ++c) n2 += v[i + c] * v[i + c];
      for (int64_t c = 0; c < dk; ++c) v[i + c] = static_cast<float>(v[i + c] / std::sqrt(n2));
    }
    return v;
  };
  std::vector<float> q = unit_rows(fill(N * H * dk, [&] { return nd(gen); }));
  std::vector<float> k = unit_rows(fill(N * H * dk, [&] { return nd(gen); }));
  std::vector<float> v = fill(N * HV * dv, [&] { return nd(gen); });
  std::vector<float> g = fill(N * HV * dk, [&] { return -std::exp(3.0f * ud(gen) - 4.0f); });  // -0.02 .. -1
  std::vector<float> beta = fill(N * HV, [&] { return ud(gen); });
  std::vector<float> dout = fill(N * HV * dv, [&] { return nd(gen); });
  ExecContext ctx(Device::cpu());
  auto t = [](std::vector<float>& x, std::initializer_list<int64_t> dims) {
    return Tensor(x.data(), DType::f32, Device::cpu(), dims);
  };
  struct Run {
    std::vector<float> o, dq, dk, dv, dg, dbeta;
  };
  auto run = [&](int64_t n, std::vector<float>& q_, std::vector<float>& k_, std::vector<float>& v_,
                 std::vector<float>& g_, std::vector<float>& b_, std::vector<float>& do_, std::vector<int32_t>& cu,
                 const SequenceParallel* sp) {
    Run out{std::vector<float>(n * HV * dv), std::vector<float>(n * H * dk),  std::vector<float>(n * H * dk),
            std::vector<float>(n * HV * dv), std::vector<float>(n * HV * dk), std::vector<float>(n * HV)};
    const auto D = static_cast<int64_t>(cu.size()) - 1;
    const Tensor Q = t(q_, {n, H, dk}), K = t(k_, {n, H, dk}), V = t(v_, {n, HV, dv}), G = t(g_, {n, HV, dk}),
                 B = t(b_, {n, HV}), DO = t(do_, {n, HV, dv}),
                 CU = Tensor(cu.data(), DType::i32, Device::cpu(), {D + 1});
    const Tensor O = t(out.o, {n, HV, dv}), DQ = t(out.dq, {n, H, dk}), DK = t(out.dk, {n, H, dk}),
                 DV = t(out.dv, {n, HV, dv}), DG = t(out.dg, {n, HV, dk}), DB = t(out.dbeta, {n, HV});
    if (sp == nullptr) {
      kernels::kda_forward(ctx, Q, K, V, G, B, CU, Tensor{}, O, Tensor{});
      kernels::kda_backward(ctx, Q, K, V, G, B, CU, Tensor{}, DO, Tensor{}, DQ, DK, DV, DG, DB, Tensor{});
    } else {
      lasp_kda_forward(ctx, *sp, &out, Q, K, V, G, B, CU, O);
      lasp_kda_backward(ctx, *sp, &out, Q, K, V, G, B, CU, DO, DQ, DK, DV, DG, DB);
    }
    return out;
  };
  const Run whole = run(N, q, k, v, g, beta, dout, global.cu_seqlens, nullptr);

  SpLayout layout;
  HostBatch local = slice_batch_for_sp(global, rows, T, r, P, layout);
  sp.set_layout(layout);
  // This rank's tokens of a per-token array with `w` values per token.
  auto mine = [&](const std::vector<float>& x, int64_t w) {
    std::vector<float> y;
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t t0 = b * T + r * slice;
      y.insert(y.end(), x.begin() + t0 * w, x.begin() + (t0 + slice) * w);
    }
    return y;
  };
  std::vector<float> lq = mine(q, H * dk), lk = mine(k, H * dk), lv = mine(v, HV * dv), lg = mine(g, HV * dk),
                     lb = mine(beta, HV), ldo = mine(dout, HV * dv);
  const Run part = run(rows * slice, lq, lk, lv, lg, lb, ldo, local.cu_seqlens, &sp);
  auto rel = [](const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
      den += static_cast<double>(b[i]) * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-30));
  };
  const double e_o = rel(part.o, mine(whole.o, HV * dv)), e_dq = rel(part.dq, mine(whole.dq, H * dk)),
               e_dk = rel(part.dk, mine(whole.dk, H * dk)), e_dv = rel(part.dv, mine(whole.dv, HV * dv)),
               e_dg = rel(part.dg, mine(whole.dg, HV * dk)), e_db = rel(part.dbeta, mine(whole.dbeta, HV));
  std::printf("rank %d %s KDA core rel. err: o %.2g dq %.2g dk %.2g dv %.2g dg %.2g dbeta %.2g\n", r, what, e_o, e_dq,
              e_dk, e_dv, e_dg, e_db);
  for (double e : {e_o, e_dq, e_dk, e_dv, e_dg, e_db}) EXPECT_LT(e, 1e-5) << what << " rank " << r;
}

std::vector<std::vector<int32_t>> aligned_plan(int P, int32_t slice) {
  return std::vector<std::vector<int32_t>>(2, std::vector<int32_t>(P, slice));
}

class KdaCore : public ::testing::TestWithParam<bool> {};

TEST_P(KdaCore, LaspMatchesTheWholeSequences) {
  Communicator world = Communicator::world();
  SequenceParallel sp(world, Device::cpu());
  const int P = world.size();
  check_core(world, sp, GetParam() ? aligned_plan(P, 32) : test::doc_plan(P, 32), "");
}

INSTANTIATE_TEST_SUITE_P(Plans, KdaCore, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "AlignedDocuments" : "CrossingDocuments"; });

// The block exchange of balanced LASP-2H over MPI (test::check_exchange).
TEST(SequenceParallel, ExchangeMovesBlocksInListOrder) {
  Communicator world = Communicator::world();
  SequenceParallel sp(world, Device::cpu());
  test::check_exchange(sp, ExecContext(Device::cpu()));
}

// A caller's record of a buffer's contents lasts as long as the contents do: kept while the buffer keeps its
// storage, cleared when a larger request reallocates it.
TEST(SequenceParallel, BufferKeyLastsAsLongAsTheContents) {
  Communicator world = Communicator::world();
  SequenceParallel sp(world, Device::cpu());
  const int owner = 0;
  const Tensor a = sp.buffer(&owner, 3, {64}, DType::f32);
  a.ptr<float>()[5] = 7.0f;
  EXPECT_TRUE(sp.buffer_key(&owner, 3).empty());
  sp.buffer_key(&owner, 3) = {1, 2, 3};
  const Tensor b = sp.buffer(&owner, 3, {32}, DType::f32);  // fits: same storage, same contents
  EXPECT_EQ(b.ptr<float>()[5], 7.0f);
  EXPECT_EQ(sp.buffer_key(&owner, 3), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_TRUE(sp.buffer_key(&owner, 4).empty()) << "another slot has its own record";
  sp.buffer(&owner, 3, {1 << 16}, DType::f32);  // grows: new storage, the record is gone
  EXPECT_TRUE(sp.buffer_key(&owner, 3).empty());
}

// One group through changing layouts, as in training: its buffers keep contents between calls, and what depends
// on the layout alone (the transition passes' identity states) is rewritten only when the layout changes; each
// batch must still equal the whole sequences.
TEST(SequenceParallel, OneGroupAcrossLayouts) {
  Communicator world = Communicator::world();
  SequenceParallel sp(world, Device::cpu());
  const int P = world.size(), T = P * 32;
  const std::vector<std::vector<int32_t>> shifted = {{T - 8, 8}, {1, T - 1}};  // documents from the row starts
  check_core(world, sp, test::doc_plan(P, 32), "plan");
  check_core(world, sp, shifted, "shifted");
  check_core(world, sp, aligned_plan(P, 32), "aligned");
  check_core(world, sp, shifted, "shifted again");
  check_core(world, sp, test::doc_plan(P, 32), "plan again");
}

TEST(SequenceParallel, HybridMatchesTheWholeBatch) {
  Communicator world = Communicator::world();
  check_equivalence(world, "KAKT", "llama", 32);
  check_equivalence(world, "KTA", "qwen3", 32);
}

TEST(SequenceParallel, SlicesOfOneChunkAndLonger) {
  Communicator world = Communicator::world();
  check_equivalence(world, "KA", "qwen2", 64);
  check_equivalence(world, "K", "llama", 80);
}

TEST(SequenceParallel, TwoGroupsOfTwoInsideTheWorld) {
  Communicator world = Communicator::world();
  if (world.size() != 4) GTEST_SKIP() << "dp 2 x sp 2 needs 4 ranks";
  ProcessGrid grid(world, 2, 2);
  check_equivalence(grid.sp_group(), "KAKA", "llama", 32);
}

// The KDA traffic per layer is O(H dk (dk + dv)) per sequence: the same bytes for T and 4T.
TEST(SequenceParallel, KdaTrafficDoesNotGrowWithT) {
  Communicator world = Communicator::world();
  const int P = world.size(), r = world.rank();
  const HybridConfig cfg = test::tiny_hybrid_config("KKA", 3, "llama");
  std::vector<int64_t> kda_bytes, halo_bytes, attn_bytes;
  for (int32_t slice : {32, 128}) {
    const int64_t T = static_cast<int64_t>(P) * slice;
    HostBatch global = test::make_global(T, test::doc_plan(P, slice), cfg.model.vocab_size, 5);
    HybridModel model(cfg, Device::cpu(), 2 * T);
    same_weights(world, model);
    ExecContext ctx(Device::cpu());
    SequenceParallel sp(world, Device::cpu());
    SpLayout layout;
    HostBatch local = slice_batch_for_sp(global, 2, T, r, P, layout);
    sp.set_layout(layout);
    model.zero_grad();
    model.forward_backward(ctx, view(local, &sp));
    kda_bytes.push_back(sp.traffic(SpTraffic::kda_state).bytes);
    halo_bytes.push_back(sp.traffic(SpTraffic::conv_halo).bytes);
    attn_bytes.push_back(sp.traffic(SpTraffic::attention_kv).bytes);
    // Two KDA layers x (one all-gather forward + one backward).
    EXPECT_EQ(sp.traffic(SpTraffic::kda_state).calls, 4);
    if (r == 0)
      std::printf(
          "T per rank %d: per KDA layer %lld bytes of state transitions, %lld of conv halos; attention K/V "
          "%lld bytes\n",
          slice, static_cast<long long>(kda_bytes.back() / 2), static_cast<long long>(halo_bytes.back() / 2),
          static_cast<long long>(attn_bytes.back()));
  }
  const int64_t hv = cfg.kda.v_heads, dk = cfg.kda.dk, dv = cfg.kda.dv;
  // Forward (M, B) and backward L, 2 rows, fp32.
  EXPECT_EQ(kda_bytes[0], 2 * 2 * hv * (dk * (dk + dv) + dk * dv) * 4);
  EXPECT_EQ(kda_bytes[1], kda_bytes[0]);
  EXPECT_EQ(halo_bytes[1], halo_bytes[0]);
  EXPECT_GT(halo_bytes[0], 0);
  EXPECT_EQ(attn_bytes[1], 4 * attn_bytes[0]);  // LASP-2H gathers K and V: linear in T
}

}  // namespace
}  // namespace hyd

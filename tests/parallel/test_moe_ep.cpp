// Expert parallelism on the CPU (PARALLEL.md; MoeExpertParallel in trainer/layer_moe.h), under mpirun -np 2
// and -np 4: EP = P equals EP = 1. Every rank holds the same f64 weights and its own 12 tokens; the
// reference runs the plain layer on all ranks' tokens in one call. Compared: each rank's outputs and input
// gradients (its rows of the reference), the router and shared-expert gradients summed over the ranks, and
// every routed expert's gradient (present on its owner rank only, so the sum over ranks). Configurations:
// softmax + norm_topk_prob with a shared expert; sigmoid + route scale with a selection bias that sends
// every token to expert 5 (one rank receives every row, the others' experts none); and k = E / P. Also a layer
// storing only its rank's experts (expert-sharded storage) against one storing all of them.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "parallel/comm.h"
#include "trainer/core/arena.h"
#include "trainer/layer_moe.h"

namespace hyd {
namespace {

std::vector<double> randn(size_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<double> v(n);
  for (double& x : v) x = d(g);
  return v;
}

double rel(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

struct Run {
  std::vector<double> out, dx;
  double aux = 0;
};

// Forward + backward of layer L on x [n, D] with output gradient dout; gradients accumulate in its weights.
Run run_layer(const MoeLayer& L, const std::vector<double>& x, const std::vector<double>& dout, int64_t n,
              const MoeExpertParallel* ep) {
  const int64_t D = L.cfg.hidden;
  ExecContext ctx(Device::cpu());
  ArenaSizer sizer;
  (void)L.alloc_saved(sizer, n, DType::f64);
  Arena saved_arena("moe saved", Device::cpu(), sizer.used() + 4096);
  ArenaSizer sizer2;
  (void)L.alloc_scratch(sizer2, n, DType::f64);
  Arena scratch("moe scratch", Device::cpu(), sizer2.used() + 4096);
  MoeLayer::Saved s = L.alloc_saved(saved_arena, n, DType::f64);
  Run r;
  r.out.assign(static_cast<size_t>(n * D), 0.0);
  r.dx.assign(static_cast<size_t>(n * D), 0.0);
  std::vector<double> xin = x, g = dout;
  const Tensor tx(xin.data(), DType::f64, Device::cpu(), {n, D}), to(r.out.data(), DType::f64, Device::cpu(), {n, D});
  r.aux = L.forward(ctx, tx, to, s, ep);
  L.backward(ctx, s, Tensor(g.data(), DType::f64, Device::cpu(), {n, D}),
             Tensor(r.dx.data(), DType::f64, Device::cpu(), {n, D}), scratch, 1.0, ep);
  return r;
}

Run run(const MoeLayerWeights& w, const std::vector<double>& x, const std::vector<double>& dout, int64_t n,
        const MoeExpertParallel* ep) {
  return run_layer(w.layer(), x, dout, n, ep);
}

void check(const MoeConfig& cfg, const std::string& what, double bias_on_5) {
  SCOPED_TRACE(what);
  Communicator world = Communicator::world();
  const int P = world.size(), r = world.rank();
  const int64_t n = 12, D = cfg.hidden;
  MoeLayerWeights ref(cfg, Device::cpu(), DType::f64), par(cfg, Device::cpu(), DType::f64);
  for (MoeLayerWeights* w : {&ref, &par}) {
    w->init_random(17, 0.4f);
    if (cfg.use_selection_bias) {
      std::vector<double> b(static_cast<size_t>(cfg.num_experts), 0.0);
      b[5] = bias_on_5;
      w->set_param("mlp.gate.e_score_correction_bias", b);
    }
    w->zero_grad();
  }
  // All ranks' tokens and output gradients (rank q's rows are [q n, (q + 1) n)).
  const std::vector<double> x_all = randn(static_cast<size_t>(P * n * D), 5), g_all = randn(x_all.size(), 6);
  const Run whole = run(ref, x_all, g_all, P * n, nullptr);

  MoeExpertParallel ep(world);
  const std::vector<double> x(x_all.begin() + r * n * D, x_all.begin() + (r + 1) * n * D);
  const std::vector<double> g(g_all.begin() + r * n * D, g_all.begin() + (r + 1) * n * D);
  const Run mine = run(par, x, g, n, &ep);
  const std::vector<double> out_ref(whole.out.begin() + r * n * D, whole.out.begin() + (r + 1) * n * D);
  const std::vector<double> dx_ref(whole.dx.begin() + r * n * D, whole.dx.begin() + (r + 1) * n * D);
  EXPECT_LT(rel(mine.out, out_ref), 1e-12) << "rank " << r;
  EXPECT_LT(rel(mine.dx, dx_ref), 1e-12) << "rank " << r;
  // Received rows: all k n P pairs land somewhere.
  std::vector<int64_t> rows{ep.last_received_rows(par.layer())};
  world.all_reduce(std::span<int64_t>(rows), ReduceOp::kSum);
  EXPECT_EQ(rows[0], P * n * cfg.top_k);

  for (const MoeLayerWeights::Param& p : par.params()) {
    if (!p.trainable) continue;
    std::vector<double> got = par.get_grad(p.name);
    const bool routed = p.name.rfind("mlp.experts.", 0) == 0;
    if (routed) {
      // Only the owner rank holds a routed expert's gradient.
      const int e = std::stoi(p.name.substr(12));
      const int owner = static_cast<int>(e / (cfg.num_experts / P));
      if (r != owner) {
        for (double v : got) ASSERT_EQ(v, 0.0) << p.name << " on rank " << r;
      }
    }
    world.all_reduce(std::span<double>(got), ReduceOp::kSum);
    const std::vector<double> want = ref.get_grad(p.name);
    double norm = 0;
    for (double v : want) norm += v * v;
    if (norm == 0) {
      for (double v : got) EXPECT_EQ(v, 0.0) << p.name;
    } else {
      EXPECT_LT(rel(got, want), 1e-12) << p.name << " rank " << r;
    }
  }
}

MoeConfig config() {
  MoeConfig c;
  c.hidden = 8;
  c.num_experts = 8;
  c.top_k = 2;
  c.expert_ffn = 6;
  return c;
}

TEST(MoeExpertParallel, SoftmaxNormalisedWithSharedExpert) {
  MoeConfig c = config();
  c.norm_topk_prob = true;
  c.num_shared_experts = 1;
  c.shared_ffn = 4;
  check(c, "softmax + norm_topk_prob + shared", 0.0);
}

TEST(MoeExpertParallel, EveryTokenToOneExpert) {
  MoeConfig c = config();
  c.score_func = "sigmoid";
  c.route_scale = 2.5f;
  c.use_selection_bias = true;
  check(c, "sigmoid + bias 1e3 on expert 5", 1e3);
}

TEST(MoeExpertParallel, TopKOfHalfTheExperts) {
  MoeConfig c = config();
  c.top_k = 4;
  check(c, "k = 4", 0.0);
}

// Expert-sharded storage: a layer whose gate_up / down hold only this rank's E / P experts (views of those rows
// here) computes exactly what the layer holding every expert does under the same expert parallelism:
// outputs, input gradients and its experts' gradients bit for bit. A storage of any other size is refused.
TEST(MoeExpertParallel, LocalExpertStorageEqualsFullStorage) {
  MoeConfig c = config();
  c.norm_topk_prob = true;
  c.num_shared_experts = 1;
  c.shared_ffn = 4;
  Communicator world = Communicator::world();
  const int P = world.size(), r = world.rank();
  const int64_t n = 12, D = c.hidden, El = c.num_experts / P;
  MoeLayerWeights full(c, Device::cpu(), DType::f64), local(c, Device::cpu(), DType::f64);
  for (MoeLayerWeights* w : {&full, &local}) {
    w->init_random(23, 0.4f);
    w->zero_grad();
  }
  MoeLayer sharded = local.layer();
  for (WeightRef* w : {&sharded.gate_up, &sharded.down}) {
    w->value = w->value.slice0(r * El, (r + 1) * El);
    w->grad = w->grad.slice0(r * El, (r + 1) * El);
  }
  const std::vector<double> x = randn(static_cast<size_t>(n * D), 40 + r), g = randn(x.size(), 50 + r);
  MoeExpertParallel ep(world);
  const hyd::Run a = run(full, x, g, n, &ep), b = run_layer(sharded, x, g, n, &ep);
  EXPECT_EQ(b.out, a.out);
  EXPECT_EQ(b.dx, a.dx);
  for (const MoeLayerWeights::Param& p : full.params()) {
    if (!p.trainable) continue;
    EXPECT_EQ(local.get_grad(p.name), full.get_grad(p.name)) << p.name << " on rank " << r;
  }
  MoeLayer wrong = local.layer();
  wrong.gate_up.value = wrong.gate_up.value.slice0(0, El > 1 ? El - 1 : 2);
  std::string msg;
  try {
    run_layer(wrong, x, g, n, &ep);
  } catch (const Error& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("expert-sharded storage"), std::string::npos) << msg;
}

}  // namespace
}  // namespace hyd

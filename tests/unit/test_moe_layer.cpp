// The MoE FFN layer on the CPU (trainer/layer_moe.h): the forward against a naive per-token loop written
// here (no permutation; weights read through the HF names); every gradient (x, router, routed experts,
// shared experts, through norm_topk_prob, softmax / sigmoid and the aux loss) against central finite
// differences in float64, with inputs redrawn until the top-k choice is stable under the step; an expert
// with zero tokens and a selection bias that sends every token to one expert; the permutation (counts,
// grouping, inverse, un-permute of permute); the auxiliary-loss-free bias update on hand-made loads;
// config errors; the parameter names and their views of the concatenated storage; d_aux scaling of the aux
// gradient; ArenaSizer sizes of alloc_saved / alloc_scratch.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "tests/common/test_util.h"
#include "trainer/layer_moe.h"

namespace hyd {
namespace {

using test::randn_f64;
using test::rel_err;

MoeConfig base_config() {
  MoeConfig c;
  c.hidden = 8;
  c.num_experts = 4;
  c.top_k = 2;
  c.expert_ffn = 6;
  return c;
}

// ------------------------------------------------------------------ naive reference (per token, f64)

struct NaiveResult {
  std::vector<double> out;  // [N, D]
  double aux = 0;
  double min_margin = 0;  // min over tokens of sel(k-th) - sel((k+1)-th) (inf when k = E)
  std::vector<int64_t> load;
};

std::vector<double> naive_ffn(const std::vector<double>& x, const std::vector<double>& g, const std::vector<double>& u,
                              const std::vector<double>& d, int64_t D, int64_t F) {
  std::vector<double> act(F), y(D, 0.0);
  for (int64_t f = 0; f < F; ++f) {
    double a = 0, b = 0;
    for (int64_t i = 0; i < D; ++i) {
      a += g[f * D + i] * x[i];
      b += u[f * D + i] * x[i];
    }
    act[f] = a / (1 + std::exp(-a)) * b;
  }
  for (int64_t i = 0; i < D; ++i)
    for (int64_t f = 0; f < F; ++f) y[i] += d[i * F + f] * act[f];
  return y;
}

NaiveResult naive_forward(const MoeConfig& c, const MoeLayerWeights& w, const std::vector<double>& x) {
  const int64_t D = c.hidden, E = c.num_experts, K = c.top_k, N = static_cast<int64_t>(x.size()) / D;
  const std::vector<double> wr = w.get_param("mlp.gate.weight");
  std::vector<double> bias(E, 0.0);
  if (c.use_selection_bias) bias = w.get_param("mlp.gate.e_score_correction_bias");
  auto expert = [&](const std::string& p, int64_t e, const char* name) {
    return w.get_param(p + std::to_string(e) + "." + name + ".weight");
  };
  NaiveResult r;
  r.out.assign(N * D, 0.0);
  r.load.assign(E, 0);
  r.min_margin = std::numeric_limits<double>::infinity();
  std::vector<double> psum(E, 0.0);
  for (int64_t t = 0; t < N; ++t) {
    std::vector<double> xt(x.begin() + t * D, x.begin() + (t + 1) * D), s(E);
    for (int64_t e = 0; e < E; ++e) {
      double l = 0;
      for (int64_t i = 0; i < D; ++i) l += wr[e * D + i] * xt[i];
      s[e] = l;
    }
    if (c.score_func == "sigmoid") {
      for (double& v : s) v = 1 / (1 + std::exp(-v));
    } else {
      const double mx = *std::max_element(s.begin(), s.end());
      double z = 0;
      for (double& v : s) z += (v = std::exp(v - mx));
      for (double& v : s) v /= z;
    }
    for (int64_t e = 0; e < E; ++e) psum[e] += s[e];
    std::vector<int64_t> idx(E);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return s[a] + bias[a] > s[b] + bias[b]; });
    if (K < E) r.min_margin = std::min(r.min_margin, (s[idx[K - 1]] + bias[idx[K - 1]]) - (s[idx[K]] + bias[idx[K]]));
    double z = 0;
    for (int64_t j = 0; j < K; ++j) z += s[idx[j]];
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = idx[j];
      ++r.load[e];
      double wj = s[e];
      if (c.norm_topk_prob) wj /= z;
      wj *= c.route_scale;
      const std::vector<double> y =
          naive_ffn(xt, expert("mlp.experts.", e, "gate_proj"), expert("mlp.experts.", e, "up_proj"),
                    expert("mlp.experts.", e, "down_proj"), D, c.expert_ffn);
      for (int64_t i = 0; i < D; ++i) r.out[t * D + i] += wj * y[i];
    }
    for (int64_t sh = 0; sh < c.num_shared_experts; ++sh) {
      const std::vector<double> y =
          naive_ffn(xt, expert("mlp.shared_experts.", sh, "gate_proj"), expert("mlp.shared_experts.", sh, "up_proj"),
                    expert("mlp.shared_experts.", sh, "down_proj"), D, c.shared_ffn);
      for (int64_t i = 0; i < D; ++i) r.out[t * D + i] += y[i];
    }
  }
  double aux = 0;
  for (int64_t e = 0; e < E; ++e)
    aux += static_cast<double>(r.load[e]) / static_cast<double>(N * K) * psum[e] / static_cast<double>(N);
  r.aux = c.aux_loss_coef * static_cast<double>(E) * aux;
  return r;
}

// ------------------------------------------------------------------ harness over the layer

template <class T>
class MoeHarness {
 public:
  explicit MoeHarness(const MoeLayerWeights& w)
      : w_(w), act_("act", Device::cpu(), 8 << 20), scratch_("scratch", Device::cpu(), 8 << 20) {}

  const MoeLayer& layer() const { return w_.layer(); }
  int64_t hidden() const { return layer().cfg.hidden; }

  // out = layer(x); returns L_aux.
  double forward(const std::vector<double>& x, std::vector<double>& out) {
    n_ = static_cast<int64_t>(x.size()) / hidden();
    x_.assign(x.begin(), x.end());
    out_.assign(x.size(), std::numeric_limits<T>::quiet_NaN());
    act_.reset();
    saved_ = layer().alloc_saved(act_, n_, dtype_of<T>());
    const double aux = layer().forward(ctx_, tensor(x_), tensor(out_), saved_);
    out.assign(out_.begin(), out_.end());
    return aux;
  }
  // L = sum dout * out + L_aux.
  double loss(const std::vector<double>& x, const std::vector<double>& dout) {
    std::vector<double> out;
    double l = forward(x, out);
    for (size_t i = 0; i < out.size(); ++i) l += dout[i] * out[i];
    return l;
  }
  // Forward, then backward of L: returns dx; parameter gradients accumulate.
  std::vector<double> backward(const std::vector<double>& x, const std::vector<double>& dout) {
    std::vector<double> out;
    forward(x, out);
    std::vector<T> d(dout.begin(), dout.end()), dx(x.size(), std::numeric_limits<T>::quiet_NaN());
    scratch_.reset();
    layer().backward(ctx_, saved_, tensor(d), tensor(dx), scratch_, 1.0);
    return std::vector<double>(dx.begin(), dx.end());
  }
  const MoeLayer::Saved& saved() const { return saved_; }

 private:
  Tensor tensor(std::vector<T>& v) { return Tensor(v.data(), dtype_of<T>(), Device::cpu(), {n_, hidden()}); }

  const MoeLayerWeights& w_;
  ExecContext ctx_{Device::cpu()};
  Arena act_, scratch_;
  MoeLayer::Saved saved_;
  int64_t n_ = 0;
  std::vector<T> x_, out_;
};

// Weights with std 0.5 (so that the router's choice depends on x), an optional random selection bias, and
// an x for which every token's k-th / (k+1)-th selection margin is at least `margin` (redrawn otherwise).
std::vector<double> stable_input(const MoeConfig& c, MoeLayerWeights& w, int64_t n, uint64_t seed, double margin) {
  for (int attempt = 0; attempt < 500; ++attempt) {
    w.init_random(seed + attempt, 0.5f);
    if (c.use_selection_bias) w.set_param("mlp.gate.e_score_correction_bias", randn_f64(c.num_experts, 0.3));
    std::vector<double> x = randn_f64(n * c.hidden);
    if (naive_forward(c, w, x).min_margin >= margin) return x;
  }
  ADD_FAILURE() << "no input with a stable top-k selection found";
  return {};
}

// Every gradient of L = sum dout * out + L_aux against central differences (f64).
void check_gradients(const MoeConfig& c, MoeLayerWeights& w, const std::vector<double>& x, double tol = 1e-7) {
  MoeHarness<double> h(w);
  const std::vector<double> dout = randn_f64(x.size());
  w.zero_grad();
  const std::vector<double> dx = h.backward(x, dout);
  const double step = 1e-5;
  {
    std::vector<double> xv = x;
    const std::vector<double> fd = test::central_differences(xv, step, [&] { return h.loss(xv, dout); });
    EXPECT_LT(rel_err(dx, fd), tol) << "dx";
  }
  for (const MoeLayerWeights::Param& p : w.params()) {
    if (!p.trainable) continue;
    const std::vector<double> g = w.get_grad(p.name);
    std::vector<double> v = w.get_param(p.name);
    const std::vector<double> fd = test::central_differences(v, step, [&] {
      w.set_param(p.name, v);
      return h.loss(x, dout);
    });
    w.set_param(p.name, v);
    const double scale = std::sqrt(std::inner_product(fd.begin(), fd.end(), fd.begin(), 0.0));
    if (scale < 1e-12) {  // e.g. an expert without tokens: the gradient must be exactly zero too
      for (double gi : g) EXPECT_EQ(gi, 0.0) << p.name;
      continue;
    }
    EXPECT_LT(rel_err(g, fd), tol) << p.name;
  }
}

struct GradCase {
  const char* name;
  std::string score_func;
  bool norm_topk_prob;
  float route_scale;
  bool bias;
  int64_t shared;
  float aux;
};

void PrintTo(const GradCase& g, std::ostream* os) { *os << g.name; }

class MoeGradient : public ::testing::TestWithParam<GradCase> {};

TEST_P(MoeGradient, MatchesFiniteDifferencesAndNaiveForward) {
  const GradCase& g = GetParam();
  MoeConfig c = base_config();
  c.score_func = g.score_func;
  c.norm_topk_prob = g.norm_topk_prob;
  c.route_scale = g.route_scale;
  c.use_selection_bias = g.bias;
  c.num_shared_experts = g.shared;
  c.shared_ffn = 4;
  c.aux_loss_coef = g.aux;
  MoeLayerWeights w(c, Device::cpu(), DType::f64);
  const int64_t n = 10;
  const std::vector<double> x = stable_input(c, w, n, 100, 1e-3);
  ASSERT_FALSE(x.empty());

  // Forward (and L_aux) against the naive loop.
  MoeHarness<double> h(w);
  std::vector<double> out;
  const double aux = h.forward(x, out);
  const NaiveResult ref = naive_forward(c, w, x);
  EXPECT_LT(rel_err(out, ref.out), 1e-13);
  EXPECT_NEAR(aux, ref.aux, 1e-15 + 1e-12 * std::abs(ref.aux));
  if (g.aux > 0) {
    EXPECT_GT(aux, 0.0);
  }
  EXPECT_EQ(h.saved().routing.counts_host(), ref.load);

  check_gradients(c, w, x);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, MoeGradient,
    ::testing::Values(GradCase{"softmax_norm", "softmax", true, 1.0f, false, 0, 0.0f},
                      GradCase{"softmax_norm_shared_aux", "softmax", true, 1.0f, false, 2, 0.01f},
                      GradCase{"softmax_plain_aux", "softmax", false, 1.0f, false, 0, 0.01f},
                      GradCase{"sigmoid_bias_scale", "sigmoid", false, 2.5f, true, 0, 0.0f},
                      GradCase{"sigmoid_bias_scale_norm_shared", "sigmoid", true, 2.5f, true, 1, 0.0f},
                      GradCase{"sigmoid_bias_scale_shared_aux", "sigmoid", false, 2.5f, true, 2, 0.01f}),
    [](const ::testing::TestParamInfo<GradCase>& info) { return std::string(info.param.name); });

// An expert that receives no token: its rows are empty, its gradients exactly zero, all else correct.
TEST(MoeLayer, ExpertWithZeroTokens) {
  MoeConfig c = base_config();
  c.use_selection_bias = true;
  c.norm_topk_prob = true;
  c.aux_loss_coef = 0.01f;
  MoeLayerWeights w(c, Device::cpu(), DType::f64);
  std::vector<double> x;
  for (uint64_t seed = 1; seed < 500 && x.empty(); ++seed) {
    w.init_random(seed, 0.5f);
    w.set_param("mlp.gate.e_score_correction_bias", {0.1, -0.2, 0.05, -100.0});  // expert 3: never selected
    std::vector<double> cand = randn_f64(9 * c.hidden);
    if (naive_forward(c, w, cand).min_margin >= 1e-3) x = cand;
  }
  ASSERT_FALSE(x.empty());

  MoeHarness<double> h(w);
  std::vector<double> out;
  const double aux = h.forward(x, out);
  const NaiveResult ref = naive_forward(c, w, x);
  const std::vector<int64_t> load = h.saved().routing.counts_host();
  EXPECT_EQ(load[3], 0);
  EXPECT_EQ(load, ref.load);
  EXPECT_LT(rel_err(out, ref.out), 1e-13);
  EXPECT_NEAR(aux, ref.aux, 1e-15);
  check_gradients(c, w, x);
  for (const char* name : {"gate_proj", "up_proj", "down_proj"})
    for (double v : w.get_grad(std::string("mlp.experts.3.") + name + ".weight")) EXPECT_EQ(v, 0.0);
}

// A huge selection bias sends every token to expert 2 (k = 1, and k = 2 with expert 2 in every token's
// first slot); outputs and gradients stay right, the combine weights still come from the unbiased scores.
TEST(MoeLayer, BiasForcesEveryTokenToOneExpert) {
  for (int64_t k : {1, 2}) {
    SCOPED_TRACE("top_k " + std::to_string(k));
    MoeConfig c = base_config();
    c.top_k = k;
    c.score_func = "sigmoid";
    c.use_selection_bias = true;
    c.route_scale = 2.5f;
    c.num_shared_experts = 1;
    c.shared_ffn = 4;
    c.aux_loss_coef = 0.01f;
    MoeLayerWeights w(c, Device::cpu(), DType::f64);
    std::vector<double> x;
    for (uint64_t seed = 1; seed < 200 && x.empty(); ++seed) {
      w.init_random(seed, 0.5f);
      w.set_param("mlp.gate.e_score_correction_bias", {0.0, 0.0, 1e3, 0.0});
      std::vector<double> cand = randn_f64(8 * c.hidden);
      if (naive_forward(c, w, cand).min_margin >= 1e-3) x = cand;
    }
    ASSERT_FALSE(x.empty());
    MoeHarness<double> h(w);
    std::vector<double> out;
    const double aux = h.forward(x, out);
    const NaiveResult ref = naive_forward(c, w, x);
    const std::vector<int64_t> load = h.saved().routing.counts_host();
    EXPECT_EQ(load[2], 8);
    EXPECT_EQ(std::accumulate(load.begin(), load.end(), int64_t(0)), 8 * k);
    EXPECT_EQ(load, ref.load);
    EXPECT_LT(rel_err(out, ref.out), 1e-13);
    EXPECT_NEAR(aux, ref.aux, 1e-15);
    // The combine weight of expert 2 is route_scale * sigmoid(logit), never near the biased value.
    for (int64_t t = 0; t < 8; ++t) EXPECT_LT(h.saved().routing.weight.ptr<double>()[t * k], 2.5 + 1e-12);
    check_gradients(c, w, x);
  }
}

// The f32 layer against the naive loop (and the f64 layer) on the same weights.
TEST(MoeLayer, Float32ForwardMatchesNaive) {
  MoeConfig c = base_config();
  c.score_func = "sigmoid";
  c.norm_topk_prob = true;
  c.use_selection_bias = true;
  c.num_shared_experts = 2;
  c.shared_ffn = 4;
  c.aux_loss_coef = 0.01f;
  MoeLayerWeights w64(c, Device::cpu(), DType::f64);
  const std::vector<double> x = stable_input(c, w64, 16, 3, 1e-3);
  ASSERT_FALSE(x.empty());
  MoeLayerWeights w32(c, Device::cpu(), DType::f32);
  for (const MoeLayerWeights::Param& p : w64.params()) {
    std::vector<double> v = test::to_f64(test::to_f32(w64.get_param(p.name)));
    w64.set_param(p.name, v);
    w32.set_param(p.name, v);
  }
  const std::vector<double> xr = test::to_f64(test::to_f32(x));
  const NaiveResult ref = naive_forward(c, w64, xr);
  MoeHarness<float> h(w32);
  std::vector<double> out;
  const double aux = h.forward(xr, out);
  EXPECT_LT(rel_err(out, ref.out), 1e-5);
  EXPECT_NEAR(aux, ref.aux, 1e-7);
  EXPECT_EQ(h.saved().routing.counts_host(), ref.load);
  // f32 backward runs and agrees with f64.
  MoeHarness<double> h64(w64);
  const std::vector<double> dout = randn_f64(xr.size());
  w32.zero_grad();
  w64.zero_grad();
  const std::vector<double> dx32 = h.backward(xr, dout), dx64 = h64.backward(xr, dout);
  EXPECT_LT(rel_err(dx32, dx64), 1e-5);
  for (const MoeLayerWeights::Param& p : w64.params())
    if (p.trainable) {
      EXPECT_LT(rel_err(w32.get_grad(p.name), w64.get_grad(p.name)), 1e-5) << p.name;
    }
}

// d_aux scales the aux loss's gradient: d_aux = 0 gives the gradients of the same layer without the aux
// loss; the aux term is linear in d_aux. ArenaSizer counts what alloc_saved / alloc_scratch take.
TEST(MoeLayer, AuxGradientScaleAndArenaSizes) {
  MoeConfig c = base_config();
  c.norm_topk_prob = true;
  c.aux_loss_coef = 0.05f;
  MoeLayerWeights w(c, Device::cpu(), DType::f64);
  // With every expert equally loaded (6 tokens x 2 = 3 per expert) the aux term's score gradient is the same
  // for all experts and the softmax Jacobian removes it: draw until the load is uneven.
  std::vector<double> x;
  for (uint64_t seed = 21; seed < 121 && x.empty(); seed += 7) {
    x = stable_input(c, w, 6, seed, 1e-3);
    const std::vector<int64_t> load = naive_forward(c, w, x).load;
    if (!x.empty() && std::all_of(load.begin(), load.end(), [&](int64_t v) { return v == load[0]; })) x.clear();
  }
  ASSERT_FALSE(x.empty());
  MoeConfig c0 = c;
  c0.aux_loss_coef = 0.f;
  MoeLayerWeights w0(c0, Device::cpu(), DType::f64);
  for (const MoeLayerWeights::Param& p : w.params()) w0.set_param(p.name, w.get_param(p.name));
  const int64_t n = 6;
  const std::vector<double> dout = randn_f64(x.size());
  auto run = [&](MoeLayerWeights& weights, double d_aux, std::vector<double>& dx) {
    ExecContext ctx(Device::cpu());
    Arena act("act", Device::cpu(), 1 << 20), scratch("scratch", Device::cpu(), 1 << 20);
    weights.zero_grad();
    MoeLayer::Saved s = weights.layer().alloc_saved(act, n, DType::f64);
    std::vector<double> xv = x, out(x.size()), d = dout;
    dx.assign(x.size(), 0.0);
    weights.layer().forward(ctx, Tensor(xv.data(), DType::f64, Device::cpu(), {n, c.hidden}),
                            Tensor(out.data(), DType::f64, Device::cpu(), {n, c.hidden}), s);
    weights.layer().backward(ctx, s, Tensor(d.data(), DType::f64, Device::cpu(), {n, c.hidden}),
                             Tensor(dx.data(), DType::f64, Device::cpu(), {n, c.hidden}), scratch, d_aux);
    return weights.get_grad("mlp.gate.weight");
  };
  std::vector<double> dx0, dxa, dx1, dx2;
  const std::vector<double> g0 = run(w0, 1.0, dx0), ga = run(w, 0.0, dxa), g1 = run(w, 1.0, dx1), g2 = run(w, 2.0, dx2);
  EXPECT_LT(rel_err(ga, g0), 1e-14);
  EXPECT_LT(rel_err(dxa, dx0), 1e-14);
  EXPECT_GT(rel_err(g1, g0), 1e-6);  // the aux term is there
  for (size_t i = 0; i < g0.size(); ++i) EXPECT_NEAR(g2[i] - g1[i], g1[i] - g0[i], 1e-13);

  ArenaSizer sizer;
  w.layer().alloc_saved(sizer, n, DType::f64);
  const size_t saved_bytes = sizer.used();
  w.layer().alloc_scratch(sizer, n, DType::f64);
  Arena act("act", Device::cpu(), saved_bytes), scratch("scratch", Device::cpu(), sizer.used() - saved_bytes);
  MoeLayer::Saved s = w.layer().alloc_saved(act, n, DType::f64);
  EXPECT_EQ(act.used(), saved_bytes);
  std::vector<double> xv = x, out(x.size()), d = dout, dx(x.size());
  ExecContext ctx(Device::cpu());
  w.layer().forward(ctx, Tensor(xv.data(), DType::f64, Device::cpu(), {n, c.hidden}),
                    Tensor(out.data(), DType::f64, Device::cpu(), {n, c.hidden}), s);
  w.layer().backward(ctx, s, Tensor(d.data(), DType::f64, Device::cpu(), {n, c.hidden}),
                     Tensor(dx.data(), DType::f64, Device::cpu(), {n, c.hidden}), scratch);  // fits exactly
  EXPECT_EQ(scratch.used(), scratch.capacity());
}

// The permutation on its own: counts, grouping, inverse, un-permute(permute(x)), combine, adjoint.
TEST(MoeRouting, PermutationGroupsRowsByExpertAndInverts) {
  MoeConfig c = base_config();
  c.num_experts = 5;
  c.top_k = 3;
  MoeLayerWeights w(c, Device::cpu(), DType::f64);
  w.init_random(11, 0.5f);
  const int64_t N = 13, D = c.hidden, K = c.top_k, E = c.num_experts;
  std::vector<double> x = randn_f64(N * D), scores(N * E);
  Arena arena("routing", Device::cpu(), 1 << 20);
  const MoeRouting r = MoeRouting::alloc(arena, N, K, E, DType::f64);
  const Tensor xt(x.data(), DType::f64, Device::cpu(), {N, D});
  moe_route(c, xt, w.layer().router.value, Tensor{}, Tensor(scores.data(), DType::f64, Device::cpu(), {N, E}), r);

  const int32_t* ex = r.expert.ptr<int32_t>();
  const int32_t* order = r.order.ptr<int32_t>();
  const int32_t* pos = r.position.ptr<int32_t>();
  const int32_t* off = r.offsets.ptr<int32_t>();
  const std::vector<int64_t> counts = r.counts_host();
  EXPECT_EQ(std::accumulate(counts.begin(), counts.end(), int64_t(0)), N * K);
  EXPECT_EQ(off[0], 0);
  for (int64_t e = 0; e < E; ++e) EXPECT_EQ(off[e + 1] - off[e], counts[e]);
  for (int64_t t = 0; t < N; ++t)  // k distinct experts per token
    for (int64_t j = 0; j < K; ++j)
      for (int64_t i = 0; i < j; ++i) EXPECT_NE(ex[t * K + i], ex[t * K + j]);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t p = off[e]; p < off[e + 1]; ++p) {
      EXPECT_EQ(ex[order[p]], e) << "row " << p;
      if (p > off[e]) {
        EXPECT_LT(order[p - 1], order[p]) << "stable order within expert " << e;
      }
    }
  for (int64_t q = 0; q < N * K; ++q) EXPECT_EQ(order[pos[q]], q);

  std::vector<double> xp(N * K * D), pairs(N * K * D);
  const Tensor xpt(xp.data(), DType::f64, Device::cpu(), {N * K, D});
  moe_permute(r, xt, xpt);
  for (int64_t p = 0; p < N * K; ++p)
    for (int64_t i = 0; i < D; ++i) EXPECT_EQ(xp[p * D + i], x[(order[p] / K) * D + i]);
  moe_unpermute(r, xpt, Tensor(pairs.data(), DType::f64, Device::cpu(), {N * K, D}));
  for (int64_t t = 0; t < N; ++t)
    for (int64_t j = 0; j < K; ++j)
      for (int64_t i = 0; i < D; ++i) EXPECT_EQ(pairs[(t * K + j) * D + i], x[t * D + i]);

  // combine of the permuted x: sum_j w_tj x[t]; permute_backward: k x[t] (+= keeps what was there).
  std::vector<double> comb(N * D), back(N * D, 1.0);
  moe_combine(r, xpt, Tensor(comb.data(), DType::f64, Device::cpu(), {N, D}), false);
  moe_permute_backward(r, xpt, Tensor(back.data(), DType::f64, Device::cpu(), {N, D}), true);
  const double* wt = r.weight.ptr<double>();
  for (int64_t t = 0; t < N; ++t) {
    double ws = 0;
    for (int64_t j = 0; j < K; ++j) ws += wt[t * K + j];
    for (int64_t i = 0; i < D; ++i) {
      EXPECT_NEAR(comb[t * D + i], ws * x[t * D + i], 1e-14);
      EXPECT_NEAR(back[t * D + i], 1.0 + K * x[t * D + i], 1e-14);
    }
  }
}

// Ties in the selection go to the lower expert index; slots are in descending selection order.
TEST(MoeRouting, TiesGoToLowerExpertIndex) {
  MoeConfig c = base_config();
  c.num_experts = 4;
  c.top_k = 2;
  c.score_func = "sigmoid";
  MoeLayerWeights w(c, Device::cpu(), DType::f64);  // router zero: every score 0.5
  std::vector<double> x = randn_f64(3 * c.hidden), scores(3 * 4);
  Arena arena("routing", Device::cpu(), 1 << 16);
  const MoeRouting r = MoeRouting::alloc(arena, 3, 2, 4, DType::f64);
  moe_route(c, Tensor(x.data(), DType::f64, Device::cpu(), {3, c.hidden}), w.layer().router.value, Tensor{},
            Tensor(scores.data(), DType::f64, Device::cpu(), {3, 4}), r);
  for (int64_t t = 0; t < 3; ++t) {
    EXPECT_EQ(r.expert.ptr<int32_t>()[t * 2], 0);
    EXPECT_EQ(r.expert.ptr<int32_t>()[t * 2 + 1], 1);
    EXPECT_EQ(r.weight.ptr<double>()[t * 2], 0.5);
  }
  EXPECT_EQ(r.counts_host(), (std::vector<int64_t>{3, 3, 0, 0}));
}

// bias_e += rate * sign(mean_load - load_e).
TEST(MoeRouting, SelectionBiasUpdateFollowsItsFormula) {
  const std::vector<int64_t> load = {10, 2, 6, 6};  // mean 6
  std::vector<double> b64 = {0.5, -0.25, 0.0, 1.0};
  moe_update_selection_bias(Tensor(b64.data(), DType::f64, Device::cpu(), {4}), load, 1e-3);
  EXPECT_EQ(b64, (std::vector<double>{0.5 - 1e-3, -0.25 + 1e-3, 0.0, 1.0}));
  std::vector<float> b32 = {0.f, 0.f, 0.f};
  moe_update_selection_bias(Tensor(b32.data(), DType::f32, Device::cpu(), {3}), {1, 2, 4}, 0.5);  // mean 7/3
  EXPECT_EQ(b32, (std::vector<float>{0.5f, 0.5f, -0.5f}));
  test::expect_error_naming(
      [&] {
        moe_update_selection_bias(Tensor(b64.data(), DType::f64, Device::cpu(), {4}), {1, 2}, 1.0);
      },
      "moe_update_selection_bias", "load");
}

TEST(MoeConfig, ValidateNamesTheField) {
  auto bad = [](auto edit, const std::string& field) {
    MoeConfig c = base_config();
    edit(c);
    test::expect_error([&] { c.validate("moe.ini"); }, {"moe.ini", field});
  };
  base_config().validate();
  bad([](MoeConfig& c) { c.top_k = 5; }, "top_k");
  bad([](MoeConfig& c) { c.top_k = 0; }, "top_k");
  bad([](MoeConfig& c) { c.hidden = 0; }, "hidden");
  bad([](MoeConfig& c) { c.num_experts = 0; }, "num_experts");
  bad([](MoeConfig& c) { c.expert_ffn = -1; }, "expert_ffn");
  bad([](MoeConfig& c) { c.num_shared_experts = -1; }, "num_shared_experts");
  bad([](MoeConfig& c) { c.num_shared_experts = 1; }, "shared_ffn");
  bad([](MoeConfig& c) { c.score_func = "relu"; }, "score_func");
  bad([](MoeConfig& c) { c.route_scale = 0.f; }, "route_scale");
  bad([](MoeConfig& c) { c.aux_loss_coef = -0.1f; }, "aux_loss_coef");
}

// HF names, shapes, and their views into the concatenated storage.
TEST(MoeLayerWeights, NamesShapesAndStorageMapping) {
  MoeConfig c = base_config();
  c.num_shared_experts = 1;
  c.shared_ffn = 4;
  c.use_selection_bias = true;
  MoeLayerWeights w(c, Device::cpu(), DType::f32);
  const int64_t D = c.hidden, F = c.expert_ffn;
  // router + 4 experts x 3 + 1 shared x 3 + bias
  EXPECT_EQ(w.params().size(), size_t(1 + 12 + 3 + 1));
  EXPECT_EQ(w.param("mlp.gate.weight").shape, (std::vector<int64_t>{4, D}));
  EXPECT_EQ(w.param("mlp.experts.3.up_proj.weight").shape, (std::vector<int64_t>{F, D}));
  EXPECT_EQ(w.param("mlp.experts.0.down_proj.weight").shape, (std::vector<int64_t>{D, F}));
  EXPECT_EQ(w.param("mlp.shared_experts.0.gate_proj.weight").shape, (std::vector<int64_t>{4, D}));
  EXPECT_FALSE(w.param("mlp.gate.e_score_correction_bias").trainable);
  std::vector<double> up(F * D);
  std::iota(up.begin(), up.end(), 1.0);
  w.set_param("mlp.experts.2.up_proj.weight", up);
  const float* gu = w.layer().gate_up.value.ptr<float>();
  for (int64_t i = 0; i < F * D; ++i) EXPECT_EQ(gu[(2 * 2 * F + F) * D + i], static_cast<float>(up[i]));
  std::vector<double> dn(D * F, 3.0);
  w.set_param("mlp.experts.1.down_proj.weight", dn);
  EXPECT_EQ(w.layer().down.value.ptr<float>()[1 * D * F], 3.f);
  EXPECT_EQ(w.layer().down.value.ptr<float>()[1 * D * F - 1], 0.f);
  test::expect_error_mentioning([&] { w.get_param("mlp.experts.4.up_proj.weight"); }, "mlp.experts.4.up_proj.weight");
  test::expect_error_mentioning([&] { w.get_grad("mlp.gate.e_score_correction_bias"); }, "e_score_correction_bias");
  test::expect_error_mentioning([&] { w.set_param("mlp.gate.weight", {1.0}); }, "mlp.gate.weight");
  test::expect_error_mentioning([&] { MoeLayerWeights bad(c, Device::cpu(), DType::bf16); }, "bf16");
}

// Expert parallelism runs on the CPU only: a layer on CUDA refuses an ep before touching any memory (so this
// runs without a GPU; the tensors' pointers and the ep are placeholders that are never dereferenced).
}  // namespace
}  // namespace hyd

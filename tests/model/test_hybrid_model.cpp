// HybridModel on the CPU (f32): every parameter's gradient vs central finite differences for the
// patterns KA and KTA; a student of T layers is the dense model (same logits, loss and gradients,
// bit for bit); packed documents == documents run alone; the stage-1 mixer entry points (forward ==
// standalone KdaLayer, backward vs finite differences, touching only the mixer's gradients); pattern
// parsing and its errors; the parameter contract; overfitting one batch with AdamW. MoE FFN layers
// (qwen3_moe and dots1): an all-T model is the MoE DenseModel bit for bit (layer taps included), a KA student over
// a dense and a MoE layer vs finite differences (routing-swap guard, HybridMoeGrad). (MoE on CUDA:
// tests/gpu/test_gpu_moe.cpp.)
//
// Finite differences: sampled entries per tensor compared as one vector, ||g - g_fd|| / ||g_fd|| < 2e-2,
// with an absolute noise floor for tensors whose sampled gradient is at rounding level (as
// tests/model/test_model_grad.cpp). Unlike the dense model, the plain central difference with h = 1e-2
// is not enough here: KDA l2-normalises q and k per head, and a head vector of small norm (SiLU outputs
// near 0) gives the loss a large third derivative, so the h^2 |L'''| / 6 error of q_proj / k_proj /
// k_conv1d / attn_norm reached 0.1-0.4 relative in some seeds; it fell as h^2 (measured on one seed:
// 1.4e-1, 1.4e-2, 1.5e-3 at h = 1e-2, 3e-3, 1e-3), i.e. the backward is right and the difference is
// truncation. So g_fd is Richardson-extrapolated, g_fd = (4 D(h/2) - D(h)) / 3 with D the central
// difference, which cancels the h^2 term; the f32 rounding noise of the loss (~1e-6 at a loss ~4) then
// contributes ~1e-6 / h = 1e-4 per entry (h = 2e-3 on the q/k path, see kQkStep). Measured over 80
// runs (10080 tensor checks): worst 1.1e-2 (f_proj.1, attn_norm), 17 above 5e-3, none failing. A wrong
// backward term (a skipped gate, a residual, a conv tap, a document leak) is 1e-1..1 off.
#include <gtest/gtest.h>

#include <functional>
#include <memory>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "distill/router_balance.h"
#include "tests/common/test_util.h"
#include "tests/common/tiny_model.h"
#include "trainer/hybrid_model.h"
#include "trainer/layer_kda.h"
#include "trainer/model.h"
#include "trainer/optimizer.h"

namespace hyd {
namespace {

constexpr float kStep = 1e-2f;
// The q/k path of a KDA layer (projection and conv weights, the tensors right before the l2 norm) has
// the largest curvature and large gradients (|g| ~ 0.5..100 over the samples): a smaller step there
// keeps the extrapolated truncation error far below the tolerance, and the rounding noise
// (~1e-6 / h = 5e-4 per entry) stays far below those gradients too.
// The softmax attention's wqkv, the norms before the mixers and the embedding feed q/k paths too: with the plain
// step, about one run in 120 missed (seed 746135240187243896: AKT_qwen2 layers.0.wqkv 2.8e-2 against 2e-2); with
// this step, 260 runs (2026-11-28): no miss, worst 1.9e-2 (wqkv), every other tensor below 1e-2.
constexpr float kQkStep = 2e-3f;
float step_for(const std::string& name) {
  for (const char* s : {"q_proj", "k_proj", "q_conv1d", "k_conv1d", "wqkv", "attn_norm", "embed"})
    if (name.find(s) != std::string::npos) return kQkStep;
  return kStep;
}
constexpr double kTolerance = 2e-2;
constexpr double kNoiseFloor = 1e-5;

test::PackedBatch make_batch(const std::vector<int32_t>& doc_lens, int64_t vocab) {
  return test::pack_documents(test::random_documents(doc_lens, vocab), [](int64_t i) { return i % 5 == 0; });
}

struct GradCheck {
  std::string name;
  double err = 0, ref_norm = 0;
};

void report(const std::vector<GradCheck>& checks) {
  for (const GradCheck& g : checks) {
    const double rel = g.err / std::max(g.ref_norm, 1e-30);
    std::printf("  %-28s |g_fd| %.3e  |g - g_fd| %.3e  rel %.2e\n", g.name.c_str(), g.ref_norm, g.err, rel);
    EXPECT_TRUE(std::isfinite(g.err)) << g.name;
    EXPECT_LT(g.err, std::max(kTolerance * g.ref_norm, kNoiseFloor))
        << g.name << ": analytic gradient differs from finite differences (|g_fd| = " << g.ref_norm << ")";
    EXPECT_GT(g.ref_norm, 0.0) << g.name << ": gradient sample is exactly zero; the check would be vacuous";
  }
}

// Central difference of eval() in x (x is perturbed in place; eval re-reads it and returns the loss),
// Richardson-extrapolated over the steps h and h/2; x is restored. The steps actually taken are the
// f32 differences of the perturbed values.
template <class Eval>
double richardson(float& x, Eval eval, float h) {
  const float orig = x;
  auto central = [&](float h) {
    x = orig + h;
    const double lp = eval();
    x = orig - h;
    const double lm = eval();
    x = orig;
    return (lp - lm) / (static_cast<double>(orig + h) - static_cast<double>(orig - h));
  };
  const double d1 = central(h), d2 = central(h / 2);
  return (4 * d2 - d1) / 3;
}

// Sampled central differences of `loss` for every parameter, against `grad(name)`.
template <class Loss>
// Embedding rows of tokens absent from the batch have zero gradient (untied): `tokens` (when given)
// makes two thirds of the embed samples come from rows the batch uses, so the check is never vacuous.
// `step` 0 = step_for(name).
std::vector<GradCheck> sampled_fd(HybridModel& m, const std::vector<ParamInfo>& params, int samples,
                                  const std::function<std::vector<float>(const std::string&)>& grad, Loss loss,
                                  const std::vector<int32_t>& tokens = {}, float step = 0) {
  std::vector<GradCheck> out;
  for (const ParamInfo& p : params) {
    const std::vector<float> g = grad(p.name);
    std::vector<float> value = m.get_param(p.name);
    std::vector<int64_t> idx(p.numel);
    std::iota(idx.begin(), idx.end(), 0);
    std::shuffle(idx.begin(), idx.end(), test::rng());
    idx.resize(std::min<int64_t>(samples, p.numel));
    if (p.name == "embed" && !tokens.empty()) {
      const int64_t D = p.shape[1];
      for (size_t j = 0; j < idx.size() * 2 / 3; ++j) {
        const int32_t t = tokens[test::randint(1, 0, static_cast<int32_t>(tokens.size()))[0]];
        idx[j] = t * D + test::randint(1, 0, static_cast<int32_t>(D))[0];
      }
    }
    const float h = step > 0 ? step : step_for(p.name);
    double num = 0, den = 0;
    for (int64_t i : idx) {
      const double fd = richardson(
          value[i],
          [&] {
            m.set_param(p.name, value.data(), p.numel);
            return loss();
          },
          h);
      num += (g[i] - fd) * (g[i] - fd);
      den += fd * fd;
    }
    m.set_param(p.name, value.data(), p.numel);
    out.push_back({p.name, std::sqrt(num), std::sqrt(den)});
  }
  return out;
}

// ------------------------------------------------------------------------------ full-model gradients

class HybridGrad : public ::testing::TestWithParam<std::pair<std::string, std::string>> {};

TEST_P(HybridGrad, EveryParameterMatchesFiniteDifferences) {
  const auto& [pattern, variant] = GetParam();
  const HybridConfig cfg = test::tiny_hybrid_config(pattern, static_cast<int64_t>(pattern.size()), variant);
  ASSERT_EQ(layer_pattern_string(cfg.layers), pattern);
  test::PackedBatch hb = make_batch({11, 13}, cfg.model.vocab_size);
  HybridModel model(cfg, Device::cpu(), 32);
  test::randomize_hybrid(model);
  ExecContext ctx(Device::cpu());
  model.zero_grad();
  const double loss = model.forward_backward(ctx, hb.batch);
  ASSERT_TRUE(std::isfinite(loss));
  EXPECT_NEAR(loss, model.forward_loss(ctx, hb.batch), 1e-6 * loss);
  report(sampled_fd(
      model, model.params(), 12, [&](const std::string& n) { return model.get_grad(n); },
      [&] { return model.forward_loss(ctx, hb.batch); }, hb.tokens));
}

INSTANTIATE_TEST_SUITE_P(Patterns, HybridGrad,
                         ::testing::Values(std::pair<std::string, std::string>{"KA", "llama"},
                                           std::pair<std::string, std::string>{"KTA", "qwen3"},
                                           std::pair<std::string, std::string>{"AKT", "qwen2"}),
                         [](const auto& info) { return info.param.first + "_" + info.param.second; });

// ------------------------------------------------------------------------------ MoE FFN layers

// MoE students on test::tiny_moe_config / tiny_dots1_config (tests/common/tiny_model.h). Top-k routing is
// piecewise constant (see ModelMoeGrad in tests/model/test_model_grad.cpp): the weights come from a fixed seed
// with large router weights (wide top-k gaps) and every sample whose D(h) and D(h/2) differ by more than
// max(kKinkThreshold, kKinkRelative |D(h/2)|) is dropped as straddling a routing swap (at most a quarter of a
// tensor's samples); the survivors are Richardson-extrapolated as in sampled_fd.
using test::tiny_dots1_config;
using test::tiny_moe_config;

constexpr uint64_t kMoeSeed = 5;
constexpr double kKinkThreshold = 2e-3;
constexpr double kKinkRelative = 5e-2;

// A KA student over a dense and a MoE layer (qwen3_moe skeleton, or dots1's), randomised: the model, its batch.
struct MoeStudent {
  HybridConfig cfg;
  test::PackedBatch hb;
  std::unique_ptr<HybridModel> model;
};

MoeStudent make_moe_student(bool dots1 = false) {
  MoeStudent s;
  HybridConfig& cfg = s.cfg;
  cfg.model = dots1 ? tiny_dots1_config(2) : tiny_moe_config(2, {0});
  cfg.kda.heads = 2;
  cfg.kda.v_heads = 4;
  cfg.kda.dk = 8;
  cfg.kda.dv = 8;
  cfg.kda.conv_size = 4;
  cfg.pattern = "KA";
  cfg.finalize("test");
  std::mt19937_64 gen(kMoeSeed);
  std::vector<std::vector<int32_t>> docs;
  for (int32_t len : {11, 13}) {
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(cfg.model.vocab_size) - 1);
    docs.emplace_back();
    for (int32_t t = 0; t < len; ++t) docs.back().push_back(tok(gen));
  }
  s.hb = test::pack_documents(docs, [](int64_t i) { return i % 5 == 0; });
  s.model = std::make_unique<HybridModel>(cfg, Device::cpu(), 32);
  test::randomize_hybrid(*s.model, &gen);
  return s;
}

// Every parameter's gradient (already in the model) against Richardson-extrapolated central differences of
// `objective` (evaluated with the current parameters), samples straddling a routing swap dropped. A selection
// bias only reorders experts: its gradient must be exactly 0 (differences of it would be vacuous).
void check_moe_grads(HybridModel& model, const test::PackedBatch& hb, const std::function<double()>& objective) {
  for (const ParamInfo& p : model.params()) {
    const std::vector<float> g = model.get_grad(p.name);
    if (p.name.ends_with(".e_score_correction_bias")) {
      for (float x : g) EXPECT_EQ(x, 0.0f) << p.name;
      continue;
    }
    std::vector<float> value = model.get_param(p.name);
    std::vector<int64_t> idx(p.numel);
    std::iota(idx.begin(), idx.end(), 0);
    std::shuffle(idx.begin(), idx.end(), test::rng());
    idx.resize(std::min<int64_t>(12, p.numel));
    if (p.name == "embed") {
      const int64_t D = p.shape[1];
      for (size_t j = 0; j < idx.size() * 2 / 3; ++j) {
        const int32_t t = hb.tokens[test::randint(1, 0, static_cast<int32_t>(hb.tokens.size()))[0]];
        idx[j] = t * D + test::randint(1, 0, static_cast<int32_t>(D))[0];
      }
    }
    const float h = step_for(p.name);
    double num = 0, den = 0;
    int kept = 0, dropped = 0;
    for (int64_t i : idx) {
      const float orig = value[i];
      auto central = [&](float hh) {
        value[i] = orig + hh;
        model.set_param(p.name, value.data(), p.numel);
        const double lp = objective();
        value[i] = orig - hh;
        model.set_param(p.name, value.data(), p.numel);
        const double lm = objective();
        value[i] = orig;
        return (lp - lm) / (static_cast<double>(orig + hh) - static_cast<double>(orig - hh));
      };
      const double d1 = central(h), d2 = central(h / 2);
      // The KDA path's own curvature moves D(h) vs D(h/2) by a few percent (what Richardson cancels):
      // the guard is relative above the absolute threshold.
      if (!(std::fabs(d1 - d2) <= std::max(kKinkThreshold, kKinkRelative * std::fabs(d2)))) {
        std::printf("  %s[%lld]: D(h) %.4e vs D(h/2) %.4e: straddles a routing swap, dropped\n", p.name.c_str(),
                    static_cast<long long>(i), d1, d2);
        ++dropped;
        continue;
      }
      const double fd = (4 * d2 - d1) / 3;
      num += (g[i] - fd) * (g[i] - fd);
      den += fd * fd;
      ++kept;
    }
    model.set_param(p.name, value.data(), p.numel);
    report({{p.name, std::sqrt(num), std::sqrt(den)}});
    EXPECT_LE(4 * dropped, kept + dropped) << p.name << ": too many samples straddle routing swaps";
  }
}

TEST(HybridMoeGrad, KdaAndAttentionOverDenseAndMoeLayers) {
  MoeStudent s = make_moe_student();
  HybridModel& model = *s.model;
  ASSERT_FALSE(s.cfg.model.is_moe_layer(0));
  ASSERT_TRUE(s.cfg.model.is_moe_layer(1));
  ASSERT_TRUE(model.has_param("layers.0.w_gate_up"));
  ASSERT_TRUE(model.has_param("layers.1.mlp.gate.weight"));
  ASSERT_TRUE(model.has_param("layers.1.mlp.gate_up"));
  ASSERT_TRUE(model.has_param("layers.1.mlp.down"));
  ASSERT_FALSE(model.has_param("layers.1.w_down"));
  EXPECT_EQ(model.param("layers.1.mlp.gate_up").shape, (std::vector<int64_t>{4, 32, s.cfg.model.hidden_size}));
  ExecContext ctx(Device::cpu());
  model.zero_grad();
  const double loss = model.forward_backward(ctx, s.hb.batch);
  ASSERT_TRUE(std::isfinite(loss));
  EXPECT_NEAR(loss, model.forward_loss(ctx, s.hb.batch), 1e-6 * loss);
  EXPECT_EQ(model.moe_aux_loss(), 0.0);  // off by default
  check_moe_grads(model, s.hb, [&] { return model.forward_loss(ctx, s.hb.batch); });
}

// The same for a student of a dots1 teacher: sigmoid router, selection bias, routed scaling, shared expert.
TEST(HybridMoeGrad, Dots1KdaAndAttentionOverDenseAndMoeLayers) {
  MoeStudent s = make_moe_student(/*dots1=*/true);
  HybridModel& model = *s.model;
  ASSERT_FALSE(s.cfg.model.is_moe_layer(0));
  ASSERT_TRUE(s.cfg.model.is_moe_layer(1));
  EXPECT_EQ(model.param("layers.1.mlp.shared_gate_up").shape, (std::vector<int64_t>{1, 32, s.cfg.model.hidden_size}));
  EXPECT_NE(model.get_param("layers.1.mlp.gate.e_score_correction_bias"), std::vector<float>(4, 0.0f));
  ExecContext ctx(Device::cpu());
  model.zero_grad();
  const double loss = model.forward_backward(ctx, s.hb.batch);
  ASSERT_TRUE(std::isfinite(loss));
  EXPECT_NEAR(loss, model.forward_loss(ctx, s.hb.batch), 1e-6 * loss);
  check_moe_grads(model, s.hb, [&] { return model.forward_loss(ctx, s.hb.batch); });
}

// Auxiliary-loss-free balancing (distill/router_balance.h): the loads of the last forward are the routed rows
// per expert (k per token), and the selection bias moves by rate x sign(mean - load) (formula written out
// here) on the pieces an optimizer holds: all of it, one ZeRO-1-like piece of it, or none with rate 0.
TEST(HybridMoe, SelectionBiasFollowsTheLoads) {
  MoeStudent s = make_moe_student(/*dots1=*/true);
  HybridModel& model = *s.model;
  ExecContext ctx(Device::cpu());
  ASSERT_TRUE(std::isfinite(model.forward_loss(ctx, s.hb.batch)));
  const std::vector<HybridModel::MoeLoad> loads = model.moe_expert_loads();
  ASSERT_EQ(loads.size(), 1u);
  const std::string name = "layers.1.mlp.gate.e_score_correction_bias";
  EXPECT_EQ(loads[0].layer, 1);
  EXPECT_EQ(loads[0].bias_param, name);
  const std::vector<int64_t>& load = loads[0].load;
  const int64_t E = s.cfg.model.num_experts, k = s.cfg.model.num_experts_per_tok;
  ASSERT_EQ(static_cast<int64_t>(load.size()), E);
  EXPECT_EQ(std::accumulate(load.begin(), load.end(), int64_t(0)), s.hb.batch.num_tokens * k);
  ASSERT_GT(*std::max_element(load.begin(), load.end()), *std::min_element(load.begin(), load.end()))
      << "a balanced routing would not show the sign rule";
  const double mean = static_cast<double>(s.hb.batch.num_tokens * k) / static_cast<double>(E);
  constexpr double kRate = 0.01;
  const std::vector<float> before = model.get_param(name);
  auto expected = [&](int64_t e) {
    const double d = mean - static_cast<double>(load[e]);
    return before[e] + static_cast<float>(kRate * ((d > 0) - (d < 0)));
  };
  const ParamInfo& bias = model.param(name);
  // Rate 0: nothing moves; the imbalance is still reported.
  {
    AdamW opt(model.params(), Device::cpu(), AdamWConfig{});
    const double imbalance = apply_selection_bias_update(ctx, model.params(), opt, loads, 0.0);
    EXPECT_NEAR(imbalance, static_cast<double>(*std::max_element(load.begin(), load.end())) / mean, 1e-12);
    EXPECT_EQ(model.get_param(name), before);
  }
  // A piece [1, 3) of the bias, as a ZeRO-1 shard would hold it: only its entries move.
  {
    ParamInfo piece = bias;
    piece.name = name + "[1:3]";
    piece.offset = bias.offset + 1;
    piece.numel = 2;
    piece.shape = {2};
    piece.value = bias.value.slice0(1, 3);
    piece.grad = bias.grad.slice0(1, 3);
    AdamW opt({piece}, Device::cpu(), AdamWConfig{});
    apply_selection_bias_update(ctx, model.params(), opt, loads, kRate);
    const std::vector<float> after = model.get_param(name);
    for (int64_t e = 0; e < E; ++e) EXPECT_EQ(after[e], e == 1 || e == 2 ? expected(e) : before[e]) << "expert " << e;
    model.set_param(name, before.data(), E);
  }
  // The whole model's optimizer: every entry moves.
  AdamW opt(model.params(), Device::cpu(), AdamWConfig{});
  apply_selection_bias_update(ctx, model.params(), opt, loads, kRate);
  const std::vector<float> after = model.get_param(name);
  for (int64_t e = 0; e < E; ++e) EXPECT_EQ(after[e], expected(e)) << "expert " << e;
  test::expect_error([&] { apply_selection_bias_update(ctx, model.params(), opt, loads, -1.0); },
                     {"apply_selection_bias_update", "rate"});
}

// With the load-balancing term on (set_moe_aux_loss): the gradients are those of CE + scale x L_aux, L_aux
// summed over the MoE layers (the term moves the router's gradient by several percent, so the finite
// differences would see it missing), and the term lies in (0, coef E].
TEST(HybridMoeGrad, LoadBalancingTermJoinsTheObjective) {
  MoeStudent s = make_moe_student();
  HybridModel& model = *s.model;
  constexpr double kCoef = 1.0, kScale = 2.0;
  ExecContext ctx(Device::cpu());
  const std::string router = "layers.1.mlp.gate.weight";
  model.zero_grad();
  model.forward_backward(ctx, s.hb.batch);
  const std::vector<float> g_ce = model.get_grad(router);
  model.set_moe_aux_loss(kCoef, kScale);
  model.zero_grad();
  const double loss = model.forward_backward(ctx, s.hb.batch);
  const double aux = model.moe_aux_loss();
  ASSERT_TRUE(std::isfinite(loss));
  // The term moves the router's gradient (so the comparison below can tell it is there).
  EXPECT_GT(test::rel_err(model.get_grad(router), g_ce), 0.02);
  // 0 < coef E sum_e f_e P_e <= coef E (one MoE layer of E = 4 experts here).
  EXPECT_GT(aux, 0.0);
  EXPECT_LE(aux, kCoef * 4);
  check_moe_grads(model, s.hb, [&] {
    const double ce = model.forward_loss(ctx, s.hb.batch);
    return ce + kScale * model.moe_aux_loss();
  });
  test::expect_error([&] { model.set_moe_aux_loss(-1.0, 1.0); }, {"set_moe_aux_loss", "coefficient"});
}

// ------------------------------------------------------------------------------ T layers == dense

// The all-T hybrid's parameter list must be the dense model's (names, shapes, weight decay, in order);
// the dense model's values are copied into it.
void copy_dense_into_hybrid(DenseModel& dense, HybridModel& hybrid) {
  ASSERT_EQ(dense.params().size(), hybrid.params().size());
  for (size_t i = 0; i < dense.params().size(); ++i) {
    const ParamInfo& p = dense.params()[i];
    EXPECT_EQ(p.name, hybrid.params()[i].name);
    EXPECT_EQ(p.shape, hybrid.params()[i].shape);
    EXPECT_EQ(p.weight_decay, hybrid.params()[i].weight_decay);
    const std::vector<float> v = dense.get_param(p.name);
    hybrid.set_param(p.name, v.data(), p.numel);
  }
}

// A student made only of T layers, with the dense model's weights copied by name, is the dense model:
// same parameter list, and the same kernels in the same order give identical logits, loss and gradients.
TEST(HybridModel, TeacherLayersReproduceTheDenseModelExactly) {
  for (const std::string variant : {"llama", "qwen2", "qwen3"}) {
    SCOPED_TRACE(variant);
    const ModelConfig dc = test::tiny_dense_variant(variant);
    HybridConfig hc;
    hc.model = dc;
    hc.pattern = "T";
    DenseModel dense(dc, Device::cpu(), 32);
    HybridModel hybrid(hc, Device::cpu(), 32);
    dense.init_random(21, 0.3f);
    ASSERT_NO_FATAL_FAILURE(copy_dense_into_hybrid(dense, hybrid));
    test::PackedBatch hb = make_batch({10, 14}, dc.vocab_size);
    ExecContext ctx(Device::cpu());
    const std::vector<float> zd = dense.forward_logits(ctx, hb.batch), zh = hybrid.forward_logits(ctx, hb.batch);
    ASSERT_TRUE(test::all_finite(zd));
    EXPECT_EQ(zd, zh);
    EXPECT_EQ(dense.forward_loss(ctx, hb.batch), hybrid.forward_loss(ctx, hb.batch));
    dense.zero_grad();
    hybrid.zero_grad();
    EXPECT_EQ(dense.forward_backward(ctx, hb.batch, 0.5f), hybrid.forward_backward(ctx, hb.batch, 0.5f));
    for (const ParamInfo& p : dense.params()) EXPECT_EQ(dense.get_grad(p.name), hybrid.get_grad(p.name)) << p.name;
  }
}

// The same for qwen3_moe (layer 0 dense through mlp_only_layers, layers 1 and 2 MoE): the MoE FFN
// parameters (mlp.gate.weight, mlp.gate_up, mlp.down) have DenseModel's names and storage, and the
// all-T hybrid runs the same MoE kernels: logits, loss, gradients and the stage-1 / stage-2 layer taps
// (forward_layer_inputs / forward_layer_outputs) bit for bit.
void expect_all_t_is_the_moe_dense_model(const ModelConfig& dc) {
  ASSERT_TRUE(dc.is_moe_layer(1));
  HybridConfig hc;
  hc.model = dc;
  hc.pattern = "T";
  DenseModel dense(dc, Device::cpu(), 32);
  HybridModel hybrid(hc, Device::cpu(), 32);
  dense.init_random(21, 0.3f);
  ASSERT_NO_FATAL_FAILURE(copy_dense_into_hybrid(dense, hybrid));
  ASSERT_TRUE(hybrid.has_param("layers.1.mlp.gate.weight"));
  ASSERT_TRUE(hybrid.has_param("layers.0.w_gate_up"));
  test::PackedBatch hb = make_batch({10, 14}, dc.vocab_size);
  ExecContext ctx(Device::cpu());
  const std::vector<float> zd = dense.forward_logits(ctx, hb.batch), zh = hybrid.forward_logits(ctx, hb.batch);
  ASSERT_TRUE(test::all_finite(zd));
  EXPECT_EQ(zd, zh);
  EXPECT_EQ(dense.forward_loss(ctx, hb.batch), hybrid.forward_loss(ctx, hb.batch));
  dense.zero_grad();
  hybrid.zero_grad();
  EXPECT_EQ(dense.forward_backward(ctx, hb.batch, 0.5f), hybrid.forward_backward(ctx, hb.batch, 0.5f));
  for (const ParamInfo& p : dense.params()) {
    const std::vector<float> g = dense.get_grad(p.name);
    EXPECT_EQ(g, hybrid.get_grad(p.name)) << p.name;
    if (p.name.find("mlp.") != std::string::npos && !p.name.ends_with(".e_score_correction_bias")) {
      double sq = 0;
      for (float x : g) sq += double(x) * x;
      EXPECT_GT(sq, 0.0) << p.name << ": no gradient reaches the MoE parameter";
    }
  }
  // Layer taps: the input of layer l + 1 is the output of layer l, the last output feeds final_norm.
  const int64_t n = hb.batch.num_tokens, D = dc.hidden_size;
  const std::vector<std::vector<float>> ins = hybrid.forward_layer_inputs_host(ctx, hb.batch);
  std::vector<std::vector<float>> outs(3, std::vector<float>(static_cast<size_t>(n * D), NAN));
  std::vector<Tensor> out_t;
  for (auto& o : outs) out_t.push_back(Tensor(o.data(), DType::f32, Device::cpu(), {n, D}));
  hybrid.forward_layer_outputs(ctx, hb.batch, out_t);
  ctx.synchronize();
  EXPECT_EQ(outs[0], ins[1]);
  EXPECT_EQ(outs[1], ins[2]);
  ASSERT_TRUE(test::all_finite(outs[2]));
}

TEST(HybridModel, TeacherLayersReproduceTheMoeDenseModelExactly) {
  expect_all_t_is_the_moe_dense_model(tiny_moe_config(3, {0}));
}

// dots1 (layer 0 dense through first_k_dense_replace): the shared MLP and the selection bias too.
TEST(HybridModel, TeacherLayersReproduceTheDots1DenseModelExactly) {
  const ModelConfig dc = tiny_dots1_config(3);
  ASSERT_FALSE(dc.is_moe_layer(0));
  expect_all_t_is_the_moe_dense_model(dc);
}

// ------------------------------------------------------------------------------ documents

std::vector<float> rows(const std::vector<float>& m, int64_t begin, int64_t end, int64_t width) {
  return {m.begin() + begin * width, m.begin() + end * width};
}

// Two documents packed in one batch give each document's logits alone: KDA state, conv windows and
// attention (NoPE and rotary) never cross the boundary.
TEST(HybridModel, PackedDocumentsMatchSeparateRuns) {
  const HybridConfig cfg = test::tiny_hybrid_config("KTA", 3, "qwen3");
  HybridModel model(cfg, Device::cpu(), 32);
  test::randomize_hybrid(model);
  ExecContext ctx(Device::cpu());
  const int64_t V = cfg.model.vocab_size;
  const std::vector<int32_t> a = test::randint(7, 0, 61), b = test::randint(9, 0, 61);
  test::PackedBatch ab = test::pack_documents({a, b}), ba = test::pack_documents({b, a});
  test::PackedBatch only_a = test::pack_documents({a}), only_b = test::pack_documents({b});
  const std::vector<float> l_ab = model.forward_logits(ctx, ab.batch), l_ba = model.forward_logits(ctx, ba.batch);
  const std::vector<float> l_a = model.forward_logits(ctx, only_a.batch), l_b = model.forward_logits(ctx, only_b.batch);
  ASSERT_TRUE(test::all_finite(l_ab));
  EXPECT_LT(test::rel_err(rows(l_ab, 0, 7, V), l_a), 1e-5);
  EXPECT_LT(test::rel_err(rows(l_ab, 7, 16, V), l_b), 1e-5);
  EXPECT_LT(test::rel_err(rows(l_ba, 0, 9, V), l_b), 1e-5);
  EXPECT_LT(test::rel_err(rows(l_ba, 9, 16, V), l_a), 1e-5);
  // Not vacuous: the same tokens as one document give other logits for b.
  std::vector<int32_t> joined = a;
  joined.insert(joined.end(), b.begin(), b.end());
  test::PackedBatch one = test::pack_documents({joined});
  EXPECT_GT(test::rel_err(rows(model.forward_logits(ctx, one.batch), 7, 16, V), l_b), 1e-3);
  // The losses agree too (one batch's mean over both documents' targets).
  const double la = model.forward_loss(ctx, only_a.batch), lb = model.forward_loss(ctx, only_b.batch);
  const double nab = double(ab.batch.num_targets);
  EXPECT_NEAR(model.forward_loss(ctx, ab.batch),
              (la * double(only_a.batch.num_targets) + lb * double(only_b.batch.num_targets)) / nab, 1e-5);
}

// ------------------------------------------------------------------------------ stage-1 mixer API

// mixer_forward of a K layer is the standalone KdaLayer with the same weights; backward vs finite
// differences for the mixer's parameters and its input; no other gradient is touched.
TEST(HybridModel, MixerForwardBackwardForStageOne) {
  const HybridConfig cfg = test::tiny_hybrid_config("KA", 2, "qwen3");
  HybridModel model(cfg, Device::cpu(), 32);
  test::randomize_hybrid(model);
  ExecContext ctx(Device::cpu());
  test::PackedBatch hb = make_batch({10, 12}, cfg.model.vocab_size);
  const Batch& b = hb.batch;
  const int64_t n = b.num_tokens, D = cfg.model.hidden_size;
  std::vector<float> hidden = test::randn(n * D), normed(n * D, NAN), out(n * D, NAN), weight = test::randn(n * D);

  // normed = RMSNorm(hidden) with layers.0.attn_norm.
  model.mixer_input_norm(ctx, 0, b, test::cpu_f32(hidden, {n, D}), test::cpu_f32(normed, {n, D}));
  {
    const std::vector<float> w = model.get_param("layers.0.attn_norm");
    std::vector<float> expect(n * D);
    for (int64_t i = 0; i < n; ++i) {
      double ss = 0;
      for (int64_t j = 0; j < D; ++j) ss += double(hidden[i * D + j]) * hidden[i * D + j];
      const double r = 1.0 / std::sqrt(ss / D + cfg.model.rms_norm_eps);
      for (int64_t j = 0; j < D; ++j) expect[i * D + j] = float(hidden[i * D + j] * r * w[j]);
    }
    EXPECT_LT(test::rel_err(normed, expect), 1e-6);
  }

  // Layer 0 (K) against KdaLayerWeights holding the same values.
  model.mixer_forward(ctx, 0, b, test::cpu_f32(normed, {n, D}), test::cpu_f32(out, {n, D}));
  ASSERT_TRUE(test::all_finite(out));
  {
    KdaLayerWeights w(cfg.kda, Device::cpu(), DType::f32);
    for (const KdaLayerWeights::Param& p : w.params()) {
      const std::vector<float> v = model.get_param("layers.0." + p.name);
      w.set_param(p.name, test::to_f64(v));
    }
    PackedSequence seq;
    seq.num_tokens = n;
    seq.num_docs = b.num_docs;
    seq.cu_seqlens = b.cu_seqlens;
    Arena act("act", Device::cpu(), 8 << 20), scratch("scratch", Device::cpu(), 8 << 20);
    KdaLayer::Saved saved = w.layer().alloc_saved(act, n, DType::f32);
    std::vector<float> ref(n * D, NAN);
    w.layer().forward(ctx, seq, test::cpu_f32(normed, {n, D}), test::cpu_f32(ref, {n, D}), saved, scratch);
    EXPECT_EQ(out, ref);
  }

  // Backward of loss = sum(weight * out) for each layer kind: only the mixer's gradients move.
  for (const int64_t layer : {int64_t(0), int64_t(1)}) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    auto loss = [&] {
      std::vector<float> o(n * D, NAN);
      model.mixer_forward(ctx, layer, b, test::cpu_f32(normed, {n, D}), test::cpu_f32(o, {n, D}));
      double s = 0;
      for (int64_t i = 0; i < n * D; ++i) s += double(weight[i]) * o[i];
      return s;
    };
    model.zero_grad();
    std::vector<float> d_input(n * D, NAN);
    loss();
    model.mixer_backward(ctx, layer, b, test::cpu_f32(weight, {n, D}), test::cpu_f32(d_input, {n, D}));
    ASSERT_TRUE(test::all_finite(d_input));
    const std::vector<ParamInfo> mixer = model.mixer_params(layer);
    ASSERT_FALSE(mixer.empty());
    for (const ParamInfo& p : model.params()) {
      const bool own = std::any_of(mixer.begin(), mixer.end(), [&](const ParamInfo& q) { return q.name == p.name; });
      if (own) continue;
      for (float g : model.get_grad(p.name)) ASSERT_EQ(g, 0.0f) << p.name << " is not a parameter of the mixer";
    }
    std::vector<std::vector<float>> grads;
    for (const ParamInfo& p : mixer) grads.push_back(model.get_grad(p.name));
    report(sampled_fd(
        model, mixer, 10,
        [&](const std::string& name) {
          for (size_t i = 0; i < mixer.size(); ++i)
            if (mixer[i].name == name) return grads[i];
          return std::vector<float>{};
        },
        loss, {}, kQkStep));
    // d_input by finite differences on sampled input entries.
    double num = 0, den = 0;
    for (int s = 0; s < 12; ++s) {
      const int64_t i = test::randint(1, 0, static_cast<int32_t>(n * D))[0];
      const double fd = richardson(normed[i], loss, kQkStep);
      num += (d_input[i] - fd) * (d_input[i] - fd);
      den += fd * fd;
    }
    report({{"d_input", std::sqrt(num), std::sqrt(den)}});
  }

  // Backward without a matching forward is refused: after a full-model call, or for another layer.
  test::PackedBatch full = make_batch({6}, cfg.model.vocab_size);
  model.forward_loss(ctx, full.batch);
  test::expect_error(
      [&] {
        model.mixer_backward(ctx, 0, b, test::cpu_f32(weight, {n, D}));
      },
      {"mixer_backward", "layer 0"});
  test::expect_error(
      [&] {
        model.mixer_forward(ctx, 2, b, test::cpu_f32(normed, {n, D}), test::cpu_f32(out, {n, D}));
      },
      {"layer 2"});
  std::vector<float> small(4 * D);
  test::expect_error(
      [&] {
        model.mixer_forward(ctx, 0, b, test::cpu_f32(small, {4, D}), test::cpu_f32(out, {n, D}));
      },
      {"normed_input"});
  // The attention kernels' grid bound must come with the batch.
  Batch no_len = full.batch;
  no_len.max_doc_len = 0;
  test::expect_error([&] { model.forward_loss(ctx, no_len); }, {"HybridModel::forward", "max_doc_len"});
}

// ------------------------------------------------------------------------------ pattern and contract

TEST(HybridPattern, RepeatsExplicitListsAndLastLayerA) {
  auto str = [](const std::string& p, int64_t L) { return layer_pattern_string(parse_layer_pattern(p, L)); };
  EXPECT_EQ(str("KKKA", 8), "KKKAKKKA");
  EXPECT_EQ(str("KKKA", 6), "KKKAKA");  // the last layer is always A when repeating a hybrid
  EXPECT_EQ(str("KKKA", 4), "KKKA");
  EXPECT_EQ(str("KAKK", 4), "KAKK");  // as many letters as layers: nothing repeats, taken as written
  EXPECT_EQ(str("KAT", 3), "KAT");
  EXPECT_EQ(str("KA", 5), "KAKAA");
  EXPECT_EQ(str("K", 4), "KKKK");  // KDA-only: no A to force
  EXPECT_EQ(str("T", 3), "TTT");
  EXPECT_EQ(str("KT", 3), "KTK");
  EXPECT_EQ(str("A", 1), "A");
  EXPECT_EQ(str("K,K,A,T", 4), "KKAT");  // explicit: as written
  EXPECT_EQ(str(" K , A ,K ", 3), "KAK");
  EXPECT_EQ(str("K,A,K,K", 4), "KAKK");
  EXPECT_EQ(parse_layer_pattern("KAT", 3),
            (std::vector<MixerKind>{MixerKind::kda, MixerKind::nope_attention, MixerKind::teacher_attention}));
}

TEST(HybridPattern, BadPatternsNameTheField) {
  struct Bad {
    std::string pattern;
    int64_t layers;
    std::string needle;
  };
  for (const Bad& c : std::vector<Bad>{{"K,A", 3, "2 layers"},
                                       {"K,A,K,A", 3, "4 layers"},
                                       {"KXA", 4, "'X'"},
                                       {"K,AK,A", 3, "'AK'"},
                                       {"K,,A", 3, "''"},
                                       {"kka", 4, "'k'"},
                                       {"", 4, "empty"},
                                       {"KKKAK", 4, "longer"}}) {
    SCOPED_TRACE(c.pattern);
    test::expect_error([&] { parse_layer_pattern(c.pattern, c.layers, "run.ini"); },
                       {"run.ini", "'student.pattern'", c.needle});
  }
  // Through the config and the model.
  HybridConfig bad = test::tiny_hybrid_config("KA", 2);
  bad.pattern = "K,A,A";
  test::expect_error([&] { bad.finalize("run.ini"); }, {"run.ini", "'student.pattern'"});
  test::expect_error([&] { HybridModel(bad, Device::cpu(), 8); }, {"'student.pattern'"});
  HybridConfig hid = test::tiny_hybrid_config("KA", 2);
  hid.kda.hidden = 16;
  test::expect_error([&] { hid.finalize("run.ini"); }, {"run.ini", "'student.kda.hidden'"});
  HybridConfig heads = test::tiny_hybrid_config("KA", 2);
  heads.kda.v_heads = 3;
  test::expect_error([&] { heads.finalize("run.ini"); }, {"run.ini", "v_heads"});
  // KDA dims are not checked when no layer is K.
  HybridConfig no_k = test::tiny_hybrid_config("TA", 2);
  no_k.kda.v_heads = 3;
  EXPECT_NO_THROW(no_k.finalize("run.ini"));
}

// Names, shapes, order and flags: K layers use KdaLayerWeights' names and storage shapes under
// layers.L., A/T layers the dense names; mixer_params(l) is exactly the layer's mixer.
TEST(HybridModel, ParameterListMatchesContract) {
  const HybridConfig cfg = test::tiny_hybrid_config("KTA", 3, "qwen3");
  HybridModel model(cfg, Device::cpu(), 8);
  EXPECT_EQ(model.layer_kind(0), MixerKind::kda);
  EXPECT_EQ(model.layer_kind(1), MixerKind::teacher_attention);
  EXPECT_EQ(model.layer_kind(2), MixerKind::nope_attention);
  KdaLayerWeights ref(cfg.kda, Device::cpu(), DType::f32);
  std::vector<std::string> expect = {"embed", "layers.0.attn_norm"};
  for (const KdaLayerWeights::Param& p : ref.params()) {
    const std::string name = "layers.0." + p.name;
    expect.push_back(name);
    ASSERT_TRUE(model.has_param(name)) << name;
    const ParamInfo& q = model.param(name);
    EXPECT_EQ(q.numel, p.ref->value.numel()) << name;
    EXPECT_EQ(q.weight_decay, p.weight_decay) << name;
    EXPECT_EQ(static_cast<int64_t>(q.shape.size()), p.ref->value.ndim) << name;
    for (size_t i = 0; i < q.shape.size(); ++i) EXPECT_EQ(q.shape[i], p.ref->value.shape[i]) << name;
  }
  for (const char* n : {"mlp_norm", "w_gate_up", "w_down"}) expect.push_back(std::string("layers.0.") + n);
  for (int l = 1; l < 3; ++l)
    for (const char* n : {"attn_norm", "wqkv", "q_norm", "k_norm", "wo", "mlp_norm", "w_gate_up", "w_down"})
      expect.push_back("layers." + std::to_string(l) + "." + n);
  expect.push_back("final_norm");  // qwen3 variant: tied, no lm_head
  std::vector<std::string> names;
  for (const ParamInfo& p : model.params()) names.push_back(p.name);
  EXPECT_EQ(names, expect);
  EXPECT_FALSE(model.has_param("lm_head"));

  std::vector<std::string> m0, m2;
  for (const ParamInfo& p : model.mixer_params(0)) m0.push_back(p.name);
  for (const ParamInfo& p : model.mixer_params(2)) m2.push_back(p.name);
  EXPECT_EQ(m0, std::vector<std::string>(expect.begin() + 2, expect.begin() + 2 + 16));
  EXPECT_EQ(m2, (std::vector<std::string>{"layers.2.wqkv", "layers.2.q_norm", "layers.2.k_norm", "layers.2.wo"}));
  test::expect_error([&] { model.param("layers.1.q_proj.weight"); }, {"layers.1.q_proj.weight"});

  int64_t end = 0;
  for (const ParamInfo& p : model.params()) {
    EXPECT_GE(p.offset, end) << p.name;
    EXPECT_EQ(p.offset % 64, 0) << p.name;
    EXPECT_EQ(p.value.numel(), p.numel);
    EXPECT_EQ(p.grad.dtype, DType::f32);
    end = p.offset + p.numel;
  }
  EXPECT_LE(end, model.flat_params().numel());
  EXPECT_GT(model.memory_bytes(), size_t(model.flat_params().numel()) * 8);
}

// init_random: deterministic; norms 1, biases 0, FLA's A_log in [0, log 16] and dt_bias with
// softplus(dt_bias) in [1e-3, 1e-1]; matrices N(0, std), output projections N(0, std / sqrt(2 L)).
TEST(HybridModel, InitRandom) {
  HybridConfig cfg = test::tiny_hybrid_config("KKA", 3);
  cfg.model.hidden_size = 64;
  cfg.kda.hidden = 0;  // follow the model's hidden size
  cfg.finalize("test");
  HybridModel a(cfg, Device::cpu(), 8), b(cfg, Device::cpu(), 8);
  a.init_random(5, 0.05f);
  b.init_random(5, 0.05f);
  for (const ParamInfo& p : a.params()) EXPECT_EQ(a.get_param(p.name), b.get_param(p.name)) << p.name;
  auto rms = [](const std::vector<float>& v) {
    double s = 0;
    for (float x : v) s += double(x) * x;
    return std::sqrt(s / double(v.size()));
  };
  for (const ParamInfo& p : a.params()) {
    const std::vector<float> v = a.get_param(p.name);
    const std::string& n = p.name;
    if (n.ends_with("norm") || n.ends_with("o_norm.weight")) {
      for (float x : v) ASSERT_EQ(x, 1.0f) << n;
    } else if (n.ends_with("g_proj.1.bias")) {
      for (float x : v) ASSERT_EQ(x, 0.0f) << n;
    } else if (n.ends_with("A_log")) {
      for (float x : v) ASSERT_TRUE(x >= 0.0f && x <= std::log(16.0f) + 1e-6f) << n << " " << x;
    } else if (n.ends_with("dt_bias")) {
      for (float x : v) {
        const double sp = std::log1p(std::exp(double(x)));
        ASSERT_TRUE(sp >= 0.99e-3 && sp <= 1.01e-1) << n << " softplus " << sp;
      }
    } else if (p.numel >= 256) {
      const bool out = n.ends_with(".wo") || n.ends_with(".w_down") || n.ends_with(".o_proj.weight");
      const double want = out ? 0.05 / std::sqrt(6.0) : 0.05;
      EXPECT_NEAR(rms(v), want, 0.15 * want) << n;
    }
  }
}

// AdamW (trainer/optimizer.h) over params() on one repeated batch drives the loss far down.
TEST(HybridModel, AdamWOverfitsOneBatch) {
  const HybridConfig cfg = test::tiny_hybrid_config("KKA", 3);
  HybridModel model(cfg, Device::cpu(), 32);
  model.init_random(3, 0.1f);
  ExecContext ctx(Device::cpu());
  test::PackedBatch hb = test::pack_documents({test::randint(14, 0, 61), test::randint(10, 0, 61)});
  AdamWConfig oc;
  oc.weight_decay = 0.0;
  AdamW opt(model.params(), Device::cpu(), oc);
  const double first = model.forward_loss(ctx, hb.batch);
  for (int step = 0; step < 150; ++step) {
    model.zero_grad();
    ASSERT_TRUE(std::isfinite(model.forward_backward(ctx, hb.batch))) << "step " << step;
    opt.step(ctx, 1e-2);
  }
  const double last = model.forward_loss(ctx, hb.batch);
  std::printf("  AdamW: loss %.4f -> %.4f\n", first, last);
  EXPECT_GT(first, 3.5);  // ~ln(61) at init
  EXPECT_LT(last, first / 10);
}

}  // namespace
}  // namespace hyd

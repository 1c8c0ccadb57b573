// DenseModel backward vs central finite differences of forward_loss (CPU, f32).
//
// Tiny configs (V=61, D=32, L=2, Hq=4, Hkv=2, d=8, F=40) in four variants: llama untied, tied
// embeddings, qwen2-style qkv bias, qwen3-style per-head q/k norm. The batch packs two documents
// with some targets ignored (-1), so document masking, positions and the target mask are all in the
// gradient. For every parameter tensor a random sample of entries is perturbed by +-h and
//   g_fd = (L(p + h) - L(p - h)) / 2h
// is compared with the analytic gradient as one vector: ||g - g_fd|| / ||g_fd|| < 2e-2.
//
// Why 2e-2 fits f32: the loss is an f32 computation of a value ~4 (per-token losses summed in
// double), so two evaluations at nearby points carry rounding noise of a few ulps, eps_L ~ 1e-6;
// the central difference then errs by about eps_L / h + h^2 |L'''| / 6 ~ 1e-4 per entry with
// h = 1e-2 and weights of O(0.1..1), against sampled gradient vectors of norm 1e-3..1. Measured over
// 40 seeds the worst tensor reached 1e-3 relative (typically 1e-4), so 2e-2 leaves a 20x margin for
// unlucky samples, while a wrong backward term (a missing residual, a skipped RoPE backward, a bad
// mask) gives 1e-1..1. A tensor whose sampled gradient norm is below kNoiseFloor / kTolerance would be
// judged in absolute terms against kNoiseFloor instead (none was, in those 40 seeds).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include "tests/common/test_util.h"
#include "tests/common/tiny_model.h"
#include "trainer/model.h"

namespace hyd {
namespace {

constexpr float kStep = 1e-2f;
constexpr double kTolerance = 2e-2;
// Absolute error allowed for a sampled gradient vector whose own norm is at the noise level.
constexpr double kNoiseFloor = 1e-5;

// Documents of the given lengths, random tokens; target = next token of the same document, -1 at
// each document's end and at every 5th token (ignored positions inside documents).
test::PackedBatch make_batch(const std::vector<int32_t>& doc_lens, int64_t vocab) {
  return test::pack_documents(test::random_documents(doc_lens, vocab), [](int64_t i) { return i % 5 == 0; });
}

// Random weights of O(1) activations (not the tiny training init), so every path carries gradient:
// matrices N(0, 1/fan_in), embeddings N(0, 1), norms 1 + N(0, 0.2), biases N(0, 0.2).
void randomize(DenseModel& m) {
  for (const ParamInfo& p : m.params()) {
    std::vector<float> v;
    if (p.name.ends_with("norm")) {
      v = test::randn(p.numel, 0.2f, 1.0f);
    } else if (p.name.ends_with("bqkv")) {
      v = test::randn(p.numel, 0.2f);
    } else if (p.name == "embed") {
      v = test::randn(p.numel, 1.0f);
    } else {
      v = test::randn(p.numel, 1.0f / std::sqrt(static_cast<float>(p.shape[1])));
    }
    m.set_param(p.name, v.data(), p.numel);
  }
}

struct GradCheck {
  std::string name;
  double err = 0, ref_norm = 0;
};

// Compares sampled entries of every parameter's analytic gradient with central differences.
std::vector<GradCheck> check_gradients(DenseModel& m, ExecContext& ctx, const Batch& batch, int samples,
                                       const std::vector<std::string>& only = {}) {
  m.zero_grad();
  const double loss = m.forward_backward(ctx, batch);
  EXPECT_TRUE(std::isfinite(loss));
  EXPECT_NEAR(loss, m.forward_loss(ctx, batch), 1e-6 * std::abs(loss));
  std::vector<GradCheck> out;
  for (const ParamInfo& p : m.params()) {
    if (!only.empty() && std::find(only.begin(), only.end(), p.name) == only.end()) continue;
    const std::vector<float> grad = m.get_grad(p.name);
    std::vector<float> value = m.get_param(p.name);
    std::vector<int64_t> idx(p.numel);
    std::iota(idx.begin(), idx.end(), 0);
    std::shuffle(idx.begin(), idx.end(), test::rng());
    idx.resize(std::min<int64_t>(samples, p.numel));
    std::vector<double> analytic, numeric;
    for (int64_t i : idx) {
      const float orig = value[i];
      value[i] = orig + kStep;
      m.set_param(p.name, value.data(), p.numel);
      const double lp = m.forward_loss(ctx, batch);
      value[i] = orig - kStep;
      m.set_param(p.name, value.data(), p.numel);
      const double lm = m.forward_loss(ctx, batch);
      value[i] = orig;
      // The step actually taken is the f32 difference of the perturbed values.
      const double h2 = static_cast<double>(orig + kStep) - static_cast<double>(orig - kStep);
      numeric.push_back((lp - lm) / h2);
      analytic.push_back(grad[i]);
    }
    m.set_param(p.name, value.data(), p.numel);
    double num = 0, den = 0;
    for (size_t j = 0; j < idx.size(); ++j) {
      num += (analytic[j] - numeric[j]) * (analytic[j] - numeric[j]);
      den += numeric[j] * numeric[j];
    }
    out.push_back({p.name, std::sqrt(num), std::sqrt(den)});  // a NaN anywhere makes err NaN: fails below
  }
  return out;
}

void expect_gradients_match(const std::vector<GradCheck>& checks) {
  for (const GradCheck& g : checks) {
    const double rel = g.err / std::max(g.ref_norm, 1e-30);
    std::printf("  %-22s |g_fd| %.3e  |g - g_fd| %.3e  rel %.2e\n", g.name.c_str(), g.ref_norm, g.err, rel);
    EXPECT_TRUE(std::isfinite(g.err)) << g.name;
    EXPECT_LT(g.err, std::max(kTolerance * g.ref_norm, kNoiseFloor))
        << g.name << ": analytic gradient differs from finite differences (|g_fd| = " << g.ref_norm << ")";
    EXPECT_GT(g.ref_norm, 0.0) << g.name << ": gradient sample is exactly zero; the check would be vacuous";
  }
}

class ModelGrad : public ::testing::TestWithParam<std::string> {};

TEST_P(ModelGrad, EveryParameterMatchesFiniteDifferences) {
  const ModelConfig cfg = test::tiny_dense_variant(GetParam());
  test::PackedBatch hb = make_batch({11, 13}, cfg.vocab_size);
  DenseModel model(cfg, Device::cpu(), 32);
  randomize(model);
  ExecContext ctx(Device::cpu());
  expect_gradients_match(check_gradients(model, ctx, hb.batch, 20));
}

INSTANTIATE_TEST_SUITE_P(Variants, ModelGrad, ::testing::Values("llama", "tied", "qwen2", "qwen3"),
                         [](const auto& info) { return info.param; });

// A batch longer than one LM-head chunk (1024 tokens): the chunked logits/CE/backward loop must
// hand every chunk's d(normed) and dWlm on correctly. Checked on the tensors the LM head touches.
TEST(ModelGradLong, LmHeadChunksMatchFiniteDifferences) {
  ModelConfig cfg = test::tiny_dense_variant("llama");
  cfg.num_layers = 1;
  cfg.max_position_embeddings = 2048;
  test::PackedBatch hb = make_batch({600, 500}, cfg.vocab_size);
  DenseModel model(cfg, Device::cpu(), 1100);
  randomize(model);
  ExecContext ctx(Device::cpu());
  expect_gradients_match(
      check_gradients(model, ctx, hb.batch, 6, {"lm_head", "final_norm", "layers.0.w_down", "embed"}));
}

// Gradients accumulate across calls and scale with loss_scale.
TEST(ModelGradAccumulation, AccumulatesAndScales) {
  const ModelConfig cfg = test::tiny_dense_variant("qwen2");
  test::PackedBatch hb = make_batch({9, 7}, cfg.vocab_size);
  DenseModel model(cfg, Device::cpu(), 16);
  model.init_random(7, 0.1f);
  ExecContext ctx(Device::cpu());
  model.zero_grad();
  const double l1 = model.forward_backward(ctx, hb.batch, 1.0f);
  std::vector<std::vector<float>> g1;
  for (const ParamInfo& p : model.params()) g1.push_back(model.get_grad(p.name));
  const double l2 = model.forward_backward(ctx, hb.batch, 0.5f);
  EXPECT_DOUBLE_EQ(l1, l2);  // the returned loss is unscaled
  size_t i = 0;
  for (const ParamInfo& p : model.params()) {
    std::vector<float> expect = g1[i++];
    for (float& v : expect) v *= 1.5f;
    EXPECT_LT(test::rel_err(model.get_grad(p.name), expect), 1e-5) << p.name;
  }
  model.zero_grad();
  for (const ParamInfo& p : model.params())
    for (float v : model.get_grad(p.name)) ASSERT_EQ(v, 0.0f) << p.name;
}

}  // namespace
}  // namespace hyd

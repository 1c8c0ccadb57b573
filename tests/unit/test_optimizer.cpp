// AdamW over flat parameter/gradient buffers: the update equals the formula of kernels/adamw.h
// (bias correction, decoupled weight decay only where ParamInfo.weight_decay), the global gradient
// norm, clipping through grad_scale, skipped non-finite steps; and the same on a real DenseModel.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "tests/common/test_util.h"
#include "trainer/model.h"
#include "trainer/optimizer.h"

namespace hyd {
namespace {

// Reference AdamW in double for one parameter.
struct RefAdamW {
  std::vector<double> p, m, v;
  explicit RefAdamW(std::vector<double> p0) : p(std::move(p0)), m(p.size(), 0.0), v(p.size(), 0.0) {}
  void step(const float* g, double lr, const AdamWConfig& c, bool decay, int64_t t, double scale) {
    const double wd = decay ? c.weight_decay : 0.0;
    for (size_t i = 0; i < p.size(); ++i) {
      const double gi = static_cast<double>(g[i]) * scale;
      m[i] = c.beta1 * m[i] + (1 - c.beta1) * gi;
      v[i] = c.beta2 * v[i] + (1 - c.beta2) * gi * gi;
      const double mh = m[i] / (1 - std::pow(c.beta1, static_cast<double>(t)));
      const double vh = v[i] / (1 - std::pow(c.beta2, static_cast<double>(t)));
      p[i] -= lr * (mh / (std::sqrt(vh) + c.eps) + wd * p[i]);
    }
  }
};

// max_i |a_i - b_i| / (1 + |b_i|): absolute for small values, relative (f32 rounding) for large ones.
double max_err(const float* a, const std::vector<double>& b) {
  double d = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    d = std::max(d, std::abs(static_cast<double>(a[i]) - b[i]) / (1.0 + std::abs(b[i])));
  }
  return d;
}

// A tiny model's flat buffers laid out like DenseModel's: one f32 parameter buffer, one f32 gradient
// buffer; a matrix (decayed), a norm weight and a bias (not decayed). The buffers never move.
struct FlatTinyModel {
  std::vector<float> params, grads;
  std::vector<ParamInfo> infos;
  FlatTinyModel() {
    const std::vector<std::pair<const char*, std::vector<int64_t>>> shapes = {
        {"layers.0.wo", {6, 5}}, {"layers.0.attn_norm", {7}}, {"layers.0.bqkv", {3}}};
    int64_t offset = 0;
    for (const auto& [name, shape] : shapes) {
      ParamInfo p;
      p.name = name;
      p.shape = shape;
      p.weight_decay = shape.size() == 2;
      p.offset = offset;
      p.numel = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
      offset += p.numel;
      infos.push_back(p);
    }
    params = test::randn(static_cast<size_t>(offset));
    grads.assign(params.size(), 0.0f);
    for (ParamInfo& p : infos) {
      p.value = Tensor(params.data() + p.offset, DType::f32, Device::cpu(), {p.numel});
      p.grad = Tensor(grads.data() + p.offset, DType::f32, Device::cpu(), {p.numel});
    }
  }
  std::vector<double> param_values(const ParamInfo& p) const {
    return std::vector<double>(params.begin() + p.offset, params.begin() + p.offset + p.numel);
  }
  void set_grads(const std::vector<float>& g) { std::copy(g.begin(), g.end(), grads.begin()); }
  double grad_norm() const {
    double sq = 0;
    for (float g : grads) sq += static_cast<double>(g) * g;
    return std::sqrt(sq);
  }
};

AdamWConfig test_config(double grad_clip) {
  AdamWConfig c;
  c.beta1 = 0.9;
  c.beta2 = 0.95;
  c.eps = 1e-8;
  c.weight_decay = 0.1;
  c.grad_clip = grad_clip;
  return c;
}

TEST(AdamW, StepsMatchTheFormulaWithWeightDecayOnlyWhereFlagged) {
  FlatTinyModel tm;
  const AdamWConfig cfg = test_config(0.0);  // no clipping
  AdamW opt(tm.infos, Device::cpu(), cfg);
  ExecContext ctx(Device::cpu());
  std::vector<RefAdamW> ref;
  for (const ParamInfo& p : tm.infos) ref.emplace_back(tm.param_values(p));
  const double lrs[] = {1e-2, 3e-3, 5e-2, 1e-3};
  for (int64_t t = 1; t <= 4; ++t) {
    tm.set_grads(test::randn(tm.grads.size(), 0.5f));
    const double norm = opt.step(ctx, lrs[t - 1]);
    EXPECT_NEAR(norm, tm.grad_norm(), 1e-5 * tm.grad_norm()) << "step " << t;
    EXPECT_EQ(opt.steps_taken(), t);
    for (size_t i = 0; i < tm.infos.size(); ++i) {
      const ParamInfo& p = tm.infos[i];
      ref[i].step(tm.grads.data() + p.offset, lrs[t - 1], cfg, p.weight_decay, t, 1.0);
      EXPECT_LT(max_err(tm.params.data() + p.offset, ref[i].p), 1e-6) << p.name << " step " << t;
      EXPECT_LT(max_err(opt.first_moments()[i].ptr<float>(), ref[i].m), 1e-6) << p.name;
      EXPECT_LT(max_err(opt.second_moments()[i].ptr<float>(), ref[i].v), 1e-6) << p.name;
    }
  }
  EXPECT_EQ(opt.skipped_steps(), 0);
}

TEST(AdamW, WeightDecayShrinksOnlyDecayedParameters) {
  // With zero gradients Adam's term is 0 (m = v = 0): only decoupled decay moves the weights.
  FlatTinyModel tm;
  AdamW opt(tm.infos, Device::cpu(), test_config(1.0));
  ExecContext ctx(Device::cpu());
  const std::vector<float> before = tm.params;
  opt.step(ctx, 0.5);
  for (const ParamInfo& p : tm.infos)
    for (int64_t j = 0; j < p.numel; ++j) {
      const float b = before[static_cast<size_t>(p.offset + j)];
      const float expect = p.weight_decay ? static_cast<float>(b * (1.0 - 0.5 * 0.1)) : b;
      EXPECT_NEAR(tm.params[static_cast<size_t>(p.offset + j)], expect, 1e-6f) << p.name << "[" << j << "]";
    }
}

TEST(AdamW, ClippingScalesTheGradientsByMaxNormOverNorm) {
  FlatTinyModel tm;
  const AdamWConfig cfg = test_config(1.0);
  AdamW opt(tm.infos, Device::cpu(), cfg);
  ExecContext ctx(Device::cpu());
  std::vector<RefAdamW> ref;
  for (const ParamInfo& p : tm.infos) ref.emplace_back(tm.param_values(p));
  // Gradients with global norm 10 (well above grad_clip = 1).
  std::vector<float> g = test::randn(tm.grads.size());
  double sq = 0;
  for (float x : g) sq += static_cast<double>(x) * x;
  for (float& x : g) x = static_cast<float>(x * 10.0 / std::sqrt(sq));
  tm.set_grads(g);
  const std::vector<float> grads_before = tm.grads;
  const double norm = opt.step(ctx, 1e-2);
  EXPECT_NEAR(norm, 10.0, 1e-4) << "the returned norm is the one before clipping";
  const double scale = 1.0 / (10.0 + 1e-6);
  for (size_t i = 0; i < tm.infos.size(); ++i) {
    const ParamInfo& p = tm.infos[i];
    ref[i].step(tm.grads.data() + p.offset, 1e-2, cfg, p.weight_decay, 1, scale);
    EXPECT_LT(max_err(opt.first_moments()[i].ptr<float>(), ref[i].m), 1e-7) << p.name;
    EXPECT_LT(max_err(opt.second_moments()[i].ptr<float>(), ref[i].v), 1e-8) << p.name;
    EXPECT_LT(max_err(tm.params.data() + p.offset, ref[i].p), 1e-6) << p.name;
  }
  EXPECT_EQ(tm.grads, grads_before) << "clipping must not rewrite the gradients";
  // Below the threshold nothing is scaled: m = (1 - beta1) g exactly.
  FlatTinyModel small;
  AdamW opt2(small.infos, Device::cpu(), test_config(100.0));
  small.set_grads(test::randn(small.grads.size(), 0.1f));
  opt2.step(ctx, 1e-3);
  for (size_t i = 0; i < small.infos.size(); ++i)
    for (int64_t j = 0; j < small.infos[i].numel; ++j)
      EXPECT_NEAR(opt2.first_moments()[i].ptr<float>()[j], 0.1 * small.grads[small.infos[i].offset + j], 1e-8);
}

TEST(AdamW, NonFiniteGradientsSkipTheStep) {
  FlatTinyModel tm;
  AdamW opt(tm.infos, Device::cpu(), test_config(1.0));
  ExecContext ctx(Device::cpu());
  const std::vector<float> before = tm.params;
  tm.set_grads(test::randn(tm.grads.size()));
  tm.grads[3] = NAN;
  EXPECT_TRUE(std::isnan(opt.step(ctx, 1e-2)));
  EXPECT_EQ(tm.params, before);
  EXPECT_EQ(opt.steps_taken(), 0);
  EXPECT_EQ(opt.skipped_steps(), 1);
  tm.grads[3] = INFINITY;
  EXPECT_FALSE(std::isfinite(opt.step(ctx, 1e-2)));
  EXPECT_EQ(opt.skipped_steps(), 2);
  // A finite step afterwards is step 1 for bias correction: |update| = lr for every element.
  for (size_t k = 0; k < tm.grads.size(); ++k) tm.grads[k] = (k % 3 == 0) ? -0.5f : 0.5f;  // |g| >> eps
  opt.step(ctx, 1e-2);
  EXPECT_EQ(opt.steps_taken(), 1);
  for (const ParamInfo& p : tm.infos) {
    if (p.weight_decay) continue;
    for (int64_t j = 0; j < p.numel; ++j) {
      const size_t k = static_cast<size_t>(p.offset + j);
      EXPECT_NEAR(std::abs(tm.params[k] - before[k]), 1e-2, 1e-6) << p.name;
    }
  }
}

// CUDA: f32 masters in the optimizer's arena start from the bf16 weights; every step updates the
// masters like the formula (f32 math on the device) and rewrites the bf16 working weights as
// bf16(master). Skipped on machines without a GPU.
TEST(AdamW, CudaKeepsF32MastersAndWritesBf16WorkingWeights) {
  HYD_REQUIRE_GPU();
  const std::vector<std::pair<const char*, std::vector<int64_t>>> shapes = {
      {"embed", {40, 24}}, {"layers.0.attn_norm", {24}}, {"layers.0.w_down", {24, 33}}};
  int64_t total = 0;
  std::vector<int64_t> offsets;
  for (const auto& [name, shape] : shapes) {
    offsets.push_back(total);
    total += (std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>()) + 63) / 64 * 64;
  }
  const std::vector<float> host_params = test::round_bf16(test::randn(static_cast<size_t>(total)));
  test::DeviceBuffers buf(Device::cuda(0), size_t(8) << 20);
  const Tensor flat_params = buf.upload(host_params, {total}, DType::bf16);
  const Tensor flat_grads = buf.zeros({total}, DType::f32);
  std::vector<ParamInfo> infos;
  for (size_t i = 0; i < shapes.size(); ++i) {
    ParamInfo p;
    p.name = shapes[i].first;
    p.shape = shapes[i].second;
    p.weight_decay = p.shape.size() == 2;
    p.offset = offsets[i];
    p.numel = std::accumulate(p.shape.begin(), p.shape.end(), int64_t{1}, std::multiplies<>());
    p.value = flat_params.slice0(p.offset, p.offset + p.numel);
    p.grad = flat_grads.slice0(p.offset, p.offset + p.numel);
    infos.push_back(p);
  }
  test::device_sync();
  const AdamWConfig cfg = test_config(2.0);
  AdamW opt(infos, Device::cuda(0), cfg);
  ExecContext ctx(Device::cuda(0));
  std::vector<RefAdamW> ref;
  for (const ParamInfo& p : infos) {
    ref.emplace_back(std::vector<double>(host_params.begin() + p.offset, host_params.begin() + p.offset + p.numel));
    EXPECT_EQ(test::DeviceBuffers::download(opt.masters()[ref.size() - 1]),
              std::vector<float>(host_params.begin() + p.offset, host_params.begin() + p.offset + p.numel))
        << p.name << ": masters start from the working weights";
  }
  for (int64_t t = 1; t <= 3; ++t) {
    const std::vector<float> g = test::randn(static_cast<size_t>(total), 0.3f);
    copy_tensor(flat_grads, Tensor(const_cast<float*>(g.data()), DType::f32, Device::cpu(), {total}));
    test::device_sync();
    double sq = 0;
    for (const ParamInfo& p : infos)
      for (int64_t j = 0; j < p.numel; ++j) sq += static_cast<double>(g[p.offset + j]) * g[p.offset + j];
    const double norm = opt.step(ctx, 1e-2);
    ctx.synchronize();
    EXPECT_NEAR(norm, std::sqrt(sq), 1e-4 * std::sqrt(sq)) << "step " << t;
    const double scale = std::sqrt(sq) > cfg.grad_clip ? cfg.grad_clip / (std::sqrt(sq) + 1e-6) : 1.0;
    for (size_t i = 0; i < infos.size(); ++i) {
      const ParamInfo& p = infos[i];
      ref[i].step(g.data() + p.offset, 1e-2, cfg, p.weight_decay, t, scale);
      const std::vector<float> master = test::DeviceBuffers::download(opt.masters()[i]);
      const std::vector<float> working = test::DeviceBuffers::download(p.value);
      EXPECT_LT(max_err(master.data(), ref[i].p), 2e-5) << p.name << " step " << t;
      EXPECT_EQ(working, test::round_bf16(master)) << p.name << ": working = bf16(master)";
    }
  }
}

// The optimizer on a real DenseModel's flat buffers, after a real backward.
TEST(AdamW, UpdatesADenseModelAfterBackward) {
  ModelConfig mc;
  mc.vocab_size = 32;
  mc.hidden_size = 16;
  mc.intermediate_size = 24;
  mc.num_layers = 1;
  mc.num_heads = 2;
  mc.num_kv_heads = 1;
  mc.max_position_embeddings = 16;
  mc.finalize("test");
  const int64_t n = 10;
  DenseModel model(mc, Device::cpu(), n);
  model.init_random(7);
  ExecContext ctx(Device::cpu());
  test::DeviceBuffers buf(Device::cpu(), 1 << 20);
  std::vector<int32_t> tokens = test::randint(n, 0, 32), targets(n), positions(n);
  for (int64_t i = 0; i < n; ++i) {
    targets[i] = i + 1 < n ? tokens[i + 1] : -1;
    positions[i] = static_cast<int32_t>(i);
  }
  Batch b;
  b.tokens = buf.upload_i32(tokens, {n});
  b.targets = buf.upload_i32(targets, {n});
  b.positions = buf.upload_i32(positions, {n});
  b.cu_seqlens = buf.upload_i32({0, static_cast<int32_t>(n)}, {2});
  b.num_tokens = n;
  b.num_docs = 1;
  b.max_doc_len = n;
  b.num_targets = n - 1;
  model.zero_grad();
  const double loss = model.forward_backward(ctx, b);
  ASSERT_TRUE(std::isfinite(loss));

  const AdamWConfig cfg = test_config(0.5);
  AdamW opt(model, cfg);
  bool saw_decayed = false, saw_plain = false;
  double sq = 0;
  std::vector<std::vector<float>> before, grads;
  for (const ParamInfo& p : model.params()) {
    before.push_back(model.get_param(p.name));
    grads.push_back(model.get_grad(p.name));
    for (float g : grads.back()) sq += static_cast<double>(g) * g;
    (p.weight_decay ? saw_decayed : saw_plain) = true;
  }
  ASSERT_TRUE(saw_decayed && saw_plain) << "the model has both decayed and undecayed parameters";
  const double norm = opt.step(ctx, 1e-2);
  EXPECT_NEAR(norm, std::sqrt(sq), 1e-5 * std::sqrt(sq));
  const double scale = norm > cfg.grad_clip ? cfg.grad_clip / (norm + 1e-6) : 1.0;
  for (size_t i = 0; i < model.params().size(); ++i) {
    const ParamInfo& p = model.params()[i];
    RefAdamW r(std::vector<double>(before[i].begin(), before[i].end()));
    r.step(grads[i].data(), 1e-2, cfg, p.weight_decay, 1, scale);
    const std::vector<float> after = model.get_param(p.name);
    EXPECT_LT(max_err(after.data(), r.p), 2e-6) << p.name;
  }
  // The next forward sees the new weights: the loss on the same batch goes down.
  EXPECT_LT(model.forward_loss(ctx, b), loss);
}

}  // namespace
}  // namespace hyd

// DenseModel behaviour on the CPU: document packing, loss vs logits, overfitting with SGD, the
// parameter contract (names, shapes, order, counts, init), memory on paper, and config errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "tests/common/test_util.h"
#include "tests/common/tiny_model.h"
#include "trainer/model.h"

namespace hyd {
namespace {

using test::pack_documents;
using test::PackedBatch;
using test::tiny_dense_config;

// Mean CE over targets >= 0 from full logits [N, V], in double.
double mean_ce(const std::vector<float>& logits, const std::vector<int32_t>& targets, int64_t vocab) {
  double sum = 0;
  int64_t count = 0;
  for (size_t i = 0; i < targets.size(); ++i) {
    if (targets[i] < 0) continue;
    const float* row = logits.data() + i * vocab;
    double mx = row[0];
    for (int64_t v = 1; v < vocab; ++v) mx = std::max(mx, double(row[v]));
    double se = 0;
    for (int64_t v = 0; v < vocab; ++v) se += std::exp(double(row[v]) - mx);
    sum += mx + std::log(se) - row[targets[i]];
    ++count;
  }
  return sum / static_cast<double>(count);
}

std::vector<float> rows(const std::vector<float>& m, int64_t begin, int64_t end, int64_t width) {
  return {m.begin() + begin * width, m.begin() + end * width};
}

// (a) Two documents packed in one batch give the same logits as each document alone: attention
// never crosses the boundary and RoPE positions restart per document.
TEST(ModelBehaviour, PackedDocumentsMatchSeparateRuns) {
  for (const bool qk_norm : {false, true}) {
    const ModelConfig cfg = tiny_dense_config(qk_norm, !qk_norm);
    DenseModel model(cfg, Device::cpu(), 32);
    model.init_random(11, 0.2f);
    ExecContext ctx(Device::cpu());
    const std::vector<int32_t> a = test::randint(7, 0, 61), b = test::randint(9, 0, 61);
    PackedBatch ab = pack_documents({a, b}), ba = pack_documents({b, a}), only_a = pack_documents({a}),
                only_b = pack_documents({b});
    const int64_t V = cfg.vocab_size;
    const std::vector<float> l_ab = model.forward_logits(ctx, ab.batch);
    const std::vector<float> l_ba = model.forward_logits(ctx, ba.batch);
    const std::vector<float> l_a = model.forward_logits(ctx, only_a.batch);
    const std::vector<float> l_b = model.forward_logits(ctx, only_b.batch);
    ASSERT_EQ(l_ab.size(), size_t(16 * V));
    ASSERT_TRUE(test::all_finite(l_ab));
    EXPECT_LT(test::rel_err(rows(l_ab, 0, 7, V), l_a), 1e-5) << "qk_norm=" << qk_norm;
    EXPECT_LT(test::rel_err(rows(l_ab, 7, 16, V), l_b), 1e-5) << "qk_norm=" << qk_norm;
    EXPECT_LT(test::rel_err(rows(l_ba, 0, 9, V), l_b), 1e-5) << "qk_norm=" << qk_norm;
    EXPECT_LT(test::rel_err(rows(l_ba, 9, 16, V), l_a), 1e-5) << "qk_norm=" << qk_norm;
    // Guard against a vacuous pass: the same tokens as one document must give different logits for b.
    std::vector<int32_t> joined = a;
    joined.insert(joined.end(), b.begin(), b.end());
    PackedBatch one = pack_documents({joined});
    EXPECT_GT(test::rel_err(rows(model.forward_logits(ctx, one.batch), 7, 16, V), l_b), 1e-3);
  }
}

// (b) forward_loss (chunked logits + CE, never all logits at once) equals the mean CE computed on
// the host from forward_logits, including a batch that spans two LM-head chunks (> 1024 tokens),
// and forward_backward returns the same loss.
TEST(ModelBehaviour, LossEqualsMeanCrossEntropyOfLogits) {
  struct Case {
    int64_t layers;
    std::vector<int32_t> doc_lens;
  };
  for (const Case& c : {Case{2, {12, 5, 15}}, Case{1, {700, 400}}}) {
    ModelConfig cfg = tiny_dense_config(false, false, c.layers == 2);
    cfg.num_layers = c.layers;
    cfg.max_position_embeddings = 1024;
    std::vector<std::vector<int32_t>> docs;
    int64_t n = 0;
    for (int32_t len : c.doc_lens) {
      docs.push_back(test::randint(len, 0, 61));
      n += len;
    }
    PackedBatch hb = pack_documents(docs, [](int64_t i) { return i % 7 == 3; });
    DenseModel model(cfg, Device::cpu(), n);
    model.init_random(5, 0.5f);
    ExecContext ctx(Device::cpu());
    const std::vector<float> logits = model.forward_logits(ctx, hb.batch);
    ASSERT_EQ(logits.size(), size_t(n * cfg.vocab_size));
    ASSERT_TRUE(test::all_finite(logits));
    const double ref = mean_ce(logits, hb.targets, cfg.vocab_size);
    const double loss = model.forward_loss(ctx, hb.batch);
    EXPECT_NEAR(loss, ref, 1e-5 * ref) << n << " tokens";
    model.zero_grad();
    EXPECT_NEAR(model.forward_backward(ctx, hb.batch), ref, 1e-5 * ref) << n << " tokens";
    EXPECT_GT(ref, 1.0);  // random weights: far from a trivial loss
  }
}

// (c) Plain SGD on one repeated batch drives the loss down by a large factor.
TEST(ModelBehaviour, SgdOverfitsOneBatch) {
  const ModelConfig cfg = tiny_dense_config(true, false, false);
  DenseModel model(cfg, Device::cpu(), 32);
  model.init_random(3, 0.1f);
  ExecContext ctx(Device::cpu());
  PackedBatch hb = pack_documents({test::randint(14, 0, 61), test::randint(10, 0, 61)});
  const Tensor p = model.flat_params(), g = model.flat_grads();
  float* pv = p.ptr<float>();
  const float* gv = g.ptr<float>();
  const float lr = 0.5f;
  const double first = model.forward_loss(ctx, hb.batch);
  double last = first;
  for (int step = 0; step < 300; ++step) {
    model.zero_grad();
    last = model.forward_backward(ctx, hb.batch);
    ASSERT_TRUE(std::isfinite(last)) << "step " << step;
    for (int64_t i = 0; i < p.numel(); ++i) pv[i] -= lr * gv[i];
  }
  last = model.forward_loss(ctx, hb.batch);
  std::printf("  SGD: loss %.4f -> %.4f\n", first, last);
  EXPECT_GT(first, 3.5);  // ~ln(61) at init
  EXPECT_LT(last, first / 20);
}

// (d) The parameter contract: names, shapes, order, weight-decay flags, non-overlapping aligned views,
// and num_parameters() = sum of numels for every variant.
TEST(ModelBehaviour, ParameterListMatchesContract) {
  const ModelConfig cfg = tiny_dense_config(true, true, false);
  DenseModel model(cfg, Device::cpu(), 8);
  std::vector<std::string> names;
  for (const ParamInfo& p : model.params()) names.push_back(p.name);
  std::vector<std::string> expect = {"embed"};
  for (int l = 0; l < 2; ++l)
    for (const char* n : {"attn_norm", "wqkv", "bqkv", "q_norm", "k_norm", "wo", "mlp_norm", "w_gate_up", "w_down"})
      expect.push_back("layers." + std::to_string(l) + "." + n);
  expect.push_back("final_norm");
  expect.push_back("lm_head");
  EXPECT_EQ(names, expect);
  const int64_t D = 32, F = 40, V = 61, d = 8;
  EXPECT_EQ(model.param("embed").shape, (std::vector<int64_t>{V, D}));
  EXPECT_EQ(model.param("layers.1.wqkv").shape, (std::vector<int64_t>{(4 + 2 * 2) * d, D}));
  EXPECT_EQ(model.param("layers.1.bqkv").shape, (std::vector<int64_t>{(4 + 2 * 2) * d}));
  EXPECT_EQ(model.param("layers.0.q_norm").shape, (std::vector<int64_t>{d}));
  EXPECT_EQ(model.param("layers.0.wo").shape, (std::vector<int64_t>{D, 4 * d}));
  EXPECT_EQ(model.param("layers.0.w_gate_up").shape, (std::vector<int64_t>{2 * F, D}));
  EXPECT_EQ(model.param("layers.0.w_down").shape, (std::vector<int64_t>{D, F}));
  EXPECT_EQ(model.param("lm_head").shape, (std::vector<int64_t>{V, D}));
  EXPECT_TRUE(model.param("layers.0.wqkv").weight_decay);
  EXPECT_FALSE(model.param("layers.0.bqkv").weight_decay);
  EXPECT_FALSE(model.param("final_norm").weight_decay);
  EXPECT_TRUE(model.has_param("lm_head"));
  EXPECT_FALSE(model.has_param("layers.2.wo"));
  test::expect_error([&] { model.param("layers.0.nonsense"); }, {"layers.0.nonsense"});

  int64_t end = 0;
  for (const ParamInfo& p : model.params()) {
    EXPECT_GE(p.offset, end) << p.name << " overlaps the previous parameter";
    EXPECT_EQ(p.offset % 64, 0) << p.name;
    EXPECT_EQ(p.value.numel(), p.numel);
    EXPECT_EQ(p.grad.numel(), p.numel);
    EXPECT_EQ(p.value.data, static_cast<char*>(model.flat_params().data) + p.offset * 4) << p.name;
    EXPECT_EQ(p.grad.dtype, DType::f32);
    end = p.offset + p.numel;
  }
  EXPECT_LE(end, model.flat_params().numel());
  EXPECT_EQ(model.flat_grads().numel(), model.flat_params().numel());

  for (const bool tied : {false, true})
    for (const bool qk : {false, true})
      for (const bool bias : {false, true}) {
        const ModelConfig c = tiny_dense_config(qk, bias, tied);
        DenseModel m(c, Device::cpu(), 4);
        int64_t sum = 0;
        for (const ParamInfo& p : m.params()) sum += p.numel;
        EXPECT_EQ(c.num_parameters(), sum) << "tied=" << tied << " qk_norm=" << qk << " bias=" << bias;
        EXPECT_EQ(m.has_param("lm_head"), !tied);
      }

  // FLOPs: 6 * (matmul params) + 6 L T q_dim.
  const ModelConfig c = tiny_dense_config();
  const double expect_flops = 6.0 * double(c.num_parameters() - V * D) + 6.0 * 2 * 128 * 32;
  EXPECT_DOUBLE_EQ(c.train_flops_per_token(128), expect_flops);
}

// init_random: deterministic in the seed; norms 1, biases 0, matrices N(0, std), output projections
// N(0, std / sqrt(2 L)). set_param/get_param round-trip, and reject a wrong size.
TEST(ModelBehaviour, InitRandomAndParamAccess) {
  ModelConfig cfg = tiny_dense_config(true, true, false);
  cfg.hidden_size = 64;
  cfg.num_layers = 4;
  cfg.head_dim = 16;
  DenseModel a(cfg, Device::cpu(), 8), b(cfg, Device::cpu(), 8);
  a.init_random(42, 0.05f);
  b.init_random(42, 0.05f);
  for (const ParamInfo& p : a.params()) EXPECT_EQ(a.get_param(p.name), b.get_param(p.name)) << p.name;
  b.init_random(43, 0.05f);
  EXPECT_NE(a.get_param("layers.0.wqkv"), b.get_param("layers.0.wqkv"));

  auto stddev = [](const std::vector<float>& v) {
    double s = 0;
    for (float x : v) s += double(x) * x;
    return std::sqrt(s / v.size());
  };
  for (const ParamInfo& p : a.params()) {
    const std::vector<float> v = a.get_param(p.name);
    if (p.name.ends_with("norm")) {
      for (float x : v) ASSERT_EQ(x, 1.0f) << p.name;
    } else if (p.name.ends_with("bqkv")) {
      for (float x : v) ASSERT_EQ(x, 0.0f) << p.name;
    } else {
      const double want = (p.name.ends_with(".wo") || p.name.ends_with(".w_down")) ? 0.05 / std::sqrt(8.0) : 0.05;
      EXPECT_NEAR(stddev(v), want, 0.1 * want) << p.name;
    }
  }

  const std::vector<float> v = test::randn(a.param("layers.2.w_down").numel);
  a.set_param("layers.2.w_down", v.data(), static_cast<int64_t>(v.size()));
  EXPECT_EQ(a.get_param("layers.2.w_down"), v);
  EXPECT_THROW(a.set_param("layers.2.w_down", v.data(), static_cast<int64_t>(v.size()) - 1), Error);
  EXPECT_THROW(a.set_param("layers.9.w_down", v.data(), static_cast<int64_t>(v.size())), Error);
}

// Arena sizes are what the formula in trainer/model.cpp says (up to the 256-byte rounding of each
// allocation and the 64-element padding of each parameter).
TEST(ModelBehaviour, MemoryMatchesFormulaOnPaper) {
  // V = 3000: the logits chunk is the largest scratch user; V = 100: the MLP backward is.
  for (const int64_t V : {3000, 100}) {
    ModelConfig c;
    c.vocab_size = V;
    c.hidden_size = 256;
    c.intermediate_size = 704;
    c.num_layers = 3;
    c.num_heads = 8;
    c.num_kv_heads = 2;
    c.max_position_embeddings = 1024;
    c.finalize("test");
    const int64_t N = 512, L = 3, D = 256, F = 704, Hq = 8, Hkv = 2, d = 32, q = Hq * d, kv = Hkv * d;
    DenseModel model(c, Device::cpu(), N);
    const double P = double(c.num_parameters());
    const double params = 4 * P, grads = 4 * P, tables = 2.0 * 1024 * (d / 2) * 4;
    const double act = 4.0 * N * ((2 * L + 1) * D + L * (D + q + 2 * kv + q) + L * (D + 2 * F + F) + 3 * D) +
                       4.0 * N * (L * (1 + Hq + 1) + 2);
    const int64_t chunk = std::min<int64_t>(N, std::clamp<int64_t>((int64_t(64) << 20) / (4 * V) / 16 * 16, 16, 1024));
    const double scratch = std::max({4.0 * N * (2 * q + 2 * kv + D), 4.0 * N * (3 * F + D), 4.0 * chunk * V});
    const double paper = params + grads + tables + act + scratch;
    const double got = double(model.memory_bytes());
    EXPECT_GE(got, paper) << "V=" << V;
    EXPECT_LT(got, paper * 1.01) << "V=" << V << ": paper " << paper << " bytes, arenas " << got;
  }
}

// Bad batches are rejected with a message, not run.
TEST(ModelBehaviour, RejectsBadBatches) {
  const ModelConfig cfg = tiny_dense_config();
  DenseModel model(cfg, Device::cpu(), 8);
  model.init_random(1);
  ExecContext ctx(Device::cpu());
  PackedBatch too_long = pack_documents({test::randint(9, 0, 61)});
  EXPECT_THROW(model.forward_loss(ctx, too_long.batch), Error);
  PackedBatch ok = pack_documents({test::randint(6, 0, 61)});
  Batch bad = ok.batch;
  bad.num_docs = 2;  // cu_seqlens has 2 entries, not 3
  EXPECT_THROW(model.forward_loss(ctx, bad), Error);
  for (const int64_t max_len : {int64_t(0), int64_t(7)}) {  // outside 1..num_tokens
    Batch bad_len = ok.batch;
    bad_len.max_doc_len = max_len;
    test::expect_error_naming([&] { model.forward_loss(ctx, bad_len); }, "DenseModel", "max_doc_len");
  }
  Batch short_len = ok.batch;
  short_len.max_doc_len = 5;  // the document has 6 tokens: the attention op checks the bound on the CPU
  test::expect_error_naming([&] { model.forward_loss(ctx, short_len); }, "attention_forward", "max_len");
  EXPECT_TRUE(std::isfinite(model.forward_loss(ctx, ok.batch)));
}

// (d) finalize names the bad field.
TEST(ModelConfigTest, FinalizeRejectsBadFieldsNamingThem) {
  struct Bad {
    std::string field;
    std::function<void(ModelConfig&)> mutate;
  };
  const std::vector<Bad> cases = {
      {"model.family", [](ModelConfig& c) { c.family = "gpt2"; }},
      {"model.vocab_size", [](ModelConfig& c) { c.vocab_size = 0; }},
      {"model.hidden_size", [](ModelConfig& c) { c.hidden_size = -4; }},
      {"model.intermediate_size", [](ModelConfig& c) { c.intermediate_size = 0; }},
      {"model.num_layers", [](ModelConfig& c) { c.num_layers = 0; }},
      {"model.num_heads", [](ModelConfig& c) { c.num_heads = 0; }},
      {"model.num_kv_heads", [](ModelConfig& c) { c.num_kv_heads = 3; }},
      {"model.num_kv_heads", [](ModelConfig& c) { c.num_kv_heads = 0; }},
      {"model.head_dim", [](ModelConfig& c) { c.head_dim = 7; }},
      {"model.head_dim", [](ModelConfig& c) { c.head_dim = 0, c.hidden_size = 30; }},
      {"model.rms_norm_eps", [](ModelConfig& c) { c.rms_norm_eps = 0; }},
      {"model.rope_theta", [](ModelConfig& c) { c.rope_theta = -1; }},
      {"model.max_position_embeddings", [](ModelConfig& c) { c.max_position_embeddings = 0; }},
      {"model.rope_scaling.type", [](ModelConfig& c) { c.rope_scaling.type = "ntk"; }},
      {"model.rope_scaling.factor", [](ModelConfig& c) { c.rope_scaling.type = "linear", c.rope_scaling.factor = 0; }},
      {"model.rope_scaling.original_max_position_embeddings",
       [](ModelConfig& c) { c.rope_scaling.type = "llama3", c.rope_scaling.factor = 8; }},
      {"model.eos_token_id", [](ModelConfig& c) { c.eos_token_id = 61; }},
      {"model.bos_token_id", [](ModelConfig& c) { c.bos_token_id = -2; }},
  };
  for (const Bad& b : cases) {
    ModelConfig c = tiny_dense_config();
    c.head_dim = 8;
    b.mutate(c);
    SCOPED_TRACE("a bad " + b.field);
    test::expect_error([&] { c.finalize("run.ini"); }, {"run.ini", "'" + b.field + "'"});
  }
  // head_dim 0 resolves to hidden / heads; a valid llama3 scaling passes.
  ModelConfig c = tiny_dense_config();
  c.head_dim = 0;
  c.rope_scaling.type = "llama3";
  c.rope_scaling.factor = 8;
  c.rope_scaling.original_max_position_embeddings = 128;
  c.finalize("run.ini");
  EXPECT_EQ(c.head_dim, 8);
  // The model refuses an invalid config too.
  ModelConfig bad = tiny_dense_config();
  bad.num_kv_heads = 3;
  EXPECT_THROW(DenseModel(bad, Device::cpu(), 4), Error);
}

}  // namespace
}  // namespace hyd

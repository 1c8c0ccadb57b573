// Golden test of the dense model against Hugging Face transformers.
//
// tests/golden/gen_dense_goldens.py saved three tiny random models (Llama with llama3 RoPE scaling and an
// untied head; Qwen3 with q/k norm, head_dim != hidden/heads, tied embeddings; Qwen2 with q/k/v biases and
// YaRN; tests/golden/gen_moe_golden.py adds a Qwen3-MoE with one dense layer and one sparse layer of 8 experts,
// top 2, renormalised, and a dots1 with one dense layer (first_k_dense_replace 1) and one sparse layer of 8
// sigmoid-routed experts, top 2, a random selection bias that changes the experts of most tokens, routed
// scaling 2.5 and 2 shared experts) and, for two token sequences run as separate forwards in float32 with eager
// attention, the logits and the mean next-token cross-entropy. Here each model is loaded from its HF folder
// (config.json + model.safetensors) into a CPU DenseModel, the two sequences are packed as two documents of one batch
// (positions restart at 0, attention must not cross the boundary), and logits and loss are compared.
// Float32 HF itself is ~1e-6 away from a float64 run (printed by the generator), so 1e-4 leaves room
// for summation order only.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "distill/teacher.h"
#include "tests/common/test_util.h"
#include "tests/common/tiny_model.h"
#include "trainer/core/exec_context.h"
#include "trainer/model.h"

namespace hyd {
namespace {

constexpr double kLogitTolerance = 1e-4;  // max |err| / max |logit|, and ||err|| / ||logits||
constexpr double kLossTolerance = 1e-5;   // relative
// CUDA: bf16 weights and activations against the float32 reference. Measured on an H200: logits
// 1.4e-2 .. 2.2e-2, loss 2e-4 .. 7e-4; transformers itself in bf16 is 1.7e-2 .. 2.5e-2 off on these models
// (bf16-rounded weights alone: 1.0e-2 .. 1.3e-2).
constexpr double kCudaLogitTolerance = 4e-2;
constexpr double kCudaLossTolerance = 5e-3;

struct Golden {
  int64_t num_seqs = 0, seq_len = 0, vocab = 0;
  std::vector<int64_t> input_ids;  // [S, T]
  std::vector<float> logits;       // [S, T, V]
  double loss = 0;
};

Golden read_golden(const std::string& path) {
  SafetensorsFile f(path);
  Golden g;
  const auto& ids = f.info("input_ids");
  const auto& lg = f.info("logits");
  EXPECT_EQ(ids.shape.size(), 2u);
  EXPECT_EQ(lg.shape.size(), 3u);
  g.num_seqs = ids.shape[0];
  g.seq_len = ids.shape[1];
  g.vocab = lg.shape[2];
  EXPECT_EQ(lg.shape[0], g.num_seqs);
  EXPECT_EQ(lg.shape[1], g.seq_len);
  g.input_ids = f.read_i64("input_ids");
  g.logits = f.read_f32("logits");
  g.loss = f.read_f32("loss").at(0);
  return g;
}

// The sequences packed as documents of one batch; target = next token of the same document.
test::PackedBatch pack(const Golden& g) {
  std::vector<std::vector<int32_t>> docs(g.num_seqs);
  for (int64_t s = 0; s < g.num_seqs; ++s)
    for (int64_t t = 0; t < g.seq_len; ++t) docs[s].push_back(static_cast<int32_t>(g.input_ids[s * g.seq_len + t]));
  return test::pack_documents(docs);
}

class GoldenDense : public ::testing::TestWithParam<const char*> {};

TEST_P(GoldenDense, LogitsAndLossMatchTransformers) {
  const std::string dir = std::string(HYD_SOURCE_DIR) + "/tests/golden/data/" + GetParam();
  const Golden g = read_golden(dir + "/golden.safetensors");
  const TeacherInfo info = inspect_teacher(dir);
  ASSERT_EQ(info.config.vocab_size, g.vocab);

  if (std::string(GetParam()) == "qwen3_moe") {
    // Both FFN kinds are covered: layer 0 dense (mlp_only_layers), layer 1 sparse.
    ASSERT_EQ(info.config.num_experts, 8);
    EXPECT_FALSE(info.config.is_moe_layer(0));
    EXPECT_TRUE(info.config.is_moe_layer(1));
  }
  if (std::string(GetParam()) == "dots1") {
    // Layer 0 dense (first_k_dense_replace), layer 1 sparse with every dots1 feature on.
    ASSERT_EQ(info.config.num_experts, 8);
    EXPECT_FALSE(info.config.is_moe_layer(0));
    EXPECT_TRUE(info.config.is_moe_layer(1));
    EXPECT_EQ(info.config.moe_score_func, "sigmoid");
    EXPECT_TRUE(info.config.moe_selection_bias);
    EXPECT_EQ(info.config.shared_expert_ffn(), 64);
    EXPECT_DOUBLE_EQ(info.config.routed_scaling_factor, 2.5);
  }

  const test::PackedBatch hb = pack(g);
  DenseModel model(info.config, Device::cpu(), hb.batch.num_tokens);
  load_teacher_weights(dir, model);
  ExecContext ctx(Device::cpu());

  const std::vector<float> logits = model.forward_logits(ctx, hb.batch);
  ASSERT_EQ(logits.size(), g.logits.size());
  ASSERT_TRUE(test::all_finite(logits));
  double max_err = 0, max_ref = 0;
  int64_t worst = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const double e = std::fabs(double(logits[i]) - double(g.logits[i]));
    if (e > max_err) {
      max_err = e;
      worst = static_cast<int64_t>(i);
    }
    max_ref = std::max(max_ref, std::fabs(double(g.logits[i])));
  }
  const double rel_max = max_err / max_ref;
  const double rel_norm = test::rel_err(logits, g.logits);
  // Per-document error: the second document must not see the first (positions restart, no cross attention).
  const size_t per_doc = static_cast<size_t>(g.seq_len * g.vocab);
  const double rel_doc1 = test::rel_err(std::vector<float>(logits.begin() + per_doc, logits.end()),
                                        std::vector<float>(g.logits.begin() + per_doc, g.logits.end()));

  const double loss = model.forward_loss(ctx, hb.batch);
  const double loss_rel = std::fabs(loss - g.loss) / std::fabs(g.loss);

  std::printf(
      "[golden %s] logits: max|err|/max|ref| %.3e, ||err||/||ref|| %.3e (doc 1: %.3e), worst at token %lld "
      "vocab %lld; loss %.8f vs HF %.8f (rel %.3e)\n",
      GetParam(), rel_max, rel_norm, rel_doc1, static_cast<long long>(worst / g.vocab),
      static_cast<long long>(worst % g.vocab), loss, g.loss, loss_rel);
  EXPECT_LT(rel_max, kLogitTolerance);
  EXPECT_LT(rel_norm, kLogitTolerance);
  EXPECT_LT(rel_doc1, kLogitTolerance);
  EXPECT_LT(loss_rel, kLossTolerance);
}

// The same teacher on CUDA (bf16 weights and activations, f32 logits and loss) against the float32 HF
// reference: only bf16 rounding separates them. Skipped without a CUDA device (runs on the GPU machine).
TEST_P(GoldenDense, CudaBf16NearTransformers) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const std::string dir = std::string(HYD_SOURCE_DIR) + "/tests/golden/data/" + GetParam();
  const Golden g = read_golden(dir + "/golden.safetensors");
  const TeacherInfo info = inspect_teacher(dir);
  if (info.config.has_moe_layers()) {
    // MoE on CUDA is held to the CPU model in tests/gpu/test_gpu_moe.cpp; against the f32 HF reference a
    // bf16 router may swap near-tied experts of a token, which this test's bounds do not allow for.
    GTEST_SKIP() << GetParam() << " on CUDA: see gpu.test_gpu_moe";
  }
  const test::PackedBatch hb = pack(g);
  test::DeviceBuffers buffers(Device::cuda(0), size_t(1) << 20);
  const Batch b = test::upload_batch(buffers, hb);

  DenseModel model(info.config, Device::cuda(0), b.num_tokens);
  load_teacher_weights(dir, model);
  ExecContext ctx(Device::cuda(0));
  const std::vector<float> logits = model.forward_logits(ctx, b);
  ASSERT_EQ(logits.size(), g.logits.size());
  ASSERT_TRUE(test::all_finite(logits));
  const double rel_norm = test::rel_err(logits, g.logits);
  const double loss = model.forward_loss(ctx, b);
  const double loss_rel = std::fabs(loss - g.loss) / std::fabs(g.loss);
  std::printf("[golden %s cuda bf16] logits ||err||/||ref|| %.3e; loss %.6f vs HF %.6f (rel %.3e)\n", GetParam(),
              rel_norm, loss, g.loss, loss_rel);
  EXPECT_LT(rel_norm, kCudaLogitTolerance);
  EXPECT_LT(loss_rel, kCudaLossTolerance);
}

INSTANTIATE_TEST_SUITE_P(Models, GoldenDense, ::testing::Values("llama", "qwen3", "qwen2", "qwen3_moe", "dots1"),
                         [](const ::testing::TestParamInfo<const char*>& p) { return std::string(p.param); });

}  // namespace
}  // namespace hyd

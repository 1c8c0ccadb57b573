#include "tests/common/tiny_model.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "trainer/batch_upload.h"
#include "trainer/layer_kda.h"

namespace hyd::test {

ModelConfig tiny_dense_config(bool qk_norm, bool qkv_bias, bool tied) {
  ModelConfig c;
  c.family = qk_norm ? "qwen3" : qkv_bias ? "qwen2" : "llama";
  c.vocab_size = 61;
  c.hidden_size = 32;
  c.intermediate_size = 40;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 256;
  c.qk_norm = qk_norm;
  c.qkv_bias = qkv_bias;
  c.tie_word_embeddings = tied;
  c.finalize("test");
  return c;
}

ModelConfig tiny_dense_variant(const std::string& variant) {
  HYD_CHECK(variant == "llama" || variant == "tied" || variant == "qwen2" || variant == "qwen3",
            "unknown tiny model variant '", variant, "'");
  return tiny_dense_config(variant == "qwen3", variant == "qwen2", variant == "qwen3" || variant == "tied");
}

void make_dots1(ModelConfig& c, double routed_scaling, int64_t shared_experts) {
  c.family = "dots1";
  c.moe_score_func = "sigmoid";
  c.moe_selection_bias = true;
  c.routed_scaling_factor = routed_scaling;
  c.num_shared_experts = shared_experts;
  c.first_k_dense_replace = 1;
  c.decoder_sparse_step = 1;
  c.mlp_only_layers.clear();
}

ModelConfig tiny_moe_config(int64_t layers, std::vector<int64_t> mlp_only) {
  ModelConfig c = tiny_dense_variant("qwen3");
  c.family = "qwen3_moe";
  c.num_layers = layers;
  c.num_experts = 4;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = 16;
  c.norm_topk_prob = true;
  c.decoder_sparse_step = 1;
  c.mlp_only_layers = std::move(mlp_only);
  return c;
}

ModelConfig tiny_dots1_config(int64_t layers) {
  ModelConfig c = tiny_moe_config(layers, {});
  make_dots1(c, 1.7, 1);
  return c;
}

PackedBatch pack_documents(const std::vector<std::vector<int32_t>>& docs, const std::function<bool(int64_t)>& ignore) {
  PackedBatch h;
  h.cu_seqlens.push_back(0);
  for (const auto& doc : docs) {
    const int32_t len = static_cast<int32_t>(doc.size());
    for (int32_t i = 0; i < len; ++i) {
      h.tokens.push_back(doc[i]);
      h.positions.push_back(i);
      h.targets.push_back(i + 1 < len ? doc[i + 1] : -1);
    }
    h.cu_seqlens.push_back(h.cu_seqlens.back() + len);
  }
  const int64_t n = static_cast<int64_t>(h.tokens.size());
  if (ignore)
    for (int64_t i = 0; i < n; ++i)
      if (ignore(i)) h.targets[i] = -1;
  Batch& b = h.batch;
  b.tokens = Tensor(h.tokens.data(), DType::i32, Device::cpu(), {n});
  b.targets = Tensor(h.targets.data(), DType::i32, Device::cpu(), {n});
  b.positions = Tensor(h.positions.data(), DType::i32, Device::cpu(), {n});
  b.cu_seqlens = Tensor(h.cu_seqlens.data(), DType::i32, Device::cpu(), {static_cast<int64_t>(docs.size()) + 1});
  b.num_tokens = n;
  b.num_docs = static_cast<int64_t>(docs.size());
  b.max_doc_len = max_doc_len(h.cu_seqlens);
  b.num_targets = std::count_if(h.targets.begin(), h.targets.end(), [](int32_t t) { return t >= 0; });
  return h;
}

std::vector<std::vector<int32_t>> random_documents(const std::vector<int32_t>& lengths, int64_t vocab) {
  std::vector<std::vector<int32_t>> docs;
  for (int32_t len : lengths) docs.push_back(randint(len, 0, static_cast<int32_t>(vocab)));
  return docs;
}

Batch upload_batch(DeviceBuffers& buffers, const PackedBatch& host) {
  Batch b = host.batch;
  b.tokens = buffers.upload_i32(host.tokens, {b.num_tokens});
  b.targets = buffers.upload_i32(host.targets, {b.num_tokens});
  b.positions = buffers.upload_i32(host.positions, {b.num_tokens});
  b.cu_seqlens = buffers.upload_i32(host.cu_seqlens, {b.num_docs + 1});
  return b;
}

HybridConfig tiny_hybrid_config(const std::string& pattern, int64_t layers, const std::string& variant) {
  HybridConfig c;
  c.model = tiny_dense_variant(variant);
  c.model.num_layers = layers;
  c.kda.heads = 2;
  c.kda.v_heads = 4;
  c.kda.dk = 8;
  c.kda.dv = 8;
  c.kda.conv_size = 4;
  c.pattern = pattern;
  c.finalize("test");
  return c;
}

void randomize_hybrid(HybridModel& m, std::mt19937_64* gen) {
  auto randn = [&](int64_t n, float sd, float mean = 0.0f) {
    if (gen == nullptr) return test::randn(static_cast<size_t>(n), sd, mean);
    std::normal_distribution<float> d(mean, sd);
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = d(*gen);
    return v;
  };
  std::vector<std::string> names;
  for (const ParamInfo& p : m.params()) names.push_back(p.name);
  for (size_t i : kda_init_draw_order(names)) {  // a seed keeps its values across layout changes
    const ParamInfo& p = m.params()[i];
    const std::string& n = p.name;
    std::vector<float> v;
    if (n.ends_with("A_log"))
      v = randn(p.numel, 0.5f);
    else if (n.ends_with("dt_bias"))
      v = randn(p.numel, 0.5f, -1.0f);
    else if (n.ends_with("norm") || n.ends_with("norm.weight"))
      v = randn(p.numel, 0.2f, 1.0f);
    else if (n.ends_with("bqkv") || n.ends_with("bias"))
      v = randn(p.numel, 0.2f);
    else if (n.ends_with("conv1d.weight"))
      v = randn(p.numel, 0.5f);
    else if (n == "embed")
      v = randn(p.numel, 1.0f);
    else if (n.ends_with("mlp.gate.weight"))
      v = randn(p.numel, 3.0f / std::sqrt(static_cast<float>(p.shape.back())));
    else
      v = randn(p.numel, 1.0f / std::sqrt(static_cast<float>(p.shape.back())));
    m.set_param(n, v.data(), p.numel);
  }
}

}  // namespace hyd::test

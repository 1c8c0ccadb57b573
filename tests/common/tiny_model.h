// Tiny dense-model configs and packed CPU batches shared by the model, golden and gpu tests.
#pragma once

#include <functional>
#include <random>
#include <string>
#include <vector>

#include "tests/common/test_util.h"
#include "trainer/hybrid_model.h"
#include "trainer/model.h"

namespace hyd::test {

// The model tests' tiny config: V=61, D=32, F=40, L=2, Hq=4, Hkv=2, d=8, 256 positions, default
// rms_norm_eps and rope_theta. The family is qwen3 with q/k norm, else qwen2 with a qkv bias, else llama.
ModelConfig tiny_dense_config(bool qk_norm = false, bool qkv_bias = false, bool tied = false);
// The same by variant: "llama", "tied" (tied embeddings), "qwen2" (qkv bias), "qwen3" (q/k norm, tied).
ModelConfig tiny_dense_variant(const std::string& variant);
// Turns a MoE config (experts already set) into a dots1 one: family dots1, sigmoid router with a selection bias,
// routed_scaling_factor `routed_scaling`, `shared_experts` shared experts (HF's one MLP of their width), layer 0
// dense through first_k_dense_replace 1 (mlp_only_layers cleared, decoder_sparse_step 1).
void make_dots1(ModelConfig& c, double routed_scaling, int64_t shared_experts);
// qwen3_moe on the tiny qwen3 skeleton (q/k norm, tied) with `layers` layers: MoE FFNs of 4 experts (F = 16),
// top 2, renormalised, except the layers in mlp_only (dense).
ModelConfig tiny_moe_config(int64_t layers, std::vector<int64_t> mlp_only);
// dots1 on the same skeleton: layers >= 1 MoE (first_k_dense_replace 1) with 4 sigmoid-routed experts (F = 16),
// top 2, renormalised, a selection bias, routed scaling 1.7 and one shared expert (F_s = 16).
ModelConfig tiny_dots1_config(int64_t layers);

// Documents packed into one CPU batch backed by host vectors: target = next token of the same
// document, -1 at each document's end and wherever ignore(i) holds (i = token index in the batch).
// Not copyable: `batch` views this object's vectors (moving keeps the views valid).
struct PackedBatch {
  std::vector<int32_t> tokens, targets, positions, cu_seqlens;
  Batch batch;

  PackedBatch() = default;
  PackedBatch(PackedBatch&&) = default;
  PackedBatch& operator=(PackedBatch&&) = default;
  PackedBatch(const PackedBatch&) = delete;
  PackedBatch& operator=(const PackedBatch&) = delete;
};
PackedBatch pack_documents(const std::vector<std::vector<int32_t>>& docs,
                           const std::function<bool(int64_t)>& ignore = nullptr);

// Documents of the given lengths with uniform random tokens in [0, vocab).
std::vector<std::vector<int32_t>> random_documents(const std::vector<int32_t>& lengths, int64_t vocab);

// The packed batch's tokens, targets, positions and cu_seqlens uploaded to `buffers`' device.
Batch upload_batch(DeviceBuffers& buffers, const PackedBatch& host);

// A hybrid student on the tiny skeleton (tiny_dense_variant(variant) with `layers` layers) and KDA with
// H=2 q/k heads, HV=4 value heads (two per q/k head), dk=dv=8, conv 4.
HybridConfig tiny_hybrid_config(const std::string& pattern, int64_t layers, const std::string& variant = "llama");

// Weights with O(1) activations so every path carries gradient and every value is distinct: matrices
// N(0, 1/fan_in), embeddings N(0, 1), norms 1 + N(0, 0.2), biases N(0, 0.2), conv taps N(0, 0.5),
// A_log N(0, 0.5) (decay rates exp(A_log) ~ 1), dt_bias N(-1, 0.5) (softplus ~ 0.3: per-token decays
// exp(g) ~ 0.7, far from 0 and 1). MoE routers (mlp.gate.weight) N(0, 9/fan_in): wide top-k gaps. fan_in is
// the last dimension (stacked expert weights [E, rows, fan_in] included). gen: the draws' source (the
// test's rng() when null), e.g. a fixed seed where routing must stay stable.
void randomize_hybrid(HybridModel& m, std::mt19937_64* gen = nullptr);

}  // namespace hyd::test

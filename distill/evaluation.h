// Evaluation building blocks for distillation: passkey retrieval accuracy and KV-cache sizes.
//
// Passkey data comes from data/make_passkey.py: one document per prompt, /loss_mask = 1 exactly on
// the answer tokens, /doc_lengths_target [D] int64 the nominal length each prompt was built for.
// A prompt is correct when, at every answer position p (loss_mask[p] = 1), argmax(logits[p - 1]) ==
// tokens[p] (teacher-forced exact match of the whole answer).
//
// KV cache per token of context, for inference memory comparisons (DISTILL.md):
//   dense:   2 (K and V) * layers * kv_heads * head_dim * bytes_per_element
//   hybrid:  the same summed over A and T layers only; K (KDA) layers keep no per-token cache but a
//            constant recurrent state of HV * dk * dv fp32 values per sequence, plus the short
//            convolutions' windows: (conv_size - 1) * (2 H dk + HV dv) values at bytes_per_element.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "data/dataset.h"
#include "trainer/hybrid_model.h"
#include "trainer/model_config.h"

namespace hyd {

// ---------------------------------------------------------------- passkey retrieval

struct PasskeyResult {
  int64_t length = 0;   // nominal prompt length (tokens)
  int64_t total = 0;    // prompts of this length
  int64_t correct = 0;  // prompts whose whole answer was predicted
  double accuracy() const { return total > 0 ? static_cast<double>(correct) / static_cast<double>(total) : 0.0; }
};

// tokens of one document [len] -> host f32 logits [len, V] (row i predicts token i + 1). Wrap a
// model's forward_logits (DenseModel, HybridModel) over a one-document batch.
using DocumentLogitsFn = std::function<std::vector<float>(const std::vector<int32_t>& tokens)>;

// Passkey accuracy grouped by nominal length (/doc_lengths_target of the dataset's file; the actual
// document length when the file has none), sorted by length. Documents without answer tokens are
// skipped. Errors (hyd::Error naming the file): no /loss_mask, no document with an answer, an answer
// token at a document's first position, logits of the wrong size, a bad /doc_lengths_target.
std::vector<PasskeyResult> passkey_accuracy(const DocumentLogitsFn& logits_fn, const TokenDataset& data);

// ---------------------------------------------------------------- KV-cache size

struct KvCacheBytes {
  int64_t per_token = 0;                // K/V cache bytes per token of context, all cached layers together
  int64_t state_per_sequence = 0;       // KDA recurrent state (fp32) bytes per sequence, all K layers
  int64_t conv_state_per_sequence = 0;  // KDA short-convolution windows per sequence, all K layers
  int64_t cached_layers = 0;            // layers with a per-token cache (dense: all; hybrid: A and T)
  int64_t state_layers = 0;             // K layers

  // Total cache of `batch` sequences of `context` tokens.
  int64_t bytes_for(int64_t context, int64_t batch = 1) const {
    return batch * (per_token * context + state_per_sequence + conv_state_per_sequence);
  }
};

// Dense teacher. head_dim 0 is resolved as hidden_size / num_heads. Throws hyd::Error on
// non-positive dimensions or bytes_per_element.
KvCacheBytes kv_cache_bytes_per_token(const ModelConfig& cfg, int64_t bytes_per_element = 2);
// Hybrid student: the pattern is parsed from cfg.pattern when cfg.layers is empty (not finalized).
KvCacheBytes kv_cache_bytes_per_token(const HybridConfig& cfg, int64_t bytes_per_element = 2);

}  // namespace hyd

// Evaluation of distillation (DISTILL.md "Evaluation"): passkey retrieval accuracy, KV-cache sizes, and
// DistillEvaluator, which puts them together with held-out metrics of a student and its teacher.
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

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "trainer/core/exec_context.h"
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

// ---------------------------------------------------------------- a student against its teacher

// Held-out next-token metrics of both models on the same tokens (those with a target), temperature 1:
//   loss       mean cross-entropy with the data labels (nats/token); perplexity = exp(loss)
//   kl         mean KL(p_teacher || p_student) per token (kernels/distill_loss.h)
//   top1       fraction of tokens where both models' argmax agree
struct HeldOutMetrics {
  int64_t tokens = 0;  // 0: not measured (the other fields are NaN)
  double teacher_loss = NAN, student_loss = NAN, kl = NAN, top1_agreement = NAN;
};

// One evaluation: where in the run it was taken, and its numbers.
struct DistillEvaluation {
  int64_t global_step = 0;  // steps of both stages
  int64_t stage = 0;        // 1 or 2
  int64_t stage_step = 0;
  std::string checkpoint;  // the evaluated checkpoint (hydistill eval); empty during a run
  HeldOutMetrics held_out;
  // Per nominal length; teacher_passkey[i] and student_passkey[i] are the same prompts. Empty: no data.
  std::vector<PasskeyResult> teacher_passkey, student_passkey;
  KvCacheBytes teacher_kv, student_kv;  // bf16 caches (2 bytes per element)

  // The printed table: one row per metric, one column per model.
  std::string table() const;
  // The eval.jsonl record: {"stage", "step" (= stage_step), "global_step", "held_out_tokens",
  // "teacher_loss", "student_loss", "teacher_ppl", "student_ppl", "kl", "top1_agreement",
  // "passkey": [{"length", "total", "teacher_correct", "student_correct", "teacher_accuracy",
  // "student_accuracy"}], "teacher_kv_bytes_per_token", "student_kv_bytes_per_token",
  // "student_state_bytes_per_sequence", "checkpoint" (hydistill eval only)}; NaN is written as null.
  nlohmann::json json() const;
};

// Evaluates a student against its teacher (an all-T HybridModel with the teacher's weights), both on
// the context's device. held_out: the validation split's sampler, read from its batch 0 on (the same
// tokens every time), `batches` micro-batches; nullptr or 0 batches: no held-out metrics. passkey: a
// passkey dataset (nullptr: none), whose documents must fit both models' max_tokens. The evaluator
// owns its batch buffers and scratch (sized for max_tokens tokens); it leaves the models' parameters
// and gradients untouched.
class DistillEvaluator {
 public:
  // sp (with rows x seq_len, the held-out batches' shape): the held-out metrics run under sequence parallelism,
  // every rank of sp's group calling evaluate() with its slice of each batch (sums all-reduced over the group,
  // so the models hold max_tokens = rows x seq_len / sp tokens); passkey evaluation is then not available.
  // ep: the models' MoE layers run under expert parallelism (Batch::ep; required for expert-sharded models),
  // every rank of ep's group calling evaluate() with the same arguments.
  DistillEvaluator(HybridModel& teacher, HybridModel& student, int64_t max_tokens, const PackedSampler* held_out,
                   int64_t batches, const TokenDataset* passkey, SequenceParallel* sp = nullptr, int64_t rows = 0,
                   int64_t seq_len = 0, const MoeExpertParallel* ep = nullptr);
  ~DistillEvaluator();
  DistillEvaluator(const DistillEvaluator&) = delete;
  DistillEvaluator& operator=(const DistillEvaluator&) = delete;

  DistillEvaluation evaluate(ExecContext& ctx);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The longest document of a dataset (tokens): what a model must hold to evaluate it document by document.
int64_t longest_document(const TokenDataset& data);

}  // namespace hyd

// HDF5 token datasets and the deterministic packed-batch sampler.
//
// File format (docs/formats.md, DESIGN.md): /tokens int32 [N]; /doc_offsets int64 [D+1] with
// doc_offsets[0] = 0, doc_offsets[D] = N, non-decreasing; optional /loss_mask uint8 [N]; root
// attributes vocab_size (int), eos_id (int), tokenizer_sha256 (string). Every problem found on open
// is a hyd::Error naming the file and the dataset/attribute.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace hyd {

struct DatasetInfo {
  std::string path;
  int64_t num_tokens = 0;
  int64_t num_docs = 0;
  int64_t vocab_size = 0;
  int32_t eos_id = -1;
  std::string tokenizer_sha256;
  bool has_loss_mask = false;
};

class TokenDataset {
 public:
  // Opens and validates the file (datasets, shapes, dtypes, attributes, offsets, token range on a
  // full scan); tokens, offsets and the mask are read into memory.
  explicit TokenDataset(const std::string& path);
  ~TokenDataset();
  TokenDataset(const TokenDataset&) = delete;
  TokenDataset& operator=(const TokenDataset&) = delete;

  const DatasetInfo& info() const;
  const std::vector<int32_t>& tokens() const;
  const std::vector<int64_t>& doc_offsets() const;
  const std::vector<uint8_t>& loss_mask() const;  // empty when the file has none
  // Unigram entropy of the token distribution, nats per token (the loss a model that ignores
  // context can reach; a trained model must go well below it).
  double unigram_entropy() const;
  // Human-readable summary (hydistill inspect FILE).
  std::string summary() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One packed micro-batch on the host: B sequences of T tokens, concatenated (N = B * T).
// Sequences are filled with whole documents from a per-epoch shuffled document order; a document
// that does not fit is cut and its remainder continues at the start of the next sequence (as its
// own document, positions restarting at 0). Targets are next tokens inside the same document
// piece, -1 at the last token of each piece and where the loss mask is 0.
struct HostBatch {
  std::vector<int32_t> tokens;      // [N]
  std::vector<int32_t> targets;     // [N]
  std::vector<int32_t> positions;   // [N]
  std::vector<int32_t> cu_seqlens;  // [num_docs + 1]; pieces never cross a sequence boundary
  int64_t num_docs = 0;
  int64_t num_targets = 0;
};

enum class Split { train, validation };

class PackedSampler {
 public:
  // Documents are split into train/validation deterministically by hashing the document index with
  // the seed: a fraction `val_fraction` goes to validation. dp_rank/dp_size shard the sequences.
  PackedSampler(const TokenDataset& data, Split split, double val_fraction, int64_t seq_len, int64_t batch_size,
                uint64_t seed, int dp_rank = 0, int dp_size = 1);
  // Pure function of (seed, step, dp_rank): resuming needs only the step.
  HostBatch batch(int64_t step) const;
  int64_t tokens_per_epoch() const;  // tokens in this split
  int64_t num_docs() const;          // documents in this split

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

}  // namespace hyd

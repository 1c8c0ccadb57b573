// Shared by the CPU and GPU sequence-parallel tests: a global micro-batch with a document plan that puts
// documents across one or several slice boundaries, short documents and a boundary-aligned end.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "data/dataset.h"

namespace hyd::test {

// rows sequences of seq_len tokens, row b cut into documents of lengths docs[b] (summing to seq_len);
// random tokens, targets = next token of the same document (-1 at a document's last token).
inline HostBatch make_global(int64_t seq_len, const std::vector<std::vector<int32_t>>& docs, int64_t vocab,
                             uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
  HostBatch hb;
  hb.cu_seqlens.push_back(0);
  for (const auto& row : docs) {
    EXPECT_EQ(std::accumulate(row.begin(), row.end(), int64_t{0}), seq_len);
    for (int32_t len : row) {
      const auto start = static_cast<int32_t>(hb.tokens.size());
      for (int32_t i = 0; i < len; ++i) {
        hb.tokens.push_back(tok(gen));
        hb.positions.push_back(i);
      }
      for (int32_t i = 0; i < len; ++i) hb.targets.push_back(i + 1 < len ? hb.tokens[start + i + 1] : -1);
      hb.cu_seqlens.push_back(start + len);
    }
  }
  hb.num_docs = static_cast<int64_t>(hb.cu_seqlens.size()) - 1;
  for (int32_t t : hb.targets) hb.num_targets += t >= 0 ? 1 : 0;
  return hb;
}

// Document lengths per row for slices of `slice` tokens over P ranks: a document across every boundary
// of row 0, short documents (< 64, one of length 1 at a slice start) and a boundary-aligned end in row 1.
inline std::vector<std::vector<int32_t>> doc_plan(int P, int32_t slice) {
  const int32_t T = P * slice;
  std::vector<std::vector<int32_t>> docs(2);
  // Row 0: 3 tokens, then one document to 5 tokens before the end (crosses all P - 1 boundaries), then 5.
  docs[0] = {3, T - 8, 5};
  // Row 1: pieces that end exactly at the first boundary, a 1-token document starting there, then short
  // documents (7, 13, ...) and the rest in one piece that crosses the remaining boundaries.
  docs[1] = {slice, 1, 7, 13};
  const int32_t used = slice + 1 + 7 + 13;
  docs[1].push_back(T - used);
  return docs;
}

}  // namespace hyd::test

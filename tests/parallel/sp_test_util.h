// Shared by the CPU and GPU sequence-parallel tests: a global micro-batch with a document plan that puts
// documents across one or several slice boundaries, short documents and a boundary-aligned end.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "data/dataset.h"
#include "parallel/comm.h"
#include "parallel/sequence_parallel.h"
#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

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

// SequenceParallel::exchange on sp's device: every rank sends blocks [0, 2) and [4, 7) of its 8 elements to the next
// rank and [2, 4) to itself, and receives the previous rank's into [1, 3) and [5, 8) of its 10 (in list order) and
// its own into [3, 5); elements 0, 8 and 9 of out keep what they held. Checked for f32 and bf16, with the traffic.
inline void check_exchange(SequenceParallel& sp, const ExecContext& ctx) {
  const int r = sp.rank(), P = sp.size(), next = (r + 1) % P, prev = (r + P - 1) % P;
  const std::vector<CommBlock> sends = {{next, 0, 2}, {r, 2, 2}, {next, 4, 3}};
  const std::vector<CommBlock> recvs = {{prev, 1, 2}, {prev, 5, 3}, {r, 3, 2}};
  const std::vector<float> want = {-1,
                                   100.f * prev + 0,
                                   100.f * prev + 1,
                                   100.f * r + 2,
                                   100.f * r + 3,
                                   100.f * prev + 4,
                                   100.f * prev + 5,
                                   100.f * prev + 6,
                                   -1,
                                   -1};
  for (DType dt : {DType::f32, DType::bf16}) {
    // Host tensors of dtype dt from floats and back.
    auto host = [&](const std::vector<float>& v) {
      HostTensor h({static_cast<int64_t>(v.size())}, dt);
      for (size_t i = 0; i < v.size(); ++i) {
        if (dt == DType::bf16)
          h.ptr<bf16>()[i] = float_to_bf16(v[i]);
        else
          h.ptr<float>()[i] = v[i];
      }
      return h;
    };
    std::vector<float> in_host(8);
    for (int i = 0; i < 8; ++i) in_host[i] = 100.f * r + i;  // rounded alike in want (bf16)
    const HostTensor in = host(in_host), out = host(std::vector<float>(10, -1.0f));
    HostTensor back({10}, dt);
    Arena arena("check_exchange", sp.device(), 4096);
    const Tensor din = arena.alloc({8}, dt), dout = arena.alloc({10}, dt);
    copy_tensor(din, in.t);
    copy_tensor(dout, out.t);
    sp.reset_traffic();
    sp.exchange(ctx, din, sends, dout, recvs, SpTraffic::attention_kv);
    ctx.synchronize();
    copy_tensor(back.t, dout);
    for (int i = 0; i < 10; ++i) {
      const float got = dt == DType::bf16 ? bf16_to_float(back.ptr<bf16>()[i]) : back.ptr<float>()[i];
      const float w = dt == DType::bf16 ? bf16_to_float(float_to_bf16(want[i])) : want[i];
      EXPECT_EQ(got, w) << dtype_name(dt) << " element " << i << " on rank " << r;
    }
    EXPECT_EQ(sp.traffic(SpTraffic::attention_kv).bytes, static_cast<int64_t>(7 * dtype_size(dt)));
  }
}

}  // namespace hyd::test

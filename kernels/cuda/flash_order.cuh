// The flash attention grids' block order (kernels/cuda/flash_attention.cu, kernels/cuda/sm90a/flash_wgmma.cu).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace hyd::kernels::cuda::flash_order {

// Block order of the forward and backward grids: 1-D, `groups` (document x head) times `tiles` (query or key tiles
// of kBM / kBN) blocks. The groups are taken `pack` at a time (pack_groups: a pack's K / V stay in L2), and inside
// a pack the tiles go longest first across all of its groups: rank 0 (the tile with the most work) of every
// group, then rank 1, ... The grid thus ends with the shortest tiles instead of a long causal tile started
// last (pack = 1: each group's tiles in turn, longest first, the order before stop 29).
struct BlockTile {
  int group, rank;
};
__device__ __forceinline__ BlockTile block_tile(int tiles, int groups, int pack) {
  const int64_t per_pack = static_cast<int64_t>(pack) * tiles;
  const int p = static_cast<int>(blockIdx.x / per_pack);
  const int first = p * pack, in_pack = min(pack, groups - first);
  const int r = static_cast<int>(blockIdx.x - p * per_pack);
  return {first + r % in_pack, r / in_pack};
}

// A backward block (grid of block_tile over document x kv head groups and key tiles of KN keys): its document,
// kv head, first key n0 (rank 0: the first keys, which see the most queries), and the query tiles of KM rows
// that see some of its keys (queries i >= n0 - off): mt_begin.., n_mt of them per query head. n0 >= len_k: none.
struct KeyBlock {
  int hk, n0, q_begin, len_q, k_begin, len_k, off, mt_begin, n_mt;
};
template <int KN, int KM>
__device__ __forceinline__ KeyBlock key_block(int tiles, int groups, int pack, int hkv, const int32_t* cu_q,
                                              const int32_t* cu_k) {
  const BlockTile bt = block_tile(tiles, groups, pack);
  KeyBlock b;
  const int doc = bt.group / hkv;
  b.hk = bt.group % hkv;
  b.n0 = bt.rank * KN;
  b.q_begin = cu_q[doc];
  b.len_q = cu_q[doc + 1] - b.q_begin;
  b.k_begin = cu_k[doc];
  b.len_k = cu_k[doc + 1] - b.k_begin;
  b.off = b.len_k - b.len_q;  // query i sees keys j <= i + off
  const int m_first = max(0, b.n0 - b.off);
  b.mt_begin = m_first / KM;
  b.n_mt = m_first < b.len_q ? (b.len_q + KM - 1) / KM - b.mt_begin : 0;
  return b;
}

// Groups per pack of block_tile: as many as keep what the pack's blocks read again and again (`bytes` per group:
// the forward's K and V rows, the backward's Q and dO rows) within ~16 MiB of L2 (the H100 / H200 have 50 MiB).
// HYD_FLASH_PACK=N (read on every call) forces N; 1 is the order before stop 29.
inline int pack_groups(int64_t groups, int64_t bytes) {
  if (const char* e = std::getenv("HYD_FLASH_PACK"); e != nullptr && std::atoi(e) > 0)
    return static_cast<int>(std::min<int64_t>(std::atoi(e), groups));
  constexpr int64_t kBudget = int64_t(16) << 20;
  return static_cast<int>(std::clamp<int64_t>(kBudget / std::max<int64_t>(bytes, 1), 1, groups));
}

}  // namespace hyd::kernels::cuda::flash_order

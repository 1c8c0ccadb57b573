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

// The dp x sp process grid of PARALLEL.md: W = dp * sp ranks, SP fastest, so world rank
// = dp_rank * sp + sp_rank and the ranks of one SP group are consecutive (they share a node).
// ep (MoE) is carved out later; it is not part of this grid yet.
#pragma once

#include "parallel/comm.h"

namespace hyd {

// Throws hyd::Error naming parallel.dp / parallel.sp and the world size unless dp, sp >= 1 and
// dp * sp == world_size.
void validate_grid(int dp, int sp, int world_size);

class ProcessGrid {
 public:
  // Collective over `world`: splits it into the SP groups (same dp_rank) and DP groups (same sp_rank).
  ProcessGrid(const Communicator& world, int dp, int sp);

  int dp() const { return dp_; }
  int sp() const { return sp_; }
  int dp_rank() const { return dp_rank_; }
  int sp_rank() const { return sp_rank_; }
  const Communicator& dp_group() const { return dp_group_; }  // size dp, rank dp_rank
  const Communicator& sp_group() const { return sp_group_; }  // size sp, rank sp_rank

 private:
  int dp_ = 1, sp_ = 1, dp_rank_ = 0, sp_rank_ = 0;
  Communicator dp_group_, sp_group_;
};

}  // namespace hyd

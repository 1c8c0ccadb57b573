#include "parallel/grid.h"

#include "trainer/core/error.h"

namespace hyd {

void validate_grid(int dp, int sp, int world_size) {
  if (dp < 1) HYD_THROW("parallel.dp = ", dp, " must be >= 1 (world size ", world_size, ")");
  if (sp < 1) HYD_THROW("parallel.sp = ", sp, " must be >= 1 (world size ", world_size, ")");
  if (static_cast<long long>(dp) * sp != world_size)
    HYD_THROW("parallel.dp * parallel.sp = ", dp, " * ", sp, " = ", static_cast<long long>(dp) * sp,
              " does not equal the world size ", world_size, " (the number of mpirun ranks)");
}

ProcessGrid::ProcessGrid(const Communicator& world, int dp, int sp) : dp_(dp), sp_(sp) {
  validate_grid(dp, sp, world.size());
  dp_rank_ = world.rank() / sp;
  sp_rank_ = world.rank() % sp;
  sp_group_ = world.split(dp_rank_, sp_rank_);
  dp_group_ = world.split(sp_rank_, dp_rank_);
}

}  // namespace hyd

// The main() of a gpu_parallel gtest program (tests/parallel/gpu_test_*.cpp, run under mpirun with one GPU
// per rank): MPI up, exit 77 (skipped) on a node with fewer visible GPUs than ranks, this rank's GPU
// (its node-local rank) made current and stored in `gpu`, the tests, and the worst exit code of all ranks.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

#include "parallel/checks.h"
#include "parallel/comm.h"
#include "trainer/core/error.h"

namespace hyd::test {

inline int gpu_rank_test_main(int argc, char** argv, int& gpu) {
  MpiRuntime mpi(&argc, &argv);
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess) gpus = 0;
  if (gpus < mpi.local_size()) {
    if (mpi.rank() == 0)
      std::printf("SKIP: %d ranks on this node, %d GPUs visible (one GPU per rank needed)\n", mpi.local_size(), gpus);
    return 77;
  }
  gpu = mpi.local_rank();
  CHECK_CUDA(cudaSetDevice(gpu));
  ::testing::InitGoogleTest(&argc, argv);
  int rc = RUN_ALL_TESTS() == 0 ? 0 : 1;
  int worst = rc;
  CHECK_MPI(MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  return worst;
}

}  // namespace hyd::test

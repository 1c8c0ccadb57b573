// gtest main of the `parallel` label, run under mpirun: every rank runs every test, and the job
// exits nonzero on every rank when any rank failed (so mpirun's status is the job's verdict).
// A test that throws outside run_or_abort fails only its rank; tests keep their collectives outside
// ASSERTs so that a failing rank does not leave the others waiting (ctest's timeout is the backstop).
#include <gtest/gtest.h>

#include "parallel/checks.h"
#include "parallel/comm.h"

int main(int argc, char** argv) {
  hyd::MpiRuntime mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rc = RUN_ALL_TESTS() == 0 ? 0 : 1;
  int worst = rc;
  CHECK_MPI(MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  if (worst != 0 && rc == 0) std::printf("[rank %d] passed here, but another rank failed\n", mpi.rank());
  return worst;
}

// hydistill: the command-line entry point (launch/commands.h does the work).
// Runs under MPI (parallel/comm.h): a plain call without mpirun is a world of one rank.
#include <iostream>
#include <string>
#include <vector>

#include "launch/commands.h"
#include "parallel/comm.h"

int main(int argc, char** argv) {
  std::ios::sync_with_stdio(true);
  const std::vector<std::string> args(argv + 1, argv + argc);
  return hyd::run_or_abort([&] {
    const hyd::MpiRuntime mpi(&argc, &argv);
    const int rc = hyd::hydistill_main(args, std::cout, std::cerr);
    // Exit 1 (a runtime error) may have happened on this rank alone while the others wait in a
    // collective: end the whole job. Configuration errors (exit 2) are found by every rank alike.
    if (rc == 1 && mpi.world_size() > 1) MPI_Abort(MPI_COMM_WORLD, rc);
    return rc;
  });
}

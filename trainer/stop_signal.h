// Graceful stops (DESIGN.md "Failure behaviour"; issue 8): SIGTERM and SIGUSR1 (what Slurm and other
// schedulers send before they pre-empt or end a job) ask a training run to finish its current step, write
// a checkpoint and exit 0, so that `train.resume auto` continues where it stopped.
//
// StopSignals installs the handlers for its lifetime (and puts the previous ones back). A handler only
// records the signal; the loops look at it between steps. A second signal of a kind already received
// gets the default action (the process ends at once), so a stuck run can still be stopped.
// Fault injection for the scripted fault tests (tests/cli/test_faults.sh), read once from the environment:
//   HYD_FAULT_KILL_AFTER_STEP=N      SIGKILL this process after global step N (before any checkpoint of it)
//   HYD_FAULT_TERM_AFTER_STEP=N      raise SIGTERM in this process after global step N (a deterministic
//                                    stand-in for a scheduler's signal arriving during step N)
//   HYD_FAULT_KILL_IN_CHECKPOINT=N   SIGKILL rank 1 (rank 0 with one rank) in the middle of writing the
//                                    checkpoint of step N: its state file written, the manifest not yet
//                                    (checkpoint/checkpoint.cpp reads this one)
#pragma once

#include <cstdint>

namespace hyd {

class Communicator;

class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // The signal received (SIGTERM or SIGUSR1) or 0.
  int received() const;
  // Collective over world (nullptr: this process): the largest signal number any rank received, so that
  // every rank stops after the same step.
  int agreed(const Communicator* world) const;
};

// "SIGTERM", "SIGUSR1", or "signal N".
const char* stop_signal_name(int sig);

// Fault injection (see above): kill (or signal) this process now when a variable names `step`.
void fault_point_after_step(int64_t step);

}  // namespace hyd

#include "trainer/stop_signal.h"

#include <csignal>
#include <cstdlib>
#include <span>
#include <string>

#include "parallel/comm.h"

namespace hyd {

namespace {

volatile std::sig_atomic_t g_received = 0;

extern "C" void on_stop_signal(int sig) {
  if (g_received == sig) {  // the second one: the default action, now
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  g_received = sig;
}

struct sigaction g_previous[2];
constexpr int kSignals[2] = {SIGTERM, SIGUSR1};

int64_t env_step(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return -1;
  try {
    return std::stoll(v);
  } catch (const std::exception&) {
    return -1;
  }
}

}  // namespace

StopSignals::StopSignals() {
  g_received = 0;
  for (int i = 0; i < 2; ++i) {
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;  // system calls interrupted by the signal go on
    sigaction(kSignals[i], &sa, &g_previous[i]);
  }
}

StopSignals::~StopSignals() {
  for (int i = 0; i < 2; ++i) sigaction(kSignals[i], &g_previous[i], nullptr);
}

int StopSignals::received() const { return static_cast<int>(g_received); }

int StopSignals::agreed(const Communicator* world) const {
  int sig = received();
  if (world != nullptr && world->size() > 1) world->all_reduce(std::span<int>(&sig, 1), ReduceOp::kMax);
  return sig;
}

const char* stop_signal_name(int sig) {
  switch (sig) {
    case SIGTERM:
      return "SIGTERM";
    case SIGUSR1:
      return "SIGUSR1";
    default:
      return "a signal";
  }
}

void fault_point_after_step(int64_t step) {
  static const int64_t kill_at = env_step("HYD_FAULT_KILL_AFTER_STEP"), term_at = env_step("HYD_FAULT_TERM_AFTER_STEP");
  if (kill_at >= 0 && step == kill_at) std::raise(SIGKILL);
  if (term_at >= 0 && step == term_at) std::raise(SIGTERM);
}

}  // namespace hyd

// Learning-rate schedules with linear warmup.
//
// Steps are 0-based optimizer steps, s = 0 .. total_steps - 1. With W = warmup_steps, T = total_steps,
// peak lr and floor min_lr:
//   warmup    (s < W):  lr (s + 1) / W                  (the first step already moves: lr / W)
//   cosine    (s >= W): min_lr + (lr - min_lr) (1 + cos(pi p)) / 2,   p = (s - W) / (T - W)
//   wsd       warmup, then constant lr until D = T - round(f T) (f = wsd_decay_fraction, D >= W), then
//             linear decay: lr - (lr - min_lr) (s - D) / (T - D)
//   constant  lr after warmup
// cosine and wsd reach min_lr at s = T and stay there (wsd with f = 0 has no decay and stays at lr);
// constant stays at lr.
#pragma once

#include <cstdint>
#include <string>

namespace hyd {

enum class ScheduleKind { cosine, wsd, constant };

// "cosine" | "wsd" | "constant"; throws hyd::Error listing the accepted names otherwise.
ScheduleKind parse_schedule_kind(const std::string& name);
const char* schedule_kind_name(ScheduleKind k);

struct LrSchedule {
  ScheduleKind kind = ScheduleKind::cosine;
  double lr = 1e-3;     // peak
  double min_lr = 0.0;  // floor reached at the end (cosine, wsd)
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  double wsd_decay_fraction = 0.2;

  // Checks the fields (lr > 0, 0 <= min_lr <= lr, warmup >= 0, total > 0, fraction in [0, 1]).
  void validate() const;
  double at(int64_t step) const;
};

}  // namespace hyd

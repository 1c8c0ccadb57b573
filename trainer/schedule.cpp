#include "trainer/schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "trainer/core/error.h"

namespace hyd {

ScheduleKind parse_schedule_kind(const std::string& name) {
  if (name == "cosine") return ScheduleKind::cosine;
  if (name == "wsd") return ScheduleKind::wsd;
  if (name == "constant") return ScheduleKind::constant;
  HYD_THROW("unknown learning-rate schedule '", name, "' (expected cosine, wsd or constant)");
}

const char* schedule_kind_name(ScheduleKind k) {
  switch (k) {
    case ScheduleKind::cosine:
      return "cosine";
    case ScheduleKind::wsd:
      return "wsd";
    case ScheduleKind::constant:
      return "constant";
  }
  return "?";
}

void LrSchedule::validate() const {
  HYD_CHECK(lr > 0 && std::isfinite(lr), "learning rate must be > 0, got ", lr);
  HYD_CHECK(min_lr >= 0 && min_lr <= lr, "min_lr must lie in [0, lr = ", lr, "], got ", min_lr);
  HYD_CHECK(warmup_steps >= 0, "warmup_steps must be >= 0, got ", warmup_steps);
  HYD_CHECK(total_steps > 0, "total_steps must be > 0, got ", total_steps);
  HYD_CHECK(wsd_decay_fraction >= 0 && wsd_decay_fraction <= 1, "wsd_decay_fraction must lie in [0, 1], got ",
            wsd_decay_fraction);
}

double LrSchedule::at(int64_t step) const {
  const int64_t s = std::max<int64_t>(step, 0);
  if (s < warmup_steps) return lr * static_cast<double>(s + 1) / static_cast<double>(warmup_steps);
  switch (kind) {
    case ScheduleKind::constant:
      return lr;
    case ScheduleKind::cosine: {
      if (s >= total_steps) return min_lr;
      const double p = static_cast<double>(s - warmup_steps) / static_cast<double>(total_steps - warmup_steps);
      return min_lr + (lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
    }
    case ScheduleKind::wsd: {
      const auto decay_steps =
          static_cast<int64_t>(std::llround(wsd_decay_fraction * static_cast<double>(total_steps)));
      const int64_t decay_start = std::max(warmup_steps, total_steps - decay_steps);
      if (s >= total_steps) return decay_start < total_steps ? min_lr : lr;
      if (s < decay_start) return lr;
      const double p = static_cast<double>(s - decay_start) / static_cast<double>(total_steps - decay_start);
      return lr - (lr - min_lr) * p;
    }
  }
  return lr;
}

}  // namespace hyd

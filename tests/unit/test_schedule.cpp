// LR schedules: linear warmup, cosine to min_lr, WSD (warmup-stable-decay), constant.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "tests/common/test_util.h"
#include "trainer/core/error.h"
#include "trainer/schedule.h"

namespace hyd {
namespace {

LrSchedule make(ScheduleKind kind, int64_t warmup, int64_t total, double frac = 0.2) {
  LrSchedule s;
  s.kind = kind;
  s.lr = 2e-3;
  s.min_lr = 2e-4;
  s.warmup_steps = warmup;
  s.total_steps = total;
  s.wsd_decay_fraction = frac;
  s.validate();
  return s;
}

TEST(Schedule, WarmupIsLinearFromLrOverWToLr) {
  for (ScheduleKind k : {ScheduleKind::cosine, ScheduleKind::wsd, ScheduleKind::constant}) {
    const LrSchedule s = make(k, 20, 200);
    for (int64_t i = 0; i < 20; ++i) EXPECT_DOUBLE_EQ(s.at(i), 2e-3 * static_cast<double>(i + 1) / 20.0) << i;
    EXPECT_DOUBLE_EQ(s.at(19), 2e-3);
    EXPECT_DOUBLE_EQ(s.at(20), 2e-3) << "first step after warmup is at the peak";
  }
}

TEST(Schedule, CosineFollowsTheFormulaAndEndsAtMinLr) {
  const LrSchedule s = make(ScheduleKind::cosine, 20, 200);
  for (int64_t i = 20; i < 200; ++i) {
    const double p = static_cast<double>(i - 20) / 180.0;
    EXPECT_NEAR(s.at(i), 2e-4 + (2e-3 - 2e-4) * 0.5 * (1 + std::cos(std::numbers::pi * p)), 1e-15) << i;
    EXPECT_LE(s.at(i + 1), s.at(i)) << "non-increasing after warmup, step " << i;
    EXPECT_GT(s.at(i), 2e-4) << i;
  }
  EXPECT_NEAR(s.at(110), (2e-3 + 2e-4) / 2, 1e-15) << "halfway through the decay: the mean of lr and min_lr";
  EXPECT_DOUBLE_EQ(s.at(200), 2e-4);
  EXPECT_DOUBLE_EQ(s.at(1000), 2e-4);
}

TEST(Schedule, WsdIsConstantThenDecaysLinearlyOverTheLastFraction) {
  const LrSchedule s = make(ScheduleKind::wsd, 10, 100, 0.2);  // decay over steps 80..100
  for (int64_t i = 10; i <= 80; ++i) EXPECT_DOUBLE_EQ(s.at(i), 2e-3) << i;
  for (int64_t i = 80; i < 100; ++i) {
    EXPECT_NEAR(s.at(i), 2e-3 - (2e-3 - 2e-4) * static_cast<double>(i - 80) / 20.0, 1e-15) << i;
    EXPECT_LT(s.at(i + 1), s.at(i)) << i;
  }
  EXPECT_NEAR(s.at(90), (2e-3 + 2e-4) / 2, 1e-15);
  EXPECT_DOUBLE_EQ(s.at(100), 2e-4);
  EXPECT_DOUBLE_EQ(s.at(500), 2e-4);
}

TEST(Schedule, WsdDecayNeverStartsInsideWarmup) {
  const LrSchedule s = make(ScheduleKind::wsd, 30, 100, 0.9);  // 90 decay steps would start at 10
  EXPECT_DOUBLE_EQ(s.at(29), 2e-3);
  EXPECT_DOUBLE_EQ(s.at(30), 2e-3);
  EXPECT_NEAR(s.at(65), (2e-3 + 2e-4) / 2, 1e-15);
  const LrSchedule none = make(ScheduleKind::wsd, 0, 50, 0.0);  // no decay phase: stays at lr
  for (int64_t i = 0; i <= 60; ++i) EXPECT_DOUBLE_EQ(none.at(i), 2e-3) << i;
}

TEST(Schedule, ConstantStaysAtLrAfterWarmup) {
  const LrSchedule s = make(ScheduleKind::constant, 5, 50);
  for (int64_t i = 5; i < 80; ++i) EXPECT_DOUBLE_EQ(s.at(i), 2e-3) << i;
}

TEST(Schedule, NoWarmupStartsAtThePeak) {
  EXPECT_DOUBLE_EQ(make(ScheduleKind::cosine, 0, 10).at(0), 2e-3);
  EXPECT_DOUBLE_EQ(make(ScheduleKind::wsd, 0, 10).at(0), 2e-3);
  EXPECT_DOUBLE_EQ(make(ScheduleKind::constant, 0, 10).at(0), 2e-3);
}

TEST(Schedule, ParsesNamesAndRejectsOthers) {
  EXPECT_EQ(parse_schedule_kind("cosine"), ScheduleKind::cosine);
  EXPECT_EQ(parse_schedule_kind("wsd"), ScheduleKind::wsd);
  EXPECT_EQ(parse_schedule_kind("constant"), ScheduleKind::constant);
  for (ScheduleKind k : {ScheduleKind::cosine, ScheduleKind::wsd, ScheduleKind::constant})
    EXPECT_EQ(parse_schedule_kind(schedule_kind_name(k)), k);
  test::expect_error([] { parse_schedule_kind("linear"); }, {"'linear'", "cosine, wsd or constant"});
}

TEST(Schedule, ValidateRejectsBadFields) {
  auto bad = [](auto mutate) {
    LrSchedule s;
    s.total_steps = 10;
    mutate(s);
    EXPECT_THROW(s.validate(), Error);
  };
  bad([](LrSchedule& s) { s.lr = 0; });
  bad([](LrSchedule& s) { s.lr = NAN; });
  bad([](LrSchedule& s) { s.min_lr = 2 * s.lr; });
  bad([](LrSchedule& s) { s.min_lr = -1; });
  bad([](LrSchedule& s) { s.warmup_steps = -1; });
  bad([](LrSchedule& s) { s.total_steps = 0; });
  bad([](LrSchedule& s) { s.wsd_decay_fraction = 1.5; });
  LrSchedule ok;
  EXPECT_NO_THROW(ok.validate());
}

}  // namespace
}  // namespace hyd

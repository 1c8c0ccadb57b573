// The progress line and metrics.jsonl record: MFU appears only when the device's peak is known.
#include <gtest/gtest.h>

#include <cstdlib>

#include "trainer/metrics.h"

namespace hyd {
namespace {

StepMetrics sample() {
  StepMetrics m;
  m.step = 120;
  m.total_steps = 200;
  m.loss = 3.412;
  m.lr = 2.9e-4;
  m.grad_norm = 0.83;
  m.tokens_per_s = 41200;
  m.memory_bytes = 210000000;
  m.eta_s = 35;
  return m;
}

TEST(Metrics, LineShowsMfuOnlyWhenKnown) {
  StepMetrics m = sample();
  EXPECT_EQ(m.line(), "step 120/200 | loss 3.412 | lr 2.9e-04 | gnorm 0.83 | 41.2k tok/s | mem 210 MB | eta 0:35");
  EXPECT_FALSE(m.json().contains("mfu"));
  m.mfu = 0.381;
  EXPECT_EQ(m.line(),
            "step 120/200 | loss 3.412 | lr 2.9e-04 | gnorm 0.83 | 41.2k tok/s | mfu 38.1% | mem 210 MB | eta 0:35");
  EXPECT_DOUBLE_EQ(m.json()["mfu"].get<double>(), 0.381);
}

TEST(Metrics, PeakFlopsUnknownOnCpuUnlessOverridden) {
  unsetenv("HYD_PEAK_TFLOPS");
  EXPECT_EQ(device_peak_flops(Device::cpu()), 0.0);
  setenv("HYD_PEAK_TFLOPS", "2.5", 1);
  EXPECT_DOUBLE_EQ(device_peak_flops(Device::cpu()), 2.5e12);
  unsetenv("HYD_PEAK_TFLOPS");
}

}  // namespace
}  // namespace hyd

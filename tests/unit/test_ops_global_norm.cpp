// CPU global norm: sum of squares accumulated over several tensors against a double sum, float
// precision on a large vector, clip_scale cases, dispatcher errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/global_norm.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::cpu_f32;
using test::expect_error_naming;
using test::randn;

TEST(OpsGlobalNorm, SumSquaresAccumulatesOverTensors) {
  ExecContext ctx(Device::cpu());
  std::vector<float> a = randn(1000), b = randn(1 << 20, 3.f), out = {0.f};
  double ref = 0;
  for (float x : a) ref += double(x) * x;
  for (float x : b) ref += double(x) * x;
  sum_squares_accumulate(ctx, cpu_f32(a), cpu_f32(out));
  sum_squares_accumulate(ctx, Tensor(b.data(), DType::f32, Device::cpu(), {1024, 1024}), cpu_f32(out));
  EXPECT_NEAR(out[0], ref, 1e-6 * ref);  // fp64 accumulation: only the final rounding to f32

  std::vector<double> d = {3.0, 4.0}, od = {1.0};
  cpu::sum_squares_accumulate<double>(d.data(), 2, od.data());
  EXPECT_EQ(od[0], 26.0);
  std::vector<float> empty_out = {2.f};
  cpu::sum_squares_accumulate<float>(nullptr, 0, empty_out.data());
  EXPECT_EQ(empty_out[0], 2.f);
}

TEST(OpsGlobalNorm, ClipScale) {
  EXPECT_EQ(clip_scale(0.5, 1.0), 1.f);
  EXPECT_EQ(clip_scale(1.0, 1.0), 1.f);  // only strictly above the limit
  EXPECT_FLOAT_EQ(clip_scale(4.0, 1.0), float(1.0 / (4.0 + 1e-6)));
  EXPECT_FLOAT_EQ(clip_scale(10.0, 2.5), float(2.5 / (10.0 + 1e-6)));
  EXPECT_EQ(clip_scale(100.0, 0.0), 1.f);  // max_norm <= 0 disables clipping
  EXPECT_EQ(clip_scale(100.0, -1.0), 1.f);
  // After clipping the norm is (just below) max_norm.
  EXPECT_NEAR(clip_scale(7.0, 1.0) * 7.0, 1.0, 1e-6);
}

TEST(OpsGlobalNorm, DispatcherRejectsBadArguments) {
  ExecContext ctx(Device::cpu());
  std::vector<float> g(4), out2(2), out1(1);
  expect_error_naming([&] { sum_squares_accumulate(ctx, cpu_f32(g), cpu_f32(out2)); }, "sum_squares_accumulate",
                      "'out'");
  expect_error_naming(
      [&] { sum_squares_accumulate(ctx, Tensor(g.data(), DType::bf16, Device::cpu(), {4}), cpu_f32(out1)); },
      "sum_squares_accumulate", "'grad'");
}

}  // namespace
}  // namespace hyd::kernels

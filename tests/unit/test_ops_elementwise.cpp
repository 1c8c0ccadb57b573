// CPU elementwise ops: add_inplace (f32 and bf16), scale_inplace, fill, convert f32 <-> bf16 (round
// to nearest even, exact round trip of bf16 values), same-dtype convert as a copy, dispatcher errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/elementwise.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::cpu_bf16;
using test::cpu_f32;
using test::expect_error_mentioning;
using test::randn;
using test::randn_f64;
using test::round_bf16;

TEST(OpsElementwise, AddAndScale) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 101;
  const std::vector<float> y0 = randn(n), x = randn(n);
  std::vector<float> y = y0, xv = x;
  add_inplace(ctx, cpu_f32(y, {n}), cpu_f32(xv, {n}));
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(y[i], y0[i] + x[i]);
  // Shapes may differ as long as the element counts agree ([n] += [1, n]).
  add_inplace(ctx, cpu_f32(y, {n}), cpu_f32(xv, {1, n}));
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(y[i], (y0[i] + x[i]) + x[i]);
  std::vector<float> t = y0;
  scale_inplace(ctx, cpu_f32(t, {n}), -0.375f);
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(t[i], y0[i] * -0.375f);

  std::vector<double> yd = randn_f64(7), xd = randn_f64(7), yd0 = yd;
  cpu::add_inplace<double>(yd.data(), xd.data(), 7);
  cpu::scale_inplace<double>(yd.data(), 2.0, 7);
  for (int i = 0; i < 7; ++i) EXPECT_EQ(yd[i], (yd0[i] + xd[i]) * 2.0);
}

TEST(OpsElementwise, AddBf16RoundsTheSum) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 64;
  const std::vector<float> a = round_bf16(randn(n)), b = round_bf16(randn(n));
  std::vector<bf16> ya(n), xb(n);
  for (int64_t i = 0; i < n; ++i) {
    ya[i] = float_to_bf16(a[i]);
    xb[i] = float_to_bf16(b[i]);
  }
  add_inplace(ctx, cpu_bf16(ya, {n}), cpu_bf16(xb, {n}));
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(bf16_to_float(ya[i]), bf16_to_float(float_to_bf16(a[i] + b[i])));
}

TEST(OpsElementwise, FillAndConvert) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 57;
  std::vector<float> f(n, std::nanf(""));
  fill(ctx, cpu_f32(f, {n}), 2.5f);
  for (float v : f) EXPECT_EQ(v, 2.5f);
  std::vector<bf16> h(n, bf16{0x7fc0});
  fill(ctx, cpu_bf16(h, {3, 19}), -1.0f / 3);
  for (bf16 v : h) EXPECT_EQ(bf16_to_float(v), bf16_to_float(float_to_bf16(-1.0f / 3)));

  const std::vector<float> src = randn(n, 10.f);
  std::vector<float> s = src, back(n, std::nanf(""));
  convert(ctx, cpu_bf16(h, {n}), cpu_f32(s, {n}));
  const std::vector<float> rounded = round_bf16(src);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(bf16_to_float(h[i]), rounded[i]);
    EXPECT_LE(std::fabs(rounded[i] - src[i]), std::fabs(src[i]) * (1.0f / 256));  // 8 mantissa bits
  }
  convert(ctx, cpu_f32(back, {n}), cpu_bf16(h, {n}));
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(back[i], rounded[i]);
  // Same dtype: a copy.
  std::vector<float> copy(n, std::nanf(""));
  convert(ctx, cpu_f32(copy, {n}), cpu_f32(s, {n}));
  EXPECT_EQ(copy, src);
}

TEST(OpsElementwise, DispatcherErrorsNameTheArgument) {
  ExecContext ctx(Device::cpu());
  std::vector<float> a(8), b(6);
  std::vector<bf16> h(8);
  std::vector<int32_t> ints(8);
  expect_error_mentioning([&] { add_inplace(ctx, cpu_f32(a, {8}), cpu_f32(b, {6})); }, "'x'");
  expect_error_mentioning([&] { add_inplace(ctx, cpu_f32(a, {8}), cpu_bf16(h, {8})); }, "'x'");
  expect_error_mentioning([&] { convert(ctx, cpu_bf16(h, {8}), cpu_f32(b, {6})); }, "'src'");
  expect_error_mentioning([&] { convert(ctx, Tensor(ints.data(), DType::i32, Device::cpu(), {8}), cpu_f32(a, {8})); },
                          "'dst'");
  expect_error_mentioning([&] { scale_inplace(ctx, cpu_bf16(h, {8}), 2.f); }, "'t'");
  expect_error_mentioning([&] { fill(ctx, Tensor(ints.data(), DType::i32, Device::cpu(), {8}), 0.f); }, "'t'");
}

}  // namespace
}  // namespace hyd::kernels

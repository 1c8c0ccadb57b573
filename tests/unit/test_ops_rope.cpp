// CPU RoPE: rope_inv_freq for every scaling type against the HF formulas recomputed here (plus spot
// values computed offline with numpy from the same formulas), table building, position 0 = identity,
// forward then backward = identity, rotation preserves pair norms, backward = adjoint of forward
// (finite differences in double, with a YaRN attention factor != 1), dispatcher errors.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>
#include <string>
#include <vector>

#include "kernels/rope.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::central_differences;
using test::cpu_f32;
using test::cpu_i32;
using test::expect_error_mentioning;
using test::randint;
using test::randn;
using test::randn_f64;
using test::rel_err;

constexpr double kPi = std::numbers::pi;

void expect_rel_near(const std::vector<double>& got, const std::vector<double>& want, double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol * std::fabs(want[i])) << "index " << i;
}

double base_freq(double theta, int d, int i) { return std::exp(-std::log(theta) * (2.0 * i) / d); }

TEST(OpsRope, InvFreqDefaultAndLinear) {
  const int d = 64;
  const double theta = 10000;
  std::vector<double> want(d / 2);
  for (int i = 0; i < d / 2; ++i) want[i] = base_freq(theta, d, i);
  double af = -1;
  expect_rel_near(rope_inv_freq(theta, d, RopeScaling{}, &af), want, 1e-13);
  EXPECT_EQ(af, 1.0);
  RopeScaling lin;
  lin.type = "linear";
  lin.factor = 2.5;
  for (double& v : want) v /= 2.5;
  af = -1;
  expect_rel_near(rope_inv_freq(theta, d, lin, &af), want, 1e-13);
  EXPECT_EQ(af, 1.0);
}

TEST(OpsRope, InvFreqLlama3) {
  // Llama 3.1: theta 500000, head_dim 128, factor 8, low 1, high 4, original context 8192.
  RopeScaling s;
  s.type = "llama3";
  s.factor = 8;
  s.low_freq_factor = 1;
  s.high_freq_factor = 4;
  s.original_max_position_embeddings = 8192;
  const int d = 128;
  double af = -1;
  const std::vector<double> got = rope_inv_freq(500000, d, s, &af);
  EXPECT_EQ(af, 1.0);
  // Independent restatement: short wavelengths (< 8192/4) unchanged, long ones (> 8192/1) divided by
  // 8, in between a blend in 1/wavelength.
  std::vector<double> want(d / 2);
  int kept = 0, divided = 0, blended = 0;
  for (int i = 0; i < d / 2; ++i) {
    const double f = base_freq(500000, d, i), wavelen = 2 * kPi / f;
    if (wavelen < 8192.0 / 4) {
      want[i] = f;
      ++kept;
    } else if (wavelen > 8192.0) {
      want[i] = f / 8;
      ++divided;
    } else {
      const double smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
      want[i] = f * (smooth + (1 - smooth) / 8);
      ++blended;
    }
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(blended, 0);
  expect_rel_near(got, want, 1e-12);
  // Spot values (numpy, float64, same formulas).
  EXPECT_NEAR(got[0], 1.0, 1e-15);
  EXPECT_NEAR(got[20], 0.016560440080994446, 1e-12 * 0.0166);
  EXPECT_NEAR(got[44], 1.509621717643313e-05, 1e-12 * 1.5e-5);
  EXPECT_NEAR(got[46], 1.0017868402809974e-05, 1e-12 * 1e-5);
  EXPECT_NEAR(got[50], 4.411534674558404e-06, 1e-12 * 4.4e-6);
  EXPECT_NEAR(got[63], 3.068925988914511e-07, 1e-12 * 3.1e-7);
}

// YaRN restated: dims whose rotation count over L exceeds beta_fast keep their frequency, those below
// beta_slow are interpolated (divided by factor), with a linear ramp in the dimension index between.
std::vector<double> yarn_reference(double theta, int d, double factor, double L, bool truncate, double* lo_out,
                                   double* hi_out) {
  auto dim_for_rotations = [&](double r) { return d * std::log(L / (2 * kPi * r)) / (2 * std::log(theta)); };
  double lo = dim_for_rotations(32), hi = dim_for_rotations(1);
  if (truncate) {
    lo = std::floor(lo);
    hi = std::ceil(hi);
  }
  lo = std::max(lo, 0.0);
  hi = std::min(hi, d - 1.0);
  *lo_out = lo;
  *hi_out = hi;
  std::vector<double> out(d / 2);
  for (int i = 0; i < d / 2; ++i) {
    const double f = base_freq(theta, d, i);
    const double t = i <= lo ? 0.0 : (i >= hi ? 1.0 : (i - lo) / (hi - lo));  // share of interpolation
    out[i] = (1 - t) * f + t * f / factor;
  }
  return out;
}

TEST(OpsRope, InvFreqYarn) {
  RopeScaling s;
  s.type = "yarn";
  s.factor = 4;
  s.original_max_position_embeddings = 4096;
  const int d = 128;
  for (bool truncate : {true, false}) {
    SCOPED_TRACE(truncate ? "truncate" : "no truncate");
    s.truncate = truncate;
    double af = -1, lo = 0, hi = 0;
    const std::vector<double> got = rope_inv_freq(10000, d, s, &af);
    EXPECT_NEAR(af, 0.1 * std::log(4.0) + 1.0, 1e-14);
    EXPECT_NEAR(af, 1.138629436111989, 1e-14);
    expect_rel_near(got, yarn_reference(10000, d, 4, 4096, truncate, &lo, &hi), 1e-12);
    if (truncate) {
      EXPECT_EQ(lo, 20);
      EXPECT_EQ(hi, 46);
      EXPECT_NEAR(got[21], 0.047292038501684786, 1e-12 * 0.047);
      EXPECT_NEAR(got[30], 0.009488517882700576, 1e-12 * 0.0095);
      EXPECT_NEAR(got[45], 0.0004294025889973582, 1e-12 * 4.3e-4);
    } else {
      EXPECT_NEAR(lo, 20.94448162063605, 1e-12);
      EXPECT_NEAR(hi, 45.02688127375455, 1e-12);
      EXPECT_NEAR(got[21], 0.04861255519347015, 1e-12 * 0.0486);
      EXPECT_NEAR(got[30], 0.009574461236755236, 1e-12 * 0.0096);
      EXPECT_NEAR(got[45], 0.00038627080494978226, 1e-12 * 3.9e-4);
    }
    EXPECT_NEAR(got[0], 1.0, 1e-15);                                     // fastest dims: extrapolated
    EXPECT_NEAR(got[63], base_freq(10000, d, 63) / 4, 1e-12 * got[63]);  // slowest dims: interpolated
  }
  // An explicit attention factor wins; factor <= 1 gives 1.
  s.attention_factor = 0.75;
  double af = -1;
  rope_inv_freq(10000, d, s, &af);
  EXPECT_EQ(af, 0.75);
  s.attention_factor = 0;
  s.factor = 1;
  rope_inv_freq(10000, d, s, &af);
  EXPECT_EQ(af, 1.0);
}

TEST(OpsRope, InvFreqErrors) {
  RopeScaling s;
  s.type = "dynamic";
  expect_error_mentioning([&] { rope_inv_freq(10000, 64, s, nullptr); }, "'type'");
  s.type = "yarn";
  s.factor = 4;
  expect_error_mentioning([&] { rope_inv_freq(10000, 64, s, nullptr); }, "original_max_position_embeddings");
  s.type = "llama3";
  expect_error_mentioning([&] { rope_inv_freq(10000, 64, s, nullptr); }, "original_max_position_embeddings");
  expect_error_mentioning([&] { rope_inv_freq(10000, 63, RopeScaling{}, nullptr); }, "head_dim");
}

TEST(OpsRope, BuildTables) {
  const std::vector<double> inv = {1.0, 0.1, 0.001};
  const int64_t max_pos = 50;
  std::vector<float> c(max_pos * 3), s(max_pos * 3);
  rope_build_tables(inv, 1.25, max_pos, c.data(), s.data());
  for (int64_t p = 0; p < max_pos; ++p)
    for (int i = 0; i < 3; ++i) {
      EXPECT_NEAR(c[p * 3 + i], 1.25 * std::cos(p * inv[i]), 1e-6);
      EXPECT_NEAR(s[p * 3 + i], 1.25 * std::sin(p * inv[i]), 1e-6);
    }
}

struct Tables {
  std::vector<float> cos, sin;
  int64_t max_pos;
};
Tables make_tables(int head_dim, int64_t max_pos, const RopeScaling& scaling = {}) {
  double af = 1;
  const std::vector<double> inv = rope_inv_freq(10000, head_dim, scaling, &af);
  Tables t{std::vector<float>(max_pos * head_dim / 2), std::vector<float>(max_pos * head_dim / 2), max_pos};
  rope_build_tables(inv, af, max_pos, t.cos.data(), t.sin.data());
  return t;
}

TEST(OpsRope, PositionZeroIsIdentityAndRotationKeepsPairNorms) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 17, heads = 3, d = 16, half = d / 2;
  Tables tb = make_tables(d, 64);
  std::vector<int32_t> pos = randint(n, 0, 64);
  pos[0] = pos[5] = 0;
  const std::vector<float> x0 = randn(n * heads * d);
  std::vector<float> x = x0;
  rope_forward(ctx, cpu_f32(x, {n, heads, d}), cpu_i32(pos, {n}), cpu_f32(tb.cos, {64, half}),
               cpu_f32(tb.sin, {64, half}));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        const int64_t b = (t * heads + h) * d;
        if (pos[t] == 0) {
          EXPECT_EQ(x[b + i], x0[b + i]);
          EXPECT_EQ(x[b + i + half], x0[b + i + half]);
        }
        const double n0 = std::hypot(x0[b + i], x0[b + i + half]), n1 = std::hypot(x[b + i], x[b + i + half]);
        EXPECT_NEAR(n1, n0, 1e-5 * (1 + n0));
        // The explicit formula for pair i at this token's position.
        const double c = std::cos(pos[t] * base_freq(10000, d, i)), s = std::sin(pos[t] * base_freq(10000, d, i));
        EXPECT_NEAR(x[b + i], x0[b + i] * c - x0[b + i + half] * s, 1e-5);
        EXPECT_NEAR(x[b + i + half], x0[b + i + half] * c + x0[b + i] * s, 1e-5);
      }
}

TEST(OpsRope, ForwardThenBackwardIsIdentity) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 29, heads = 4, d = 64, half = d / 2, max_pos = 4096;
  Tables tb = make_tables(d, max_pos);
  std::vector<int32_t> pos = randint(n, 0, max_pos);
  const std::vector<float> x0 = randn(n * heads * d);
  std::vector<float> x = x0;
  auto X = cpu_f32(x, {n, heads, d});
  rope_forward(ctx, X, cpu_i32(pos, {n}), cpu_f32(tb.cos, {max_pos, half}), cpu_f32(tb.sin, {max_pos, half}));
  EXPECT_GT(rel_err(x, x0), 1e-2);  // it did rotate
  rope_backward(ctx, X, cpu_i32(pos, {n}), cpu_f32(tb.cos, {max_pos, half}), cpu_f32(tb.sin, {max_pos, half}));
  EXPECT_LT(rel_err(x, x0), 1e-6);
}

TEST(OpsRope, BackwardMatchesFiniteDifferences) {
  // YaRN tables: the attention factor makes forward a scaled rotation, so backward must be its adjoint
  // (not its inverse).
  RopeScaling yarn;
  yarn.type = "yarn";
  yarn.factor = 4;
  yarn.original_max_position_embeddings = 64;
  const int64_t n = 5, heads = 2, d = 8, max_pos = 200;
  Tables tb = make_tables(d, max_pos, yarn);
  std::vector<int32_t> pos = randint(n, 0, max_pos);
  std::vector<double> x = randn_f64(n * heads * d), g = randn_f64(n * heads * d);
  auto loss = [&] {
    std::vector<double> y = x;
    cpu::rope_apply<double>(y.data(), pos.data(), tb.cos.data(), tb.sin.data(), n, heads, d, +1);
    double l = 0;
    for (size_t k = 0; k < y.size(); ++k) l += g[k] * y[k];
    return l;
  };
  const std::vector<double> numeric = central_differences(x, 1e-6, loss);
  std::vector<double> dx = g;
  cpu::rope_apply<double>(dx.data(), pos.data(), tb.cos.data(), tb.sin.data(), n, heads, d, -1);
  EXPECT_LT(rel_err(dx, numeric), 1e-8);
}

TEST(OpsRope, DispatcherErrorsNameTheArgument) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 3, heads = 2, d = 8, max_pos = 10;
  Tables tb = make_tables(d, max_pos);
  std::vector<float> x(n * heads * d, 0.f);
  std::vector<int32_t> pos = {0, 1, 2}, bad = {0, 10, 1};
  auto C = [&] { return cpu_f32(tb.cos, {max_pos, d / 2}); };
  auto S = [&] { return cpu_f32(tb.sin, {max_pos, d / 2}); };
  expect_error_mentioning([&] { rope_forward(ctx, cpu_f32(x, {n, heads * d}), cpu_i32(pos, {n}), C(), S()); }, "'x'");
  expect_error_mentioning([&] { rope_backward(ctx, cpu_f32(x, {n * heads * d}), cpu_i32(pos, {n}), C(), S()); },
                          "'dx'");
  expect_error_mentioning(
      [&] {
        rope_forward(ctx, cpu_f32(x, {n, heads, d}), cpu_i32(pos, {2}), C(), S());
      },
      "'positions'");
  expect_error_mentioning(
      [&] {
        rope_forward(ctx, cpu_f32(x, {n, heads, d}), cpu_i32(pos, {n}), cpu_f32(tb.cos, {max_pos / 2, d}), S());
      },
      "'cos'");
  expect_error_mentioning(
      [&] {
        rope_forward(ctx, cpu_f32(x, {n, heads, d}), cpu_i32(pos, {n}), C(), cpu_f32(tb.sin, {max_pos * d / 2}));
      },
      "'sin'");
  expect_error_mentioning(
      [&] {
        rope_forward(ctx, cpu_f32(x, {n, heads, d}), cpu_i32(bad, {n}), C(), S());
      },
      "positions[1] = 10");
  expect_error_mentioning(
      [&] {
        rope_forward(ctx, Tensor(x.data(), DType::bf16, Device::cpu(), {n, heads, d}), cpu_i32(pos, {n}), C(), S());
      },
      "'x'");
}

}  // namespace
}  // namespace hyd::kernels

// CPU AdamW: one step against numbers worked out by hand, several steps against an independent
// double implementation, the working copy (bf16 = rounded master, f32 = master), dispatcher errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/adamw.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::cpu_f32;
using test::expect_error_naming;
using test::randn;
using test::rel_err;
using test::to_f64;

TEST(OpsAdamW, OneStepMatchesHandComputation) {
  // p = 1, g = 0.5 * grad_scale 2 = 1, m = v = 0, step 1, lr 0.1, beta1 0.9, beta2 0.99, eps 1e-8, wd 0.1:
  //   m = 0.1, v = 0.01, m_hat = 1, v_hat = 1, update = 1 / (1 + 1e-8) + 0.1 * 1,
  //   p = 1 - 0.1 * 1.1 = 0.89 (to 1e-9).
  ExecContext ctx(Device::cpu());
  std::vector<float> p = {1.f}, g = {0.5f}, m = {0.f}, v = {0.f};
  AdamWStep s;
  s.lr = 0.1f;
  s.beta1 = 0.9f;
  s.beta2 = 0.99f;
  s.eps = 1e-8f;
  s.weight_decay = 0.1f;
  s.step = 1;
  s.grad_scale = 2.f;
  adamw_update(ctx, cpu_f32(p), cpu_f32(g), cpu_f32(m), cpu_f32(v), Tensor{}, s);
  EXPECT_NEAR(m[0], 0.1f, 1e-7);
  EXPECT_NEAR(v[0], 0.01f, 1e-8);
  EXPECT_NEAR(p[0], 0.89f, 1e-6);

  // Step 2 with g = 0 and no decay: m = 0.09, v = 0.0099, m_hat = 0.09 / 0.19, v_hat = 0.0099 / 0.0199.
  g[0] = 0.f;
  s.weight_decay = 0.f;
  s.step = 2;
  const double expect = 0.89 - 0.1 * (0.09 / 0.19) / (std::sqrt(0.0099 / 0.0199) + 1e-8);
  adamw_update(ctx, cpu_f32(p), cpu_f32(g), cpu_f32(m), cpu_f32(v), Tensor{}, s);
  EXPECT_NEAR(p[0], expect, 1e-6);
}

TEST(OpsAdamW, SeveralStepsMatchDoubleReference) {
  ExecContext ctx(Device::cpu());
  const size_t n = 1000;
  std::vector<float> p = randn(n), m(n, 0.f), v(n, 0.f);
  std::vector<double> pd(p.begin(), p.end()), md(n, 0.0), vd(n, 0.0);
  AdamWStep s;
  s.lr = 1e-2f;
  s.weight_decay = 0.05f;
  s.grad_scale = 0.8f;
  for (int64_t step = 1; step <= 5; ++step) {
    s.step = step;
    std::vector<float> g = randn(n);
    adamw_update(ctx, cpu_f32(p), cpu_f32(g), cpu_f32(m), cpu_f32(v), Tensor{}, s);
    const double b1 = s.beta1, b2 = s.beta2;
    for (size_t i = 0; i < n; ++i) {
      const double gi = double(g[i]) * double(s.grad_scale);
      md[i] = b1 * md[i] + (1 - b1) * gi;
      vd[i] = b2 * vd[i] + (1 - b2) * gi * gi;
      const double mh = md[i] / (1 - std::pow(b1, step)), vh = vd[i] / (1 - std::pow(b2, step));
      pd[i] -= double(s.lr) * (mh / (std::sqrt(vh) + double(s.eps)) + double(s.weight_decay) * pd[i]);
    }
  }
  EXPECT_LT(rel_err(to_f64(p), pd), 1e-6);
  EXPECT_LT(rel_err(to_f64(m), md), 1e-5);
  EXPECT_LT(rel_err(to_f64(v), vd), 1e-5);

  // The double instantiation agrees with the same reference much more tightly.
  std::vector<double> p2(n, 0.5), m2(n, 0.0), v2(n, 0.0), g2(n, 0.25);
  s.step = 1;
  cpu::adamw_update<double>(p2.data(), g2.data(), m2.data(), v2.data(), int64_t(n), s);
  const double gi = 0.25 * double(s.grad_scale);
  const double mh = (1 - double(s.beta1)) * gi / (1 - double(s.beta1));
  const double vh = (1 - double(s.beta2)) * gi * gi / (1 - double(s.beta2));
  const double ref = 0.5 - double(s.lr) * (mh / (std::sqrt(vh) + double(s.eps)) + double(s.weight_decay) * 0.5);
  for (double x : p2) EXPECT_NEAR(x, ref, 1e-12);
}

TEST(OpsAdamW, WorkingCopyFollowsMaster) {
  ExecContext ctx(Device::cpu());
  const size_t n = 257;
  std::vector<float> p = randn(n), g = randn(n), m(n, 0.f), v(n, 0.f);
  std::vector<bf16> wb(n, bf16{0x7fc0});
  AdamWStep s;
  s.lr = 1e-3f;
  adamw_update(ctx, cpu_f32(p), cpu_f32(g), cpu_f32(m), cpu_f32(v),
               Tensor(wb.data(), DType::bf16, Device::cpu(), {int64_t(n)}), s);
  for (size_t i = 0; i < n; ++i) EXPECT_EQ(wb[i].bits, float_to_bf16(p[i]).bits) << i;
  std::vector<float> wf(n, NAN);
  s.step = 2;
  adamw_update(ctx, cpu_f32(p), cpu_f32(g), cpu_f32(m), cpu_f32(v), cpu_f32(wf), s);
  EXPECT_EQ(wf, p);
}

TEST(OpsAdamW, DispatcherRejectsBadArguments) {
  ExecContext ctx(Device::cpu());
  std::vector<float> p(8), g(8), m(8), v(8), short_v(7);
  std::vector<int32_t> wi(8);
  AdamWStep s;
  expect_error_naming([&] { adamw_update(ctx, cpu_f32(p), cpu_f32(g), cpu_f32(m), cpu_f32(short_v), Tensor{}, s); },
                      "adamw_update", "'v'");
  expect_error_naming(
      [&] {
        adamw_update(ctx, cpu_f32(p), Tensor(g.data(), DType::bf16, Device::cpu(), {8}), cpu_f32(m), cpu_f32(v),
                     Tensor{}, s);
      },
      "adamw_update", "'grad'");
  expect_error_naming(
      [&] {
        adamw_update(ctx, cpu_f32(p), cpu_f32(g), cpu_f32(m), cpu_f32(v),
                     Tensor(wi.data(), DType::i32, Device::cpu(), {8}), s);
      },
      "adamw_update", "'working'");
  s.step = 0;
  expect_error_naming([&] { adamw_update(ctx, cpu_f32(p), cpu_f32(g), cpu_f32(m), cpu_f32(v), Tensor{}, s); },
                      "adamw_update", "step");
}

}  // namespace
}  // namespace hyd::kernels

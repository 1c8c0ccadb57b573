// CPU cross-entropy: losses against the direct formula (incl. ignored targets and large logits),
// dlogits against finite differences (double), float vs double agreement, invalid targets and
// dispatcher errors.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cross_entropy.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::central_differences;
using test::expect_error_naming;
using test::randint;
using test::randn_f64;
using test::rel_err;
using test::to_f64;

// loss = log sum_v exp(x_v) - x_t, summed naively (inputs are small enough not to overflow).
double direct_loss(const double* row, int64_t vocab, int32_t t) {
  if (t < 0) return 0;
  double z = 0;
  for (int64_t v = 0; v < vocab; ++v) z += std::exp(row[v]);
  return std::log(z) - row[t];
}

std::vector<int32_t> targets_with_ignored(int64_t n, int64_t vocab) {
  std::vector<int32_t> t = randint(n, 0, static_cast<int32_t>(vocab));
  t[1] = -100;  // the usual ignore index
  t[n - 1] = -1;
  return t;
}

TEST(OpsCrossEntropy, LossMatchesDirectFormula) {
  const int64_t n = 9, vocab = 50;
  std::vector<double> logits = randn_f64(n * vocab, 2.0);
  const std::vector<double> original = logits;
  const std::vector<int32_t> t = targets_with_ignored(n, vocab);
  std::vector<double> loss(n, NAN), ref(n);
  for (int64_t i = 0; i < n; ++i) ref[i] = direct_loss(&original[i * vocab], vocab, t[i]);
  cpu::cross_entropy<double>(logits.data(), t.data(), loss.data(), n, vocab, false, 1.0);
  EXPECT_LT(rel_err(loss, ref), 1e-13);
  EXPECT_EQ(loss[1], 0.0);
  EXPECT_EQ(loss[n - 1], 0.0);
  EXPECT_EQ(logits, original);  // write_grad = false leaves logits alone
}

TEST(OpsCrossEntropy, LargeLogitsStayFinite) {
  const int64_t n = 4, vocab = 64;
  std::vector<float> logits(n * vocab);
  const std::vector<double> r = randn_f64(n * vocab);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = static_cast<float>(1000.0 + 10.0 * r[i]);
  std::vector<double> shifted(n * vocab);  // the same problem shifted by -1000: identical losses
  for (size_t i = 0; i < shifted.size(); ++i) shifted[i] = double(logits[i]) - 1000.0;
  const std::vector<int32_t> t = randint(n, 0, vocab);
  std::vector<float> loss(n, NAN);
  cpu::cross_entropy<float>(logits.data(), t.data(), loss.data(), n, vocab, true, 1.0);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_NEAR(loss[i], direct_loss(&shifted[i * vocab], vocab, t[i]), 1e-3 * (1 + std::abs(loss[i])));
    double row_sum = 0;  // softmax - onehot sums to 0
    for (int64_t v = 0; v < vocab; ++v) {
      ASSERT_TRUE(std::isfinite(logits[i * vocab + v]));
      row_sum += logits[i * vocab + v];
    }
    EXPECT_NEAR(row_sum, 0.0, 1e-5);
  }
}

TEST(OpsCrossEntropy, GradientMatchesFiniteDifferences) {
  const int64_t n = 6, vocab = 11;
  const double grad_scale = 0.37;
  const std::vector<double> x = randn_f64(n * vocab, 1.5);
  const std::vector<int32_t> t = targets_with_ignored(n, vocab);
  std::vector<double> g = x, loss(n);
  cpu::cross_entropy<double>(g.data(), t.data(), loss.data(), n, vocab, true, grad_scale);
  // L = grad_scale * sum_i loss_i.
  auto total = [&](const std::vector<double>& logits) {
    std::vector<double> tmp = logits, l(n);
    cpu::cross_entropy<double>(tmp.data(), t.data(), l.data(), n, vocab, false, 1.0);
    double s = 0;
    for (double v : l) s += v;
    return grad_scale * s;
  };
  std::vector<double> xp = x;
  const std::vector<double> num = central_differences(xp, 1e-5, [&] { return total(xp); });
  EXPECT_LT(rel_err(g, num), 1e-8);
  for (int64_t v = 0; v < vocab; ++v) {  // ignored rows: exact zeros
    EXPECT_EQ(g[1 * vocab + v], 0.0);
    EXPECT_EQ(g[(n - 1) * vocab + v], 0.0);
  }
}

TEST(OpsCrossEntropy, DispatcherFloatMatchesDouble) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 16, vocab = 1000;
  const std::vector<double> x = randn_f64(n * vocab, 3.0);
  std::vector<int32_t> t = targets_with_ignored(n, vocab);
  std::vector<double> gd = x, ld(n);
  cpu::cross_entropy<double>(gd.data(), t.data(), ld.data(), n, vocab, true, 0.5);
  std::vector<float> gf(x.begin(), x.end()), lf(n, NAN);
  cross_entropy(ctx, Tensor(gf.data(), DType::f32, Device::cpu(), {n, vocab}),
                Tensor(t.data(), DType::i32, Device::cpu(), {n}), Tensor(lf.data(), DType::f32, Device::cpu(), {n}),
                true, 0.5f);
  EXPECT_LT(rel_err(to_f64(lf), ld), 1e-6);
  EXPECT_LT(rel_err(to_f64(gf), gd), 1e-6);
}

TEST(OpsCrossEntropy, RejectsBadTargetsAndArguments) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 4, vocab = 10;
  std::vector<float> logits(n * vocab, 0.5f), loss(n, NAN);
  const std::vector<float> original = logits;
  std::vector<int32_t> t = {1, 2, 10, 3};  // 10 is outside the vocabulary
  const Device cpu = Device::cpu();
  const Tensor tl(logits.data(), DType::f32, cpu, {n, vocab}), tt(t.data(), DType::i32, cpu, {n}),
      tloss(loss.data(), DType::f32, cpu, {n});
  expect_error_naming([&] { cross_entropy(ctx, tl, tt, tloss, true, 1.f); }, "cross_entropy", "'targets'");
  EXPECT_EQ(logits, original);  // nothing written before the error
  t[2] = 9;
  expect_error_naming([&] { cross_entropy(ctx, tl, Tensor(t.data(), DType::i32, cpu, {n - 1}), tloss, true, 1.f); },
                      "cross_entropy", "'targets'");
  expect_error_naming([&] { cross_entropy(ctx, tl, Tensor(loss.data(), DType::f32, cpu, {n}), tloss, true, 1.f); },
                      "cross_entropy", "'targets'");
  expect_error_naming(
      [&] {
        cross_entropy(ctx, tl, tt, Tensor(loss.data(), DType::f32, cpu, {n, 1}), true, 1.f);
      },
      "cross_entropy", "'losses'");
  expect_error_naming(
      [&] { cross_entropy(ctx, Tensor(logits.data(), DType::f32, cpu, {n * vocab}), tt, tloss, true, 1.f); },
      "cross_entropy", "'logits'");
  EXPECT_NO_THROW(cross_entropy(ctx, tl, tt, tloss, true, 1.f));
}

}  // namespace
}  // namespace hyd::kernels

// CPU fused distillation loss (KL(teacher || student) at temperature tau + CE): dlogits against
// finite differences in double (KL alone, CE alone, both; tau 1 and 2; masked and ignored tokens),
// kl/ce/top1 against the direct formulas, KL = 0 and zero dlogits when student == teacher, KL >= 0,
// teacher probabilities that are exactly 0, extreme logits, float vs double, optional tensors and
// dispatcher errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/distill_loss.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::central_differences;
using test::expect_error_naming;
using test::randint;
using test::randn_f64;
using test::rel_err;
using test::to_f64;

constexpr double kInf = std::numeric_limits<double>::infinity();

// Outputs of one CPU run in double.
struct Result {
  std::vector<double> grad, kl, ce;
  std::vector<uint8_t> top1;
};

Result run_f64(const std::vector<double>& s, const std::vector<double>& t, const std::vector<int32_t>& labels,
               const std::vector<uint8_t>& mask, int64_t n, int64_t vocab, const DistillLossOptions& opt) {
  Result r{s, std::vector<double>(n, NAN), std::vector<double>(n, NAN), std::vector<uint8_t>(n, 0x7f)};
  cpu::distill_loss<double>(r.grad.data(), t.data(), labels.empty() ? nullptr : labels.data(),
                            mask.empty() ? nullptr : mask.data(), r.kl.data(), r.ce.data(), r.top1.data(), n, vocab,
                            opt);
  return r;
}

// Direct formulas without max subtraction (inputs are small enough not to overflow); p_t == 0 terms
// are skipped by the definition 0 log 0 = 0.
double direct_kl(const double* s, const double* t, int64_t vocab, double tau) {
  double zs = 0, zt = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    zs += std::exp(s[v] / tau);
    zt += std::exp(t[v] / tau);
  }
  double kl = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    const double pt = std::exp(t[v] / tau) / zt, ps = std::exp(s[v] / tau) / zs;
    if (pt > 0) kl += pt * std::log(pt / ps);
  }
  return tau * tau * kl;
}

double direct_ce(const double* s, int64_t vocab, int32_t label) {
  if (label < 0) return 0;
  double z = 0;
  for (int64_t v = 0; v < vocab; ++v) z += std::exp(s[v]);
  return std::log(z) - s[label];
}

int64_t first_argmax(const double* x, int64_t vocab) { return std::max_element(x, x + vocab) - x; }

// Labels with an ignored token at row 1, a mask with a non-loss token at row 3 (which has a valid label).
std::vector<int32_t> labels_with_ignored(int64_t n, int64_t vocab) {
  std::vector<int32_t> l = randint(n, 0, static_cast<int32_t>(vocab));
  l[1] = -100;
  return l;
}
std::vector<uint8_t> mask_with_hole(int64_t n) {
  std::vector<uint8_t> m(n, 1);
  m[3] = 0;
  return m;
}

struct FdCase {
  float w_kl, w_ce, tau;
};

class OpsDistillLossFd : public ::testing::TestWithParam<FdCase> {};

TEST_P(OpsDistillLossFd, GradientMatchesFiniteDifferences) {
  const FdCase c = GetParam();
  const int64_t n = 6, vocab = 13;
  DistillLossOptions opt;
  opt.temperature = c.tau;
  opt.w_kl = c.w_kl;
  opt.w_ce = c.w_ce;
  opt.grad_scale = 0.37f;
  opt.write_grad = true;
  const std::vector<double> s = randn_f64(n * vocab, 1.5), t = randn_f64(n * vocab, 2.0);
  const std::vector<int32_t> labels = labels_with_ignored(n, vocab);
  const std::vector<uint8_t> mask = mask_with_hole(n);
  const Result r = run_f64(s, t, labels, mask, n, vocab, opt);

  // L = grad_scale * sum_i (w_kl kl_i + w_ce ce_i), which is what the in-place gradient differentiates.
  DistillLossOptions fwd = opt;
  fwd.write_grad = false;
  std::vector<double> sp = s;
  const std::vector<double> num = central_differences(sp, 1e-5, [&] {
    const Result f = run_f64(sp, t, labels, mask, n, vocab, fwd);
    double total = 0;
    for (int64_t i = 0; i < n; ++i) total += double(c.w_kl) * f.kl[i] + double(c.w_ce) * f.ce[i];
    return double(opt.grad_scale) * total;
  });
  EXPECT_LT(rel_err(r.grad, num), 1e-8);
  for (int64_t v = 0; v < vocab; ++v) ASSERT_EQ(r.grad[3 * vocab + v], 0.0) << "masked row, v=" << v;
  EXPECT_EQ(r.kl[3], 0.0);
  EXPECT_EQ(r.ce[3], 0.0);
  EXPECT_EQ(r.top1[3], 0);
  EXPECT_EQ(r.ce[1], 0.0);  // ignored label: no CE, but KL still counts
  EXPECT_GT(r.kl[1], 0.0);
  if (c.w_kl == 0) {  // CE alone: the ignored token has nothing left
    for (int64_t v = 0; v < vocab; ++v) ASSERT_EQ(r.grad[1 * vocab + v], 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Weights, OpsDistillLossFd,
                         ::testing::Values(FdCase{1, 0, 1}, FdCase{1, 0, 2}, FdCase{0, 1, 1}, FdCase{0, 1, 2},
                                           FdCase{0.7f, 0.4f, 1}, FdCase{0.7f, 0.4f, 2}),
                         [](const ::testing::TestParamInfo<FdCase>& info) {
                           const FdCase& c = info.param;
                           std::string name = c.w_ce == 0 ? "KlOnly" : (c.w_kl == 0 ? "CeOnly" : "KlAndCe");
                           return name + "_tau" + std::to_string(static_cast<int>(c.tau));
                         });

TEST(OpsDistillLoss, MatchesDirectFormulasAndKlIsNonNegative) {
  const int64_t n = 10, vocab = 40;
  for (float tau : {1.f, 2.f, 0.5f}) {
    SCOPED_TRACE("tau=" + std::to_string(tau));
    std::vector<double> s = randn_f64(n * vocab, 2.0);
    const std::vector<double> t = randn_f64(n * vocab, 2.0);
    // Rows 0 and 1: student close to the teacher (tiny but positive KL).
    for (int64_t v = 0; v < vocab; ++v) {
      s[v] = t[v] + 1e-3 * s[v];
      s[vocab + v] = t[vocab + v] + 1e-4 * s[vocab + v];
    }
    const std::vector<int32_t> labels = labels_with_ignored(n, vocab);
    DistillLossOptions opt;
    opt.temperature = tau;
    const Result r = run_f64(s, t, labels, {}, n, vocab, opt);
    EXPECT_EQ(r.grad, s);  // write_grad = false leaves the student alone
    std::vector<double> kl_ref(n), ce_ref(n);
    for (int64_t i = 0; i < n; ++i) {
      kl_ref[i] = direct_kl(&s[i * vocab], &t[i * vocab], vocab, tau);
      ce_ref[i] = direct_ce(&s[i * vocab], vocab, labels[i]);
      EXPECT_GE(r.kl[i], 0.0) << "row " << i;
      EXPECT_EQ(r.top1[i], first_argmax(&s[i * vocab], vocab) == first_argmax(&t[i * vocab], vocab) ? 1 : 0);
    }
    EXPECT_LT(rel_err(r.kl, kl_ref), 1e-12);
    EXPECT_LT(rel_err(r.ce, ce_ref), 1e-12);
    // The near-equal rows on their own scale (KL of order 1e-6 and 1e-8, less when p_t is peaked).
    EXPECT_GT(r.kl[0], 0.0);
    EXPECT_GT(r.kl[1], 0.0);
    EXPECT_NEAR(r.kl[0], kl_ref[0], 1e-5 * kl_ref[0]);
    EXPECT_NEAR(r.kl[1], kl_ref[1], 1e-3 * kl_ref[1]);
    EXPECT_EQ(r.ce[1], 0.0);
  }
}

TEST(OpsDistillLoss, StudentEqualToTeacherGivesZeroKlAndZeroGradient) {
  const int64_t n = 5, vocab = 64;
  const std::vector<double> t = randn_f64(n * vocab, 3.0);
  for (float tau : {1.f, 2.f}) {
    DistillLossOptions opt;
    opt.temperature = tau;
    opt.w_ce = 0;
    opt.write_grad = true;
    const std::vector<int32_t> labels = randint(n, 0, vocab);  // CE is reported but has no weight
    const Result r = run_f64(t, t, labels, {}, n, vocab, opt);
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_EQ(r.kl[i], 0.0);
      EXPECT_GT(r.ce[i], 0.0);
      EXPECT_EQ(r.top1[i], 1);
    }
    for (double g : r.grad) ASSERT_EQ(g, 0.0);
  }
  // The same through the f32 dispatcher.
  ExecContext ctx(Device::cpu());
  std::vector<float> sf(t.begin(), t.end()), tf = sf, kl(n, NAN), ce(n, NAN);
  std::vector<uint8_t> top1(n, 0x7f);
  DistillLossOptions opt;
  opt.write_grad = true;
  const Device cpu = Device::cpu();
  distill_loss(ctx, Tensor(sf.data(), DType::f32, cpu, {n, vocab}), Tensor(tf.data(), DType::f32, cpu, {n, vocab}),
               Tensor{}, Tensor{}, Tensor(kl.data(), DType::f32, cpu, {n}), Tensor(ce.data(), DType::f32, cpu, {n}),
               Tensor(top1.data(), DType::u8, cpu, {n}), opt);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(kl[i], 0.f);
    EXPECT_EQ(ce[i], 0.f);  // no labels at all: no CE
    EXPECT_EQ(top1[i], 1);
  }
  for (float g : sf) ASSERT_EQ(g, 0.f);
}

TEST(OpsDistillLoss, ZeroTeacherProbabilitiesContributeNothing) {
  const int64_t n = 3, vocab = 20;
  const std::vector<double> s = randn_f64(n * vocab);
  std::vector<double> t = randn_f64(n * vocab);
  for (int64_t v = 0; v < vocab; v += 3) t[v] = -kInf;                        // row 0: p_t exactly 0 at every third id
  for (int64_t v = 0; v < vocab; ++v) t[vocab + v] = v == 7 ? 0 : -kInf;      // row 1: one-hot teacher
  for (int64_t v = 0; v < vocab; ++v) t[2 * vocab + v] = v == 4 ? 0 : -2000;  // row 2: exp underflows to 0
  for (float tau : {1.f, 2.f}) {
    DistillLossOptions opt;
    opt.temperature = tau;
    opt.write_grad = true;
    const Result r = run_f64(s, t, {}, {}, n, vocab, opt);
    for (double g : r.grad) ASSERT_TRUE(std::isfinite(g));
    EXPECT_NEAR(r.kl[0], direct_kl(&s[0], &t[0], vocab, tau), 1e-12);
    // One-hot teacher: KL = -tau^2 log p_s[7] (and the same for the underflowing row with id 4).
    double z = 0;
    for (int64_t v = 0; v < vocab; ++v) z += std::exp(s[vocab + v] / tau);
    EXPECT_NEAR(r.kl[1], -tau * tau * (s[vocab + 7] / tau - std::log(z)), 1e-12);
    z = 0;
    for (int64_t v = 0; v < vocab; ++v) z += std::exp(s[2 * vocab + v] / tau);
    EXPECT_NEAR(r.kl[2], -tau * tau * (s[2 * vocab + 4] / tau - std::log(z)), 1e-12);
  }
}

TEST(OpsDistillLoss, ExtremeLogitsStayFinite) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 8, vocab = 300;
  const Device cpu = Device::cpu();
  std::vector<float> s(n * vocab), t(n * vocab);
  const std::vector<double> rs = randn_f64(n * vocab), rt = randn_f64(n * vocab);
  for (int64_t k = 0; k < n * vocab; ++k) {  // a mix of +-1e4 and ordinary logits
    s[k] = static_cast<float>(k % 7 == 0 ? 1e4 * (rs[k] > 0 ? 1 : -1) : rs[k]);
    t[k] = static_cast<float>(k % 5 == 0 ? 1e4 * (rt[k] > 0 ? 1 : -1) : 100 * rt[k]);
  }
  for (int64_t v = 0; v < vocab; ++v) {  // row 0: student and teacher both certain, of different ids
    s[v] = static_cast<float>(rs[v]);
    t[v] = static_cast<float>(rt[v]);
  }
  s[0] = 1e4f;
  t[1] = 1e4f;
  std::vector<int32_t> labels = randint(n, 0, vocab);
  for (float tau : {1.f, 2.f}) {
    SCOPED_TRACE("tau=" + std::to_string(tau));
    std::vector<float> g = s, kl(n, NAN), ce(n, NAN);
    std::vector<uint8_t> top1(n, 0x7f);
    DistillLossOptions opt;
    opt.temperature = tau;
    opt.w_kl = 0.5f;
    opt.w_ce = 0.5f;
    opt.write_grad = true;
    distill_loss(ctx, Tensor(g.data(), DType::f32, cpu, {n, vocab}), Tensor(t.data(), DType::f32, cpu, {n, vocab}),
                 Tensor(labels.data(), DType::i32, cpu, {n}), Tensor{}, Tensor(kl.data(), DType::f32, cpu, {n}),
                 Tensor(ce.data(), DType::f32, cpu, {n}), Tensor(top1.data(), DType::u8, cpu, {n}), opt);
    EXPECT_TRUE(test::all_finite(kl));
    EXPECT_TRUE(test::all_finite(ce));
    EXPECT_TRUE(test::all_finite(g));
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_GE(kl[i], 0.f);
      double row_sum = 0;  // (p_s - p_t) and (q - onehot) both sum to 0
      for (int64_t v = 0; v < vocab; ++v) row_sum += g[i * vocab + v];
      EXPECT_NEAR(row_sum, 0.0, 1e-4);
    }
    EXPECT_GT(kl[0], 1e3f);  // -tau^2 log p_s[1] with s[1] ~ 2e4/tau below the maximum
    // Against the double reference on the same f32 inputs.
    const Result r = run_f64(to_f64(s), to_f64(t), labels, {}, n, vocab, opt);
    EXPECT_LT(rel_err(to_f64(kl), r.kl), 1e-6);
    EXPECT_LT(rel_err(to_f64(ce), r.ce), 1e-6);
    EXPECT_LT(rel_err(to_f64(g), r.grad), 1e-6);
  }
}

TEST(OpsDistillLoss, DispatcherFloatMatchesDouble) {
  ExecContext ctx(Device::cpu());
  const Device cpu = Device::cpu();
  const int64_t n = 16, vocab = 1000;
  const std::vector<double> s = randn_f64(n * vocab, 3.0), t = randn_f64(n * vocab, 3.0);
  std::vector<int32_t> labels = labels_with_ignored(n, vocab);
  std::vector<uint8_t> mask = mask_with_hole(n);
  DistillLossOptions opt;
  opt.temperature = 2;
  opt.w_kl = 0.8f;
  opt.w_ce = 0.2f;
  opt.grad_scale = 1.f / 13;
  opt.write_grad = true;
  // References from the float-rounded inputs, so only the arithmetic differs.
  std::vector<float> sf(s.begin(), s.end()), tf(t.begin(), t.end()), kl(n, NAN), ce(n, NAN);
  const Result r = run_f64(to_f64(sf), to_f64(tf), labels, mask, n, vocab, opt);
  std::vector<uint8_t> top1(n, 0x7f);
  distill_loss(ctx, Tensor(sf.data(), DType::f32, cpu, {n, vocab}), Tensor(tf.data(), DType::f32, cpu, {n, vocab}),
               Tensor(labels.data(), DType::i32, cpu, {n}), Tensor(mask.data(), DType::u8, cpu, {n}),
               Tensor(kl.data(), DType::f32, cpu, {n}), Tensor(ce.data(), DType::f32, cpu, {n}),
               Tensor(top1.data(), DType::u8, cpu, {n}), opt);
  EXPECT_LT(rel_err(to_f64(kl), r.kl), 1e-6);
  EXPECT_LT(rel_err(to_f64(ce), r.ce), 1e-6);
  EXPECT_LT(rel_err(to_f64(sf), r.grad), 1e-6);
  EXPECT_EQ(top1, r.top1);
}

TEST(OpsDistillLoss, OptionalTensorsMeanNoLabelsAllTokensNoTop1) {
  const int64_t n = 4, vocab = 30;
  const std::vector<double> s = randn_f64(n * vocab, 2.0), t = randn_f64(n * vocab, 2.0);
  DistillLossOptions opt;
  opt.w_ce = 1;  // weighted, but without labels there is nothing to weigh
  opt.write_grad = true;
  const Result all_ignored = run_f64(s, t, std::vector<int32_t>(n, -1), std::vector<uint8_t>(n, 1), n, vocab, opt);
  std::vector<double> g = s, kl(n, NAN), ce(n, NAN);
  cpu::distill_loss<double>(g.data(), t.data(), nullptr, nullptr, kl.data(), ce.data(), nullptr, n, vocab, opt);
  EXPECT_EQ(g, all_ignored.grad);
  EXPECT_EQ(kl, all_ignored.kl);
  EXPECT_EQ(ce, std::vector<double>(n, 0.0));
}

TEST(OpsDistillLoss, RejectsBadArguments) {
  ExecContext ctx(Device::cpu());
  const Device cpu = Device::cpu();
  const int64_t n = 4, vocab = 10;
  std::vector<float> s(n * vocab, 0.5f), t(n * vocab, 0.25f), kl(n, NAN), ce(n, NAN);
  std::vector<int32_t> labels = {1, 2, 10, 3};  // 10 is outside the vocabulary
  std::vector<uint8_t> mask(n, 1), top1(n, 0);
  std::vector<int32_t> mask_i32(n, 1);
  const std::vector<float> s0 = s;
  const Tensor ts(s.data(), DType::f32, cpu, {n, vocab}), tt(t.data(), DType::f32, cpu, {n, vocab}),
      tl(labels.data(), DType::i32, cpu, {n}), tm(mask.data(), DType::u8, cpu, {n}),
      tkl(kl.data(), DType::f32, cpu, {n}), tce(ce.data(), DType::f32, cpu, {n}),
      ttop(top1.data(), DType::u8, cpu, {n});
  DistillLossOptions opt;
  opt.write_grad = true;
  const char* op = "distill_loss";
  expect_error_naming([&] { distill_loss(ctx, ts, tt, tl, tm, tkl, tce, ttop, opt); }, op, "'labels'");
  EXPECT_EQ(s, s0);  // nothing written before the error
  EXPECT_TRUE(std::isnan(kl[0]));
  labels[2] = 9;

  expect_error_naming([&] { distill_loss(ctx, ts.view({n * vocab}), tt, tl, tm, tkl, tce, ttop, opt); }, op,
                      "'student'");
  expect_error_naming(
      [&] {
        distill_loss(ctx, ts, tt.view({n, vocab / 2, 2}), tl, tm, tkl, tce, ttop, opt);
      },
      op, "'teacher'");
  expect_error_naming([&] { distill_loss(ctx, ts, tt.slice0(0, n - 1), tl, tm, tkl, tce, ttop, opt); }, op,
                      "'teacher'");
  std::vector<double> t64(n * vocab);
  expect_error_naming(
      [&] {
        distill_loss(ctx, ts, Tensor(t64.data(), DType::f64, cpu, {n, vocab}), tl, tm, tkl, tce, ttop, opt);
      },
      op, "'teacher'");
  expect_error_naming([&] { distill_loss(ctx, ts, tt, tl.slice0(0, n - 1), tm, tkl, tce, ttop, opt); }, op, "'labels'");
  expect_error_naming([&] { distill_loss(ctx, ts, tt, tce, tm, tkl, tce, ttop, opt); }, op, "'labels'");
  expect_error_naming(
      [&] { distill_loss(ctx, ts, tt, tl, Tensor(mask_i32.data(), DType::i32, cpu, {n}), tkl, tce, ttop, opt); }, op,
      "'mask'");
  expect_error_naming([&] { distill_loss(ctx, ts, tt, tl, tm.slice0(0, 2), tkl, tce, ttop, opt); }, op, "'mask'");
  expect_error_naming([&] { distill_loss(ctx, ts, tt, tl, tm, tkl.view({n, 1}), tce, ttop, opt); }, op, "'kl'");
  expect_error_naming([&] { distill_loss(ctx, ts, tt, tl, tm, tkl, tl, ttop, opt); }, op, "'ce'");
  expect_error_naming([&] { distill_loss(ctx, ts, tt, tl, tm, tkl, tce, tm.slice0(0, 1), opt); }, op, "'top1'");
  expect_error_naming([&] { distill_loss(ctx, ts, tt, tl, tm, tkl, tce, tkl, opt); }, op, "'top1'");
  expect_error_naming([&] { distill_loss(ctx, ts, ts, tl, tm, tkl, tce, ttop, opt); }, op, "'teacher'");  // aliasing
  expect_error_naming(
      [&] {
        distill_loss(ctx, ts.view({n, vocab, 1}), tt, tl, tm, tkl, tce, ttop, opt);
      },
      op, "'student'");
  std::vector<bf16> sb(n * vocab);
  expect_error_naming(
      [&] {
        distill_loss(ctx, Tensor(sb.data(), DType::bf16, cpu, {n, vocab}), tt, tl, tm, tkl, tce, ttop, opt);
      },
      op, "'teacher'");  // teacher f32 vs student bf16: dtypes must agree
  for (float bad : {0.f, -1.f, float(NAN), float(INFINITY)}) {
    DistillLossOptions o = opt;
    o.temperature = bad;
    expect_error_naming([&] { distill_loss(ctx, ts, tt, tl, tm, tkl, tce, ttop, o); }, op, "'temperature'");
  }
  {
    DistillLossOptions o = opt;
    o.w_kl = INFINITY;
    expect_error_naming([&] { distill_loss(ctx, ts, tt, tl, tm, tkl, tce, ttop, o); }, op, "'w_kl'");
    o = opt;
    o.w_ce = NAN;
    expect_error_naming([&] { distill_loss(ctx, ts, tt, tl, tm, tkl, tce, ttop, o); }, op, "'w_ce'");
    o = opt;
    o.grad_scale = NAN;
    expect_error_naming([&] { distill_loss(ctx, ts, tt, tl, tm, tkl, tce, ttop, o); }, op, "'grad_scale'");
  }
  EXPECT_EQ(s, s0);
  EXPECT_NO_THROW(distill_loss(ctx, ts, tt, tl, tm, tkl, tce, ttop, opt));
  EXPECT_NO_THROW(distill_loss(ctx, ts, tt, Tensor{}, Tensor{}, tkl, tce, Tensor{}, opt));
}

}  // namespace
}  // namespace hyd::kernels

// CPU KDA gates: forward against the formulas (g = -exp(A_log) softplus(f + dt_bias) < 0, beta =
// sigmoid(b)), including large |f + dt_bias| where a naive softplus overflows or loses precision;
// backward (df, db and the accumulated dA_log, ddt_bias) against finite differences in double; the
// f32 and f64 dispatchers against the double reference; dispatcher errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/kda_gates.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::central_differences;
using test::cpu_f32;
using test::expect_error_mentioning;
using test::randn;
using test::randn_f64;
using test::rel_err;
using test::to_f64;

Tensor cpu_f64(std::vector<double>& v, std::initializer_list<int64_t> dims) {
  return Tensor(v.data(), DType::f64, Device::cpu(), dims);
}

TEST(OpsKdaGates, ForwardMatchesFormula) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 7, hv = 3, dk = 5;
  std::vector<float> f = randn(n * hv * dk, 3.0f), A_log = randn(hv, 1.0f, 1.0f), dt = randn(hv * dk, 1.0f);
  std::vector<float> b = randn(n * hv, 3.0f);
  f[0] = 60.f;   // softplus(z) = z (exp(z) would be large but finite in double; must not lose z)
  f[1] = -60.f;  // softplus(z) = exp(z) ~ 1e-26: must not round to 0
  std::vector<float> g(n * hv * dk, std::nanf("")), beta(n * hv, std::nanf(""));
  kda_gates_forward(ctx, cpu_f32(f, {n, hv, dk}), cpu_f32(A_log, {hv}), cpu_f32(dt, {hv * dk}), cpu_f32(b, {n, hv}),
                    cpu_f32(g, {n, hv, dk}), cpu_f32(beta, {n, hv}));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < hv; ++h) {
      for (int64_t i = 0; i < dk; ++i) {
        const int64_t e = (t * hv + h) * dk + i;
        const double z = double(f[e]) + dt[h * dk + i];
        const double sp = z > 30 ? z : std::log1p(std::exp(z));
        const double want = -std::exp(double(A_log[h])) * sp;
        EXPECT_LT(g[e], 0.f);
        EXPECT_NEAR(g[e], want, 1e-6 * std::fabs(want)) << "t " << t << " h " << h << " i " << i;
      }
      EXPECT_NEAR(beta[t * hv + h], 1 / (1 + std::exp(-double(b[t * hv + h]))), 1e-7);
    }
}

TEST(OpsKdaGates, BackwardMatchesFiniteDifferences) {
  const int64_t n = 4, hv = 2, dk = 3;
  std::vector<double> f = randn_f64(n * hv * dk, 2.0), A_log = randn_f64(hv, 0.5, 1.0), dt = randn_f64(hv * dk);
  std::vector<double> b = randn_f64(n * hv, 2.0), wg = randn_f64(n * hv * dk), wb = randn_f64(n * hv);
  f[2] = 25.0;  // far on both sides of the softplus knee
  f[3] = -25.0;
  // L = sum wg * g + sum wb * beta, returned as its change from the unperturbed point and summed in long double: L
  // reaches ~1e3 here (g ~ -exp(A_log) z at z = 25), and its rounding in double (~1e-13) over the central
  // difference's 2e-6 made ~1e-7 of a beta gradient (~0.1): about one seed in a hundred failed db's 1e-7 bound
  // (HYD_TEST_SEED=67: 1.4e-7).
  auto total = [&] {
    std::vector<double> g(n * hv * dk), beta(n * hv);
    cpu::kda_gates_forward<double>(f.data(), A_log.data(), dt.data(), b.data(), g.data(), beta.data(), n, hv, dk);
    long double l = 0;
    for (size_t i = 0; i < g.size(); ++i) l += static_cast<long double>(wg[i]) * g[i];
    for (size_t i = 0; i < beta.size(); ++i) l += static_cast<long double>(wb[i]) * beta[i];
    return l;
  };
  const long double base = total();
  auto loss = [&] { return static_cast<double>(total() - base); };
  const std::vector<double> df_num = central_differences(f, 1e-6, loss),
                            dA_num = central_differences(A_log, 1e-6, loss),
                            ddt_num = central_differences(dt, 1e-6, loss), db_num = central_differences(b, 1e-6, loss);

  std::vector<double> g(n * hv * dk), beta(n * hv);
  cpu::kda_gates_forward<double>(f.data(), A_log.data(), dt.data(), b.data(), g.data(), beta.data(), n, hv, dk);
  const std::vector<double> dA0 = randn_f64(hv), ddt0 = randn_f64(hv * dk);  // accumulated: start non-zero
  std::vector<double> df(n * hv * dk, std::nan("")), db(n * hv, std::nan("")), dA = dA0, ddt = ddt0;
  cpu::kda_gates_backward<double>(wg.data(), wb.data(), g.data(), beta.data(), A_log.data(), df.data(), dA.data(),
                                  ddt.data(), db.data(), n, hv, dk);
  for (int64_t h = 0; h < hv; ++h) dA[h] -= dA0[h];
  for (int64_t c = 0; c < hv * dk; ++c) ddt[c] -= ddt0[c];
  EXPECT_LT(rel_err(df, df_num), 1e-7);
  EXPECT_LT(rel_err(dA, dA_num), 1e-7);
  EXPECT_LT(rel_err(ddt, ddt_num), 1e-7);
  EXPECT_LT(rel_err(db, db_num), 1e-7);
}

TEST(OpsKdaGates, FloatAndDoubleDispatchersMatchDoubleReference) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 50, hv = 4, dk = 16;
  std::vector<double> fd = randn_f64(n * hv * dk, 2.0), Ad = randn_f64(hv, 0.5, 1.0), dtd = randn_f64(hv * dk);
  std::vector<double> bd = randn_f64(n * hv, 2.0), dgd = randn_f64(n * hv * dk), dbetad = randn_f64(n * hv);
  std::vector<double> gd(n * hv * dk), betad(n * hv), dfd(n * hv * dk), dbd(n * hv), dAd(hv, 0.0), ddtd(hv * dk, 0.0);
  cpu::kda_gates_forward<double>(fd.data(), Ad.data(), dtd.data(), bd.data(), gd.data(), betad.data(), n, hv, dk);
  cpu::kda_gates_backward<double>(dgd.data(), dbetad.data(), gd.data(), betad.data(), Ad.data(), dfd.data(), dAd.data(),
                                  ddtd.data(), dbd.data(), n, hv, dk);

  std::vector<float> f = test::to_f32(fd), A = test::to_f32(Ad), dt = test::to_f32(dtd), b = test::to_f32(bd);
  std::vector<float> dg = test::to_f32(dgd), dbeta = test::to_f32(dbetad);
  std::vector<float> g(n * hv * dk, std::nanf("")), beta(n * hv, std::nanf("")), df(n * hv * dk, std::nanf(""));
  std::vector<float> db(n * hv, std::nanf("")), dA(hv, 0.f), ddt(hv * dk, 0.f);
  kda_gates_forward(ctx, cpu_f32(f, {n, hv, dk}), cpu_f32(A, {hv}), cpu_f32(dt, {hv * dk}), cpu_f32(b, {n, hv}),
                    cpu_f32(g, {n, hv, dk}), cpu_f32(beta, {n, hv}));
  kda_gates_backward(ctx, cpu_f32(dg, {n, hv, dk}), cpu_f32(dbeta, {n, hv}), cpu_f32(g, {n, hv, dk}),
                     cpu_f32(beta, {n, hv}), cpu_f32(A, {hv}), cpu_f32(df, {n, hv, dk}), cpu_f32(dA, {hv}),
                     cpu_f32(ddt, {hv * dk}), cpu_f32(db, {n, hv}));
  EXPECT_LT(rel_err(to_f64(g), gd), 1e-6);
  EXPECT_LT(rel_err(to_f64(beta), betad), 1e-6);
  EXPECT_LT(rel_err(to_f64(df), dfd), 1e-5);
  EXPECT_LT(rel_err(to_f64(db), dbd), 1e-5);
  EXPECT_LT(rel_err(to_f64(dA), dAd), 1e-5);
  EXPECT_LT(rel_err(to_f64(ddt), ddtd), 1e-5);

  std::vector<double> g64(n * hv * dk, std::nan("")), beta64(n * hv, std::nan("")), df64(n * hv * dk, std::nan(""));
  std::vector<double> db64(n * hv, std::nan("")), dA64(hv, 0.0), ddt64(hv * dk, 0.0);
  kda_gates_forward(ctx, cpu_f64(fd, {n, hv, dk}), cpu_f64(Ad, {hv}), cpu_f64(dtd, {hv * dk}), cpu_f64(bd, {n, hv}),
                    cpu_f64(g64, {n, hv, dk}), cpu_f64(beta64, {n, hv}));
  kda_gates_backward(ctx, cpu_f64(dgd, {n, hv, dk}), cpu_f64(dbetad, {n, hv}), cpu_f64(g64, {n, hv, dk}),
                     cpu_f64(beta64, {n, hv}), cpu_f64(Ad, {hv}), cpu_f64(df64, {n, hv, dk}), cpu_f64(dA64, {hv}),
                     cpu_f64(ddt64, {hv * dk}), cpu_f64(db64, {n, hv}));
  EXPECT_EQ(rel_err(g64, gd), 0.0);
  EXPECT_EQ(rel_err(beta64, betad), 0.0);
  EXPECT_EQ(rel_err(df64, dfd), 0.0);
  EXPECT_EQ(rel_err(db64, dbd), 0.0);
  EXPECT_EQ(rel_err(dA64, dAd), 0.0);
  EXPECT_EQ(rel_err(ddt64, ddtd), 0.0);
}

TEST(OpsKdaGates, DispatcherErrorsNameTheArgument) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 3, hv = 2, dk = 4;
  std::vector<float> f(n * hv * dk), A(hv), dt(hv * dk), b(n * hv), g(n * hv * dk), beta(n * hv), wrong(5);
  std::vector<double> A64(hv);
  auto F = [&] { return cpu_f32(f, {n, hv, dk}); };
  auto G = [&] { return cpu_f32(g, {n, hv, dk}); };
  auto B = [&] { return cpu_f32(b, {n, hv}); };
  expect_error_mentioning(
      [&] { kda_gates_forward(ctx, F(), cpu_f32(wrong, {5}), cpu_f32(dt, {hv * dk}), B(), G(), B()); }, "'A_log'");
  expect_error_mentioning([&] { kda_gates_forward(ctx, F(), cpu_f32(A, {hv}), cpu_f32(wrong, {5}), B(), G(), B()); },
                          "'dt_bias'");
  expect_error_mentioning(
      [&] {
        kda_gates_forward(ctx, F(), cpu_f32(A, {hv}), cpu_f32(dt, {hv * dk}), cpu_f32(b, {hv, n}), G(), B());
      },
      "'b'");
  expect_error_mentioning(
      [&] {
        kda_gates_forward(ctx, F(), cpu_f32(A, {hv}), cpu_f32(dt, {hv * dk}), B(), cpu_f32(g, {n, dk, hv}), B());
      },
      "'g'");
  expect_error_mentioning(
      [&] {
        kda_gates_forward(ctx, F(), Tensor(A64.data(), DType::f64, Device::cpu(), {hv}), cpu_f32(dt, {hv * dk}), B(),
                          G(), B());
      },
      "'A_log'");
  expect_error_mentioning(
      [&] {
        kda_gates_backward(ctx, G(), B(), G(), B(), cpu_f32(A, {hv}), F(), cpu_f32(A, {hv}), cpu_f32(wrong, {5}), B());
      },
      "'ddt_bias'");
  expect_error_mentioning(
      [&] {
        kda_gates_backward(ctx, G(), B(), G(), B(), cpu_f32(A, {hv}), F(), cpu_f32(wrong, {5}), cpu_f32(dt, {hv * dk}),
                           B());
      },
      "'dA_log'");
  expect_error_mentioning(
      [&] {
        kda_gates_backward(ctx, G(), B(), G(), B(), cpu_f32(A, {hv}), F(), cpu_f32(A, {hv}), cpu_f32(dt, {hv * dk}),
                           cpu_f32(beta, {hv, n}));
      },
      "'db'");
}

}  // namespace
}  // namespace hyd::kernels

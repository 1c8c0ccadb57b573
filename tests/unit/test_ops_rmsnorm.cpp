// CPU RMSNorm: forward against the formula (rows of y / w have unit RMS, rstd as defined), backward
// (dx and accumulated dw) against finite differences in double, float dispatcher vs double, errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/rmsnorm.h"
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

TEST(OpsRmsnorm, ForwardHasUnitRmsAndMatchesFormula) {
  ExecContext ctx(Device::cpu());
  const int64_t rows = 13, dim = 48;
  std::vector<float> x = randn(rows * dim, 3.0f, 0.5f), w = randn(dim, 0.5f, 1.0f);
  std::vector<float> y(rows * dim, std::nanf("")), rstd(rows, std::nanf(""));
  const float eps = 1e-6f;
  rmsnorm_forward(ctx, cpu_f32(x, {rows, dim}), cpu_f32(w, {dim}), cpu_f32(y, {rows, dim}), cpu_f32(rstd, {rows}), eps);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0, ms = 0;
    for (int64_t j = 0; j < dim; ++j) {
      ss += double(x[r * dim + j]) * x[r * dim + j];
      const double u = double(y[r * dim + j]) / w[j];
      ms += u * u;
    }
    EXPECT_NEAR(std::sqrt(ms / dim), 1.0, 1e-4) << "row " << r;  // y / w has unit RMS (eps is negligible)
    EXPECT_NEAR(rstd[r], 1.0 / std::sqrt(ss / dim + eps), 1e-5 * rstd[r]);
    for (int64_t j = 0; j < dim; ++j) EXPECT_NEAR(y[r * dim + j], x[r * dim + j] * rstd[r] * w[j], 1e-5);
  }
}

TEST(OpsRmsnorm, BackwardMatchesFiniteDifferences) {
  const int64_t rows = 5, dim = 9;
  const double eps_norm = 1e-5;
  std::vector<double> x = randn_f64(rows * dim), w = randn_f64(dim, 0.5, 1.0), g = randn_f64(rows * dim);
  // L(x, w) = sum g * y
  auto loss = [&] {
    std::vector<double> y(rows * dim), rstd(rows);
    cpu::rmsnorm_forward<double>(x.data(), w.data(), y.data(), rstd.data(), rows, dim, eps_norm);
    double l = 0;
    for (int64_t k = 0; k < rows * dim; ++k) l += g[k] * y[k];
    return l;
  };
  const std::vector<double> dx_num = central_differences(x, 1e-6, loss), dw_num = central_differences(w, 1e-6, loss);

  std::vector<double> y(rows * dim), rstd(rows);
  cpu::rmsnorm_forward<double>(x.data(), w.data(), y.data(), rstd.data(), rows, dim, eps_norm);
  const std::vector<double> dw0 = randn_f64(dim);  // dw accumulates: start non-zero
  std::vector<double> dx(rows * dim, std::nan("")), dw = dw0;
  cpu::rmsnorm_backward<double>(g.data(), x.data(), w.data(), rstd.data(), dx.data(), dw.data(), rows, dim);
  for (int64_t j = 0; j < dim; ++j) dw[j] -= dw0[j];
  EXPECT_LT(rel_err(dx, dx_num), 1e-7);
  EXPECT_LT(rel_err(dw, dw_num), 1e-7);
}

TEST(OpsRmsnorm, FloatDispatcherMatchesDouble) {
  ExecContext ctx(Device::cpu());
  const int64_t rows = 37, dim = 96;
  std::vector<double> xd = randn_f64(rows * dim), wd = randn_f64(dim, 0.3, 1.0), gd = randn_f64(rows * dim);
  std::vector<double> yd(rows * dim), rd(rows), dxd(rows * dim), dwd(dim, 0.0);
  cpu::rmsnorm_forward<double>(xd.data(), wd.data(), yd.data(), rd.data(), rows, dim, 1e-6);
  cpu::rmsnorm_backward<double>(gd.data(), xd.data(), wd.data(), rd.data(), dxd.data(), dwd.data(), rows, dim);

  std::vector<float> x(xd.begin(), xd.end()), w(wd.begin(), wd.end()), g(gd.begin(), gd.end());
  std::vector<float> y(rows * dim, std::nanf("")), r(rows, std::nanf("")), dx(rows * dim, std::nanf("")), dw(dim, 0.f);
  rmsnorm_forward(ctx, cpu_f32(x, {rows, dim}), cpu_f32(w, {dim}), cpu_f32(y, {rows, dim}), cpu_f32(r, {rows}), 1e-6f);
  rmsnorm_backward(ctx, cpu_f32(g, {rows, dim}), cpu_f32(x, {rows, dim}), cpu_f32(w, {dim}), cpu_f32(r, {rows}),
                   cpu_f32(dx, {rows, dim}), cpu_f32(dw, {dim}));
  EXPECT_LT(rel_err(to_f64(y), yd), 1e-6);
  EXPECT_LT(rel_err(to_f64(r), rd), 1e-6);
  EXPECT_LT(rel_err(to_f64(dx), dxd), 1e-5);
  EXPECT_LT(rel_err(to_f64(dw), dwd), 1e-5);
}

// backward with a residual gradient: dx = the norm's gradient + residual, also in place (residual = dx).
TEST(OpsRmsnorm, BackwardAddsTheResidual) {
  ExecContext ctx(Device::cpu());
  const int64_t rows = 9, dim = 24;
  std::vector<float> x = randn(rows * dim), w = randn(dim, 0.3f, 1.0f), g = randn(rows * dim), res = randn(rows * dim);
  std::vector<float> y(rows * dim), r(rows), dx(rows * dim), dw(dim, 0.f);
  rmsnorm_forward(ctx, cpu_f32(x, {rows, dim}), cpu_f32(w, {dim}), cpu_f32(y, {rows, dim}), cpu_f32(r, {rows}), 1e-6f);
  rmsnorm_backward(ctx, cpu_f32(g, {rows, dim}), cpu_f32(x, {rows, dim}), cpu_f32(w, {dim}), cpu_f32(r, {rows}),
                   cpu_f32(dx, {rows, dim}), cpu_f32(dw, {dim}));
  std::vector<float> dx2(rows * dim, std::nanf("")), dw2(dim, 0.f), inplace = res, dw3(dim, 0.f);
  rmsnorm_backward(ctx, cpu_f32(g, {rows, dim}), cpu_f32(x, {rows, dim}), cpu_f32(w, {dim}), cpu_f32(r, {rows}),
                   cpu_f32(dx2, {rows, dim}), cpu_f32(dw2, {dim}), cpu_f32(res, {rows, dim}));
  rmsnorm_backward(ctx, cpu_f32(g, {rows, dim}), cpu_f32(x, {rows, dim}), cpu_f32(w, {dim}), cpu_f32(r, {rows}),
                   cpu_f32(inplace, {rows, dim}), cpu_f32(dw3, {dim}), cpu_f32(inplace, {rows, dim}));
  for (int64_t i = 0; i < rows * dim; ++i) {
    EXPECT_EQ(dx2[i], dx[i] + res[i]) << i;
    EXPECT_EQ(inplace[i], dx[i] + res[i]) << i;
  }
  EXPECT_EQ(dw2, dw);
  EXPECT_EQ(dw3, dw);
  expect_error_mentioning(
      [&] {
        rmsnorm_backward(ctx, cpu_f32(g, {rows, dim}), cpu_f32(x, {rows, dim}), cpu_f32(w, {dim}), cpu_f32(r, {rows}),
                         cpu_f32(dx, {rows, dim}), cpu_f32(dw, {dim}), cpu_f32(g, {rows, dim}));
      },
      "residual");
  expect_error_mentioning(
      [&] {
        rmsnorm_backward(ctx, cpu_f32(g, {rows, dim}), cpu_f32(x, {rows, dim}), cpu_f32(w, {dim}), cpu_f32(r, {rows}),
                         cpu_f32(dx, {rows, dim}), cpu_f32(dw, {dim}), cpu_f32(res, {dim, rows}));
      },
      "'residual'");
}

TEST(OpsRmsnorm, DispatcherErrorsNameTheArgument) {
  ExecContext ctx(Device::cpu());
  std::vector<float> x(4 * 8), w(8), y(4 * 8), r(4), wrong(7);
  auto X = [&] { return cpu_f32(x, {4, 8}); };
  expect_error_mentioning(
      [&] {
        rmsnorm_forward(ctx, X(), cpu_f32(wrong, {7}), cpu_f32(y, {4, 8}), cpu_f32(r, {4}), 1e-6f);
      },
      "'w'");
  expect_error_mentioning(
      [&] {
        rmsnorm_forward(ctx, X(), cpu_f32(w, {8}), cpu_f32(y, {8, 4}), cpu_f32(r, {4}), 1e-6f);
      },
      "'y'");
  expect_error_mentioning(
      [&] {
        rmsnorm_forward(ctx, X(), cpu_f32(w, {8}), cpu_f32(y, {4, 8}), cpu_f32(wrong, {3}), 1e-6f);
      },
      "'rstd'");
  expect_error_mentioning(
      [&] {
        rmsnorm_forward(ctx, cpu_f32(x, {32}), cpu_f32(w, {8}), cpu_f32(y, {4, 8}), cpu_f32(r, {4}), 1e-6f);
      },
      "'x'");
  expect_error_mentioning(
      [&] {
        rmsnorm_backward(ctx, cpu_f32(y, {4, 8}), X(), cpu_f32(w, {8}), cpu_f32(r, {4}), cpu_f32(y, {4, 8}),
                         cpu_f32(wrong, {7}));
      },
      "'dw'");
  expect_error_mentioning(
      [&] {
        rmsnorm_backward(ctx, cpu_f32(y, {4, 8}), X(), cpu_f32(w, {8}), cpu_f32(r, {4}),
                         Tensor(y.data(), DType::bf16, Device::cpu(), {4, 8}), cpu_f32(w, {8}));
      },
      "'dx'");
}

}  // namespace
}  // namespace hyd::kernels

// CPU L2 normalisation: forward against the formula (scaled rows of unit norm, FLA's eps inside the
// square root, which matters for tiny rows), backward against finite differences in double (also
// in place), the f32 and f64 dispatchers against the double reference, dispatcher errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/l2norm.h"
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

TEST(OpsL2norm, ForwardGivesScaledUnitRows) {
  ExecContext ctx(Device::cpu());
  const int64_t rows = 12, dim = 32;
  const float scale = 1.0f / std::sqrt(32.0f);
  std::vector<float> x = randn(rows * dim, 3.0f, 0.2f), y(rows * dim, std::nanf("")), rstd(rows, std::nanf(""));
  l2norm_forward(ctx, cpu_f32(x, {rows, dim}), cpu_f32(y, {rows, dim}), cpu_f32(rstd, {rows}), scale);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0, ys = 0;
    for (int64_t j = 0; j < dim; ++j) {
      ss += double(x[r * dim + j]) * x[r * dim + j];
      ys += double(y[r * dim + j]) * y[r * dim + j];
    }
    EXPECT_NEAR(std::sqrt(ys), scale, 1e-6) << "row " << r;
    EXPECT_NEAR(rstd[r], 1.0 / std::sqrt(ss + 1e-6), 1e-6 * rstd[r]);
    for (int64_t j = 0; j < dim; ++j) EXPECT_NEAR(y[r * dim + j], scale * x[r * dim + j] * rstd[r], 1e-6);
  }
  // eps is added to the sum of squares (not to the norm): a row of size 1e-4 has norm^2 = 1e-8 * dim.
  std::vector<float> tiny(dim, 1e-4f), ty(dim), tr(1);
  l2norm_forward(ctx, cpu_f32(tiny, {1, dim}), cpu_f32(ty, {1, dim}), cpu_f32(tr, {1}), 1.0f);
  EXPECT_NEAR(tr[0], 1.0 / std::sqrt(1e-8 * dim + 1e-6), 1e-5 * tr[0]);
}

TEST(OpsL2norm, BackwardMatchesFiniteDifferences) {
  const int64_t rows = 5, dim = 7;
  for (double scale : {1.0, 0.125}) {
    SCOPED_TRACE("scale " + std::to_string(scale));
    // One row tiny, so that eps matters in the derivative too.
    std::vector<double> x = randn_f64(rows * dim), g = randn_f64(rows * dim);
    for (int64_t j = 0; j < dim; ++j) x[2 * dim + j] *= 1e-3;
    auto loss = [&] {
      std::vector<double> y(rows * dim), rstd(rows);
      cpu::l2norm_forward<double>(x.data(), y.data(), rstd.data(), rows, dim, scale, 1e-6);
      double l = 0;
      for (int64_t i = 0; i < rows * dim; ++i) l += g[i] * y[i];
      return l;
    };
    const std::vector<double> num = central_differences(x, 1e-7, loss);
    std::vector<double> y(rows * dim), rstd(rows), dx(rows * dim, std::nan(""));
    cpu::l2norm_forward<double>(x.data(), y.data(), rstd.data(), rows, dim, scale, 1e-6);
    cpu::l2norm_backward<double>(g.data(), y.data(), rstd.data(), dx.data(), rows, dim, scale);
    EXPECT_LT(rel_err(dx, num), 1e-7);
    // In place: dx written over dy.
    std::vector<double> inplace = g;
    cpu::l2norm_backward<double>(inplace.data(), y.data(), rstd.data(), inplace.data(), rows, dim, scale);
    EXPECT_EQ(rel_err(inplace, dx), 0.0);
  }
}

TEST(OpsL2norm, FloatAndDoubleDispatchersMatchDoubleReference) {
  ExecContext ctx(Device::cpu());
  const int64_t rows = 40, dim = 64;
  const float scale = 0.125f;
  std::vector<double> xd = randn_f64(rows * dim, 2.0), gd = randn_f64(rows * dim);
  std::vector<double> yd(rows * dim), rd(rows), dxd(rows * dim);
  cpu::l2norm_forward<double>(xd.data(), yd.data(), rd.data(), rows, dim, scale, 1e-6);
  cpu::l2norm_backward<double>(gd.data(), yd.data(), rd.data(), dxd.data(), rows, dim, scale);

  std::vector<float> x(xd.begin(), xd.end()), g(gd.begin(), gd.end());
  std::vector<float> y(rows * dim, std::nanf("")), r(rows, std::nanf("")), dx(rows * dim, std::nanf(""));
  l2norm_forward(ctx, cpu_f32(x, {rows, dim}), cpu_f32(y, {rows, dim}), cpu_f32(r, {rows}), scale);
  l2norm_backward(ctx, cpu_f32(g, {rows, dim}), cpu_f32(y, {rows, dim}), cpu_f32(r, {rows}), cpu_f32(dx, {rows, dim}),
                  scale);
  EXPECT_LT(rel_err(to_f64(y), yd), 1e-6);
  EXPECT_LT(rel_err(to_f64(r), rd), 1e-6);
  EXPECT_LT(rel_err(to_f64(dx), dxd), 1e-5);

  // f64 through the dispatcher, in place (y over x): bit-identical to the reference.
  std::vector<double> x64 = xd, r64(rows, std::nan("")), dx64(rows * dim, std::nan(""));
  l2norm_forward(ctx, cpu_f64(x64, {rows, dim}), cpu_f64(x64, {rows, dim}), cpu_f64(r64, {rows}), scale);
  l2norm_backward(ctx, cpu_f64(gd, {rows, dim}), cpu_f64(x64, {rows, dim}), cpu_f64(r64, {rows}),
                  cpu_f64(dx64, {rows, dim}), scale);
  EXPECT_EQ(rel_err(x64, yd), 0.0);
  EXPECT_EQ(rel_err(r64, rd), 0.0);
  EXPECT_EQ(rel_err(dx64, dxd), 0.0);
}

TEST(OpsL2norm, DispatcherErrorsNameTheArgument) {
  ExecContext ctx(Device::cpu());
  std::vector<float> x(4 * 8), y(4 * 8), r(4), wrong(3);
  std::vector<double> r64(4);
  auto X = [&] { return cpu_f32(x, {4, 8}); };
  expect_error_mentioning([&] { l2norm_forward(ctx, X(), cpu_f32(y, {8, 4}), cpu_f32(r, {4}), 1.f); }, "'y'");
  expect_error_mentioning([&] { l2norm_forward(ctx, X(), cpu_f32(y, {4, 8}), cpu_f32(wrong, {3}), 1.f); }, "'rstd'");
  expect_error_mentioning(
      [&] {
        l2norm_forward(ctx, X(), cpu_f32(y, {4, 8}), Tensor(r64.data(), DType::f64, Device::cpu(), {4}), 1.f);
      },
      "'rstd'");
  expect_error_mentioning(
      [&] {
        l2norm_forward(ctx, cpu_f32(x, {32}), cpu_f32(y, {4, 8}), cpu_f32(r, {4}), 1.f);
      },
      "'x'");
  expect_error_mentioning([&] { l2norm_backward(ctx, X(), X(), cpu_f32(r, {4}), cpu_f32(y, {2, 16}), 1.f); }, "'dx'");
  expect_error_mentioning([&] { l2norm_backward(ctx, X(), X(), cpu_f32(r, {4}), cpu_f32(y, {4, 8}), 0.f); }, "scale");
}

}  // namespace
}  // namespace hyd::kernels

// CPU gated RMSNorm: forward against the formula, backward (do, dgate and the accumulated dw) against
// finite differences in double, the f32 and f64 dispatchers against the double reference, dispatcher
// errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/gated_rmsnorm.h"
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

TEST(OpsGatedRmsnorm, ForwardMatchesFormula) {
  ExecContext ctx(Device::cpu());
  const int64_t rows = 9, dim = 24;
  const float eps = 1e-6f;
  std::vector<float> o = randn(rows * dim, 2.0f, 0.3f), gate = randn(rows * dim, 2.0f), w = randn(dim, 0.3f, 1.0f);
  std::vector<float> y(rows * dim, std::nanf("")), rstd(rows, std::nanf(""));
  gated_rmsnorm_forward(ctx, cpu_f32(o, {rows, dim}), cpu_f32(gate, {rows, dim}), cpu_f32(w, {dim}),
                        cpu_f32(y, {rows, dim}), cpu_f32(rstd, {rows}), eps);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < dim; ++j) ss += double(o[r * dim + j]) * o[r * dim + j];
    const double s = 1 / std::sqrt(ss / dim + eps);
    EXPECT_NEAR(rstd[r], s, 1e-6 * s);
    for (int64_t j = 0; j < dim; ++j) {
      const int64_t e = r * dim + j;
      const double want = o[e] * s * w[j] / (1 + std::exp(-double(gate[e])));
      EXPECT_NEAR(y[e], want, 1e-5 * (1 + std::fabs(want)));
    }
  }
}

TEST(OpsGatedRmsnorm, BackwardMatchesFiniteDifferences) {
  const int64_t rows = 5, dim = 8;
  const double eps = 1e-5;
  std::vector<double> o = randn_f64(rows * dim), gate = randn_f64(rows * dim, 2.0), w = randn_f64(dim, 0.5, 1.0);
  std::vector<double> g = randn_f64(rows * dim);
  auto loss = [&] {
    std::vector<double> y(rows * dim), rstd(rows);
    cpu::gated_rmsnorm_forward<double>(o.data(), gate.data(), w.data(), y.data(), rstd.data(), rows, dim, eps);
    double l = 0;
    for (int64_t i = 0; i < rows * dim; ++i) l += g[i] * y[i];
    return l;
  };
  const std::vector<double> do_num = central_differences(o, 1e-6, loss),
                            dgate_num = central_differences(gate, 1e-6, loss),
                            dw_num = central_differences(w, 1e-6, loss);
  std::vector<double> y(rows * dim), rstd(rows);
  cpu::gated_rmsnorm_forward<double>(o.data(), gate.data(), w.data(), y.data(), rstd.data(), rows, dim, eps);
  const std::vector<double> dw0 = randn_f64(dim);
  std::vector<double> do_(rows * dim, std::nan("")), dgate(rows * dim, std::nan("")), dw = dw0;
  cpu::gated_rmsnorm_backward<double>(g.data(), o.data(), gate.data(), w.data(), rstd.data(), do_.data(), dgate.data(),
                                      dw.data(), rows, dim);
  for (int64_t j = 0; j < dim; ++j) dw[j] -= dw0[j];
  EXPECT_LT(rel_err(do_, do_num), 1e-7);
  EXPECT_LT(rel_err(dgate, dgate_num), 1e-7);
  EXPECT_LT(rel_err(dw, dw_num), 1e-7);
}

TEST(OpsGatedRmsnorm, FloatAndDoubleDispatchersMatchDoubleReference) {
  ExecContext ctx(Device::cpu());
  const int64_t rows = 37, dim = 64;
  const float eps = 1e-6f;
  std::vector<double> od = randn_f64(rows * dim, 2.0), gd = randn_f64(rows * dim, 2.0), wd = randn_f64(dim, 0.3, 1.0);
  std::vector<double> dyd = randn_f64(rows * dim);
  std::vector<double> yd(rows * dim), rd(rows), dod(rows * dim), dgd(rows * dim), dwd(dim, 0.0);
  cpu::gated_rmsnorm_forward<double>(od.data(), gd.data(), wd.data(), yd.data(), rd.data(), rows, dim, eps);
  cpu::gated_rmsnorm_backward<double>(dyd.data(), od.data(), gd.data(), wd.data(), rd.data(), dod.data(), dgd.data(),
                                      dwd.data(), rows, dim);

  std::vector<float> o = test::to_f32(od), gate = test::to_f32(gd), w = test::to_f32(wd), dy = test::to_f32(dyd);
  std::vector<float> y(rows * dim, std::nanf("")), r(rows, std::nanf("")), do_(rows * dim, std::nanf(""));
  std::vector<float> dgate(rows * dim, std::nanf("")), dw(dim, 0.f);
  gated_rmsnorm_forward(ctx, cpu_f32(o, {rows, dim}), cpu_f32(gate, {rows, dim}), cpu_f32(w, {dim}),
                        cpu_f32(y, {rows, dim}), cpu_f32(r, {rows}), eps);
  gated_rmsnorm_backward(ctx, cpu_f32(dy, {rows, dim}), cpu_f32(o, {rows, dim}), cpu_f32(gate, {rows, dim}),
                         cpu_f32(w, {dim}), cpu_f32(r, {rows}), cpu_f32(do_, {rows, dim}), cpu_f32(dgate, {rows, dim}),
                         cpu_f32(dw, {dim}));
  EXPECT_LT(rel_err(to_f64(y), yd), 1e-6);
  EXPECT_LT(rel_err(to_f64(r), rd), 1e-6);
  EXPECT_LT(rel_err(to_f64(do_), dod), 1e-5);
  EXPECT_LT(rel_err(to_f64(dgate), dgd), 1e-5);
  EXPECT_LT(rel_err(to_f64(dw), dwd), 1e-5);

  std::vector<double> y64(rows * dim, std::nan("")), r64(rows, std::nan("")), do64(rows * dim, std::nan(""));
  std::vector<double> dg64(rows * dim, std::nan("")), dw64(dim, 0.0);
  gated_rmsnorm_forward(ctx, cpu_f64(od, {rows, dim}), cpu_f64(gd, {rows, dim}), cpu_f64(wd, {dim}),
                        cpu_f64(y64, {rows, dim}), cpu_f64(r64, {rows}), eps);
  gated_rmsnorm_backward(ctx, cpu_f64(dyd, {rows, dim}), cpu_f64(od, {rows, dim}), cpu_f64(gd, {rows, dim}),
                         cpu_f64(wd, {dim}), cpu_f64(r64, {rows}), cpu_f64(do64, {rows, dim}),
                         cpu_f64(dg64, {rows, dim}), cpu_f64(dw64, {dim}));
  EXPECT_EQ(rel_err(y64, yd), 0.0);
  EXPECT_EQ(rel_err(r64, rd), 0.0);
  EXPECT_EQ(rel_err(do64, dod), 0.0);
  EXPECT_EQ(rel_err(dg64, dgd), 0.0);
  EXPECT_EQ(rel_err(dw64, dwd), 0.0);
}

TEST(OpsGatedRmsnorm, DispatcherErrorsNameTheArgument) {
  ExecContext ctx(Device::cpu());
  std::vector<float> o(4 * 8), gate(4 * 8), w(8), y(4 * 8), r(4), wrong(7);
  auto O = [&] { return cpu_f32(o, {4, 8}); };
  expect_error_mentioning(
      [&] {
        gated_rmsnorm_forward(ctx, O(), cpu_f32(gate, {8, 4}), cpu_f32(w, {8}), O(), cpu_f32(r, {4}), 1e-6f);
      },
      "'gate'");
  expect_error_mentioning(
      [&] { gated_rmsnorm_forward(ctx, O(), O(), cpu_f32(wrong, {7}), O(), cpu_f32(r, {4}), 1e-6f); }, "'w'");
  expect_error_mentioning(
      [&] { gated_rmsnorm_forward(ctx, O(), O(), cpu_f32(w, {8}), cpu_f32(y, {32}), cpu_f32(r, {4}), 1e-6f); }, "'y'");
  expect_error_mentioning(
      [&] {
        gated_rmsnorm_forward(ctx, O(), O(), cpu_f32(w, {8}), O(), Tensor(r.data(), DType::i32, Device::cpu(), {4}),
                              1e-6f);
      },
      "'rstd'");
  expect_error_mentioning(
      [&] {
        gated_rmsnorm_backward(ctx, O(), O(), O(), cpu_f32(w, {8}), cpu_f32(r, {4}), O(), O(), cpu_f32(wrong, {7}));
      },
      "'dw'");
  expect_error_mentioning(
      [&] {
        gated_rmsnorm_backward(ctx, O(), O(), O(), cpu_f32(w, {8}), cpu_f32(r, {4}), O(), cpu_f32(y, {8, 4}),
                               cpu_f32(w, {8}));
      },
      "'dgate'");
}

}  // namespace
}  // namespace hyd::kernels

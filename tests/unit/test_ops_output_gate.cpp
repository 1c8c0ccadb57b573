// CPU sigmoid output gate (kernels/output_gate.h): forward against the formula, backward against
// finite differences (double), saturated gates without NaN, the f32 dispatcher against double,
// dispatcher errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/output_gate.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::central_differences;
using test::expect_error_naming;
using test::randn_f64;
using test::rel_err;
using test::to_f32;
using test::to_f64;

TEST(OpsOutputGate, ForwardMatchesFormula) {
  const int64_t n = 7 * 24;
  const std::vector<double> o = randn_f64(n), g = randn_f64(n, 3.0);
  std::vector<double> y(n, NAN);
  cpu::output_gate_forward<double>(o.data(), g.data(), y.data(), n);
  for (int64_t x = 0; x < n; ++x) EXPECT_NEAR(y[x], o[x] / (1.0 + std::exp(-g[x])), 1e-15) << x;
}

TEST(OpsOutputGate, BackwardMatchesFiniteDifferences) {
  const int64_t n = 5 * 12;
  std::vector<double> o = randn_f64(n), g = randn_f64(n, 2.0);
  const std::vector<double> dy = randn_f64(n);
  std::vector<double> d_o(n, NAN), dg(n, NAN);
  cpu::output_gate_backward<double>(dy.data(), o.data(), g.data(), d_o.data(), dg.data(), n);
  auto loss = [&] {  // L = <dy, y>
    std::vector<double> y(n);
    cpu::output_gate_forward<double>(o.data(), g.data(), y.data(), n);
    double s = 0;
    for (int64_t x = 0; x < n; ++x) s += dy[x] * y[x];
    return s;
  };
  EXPECT_LT(rel_err(d_o, central_differences(o, 1e-6, loss)), 1e-8);
  EXPECT_LT(rel_err(dg, central_differences(g, 1e-6, loss)), 1e-8);
}

TEST(OpsOutputGate, SaturatedGatesStayFinite) {
  // g = +-100, +-1000 (e^-g overflows float for g << 0): y is o or ~0, do is dy or ~0, dgate ~0
  // (e^-100 ~ 4e-44 survives as a float denormal); nothing is NaN or Inf.
  std::vector<float> o = {1.5f, -2.f, 3.f, 0.25f}, g = {100.f, -100.f, 1000.f, -1000.f}, dy = {1.f, 2.f, -1.f, 4.f};
  std::vector<float> y(4, NAN), d_o(4, NAN), dg(4, NAN);
  cpu::output_gate_forward<float>(o.data(), g.data(), y.data(), 4);
  cpu::output_gate_backward<float>(dy.data(), o.data(), g.data(), d_o.data(), dg.data(), 4);
  const std::vector<float> y_ref = {1.5f, 0.f, 3.f, 0.f}, do_ref = {1.f, 0.f, -1.f, 0.f};
  for (int x = 0; x < 4; ++x) {
    EXPECT_NEAR(y[x], y_ref[x], 1e-30) << x;
    EXPECT_NEAR(d_o[x], do_ref[x], 1e-30) << x;
    EXPECT_NEAR(dg[x], 0.f, 1e-30) << x;
  }
  EXPECT_TRUE(test::all_finite(y) && test::all_finite(d_o) && test::all_finite(dg));
}

TEST(OpsOutputGate, DispatcherFloatMatchesDouble) {
  ExecContext ctx(Device::cpu());
  const int64_t rows = 9, cols = 4 * 16;
  const std::vector<double> o = randn_f64(rows * cols), g = randn_f64(rows * cols, 2.0), dy = randn_f64(rows * cols);
  std::vector<double> y(o.size()), d_o(o.size()), dg(o.size());
  cpu::output_gate_forward<double>(o.data(), g.data(), y.data(), rows * cols);
  cpu::output_gate_backward<double>(dy.data(), o.data(), g.data(), d_o.data(), dg.data(), rows * cols);
  std::vector<float> of = to_f32(o), gf = to_f32(g), dyf = to_f32(dy), yf(o.size(), NAN), dof(o.size(), NAN),
                     dgf(o.size(), NAN);
  output_gate_forward(ctx, test::cpu_f32(of, {rows, cols}), test::cpu_f32(gf, {rows, cols}),
                      test::cpu_f32(yf, {rows, cols}));
  output_gate_backward(ctx, test::cpu_f32(dyf, {rows, cols}), test::cpu_f32(of, {rows, cols}),
                       test::cpu_f32(gf, {rows, cols}), test::cpu_f32(dof, {rows, cols}),
                       test::cpu_f32(dgf, {rows, cols}));
  EXPECT_LT(rel_err(to_f64(yf), y), 1e-6);
  EXPECT_LT(rel_err(to_f64(dof), d_o), 1e-6);
  EXPECT_LT(rel_err(to_f64(dgf), dg), 1e-6);
}

TEST(OpsOutputGate, DispatcherRejectsBadArguments) {
  ExecContext ctx(Device::cpu());
  const int64_t rows = 3, cols = 8;
  std::vector<float> a(rows * cols), b(rows * cols), c(rows * cols), d(rows * cols), e(rows * cols);
  auto t = [](std::vector<float>& x, std::initializer_list<int64_t> dims) { return test::cpu_f32(x, dims); };
  expect_error_naming(
      [&] {
        output_gate_forward(ctx, t(a, {rows, cols}), t(b, {rows, cols - 1}), t(c, {rows, cols}));
      },
      "output_gate_forward", "'gate'");
  expect_error_naming(
      [&] {
        output_gate_forward(ctx, t(a, {rows, cols}), t(b, {rows, cols}), t(c, {cols, rows}));
      },
      "output_gate_forward", "'y'");
  expect_error_naming(
      [&] {
        output_gate_forward(ctx, t(a, {rows, 2, 4}), t(b, {rows, cols}), t(c, {rows, cols}));
      },
      "output_gate_forward", "'o'");
  std::vector<int32_t> ints(rows * cols);
  expect_error_naming(
      [&] {
        output_gate_forward(ctx, t(a, {rows, cols}), test::cpu_i32(ints, {rows, cols}), t(c, {rows, cols}));
      },
      "output_gate_forward", "'gate'");
  expect_error_naming(
      [&] {
        output_gate_backward(ctx, t(a, {rows, cols}), t(b, {rows, cols}), t(c, {rows, cols}), t(d, {rows, cols}),
                             t(e, {rows, 4}));
      },
      "output_gate_backward", "'dgate'");
  expect_error_naming(
      [&] {
        output_gate_backward(ctx, t(a, {rows + 1, cols}), t(b, {rows, cols}), t(c, {rows, cols}), t(d, {rows, cols}),
                             t(e, {rows, cols}));
      },
      "output_gate_backward", "'dy'");
  expect_error_naming(
      [&] {
        output_gate_backward(ctx, t(a, {rows, cols}), t(b, {rows, cols}), t(c, {rows, cols}), t(d, {rows, 1}),
                             t(e, {rows, cols}));
      },
      "output_gate_backward", "'d_o'");
  // bf16 tensors said to be on cuda:0 with a CPU context: refused before anything is read.
  std::vector<bf16> h(rows * cols);
  const Tensor gpu(h.data(), DType::bf16, Device::cuda(0), {rows, cols});
  expect_error_naming([&] { output_gate_forward(ctx, gpu, gpu, gpu); }, "output_gate_forward", "cuda");
}

}  // namespace
}  // namespace hyd::kernels

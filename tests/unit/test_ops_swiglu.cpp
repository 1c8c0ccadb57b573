// CPU SwiGLU: forward against silu(a) * b, backward against finite differences in double (also with
// din aliasing in), float dispatcher vs double, dispatcher errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/swiglu.h"
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

TEST(OpsSwiglu, ForwardIsSiluGateTimesUp) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 11, f = 13;
  std::vector<float> in = randn(n * 2 * f, 2.0f), out(n * f, std::nanf(""));
  swiglu_forward(ctx, cpu_f32(in, {n, 2 * f}), cpu_f32(out, {n, f}));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < f; ++j) {
      const double a = in[i * 2 * f + j], b = in[i * 2 * f + f + j];
      EXPECT_NEAR(out[i * f + j], a / (1 + std::exp(-a)) * b, 1e-5 * (1 + std::fabs(a * b)));
    }
}

TEST(OpsSwiglu, BackwardMatchesFiniteDifferences) {
  const int64_t n = 4, f = 7;
  std::vector<double> in = randn_f64(n * 2 * f, 2.0), g = randn_f64(n * f);
  auto loss = [&] {
    std::vector<double> out(n * f);
    cpu::swiglu_forward<double>(in.data(), out.data(), n, f);
    double l = 0;
    for (int64_t k = 0; k < n * f; ++k) l += g[k] * out[k];
    return l;
  };
  const std::vector<double> numeric = central_differences(in, 1e-6, loss);
  std::vector<double> din(in.size(), std::nan(""));
  cpu::swiglu_backward<double>(g.data(), in.data(), din.data(), n, f);
  EXPECT_LT(rel_err(din, numeric), 1e-7);
  // In place (din == in) gives the same result: each element is read before it is written.
  std::vector<double> inplace = in;
  cpu::swiglu_backward<double>(g.data(), inplace.data(), inplace.data(), n, f);
  EXPECT_LT(rel_err(inplace, din), 1e-15);
}

TEST(OpsSwiglu, FloatDispatcherMatchesDouble) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 9, f = 33;
  std::vector<double> ind = randn_f64(n * 2 * f, 2.0), gd = randn_f64(n * f);
  std::vector<double> outd(n * f), dind(n * 2 * f);
  cpu::swiglu_forward<double>(ind.data(), outd.data(), n, f);
  cpu::swiglu_backward<double>(gd.data(), ind.data(), dind.data(), n, f);
  std::vector<float> in(ind.begin(), ind.end()), g(gd.begin(), gd.end());
  std::vector<float> out(n * f, std::nanf("")), din(n * 2 * f, std::nanf(""));
  swiglu_forward(ctx, cpu_f32(in, {n, 2 * f}), cpu_f32(out, {n, f}));
  swiglu_backward(ctx, cpu_f32(g, {n, f}), cpu_f32(in, {n, 2 * f}), cpu_f32(din, {n, 2 * f}));
  EXPECT_LT(rel_err(to_f64(out), outd), 1e-6);
  EXPECT_LT(rel_err(to_f64(din), dind), 1e-6);
}

TEST(OpsSwiglu, DispatcherErrorsNameTheArgument) {
  ExecContext ctx(Device::cpu());
  std::vector<float> in(3 * 8), out(3 * 4), odd(3 * 7);
  expect_error_mentioning([&] { swiglu_forward(ctx, cpu_f32(odd, {3, 7}), cpu_f32(out, {3, 4})); }, "'in'");
  expect_error_mentioning([&] { swiglu_forward(ctx, cpu_f32(in, {3, 8}), cpu_f32(in, {3, 8})); }, "'out'");
  expect_error_mentioning(
      [&] {
        swiglu_backward(ctx, cpu_f32(out, {4, 3}), cpu_f32(in, {3, 8}), cpu_f32(in, {3, 8}));
      },
      "'dout'");
  expect_error_mentioning(
      [&] {
        swiglu_backward(ctx, cpu_f32(out, {3, 4}), cpu_f32(in, {3, 8}), cpu_f32(out, {3, 4}));
      },
      "'din'");
  expect_error_mentioning(
      [&] {
        swiglu_forward(ctx, Tensor(in.data(), DType::bf16, Device::cpu(), {3, 8}), cpu_f32(out, {3, 4}));
      },
      "'in'");
}

}  // namespace
}  // namespace hyd::kernels

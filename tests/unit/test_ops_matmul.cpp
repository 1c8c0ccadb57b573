// CPU matrix products: gemm against a naive triple loop for every transpose combination, linear
// backward against finite differences (double), float vs double agreement, dispatcher errors.
#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <vector>

#include "kernels/matmul.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::central_differences;
using test::cpu_f32;
using test::expect_error_naming;
using test::randn;
using test::randn_f64;
using test::rel_err;
using test::to_f32;
using test::to_f64;

// C = alpha op(A) op(B) + beta C, written independently of the implementation under test.
std::vector<double> naive_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
                               const std::vector<double>& a, const std::vector<double>& b, double beta,
                               const std::vector<double>& c) {
  std::vector<double> out(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) s += (ta ? a[p * m + i] : a[i * k + p]) * (tb ? b[j * k + p] : b[p * n + j]);
      out[i * n + j] = alpha * s + beta * c[i * n + j];
    }
  return out;
}

TEST(OpsMatmul, GemmAllTransposesMatchNaive) {
  ExecContext ctx(Device::cpu());
  const int64_t m = 37, n = 29, k = 41;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      SCOPED_TRACE("trans_a=" + std::to_string(ta) + " trans_b=" + std::to_string(tb));
      const std::vector<double> a = randn_f64(m * k), b = randn_f64(k * n), c0 = randn_f64(m * n);
      const double alpha = 0.7, beta = 0.3;
      const std::vector<double> ref = naive_gemm(ta, tb, m, n, k, alpha, a, b, beta, c0);

      std::vector<double> cd = c0;
      cpu::gemm<double>(ta, tb, m, n, k, alpha, a.data(), b.data(), beta, cd.data());
      EXPECT_LT(rel_err(cd, ref), 1e-13);

      // float through the dispatcher (OpenBLAS).
      std::vector<float> af = to_f32(a), bf = to_f32(b), cf = to_f32(c0);
      gemm(ctx, ta, tb, float(alpha), cpu_f32(af, {ta ? k : m, ta ? m : k}), cpu_f32(bf, {tb ? n : k, tb ? k : n}),
           float(beta), cpu_f32(cf, {m, n}));
      EXPECT_LT(rel_err(to_f64(cf), ref), 1e-5);
    }
  }
}

TEST(OpsMatmul, GemmBetaZeroOverwritesPoison) {
  const int64_t m = 5, n = 6, k = 7;
  const std::vector<double> a = randn_f64(m * k), b = randn_f64(k * n);
  const std::vector<double> ref = naive_gemm(false, false, m, n, k, 1.0, a, b, 0.0, std::vector<double>(m * n, 0.0));
  std::vector<float> af = to_f32(a), bf = to_f32(b), cf(m * n, std::numeric_limits<float>::quiet_NaN());
  cpu::gemm<float>(false, false, m, n, k, 1.f, af.data(), bf.data(), 0.f, cf.data());
  EXPECT_LT(rel_err(to_f64(cf), ref), 1e-5);
  std::vector<double> cd(m * n, std::numeric_limits<double>::quiet_NaN());
  cpu::gemm<double>(false, false, m, n, k, 1.0, a.data(), b.data(), 0.0, cd.data());
  EXPECT_LT(rel_err(cd, ref), 1e-13);
  // k == 0: C = beta C (0 here, even over NaN).
  cpu::gemm<float>(false, false, m, n, 0, 1.f, af.data(), bf.data(), 0.f, cf.data());
  for (float x : cf) EXPECT_EQ(x, 0.f);
}

// y = x w^T + bias in double, through the cpu:: functions.
std::vector<double> linear_f64(const std::vector<double>& x, const std::vector<double>& w,
                               const std::vector<double>& bias, int64_t m, int64_t n, int64_t k) {
  std::vector<double> y(m * n);
  cpu::gemm<double>(false, true, m, n, k, 1.0, x.data(), w.data(), 0.0, y.data());
  cpu::bias_add<double>(y.data(), bias.data(), m, n);
  return y;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

TEST(OpsMatmul, LinearBackwardMatchesFiniteDifferences) {
  const int64_t m = 6, n = 5, k = 7;
  std::vector<double> x = randn_f64(m * k), w = randn_f64(n * k), bias = randn_f64(n), r = randn_f64(m * n);
  // L = <r, linear(x)>, so dL/dy = r.
  auto loss = [&] { return dot(r, linear_f64(x, w, bias, m, n, k)); };
  auto numeric = [&](std::vector<double>& param) { return central_differences(param, 1e-5, loss); };
  std::vector<double> dx(m * k), dw0 = randn_f64(n * k), db0 = randn_f64(n);
  std::vector<double> dw = dw0, db = db0;
  cpu::gemm<double>(false, false, m, k, n, 1.0, r.data(), w.data(), 0.0, dx.data());
  cpu::gemm<double>(true, false, n, k, m, 1.0, r.data(), x.data(), 1.0, dw.data());
  cpu::bias_grad<double>(r.data(), db.data(), m, n);
  for (size_t i = 0; i < dw.size(); ++i) dw[i] -= dw0[i];  // dw and dbias accumulate
  for (size_t i = 0; i < db.size(); ++i) db[i] -= db0[i];
  EXPECT_LT(rel_err(dx, numeric(x)), 1e-8);
  EXPECT_LT(rel_err(dw, numeric(w)), 1e-8);
  EXPECT_LT(rel_err(db, numeric(bias)), 1e-8);
}

TEST(OpsMatmul, LinearForwardResidualAddsTheResidual) {
  ExecContext ctx(Device::cpu());
  const int64_t m = 7, n = 9, k = 11;
  std::vector<float> x = randn(m * k), w = randn(n * k), r = randn(m * n);
  std::vector<double> ref = linear_f64(to_f64(x), to_f64(w), std::vector<double>(n, 0.0), m, n, k);
  for (int64_t i = 0; i < m * n; ++i) ref[i] += r[i];
  // Into a separate output (poisoned first), then in place over the residual.
  std::vector<float> y(m * n, std::numeric_limits<float>::quiet_NaN()), r_inplace = r;
  linear_forward_residual(ctx, cpu_f32(x, {m, k}), cpu_f32(w, {n, k}), cpu_f32(r, {m, n}), cpu_f32(y, {m, n}));
  EXPECT_LT(rel_err(to_f64(y), ref), 1e-5);
  linear_forward_residual(ctx, cpu_f32(x, {m, k}), cpu_f32(w, {n, k}), cpu_f32(r_inplace, {m, n}),
                          cpu_f32(r_inplace, {m, n}));
  EXPECT_LT(rel_err(to_f64(r_inplace), ref), 1e-5);
  // An empty residual: the plain linear forward.
  std::vector<float> y0(m * n, std::numeric_limits<float>::quiet_NaN());
  linear_forward_residual(ctx, cpu_f32(x, {m, k}), cpu_f32(w, {n, k}), Tensor{}, cpu_f32(y0, {m, n}));
  EXPECT_LT(rel_err(to_f64(y0), linear_f64(to_f64(x), to_f64(w), std::vector<double>(n, 0.0), m, n, k)), 1e-5);
  // f64 (the finite-difference harnesses' path).
  std::vector<double> yd(m * n, std::numeric_limits<double>::quiet_NaN()), xd = to_f64(x), wd = to_f64(w),
                                                                           rd = to_f64(r);
  linear_forward_residual(
      ctx, Tensor(xd.data(), DType::f64, Device::cpu(), {m, k}), Tensor(wd.data(), DType::f64, Device::cpu(), {n, k}),
      Tensor(rd.data(), DType::f64, Device::cpu(), {m, n}), Tensor(yd.data(), DType::f64, Device::cpu(), {m, n}));
  EXPECT_LT(rel_err(yd, ref), 1e-12);
  // A residual of the wrong shape or dtype is refused by name.
  std::vector<float> r_short(n * (m - 1));
  EXPECT_THROW(
      {
        try {
          linear_forward_residual(ctx, cpu_f32(x, {m, k}), cpu_f32(w, {n, k}), cpu_f32(r_short, {m - 1, n}),
                                  cpu_f32(y, {m, n}));
        } catch (const std::exception& e) {
          EXPECT_NE(std::string(e.what()).find("residual"), std::string::npos) << e.what();
          throw;
        }
      },
      std::exception);
}

TEST(OpsMatmul, LinearDispatcherFloatMatchesDouble) {
  ExecContext ctx(Device::cpu());
  const int64_t b = 3, t = 4, n = 9, k = 11, m = b * t;  // x as [B, T, K]: leading dims are flattened
  std::vector<float> x = randn(m * k), w = randn(n * k), bias = randn(n), dy = randn(m * n);
  std::vector<float> y(m * n, std::numeric_limits<float>::quiet_NaN());
  linear_forward(ctx, cpu_f32(x, {b, t, k}), cpu_f32(w, {n, k}), cpu_f32(bias, {n}), cpu_f32(y, {b, t, n}));
  EXPECT_LT(rel_err(to_f64(y), linear_f64(to_f64(x), to_f64(w), to_f64(bias), m, n, k)), 1e-5);

  // No bias.
  std::vector<float> y2(m * n, std::numeric_limits<float>::quiet_NaN());
  linear_forward(ctx, cpu_f32(x, {m, k}), cpu_f32(w, {n, k}), Tensor{}, cpu_f32(y2, {m, n}));
  EXPECT_LT(rel_err(to_f64(y2), linear_f64(to_f64(x), to_f64(w), std::vector<double>(n, 0.0), m, n, k)), 1e-5);

  // Backward: dx overwritten then accumulated, dw and dbias accumulated.
  std::vector<float> dx(m * k, std::numeric_limits<float>::quiet_NaN()), dw = randn(n * k), db = randn(n);
  const std::vector<float> dw0 = dw, db0 = db;
  linear_backward(ctx, cpu_f32(dy, {b, t, n}), cpu_f32(x, {b, t, k}), cpu_f32(w, {n, k}), cpu_f32(dx, {b, t, k}), false,
                  cpu_f32(dw, {n, k}), cpu_f32(db, {n}));
  std::vector<double> dx_ref(m * k), dw_ref = to_f64(dw0), db_ref = to_f64(db0);
  const std::vector<double> dyd = to_f64(dy), xd = to_f64(x), wd = to_f64(w);
  dx_ref = naive_gemm(false, false, m, k, n, 1.0, dyd, wd, 0.0, dx_ref);
  dw_ref = naive_gemm(true, false, n, k, m, 1.0, dyd, xd, 1.0, dw_ref);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) db_ref[j] += dyd[i * n + j];
  EXPECT_LT(rel_err(to_f64(dx), dx_ref), 1e-5);
  EXPECT_LT(rel_err(to_f64(dw), dw_ref), 1e-5);
  EXPECT_LT(rel_err(to_f64(db), db_ref), 1e-5);

  linear_backward(ctx, cpu_f32(dy, {m, n}), cpu_f32(x, {m, k}), cpu_f32(w, {n, k}), cpu_f32(dx, {m, k}), true, Tensor{},
                  Tensor{});
  for (auto& v : dx_ref) v *= 2;
  EXPECT_LT(rel_err(to_f64(dx), dx_ref), 1e-5);
}

TEST(OpsMatmul, DispatcherRejectsBadArguments) {
  ExecContext ctx(Device::cpu());
  std::vector<float> a(12), b(12), c(16), w(20), y(12), bias(5);
  expect_error_naming(
      [&] {
        gemm(ctx, false, false, 1.f, cpu_f32(a, {4, 3}), cpu_f32(b, {4, 3}), 0.f, cpu_f32(c, {4, 4}));
      },
      "gemm", "'b'");
  expect_error_naming(
      [&] {
        gemm(ctx, true, false, 1.f, cpu_f32(a, {4, 3}), cpu_f32(b, {4, 3}), 0.f, cpu_f32(c, {4, 4}));
      },
      "gemm", "'a'");
  expect_error_naming(
      [&] {
        gemm(ctx, false, false, 1.f, cpu_f32(a, {12}), cpu_f32(b, {3, 4}), 0.f, cpu_f32(c, {4, 4}));
      },
      "gemm", "'a'");
  // x [4, 3] against w [5, 4]: the inner dimensions disagree.
  expect_error_naming(
      [&] {
        linear_forward(ctx, cpu_f32(a, {4, 3}), cpu_f32(w, {5, 4}), Tensor{}, cpu_f32(y, {4, 3}));
      },
      "linear_forward", "'w'");
  expect_error_naming(
      [&] {
        linear_forward(ctx, cpu_f32(a, {4, 3}), cpu_f32(w, {4, 3}), cpu_f32(bias, {5}), cpu_f32(c, {4, 4}));
      },
      "linear_forward", "'bias'");
  expect_error_naming(
      [&] {
        linear_forward(ctx, cpu_f32(a, {4, 3}), cpu_f32(w, {4, 3}), Tensor{}, cpu_f32(y, {3, 4}));
      },
      "linear_forward", "'y'");
  // bf16 on the CPU is not implemented.
  Tensor xb(a.data(), DType::bf16, Device::cpu(), {4, 3});
  expect_error_naming(
      [&] {
        linear_forward(ctx, xb, cpu_f32(w, {4, 3}), Tensor{}, cpu_f32(c, {4, 4}));
      },
      "linear_forward", "'x'");
  // dw must be f32 [N, K].
  expect_error_naming(
      [&] {
        linear_backward(ctx, cpu_f32(c, {4, 4}), cpu_f32(a, {4, 3}), cpu_f32(b, {4, 3}), Tensor{}, false,
                        cpu_f32(w, {5, 4}), Tensor{});
      },
      "linear_backward", "'dw'");
  // A CUDA tensor with a CPU context (or in a CPU-only build) is an error naming the op.
  Tensor gpu_a(a.data(), DType::bf16, Device::cuda(0), {4, 3});
  Tensor gpu_b(b.data(), DType::bf16, Device::cuda(0), {3, 4});
  Tensor gpu_c(c.data(), DType::bf16, Device::cuda(0), {4, 4});
  expect_error_naming([&] { gemm(ctx, false, false, 1.f, gpu_a, gpu_b, 0.f, gpu_c); }, "gemm", "cuda");
  // Mixed devices.
  expect_error_naming(
      [&] {
        gemm(ctx, false, false, 1.f, cpu_f32(a, {4, 3}), gpu_b, 0.f, cpu_f32(c, {4, 4}));
      },
      "gemm", "device");
}

}  // namespace
}  // namespace hyd::kernels

// CPU short convolution: forward against the direct formula (a token's window stops at its document
// start), for kernel sizes 1..6 including documents shorter than the kernel and empty documents;
// backward (dx and accumulated dw) against finite differences in double; the f32 and f64 dispatchers
// against the double reference; dispatcher errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/short_conv.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::central_differences;
using test::cpu_f32;
using test::cpu_i32;
using test::expect_error_mentioning;
using test::randn;
using test::randn_f64;
using test::rel_err;
using test::to_f64;

Tensor cpu_f64(std::vector<double>& v, std::initializer_list<int64_t> dims) {
  return Tensor(v.data(), DType::f64, Device::cpu(), dims);
}

// Document lengths 3, 1, 0 (empty), 7, 2 packed: 13 tokens.
std::vector<int32_t> test_cu_seqlens() { return {0, 3, 4, 4, 11, 13}; }

// The formula, written independently of the implementation: the document start of t is found by
// scanning the boundaries, every tap outside [start, t] reads zero.
std::vector<double> direct_forward(const std::vector<double>& x, const std::vector<double>& w,
                                   const std::vector<int32_t>& cu, int64_t n, int64_t ch, int64_t k) {
  std::vector<double> y(n * ch);
  for (int64_t t = 0; t < n; ++t) {
    int64_t start = 0;
    for (size_t d = 0; d + 1 < cu.size(); ++d)
      if (cu[d] <= t && t < cu[d + 1]) start = cu[d];
    for (int64_t c = 0; c < ch; ++c) {
      double u = 0;
      for (int64_t lag = 0; lag < k; ++lag)  // tap K-1-lag reads token t-lag
        if (t - lag >= start) u += w[c * k + (k - 1 - lag)] * x[(t - lag) * ch + c];
      y[t * ch + c] = u / (1 + std::exp(-u));
    }
  }
  return y;
}

TEST(OpsShortConv, ForwardMatchesDirectFormula) {
  ExecContext ctx(Device::cpu());
  std::vector<int32_t> cu = test_cu_seqlens();
  const int64_t n = 13, ch = 6, docs = 5;
  for (int64_t k : {1, 2, 3, 4, 6}) {
    SCOPED_TRACE("kernel " + std::to_string(k));
    std::vector<float> x = randn(n * ch, 1.5f), w = randn(ch * k, 0.7f);
    std::vector<float> y(n * ch, std::nanf(""));
    short_conv_forward(ctx, cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}), cpu_i32(cu, {docs + 1}), cpu_f32(y, {n, ch}));
    EXPECT_LT(rel_err(to_f64(y), direct_forward(to_f64(x), to_f64(w), cu, n, ch, k)), 1e-6);
  }
}

TEST(OpsShortConv, DocumentsDoNotSeeEachOther) {
  // Changing the last token of one document leaves every other document's output unchanged.
  ExecContext ctx(Device::cpu());
  std::vector<int32_t> cu = test_cu_seqlens();
  const int64_t n = 13, ch = 3, k = 4;
  std::vector<float> x = randn(n * ch), w = randn(ch * k), y0(n * ch), y1(n * ch);
  short_conv_forward(ctx, cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}), cpu_i32(cu, {6}), cpu_f32(y0, {n, ch}));
  for (int64_t c = 0; c < ch; ++c) x[10 * ch + c] += 5.0f;  // token 10: last of the document [4, 11)
  short_conv_forward(ctx, cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}), cpu_i32(cu, {6}), cpu_f32(y1, {n, ch}));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < ch; ++c) {
      if (t == 10) {
        EXPECT_NE(y0[t * ch + c], y1[t * ch + c]);
      } else {
        EXPECT_EQ(y0[t * ch + c], y1[t * ch + c]) << "token " << t;
      }
    }
}

TEST(OpsShortConv, BackwardMatchesFiniteDifferences) {
  std::vector<int32_t> cu = test_cu_seqlens();
  const int64_t n = 13, ch = 4, docs = 5;
  for (int64_t k : {1, 4, 5}) {
    SCOPED_TRACE("kernel " + std::to_string(k));
    std::vector<double> x = randn_f64(n * ch, 1.5), w = randn_f64(ch * k, 0.7), g = randn_f64(n * ch);
    auto loss = [&] {
      std::vector<double> y(n * ch);
      cpu::short_conv_forward<double>(x.data(), w.data(), cu.data(), docs, y.data(), n, ch, k);
      double l = 0;
      for (int64_t i = 0; i < n * ch; ++i) l += g[i] * y[i];
      return l;
    };
    const std::vector<double> dx_num = central_differences(x, 1e-6, loss), dw_num = central_differences(w, 1e-6, loss);
    const std::vector<double> dw0 = randn_f64(ch * k);  // dw accumulates: start non-zero
    std::vector<double> dx(n * ch, std::nan("")), dw = dw0;
    cpu::short_conv_backward<double>(g.data(), x.data(), w.data(), cu.data(), docs, dx.data(), dw.data(), n, ch, k);
    for (int64_t i = 0; i < ch * k; ++i) dw[i] -= dw0[i];
    EXPECT_LT(rel_err(dx, dx_num), 1e-7);
    EXPECT_LT(rel_err(dw, dw_num), 1e-7);
  }
}

TEST(OpsShortConv, FloatAndDoubleDispatchersMatchDoubleReference) {
  ExecContext ctx(Device::cpu());
  std::vector<int32_t> cu = {0, 1, 64, 65, 130, 200};
  const int64_t n = 200, ch = 40, k = 4;
  std::vector<double> xd = randn_f64(n * ch, 2.0), wd = randn_f64(ch * k, 0.5), gd = randn_f64(n * ch);
  std::vector<double> yd(n * ch), dxd(n * ch), dwd(ch * k, 0.0);
  cpu::short_conv_forward<double>(xd.data(), wd.data(), cu.data(), 5, yd.data(), n, ch, k);
  cpu::short_conv_backward<double>(gd.data(), xd.data(), wd.data(), cu.data(), 5, dxd.data(), dwd.data(), n, ch, k);

  std::vector<float> x(xd.begin(), xd.end()), w(wd.begin(), wd.end()), g(gd.begin(), gd.end());
  std::vector<float> y(n * ch, std::nanf("")), dx(n * ch, std::nanf("")), dw(ch * k, 0.f);
  short_conv_forward(ctx, cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}), cpu_i32(cu, {6}), cpu_f32(y, {n, ch}));
  short_conv_backward(ctx, cpu_f32(g, {n, ch}), cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}), cpu_i32(cu, {6}),
                      cpu_f32(dx, {n, ch}), cpu_f32(dw, {ch, k}));
  EXPECT_LT(rel_err(to_f64(y), yd), 1e-6);
  EXPECT_LT(rel_err(to_f64(dx), dxd), 1e-6);
  EXPECT_LT(rel_err(to_f64(dw), dwd), 1e-6);

  std::vector<double> y64(n * ch, std::nan("")), dx64(n * ch, std::nan("")), dw64(ch * k, 0.0);
  short_conv_forward(ctx, cpu_f64(xd, {n, ch}), cpu_f64(wd, {ch, k}), cpu_i32(cu, {6}), cpu_f64(y64, {n, ch}));
  short_conv_backward(ctx, cpu_f64(gd, {n, ch}), cpu_f64(xd, {n, ch}), cpu_f64(wd, {ch, k}), cpu_i32(cu, {6}),
                      cpu_f64(dx64, {n, ch}), cpu_f64(dw64, {ch, k}));
  EXPECT_EQ(rel_err(y64, yd), 0.0);
  EXPECT_EQ(rel_err(dx64, dxd), 0.0);
  EXPECT_EQ(rel_err(dw64, dwd), 0.0);
}

TEST(OpsShortConv, DispatcherErrorsNameTheArgument) {
  ExecContext ctx(Device::cpu());
  std::vector<float> x(6 * 4), w(4 * 4), y(6 * 4), wrong(3 * 4);
  std::vector<int32_t> cu = {0, 2, 6}, bad_end = {0, 2, 5}, bad_order = {0, 4, 2, 6};
  std::vector<double> w64(4 * 4);
  auto X = [&] { return cpu_f32(x, {6, 4}); };
  expect_error_mentioning([&] { short_conv_forward(ctx, X(), cpu_f32(wrong, {3, 4}), cpu_i32(cu, {3}), X()); }, "'w'");
  expect_error_mentioning(
      [&] {
        short_conv_forward(ctx, X(), cpu_f32(w, {4, 4}), cpu_i32(cu, {3}), cpu_f32(y, {4, 6}));
      },
      "'y'");
  expect_error_mentioning(
      [&] {
        short_conv_forward(ctx, X(), cpu_f32(w, {4, 4}), cpu_f32(x, {24}), cpu_f32(y, {6, 4}));
      },
      "'cu_seqlens'");
  expect_error_mentioning(
      [&] {
        short_conv_forward(ctx, X(), cpu_f32(w, {4, 4}), cpu_i32(bad_end, {3}), cpu_f32(y, {6, 4}));
      },
      "'cu_seqlens'");
  expect_error_mentioning(
      [&] {
        short_conv_forward(ctx, X(), cpu_f32(w, {4, 4}), cpu_i32(bad_order, {4}), cpu_f32(y, {6, 4}));
      },
      "'cu_seqlens'");
  expect_error_mentioning(
      [&] {
        short_conv_forward(ctx, X(), cpu_f64(w64, {4, 4}), cpu_i32(cu, {3}), cpu_f32(y, {6, 4}));
      },
      "'w'");
  expect_error_mentioning(
      [&] {
        short_conv_backward(ctx, X(), X(), cpu_f32(w, {4, 4}), cpu_i32(cu, {3}), X(), cpu_f32(wrong, {4, 3}));
      },
      "'dw'");
  expect_error_mentioning(
      [&] {
        short_conv_backward(ctx, cpu_f32(y, {4, 6}), X(), cpu_f32(w, {4, 4}), cpu_i32(cu, {3}), X(),
                            cpu_f32(w, {4, 4}));
      },
      "'dy'");
}

}  // namespace
}  // namespace hyd::kernels

// CPU short convolution: forward against the direct formula (a token's window stops at its document
// start), for kernel sizes 1..6 including documents shorter than the kernel and empty documents;
// backward (dx and accumulated dw) against finite differences in double; the f32 and f64 dispatchers
// against the double reference; dispatcher errors. With a halo: forward and backward equal the op
// without a halo on the sequence whose documents start with their halo rows (dhalo = dx of those
// rows), for kernel sizes 4, 2 and 1 (a halo of no rows) and documents shorter than K-1; dhalo, dx
// and dw against finite differences; a zero halo equals no halo; halo argument errors. The fused q / k op
// (convolution + per-head l2 norm): forward equals the two ops, backward (dx, dw, dhalo) against finite
// differences in double through the tensor-level dispatcher, with and without a halo; its argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/l2norm.h"
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

// cu_seqlens of documents with the given lengths.
std::vector<int32_t> offsets(const std::vector<int32_t>& lengths) {
  std::vector<int32_t> cu = {0};
  for (int32_t l : lengths) cu.push_back(cu.back() + l);
  return cu;
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

// ------------------------------------------------------------------------------------------ halo

// The packed sequence whose document d is its K-1 halo rows followed by its tokens (an empty document
// becomes its halo rows alone): the op with a halo must equal the op without one on this sequence.
struct ExtendedSequence {
  std::vector<int32_t> cu;
  std::vector<int64_t> row_of_token;  // row of token t of the original sequence
  std::vector<int64_t> row_of_halo;   // row of halo row (d, i), index d * (K-1) + i
  int64_t n = 0;
};

ExtendedSequence extend_with_halo(const std::vector<int32_t>& cu, int64_t k) {
  ExtendedSequence e;
  e.cu = {0};
  for (size_t d = 0; d + 1 < cu.size(); ++d) {
    for (int64_t i = 0; i < k - 1; ++i) e.row_of_halo.push_back(e.n++);
    for (int32_t t = cu[d]; t < cu[d + 1]; ++t) e.row_of_token.push_back(e.n++);
    e.cu.push_back(static_cast<int32_t>(e.n));
  }
  return e;
}

// Rows `rows` of a [*, ch] matrix, in that order.
std::vector<double> gather_rows(const std::vector<double>& m, const std::vector<int64_t>& rows, int64_t ch) {
  std::vector<double> out;
  for (int64_t r : rows)
    for (int64_t c = 0; c < ch; ++c) out.push_back(m[r * ch + c]);
  return out;
}

TEST(OpsShortConv, HaloEqualsNoHaloOnDocumentsExtendedByTheirHalo) {
  ExecContext ctx(Device::cpu());
  // Lengths 3, 1, 0 (empty), 7, 2, 5: documents of 1 and 2 tokens are shorter than K-1 = 3.
  std::vector<int32_t> cu = offsets({3, 1, 0, 7, 2, 5});
  const int64_t n = cu.back(), ch = 5, docs = static_cast<int64_t>(cu.size()) - 1;
  for (int64_t k : {4, 2, 1}) {
    SCOPED_TRACE("kernel " + std::to_string(k));
    const int64_t h = k - 1;
    const ExtendedSequence e = extend_with_halo(cu, k);
    std::vector<double> x = randn_f64(n * ch, 1.5), w = randn_f64(ch * k, 0.7), halo = randn_f64(docs * h * ch, 1.5);
    std::vector<double> dy = randn_f64(n * ch), dw0 = randn_f64(ch * k);

    // Without a halo on the extended sequence; the halo rows' outputs are dropped (dy = 0 there).
    std::vector<double> xe(e.n * ch), dye(e.n * ch, 0.0), ye(e.n * ch), dxe(e.n * ch), dwe = dw0;
    std::vector<int32_t> cue = e.cu;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < ch; ++c) {
        xe[e.row_of_token[t] * ch + c] = x[t * ch + c];
        dye[e.row_of_token[t] * ch + c] = dy[t * ch + c];
      }
    for (int64_t r = 0; r < docs * h; ++r)
      for (int64_t c = 0; c < ch; ++c) xe[e.row_of_halo[r] * ch + c] = halo[r * ch + c];
    const int64_t ne = e.n;
    short_conv_forward(ctx, cpu_f64(xe, {ne, ch}), cpu_f64(w, {ch, k}), cpu_i32(cue, {docs + 1}),
                       cpu_f64(ye, {ne, ch}));
    short_conv_backward(ctx, cpu_f64(dye, {ne, ch}), cpu_f64(xe, {ne, ch}), cpu_f64(w, {ch, k}),
                        cpu_i32(cue, {docs + 1}), cpu_f64(dxe, {ne, ch}), cpu_f64(dwe, {ch, k}));

    // With the halo; outputs poisoned. (For K = 1 the halo has no rows: an empty vector, maybe no data.)
    std::vector<double> y(n * ch, std::nan("")), dx(n * ch, std::nan("")), dhalo(docs * h * ch, std::nan(""));
    std::vector<double> dw = dw0;
    short_conv_forward(ctx, cpu_f64(x, {n, ch}), cpu_f64(w, {ch, k}), cpu_i32(cu, {docs + 1}), cpu_f64(y, {n, ch}),
                       cpu_f64(halo, {docs, h, ch}));
    short_conv_backward(ctx, cpu_f64(dy, {n, ch}), cpu_f64(x, {n, ch}), cpu_f64(w, {ch, k}), cpu_i32(cu, {docs + 1}),
                        cpu_f64(dx, {n, ch}), cpu_f64(dw, {ch, k}), cpu_f64(halo, {docs, h, ch}),
                        cpu_f64(dhalo, {docs, h, ch}));
    EXPECT_LT(rel_err(y, gather_rows(ye, e.row_of_token, ch)), 1e-14);
    EXPECT_LT(rel_err(dx, gather_rows(dxe, e.row_of_token, ch)), 1e-14);
    EXPECT_LT(rel_err(dhalo, gather_rows(dxe, e.row_of_halo, ch)), 1e-14);
    EXPECT_LT(rel_err(dw, dwe), 1e-14);
    if (k == 4) {  // the empty document (index 2) gets zero dhalo rows; others do not
      for (int64_t i = 0; i < h * ch; ++i) EXPECT_EQ(dhalo[2 * h * ch + i], 0.0);
      for (int64_t i = 0; i < h * ch; ++i) EXPECT_NE(dhalo[1 * h * ch + i], 0.0);
    }

    // dhalo not requested: dx and dw unchanged.
    std::vector<double> dx2(n * ch, std::nan("")), dw2 = dw0;
    short_conv_backward(ctx, cpu_f64(dy, {n, ch}), cpu_f64(x, {n, ch}), cpu_f64(w, {ch, k}), cpu_i32(cu, {docs + 1}),
                        cpu_f64(dx2, {n, ch}), cpu_f64(dw2, {ch, k}), cpu_f64(halo, {docs, h, ch}));
    EXPECT_EQ(rel_err(dx2, dx), 0.0);
    EXPECT_EQ(rel_err(dw2, dw), 0.0);

    // The f32 dispatcher (the GPU tests' reference) agrees with f64.
    std::vector<float> xf(x.begin(), x.end()), wf(w.begin(), w.end()), hf(halo.begin(), halo.end());
    std::vector<float> dyf(dy.begin(), dy.end()), dw0f(dw0.begin(), dw0.end()), dwf = dw0f;
    std::vector<float> yf(n * ch, std::nanf("")), dxf(n * ch, std::nanf("")), dhf(docs * h * ch, std::nanf(""));
    short_conv_forward(ctx, cpu_f32(xf, {n, ch}), cpu_f32(wf, {ch, k}), cpu_i32(cu, {docs + 1}), cpu_f32(yf, {n, ch}),
                       cpu_f32(hf, {docs, h, ch}));
    short_conv_backward(ctx, cpu_f32(dyf, {n, ch}), cpu_f32(xf, {n, ch}), cpu_f32(wf, {ch, k}), cpu_i32(cu, {docs + 1}),
                        cpu_f32(dxf, {n, ch}), cpu_f32(dwf, {ch, k}), cpu_f32(hf, {docs, h, ch}),
                        cpu_f32(dhf, {docs, h, ch}));
    std::vector<double> dw_inc = dw, dwf_inc = to_f64(dwf);
    for (int64_t i = 0; i < ch * k; ++i) {
      dw_inc[i] -= dw0[i];
      dwf_inc[i] -= dw0f[i];
    }
    EXPECT_LT(rel_err(to_f64(yf), y), 1e-6);
    EXPECT_LT(rel_err(to_f64(dxf), dx), 1e-6);
    EXPECT_LT(rel_err(to_f64(dhf), dhalo), 1e-6);
    EXPECT_LT(rel_err(dwf_inc, dw_inc), 1e-5);
  }
}

TEST(OpsShortConv, ZeroHaloEqualsNoHalo) {
  ExecContext ctx(Device::cpu());
  std::vector<int32_t> cu = test_cu_seqlens();
  const int64_t n = 13, ch = 4, k = 4, docs = 5;
  std::vector<double> x = randn_f64(n * ch), w = randn_f64(ch * k), dy = randn_f64(n * ch), zero(docs * 3 * ch, 0.0);
  std::vector<double> y0(n * ch), dx0(n * ch), dw0(ch * k, 0.0), y1(n * ch), dx1(n * ch), dw1(ch * k, 0.0);
  std::vector<double> dhalo(docs * 3 * ch, std::nan(""));
  short_conv_forward(ctx, cpu_f64(x, {n, ch}), cpu_f64(w, {ch, k}), cpu_i32(cu, {docs + 1}), cpu_f64(y0, {n, ch}));
  short_conv_backward(ctx, cpu_f64(dy, {n, ch}), cpu_f64(x, {n, ch}), cpu_f64(w, {ch, k}), cpu_i32(cu, {docs + 1}),
                      cpu_f64(dx0, {n, ch}), cpu_f64(dw0, {ch, k}));
  short_conv_forward(ctx, cpu_f64(x, {n, ch}), cpu_f64(w, {ch, k}), cpu_i32(cu, {docs + 1}), cpu_f64(y1, {n, ch}),
                     cpu_f64(zero, {docs, 3, ch}));
  short_conv_backward(ctx, cpu_f64(dy, {n, ch}), cpu_f64(x, {n, ch}), cpu_f64(w, {ch, k}), cpu_i32(cu, {docs + 1}),
                      cpu_f64(dx1, {n, ch}), cpu_f64(dw1, {ch, k}), cpu_f64(zero, {docs, 3, ch}),
                      cpu_f64(dhalo, {docs, 3, ch}));
  EXPECT_EQ(rel_err(y1, y0), 0.0);
  EXPECT_EQ(rel_err(dx1, dx0), 0.0);
  EXPECT_EQ(rel_err(dw1, dw0), 0.0);
  for (double v : dhalo) EXPECT_TRUE(std::isfinite(v));
}

TEST(OpsShortConv, HaloBackwardMatchesFiniteDifferences) {
  std::vector<int32_t> cu = offsets({3, 1, 0, 7, 2});
  const int64_t n = cu.back(), ch = 3, docs = 5;
  for (int64_t k : {4, 2, 6}) {
    SCOPED_TRACE("kernel " + std::to_string(k));
    const int64_t h = k - 1;
    std::vector<double> x = randn_f64(n * ch, 1.5), w = randn_f64(ch * k, 0.7), g = randn_f64(n * ch);
    std::vector<double> halo = randn_f64(docs * h * ch, 1.5);
    auto loss = [&] {
      std::vector<double> y(n * ch);
      cpu::short_conv_forward<double>(x.data(), w.data(), cu.data(), docs, y.data(), n, ch, k, halo.data());
      double l = 0;
      for (int64_t i = 0; i < n * ch; ++i) l += g[i] * y[i];
      return l;
    };
    const std::vector<double> dhalo_num = central_differences(halo, 1e-6, loss);
    const std::vector<double> dx_num = central_differences(x, 1e-6, loss), dw_num = central_differences(w, 1e-6, loss);
    const std::vector<double> dw0 = randn_f64(ch * k);
    std::vector<double> dx(n * ch, std::nan("")), dw = dw0, dhalo(docs * h * ch, std::nan(""));
    cpu::short_conv_backward<double>(g.data(), x.data(), w.data(), cu.data(), docs, dx.data(), dw.data(), n, ch, k,
                                     halo.data(), dhalo.data());
    for (int64_t i = 0; i < ch * k; ++i) dw[i] -= dw0[i];
    EXPECT_LT(rel_err(dhalo, dhalo_num), 1e-7);
    EXPECT_LT(rel_err(dx, dx_num), 1e-7);
    EXPECT_LT(rel_err(dw, dw_num), 1e-7);
  }
}

TEST(OpsShortConv, HaloErrorsNameTheArgument) {
  ExecContext ctx(Device::cpu());
  // 6 tokens, 4 channels, 2 documents, K = 4: halo [2, 3, 4].
  std::vector<float> x(6 * 4), w(4 * 4), y(6 * 4), halo(2 * 3 * 4), dhalo(2 * 3 * 4), dw(4 * 4);
  std::vector<double> halo64(2 * 3 * 4);
  std::vector<int32_t> cu = {0, 2, 6};
  auto X = [&] { return cpu_f32(x, {6, 4}); };
  auto W = [&] { return cpu_f32(w, {4, 4}); };
  auto CU = [&] { return cpu_i32(cu, {3}); };
  expect_error_mentioning([&] { short_conv_forward(ctx, X(), W(), CU(), X(), cpu_f32(halo, {2, 4, 3})); }, "'halo'");
  expect_error_mentioning([&] { short_conv_forward(ctx, X(), W(), CU(), X(), cpu_f32(halo, {3, 2, 4})); }, "'halo'");
  expect_error_mentioning([&] { short_conv_forward(ctx, X(), W(), CU(), X(), cpu_f64(halo64, {2, 3, 4})); }, "'halo'");
  expect_error_mentioning(
      [&] {
        short_conv_forward(ctx, X(), W(), CU(), X(), Tensor(nullptr, DType::f32, Device::cpu(), {2, 3, 4}));
      },
      "'halo'");
  expect_error_mentioning(
      [&] {
        short_conv_backward(ctx, X(), X(), W(), CU(), cpu_f32(y, {6, 4}), cpu_f32(dw, {4, 4}), Tensor{},
                            cpu_f32(dhalo, {2, 3, 4}));
      },
      "'dhalo'");
  expect_error_mentioning(
      [&] {
        short_conv_backward(ctx, X(), X(), W(), CU(), cpu_f32(y, {6, 4}), cpu_f32(dw, {4, 4}), cpu_f32(halo, {2, 3, 4}),
                            cpu_f32(dhalo, {2, 4, 3}));
      },
      "'dhalo'");
  expect_error_mentioning(
      [&] {
        short_conv_backward(ctx, X(), X(), W(), CU(), cpu_f32(y, {6, 4}), cpu_f32(dw, {4, 4}), cpu_f32(halo, {2, 3, 4}),
                            cpu_f64(halo64, {2, 3, 4}));
      },
      "'dhalo'");
  expect_error_mentioning(
      [&] {
        short_conv_backward(ctx, X(), X(), W(), CU(), cpu_f32(y, {6, 4}), cpu_f32(dw, {4, 4}), cpu_f32(halo, {1, 3, 4}),
                            cpu_f32(dhalo, {2, 3, 4}));
      },
      "'halo'");
}

// ------------------------------------------------------------------------------ convolution + l2 norm

TEST(OpsShortConv, ConvL2normForwardEqualsTheTwoOps) {
  ExecContext ctx(Device::cpu());
  std::vector<int32_t> cu = offsets({3, 1, 0, 7, 2});
  const int64_t n = cu.back(), ch = 12, hd = 4, k = 4, docs = 5, rows = n * ch / hd;
  std::vector<float> x = randn(n * ch, 1.5f), w = randn(ch * k, 0.7f), halo = randn(docs * (k - 1) * ch);
  for (bool with_halo : {false, true}) {
    SCOPED_TRACE(with_halo ? "halo" : "no halo");
    const Tensor h = with_halo ? cpu_f32(halo, {docs, k - 1, ch}) : Tensor{};
    std::vector<float> y(n * ch, std::nanf("")), rstd(rows, std::nanf("")), y2(n * ch), rstd2(rows);
    short_conv_l2norm_forward(ctx, cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}), cpu_i32(cu, {docs + 1}),
                              cpu_f32(y, {n, ch}), cpu_f32(rstd, {rows}), hd, 0.5f, h);
    short_conv_forward(ctx, cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}), cpu_i32(cu, {docs + 1}), cpu_f32(y2, {n, ch}), h);
    l2norm_forward(ctx, cpu_f32(y2, {rows, hd}), cpu_f32(y2, {rows, hd}), cpu_f32(rstd2, {rows}), 0.5f);
    EXPECT_EQ(rel_err(y, y2), 0.0);
    EXPECT_EQ(rel_err(rstd, rstd2), 0.0);
  }
}

TEST(OpsShortConv, ConvL2normBackwardMatchesFiniteDifferences) {
  ExecContext ctx(Device::cpu());
  std::vector<int32_t> cu = offsets({3, 1, 0, 7, 2});
  const int64_t n = cu.back(), ch = 6, hd = 3, docs = 5, rows = n * ch / hd;
  const double scale = 0.6;
  for (int64_t k : {4, 2}) {
    for (bool with_halo : {false, true}) {
      SCOPED_TRACE("kernel " + std::to_string(k) + (with_halo ? " halo" : " no halo"));
      std::vector<double> x = randn_f64(n * ch, 1.5), w = randn_f64(ch * k, 0.7), g = randn_f64(n * ch);
      std::vector<double> halo = randn_f64(docs * (k - 1) * ch, 1.5);
      auto halo_t = [&] { return with_halo ? cpu_f64(halo, {docs, k - 1, ch}) : Tensor{}; };
      std::vector<double> y(n * ch), rstd(rows);
      auto forward = [&] {
        short_conv_l2norm_forward(ctx, cpu_f64(x, {n, ch}), cpu_f64(w, {ch, k}), cpu_i32(cu, {docs + 1}),
                                  cpu_f64(y, {n, ch}), cpu_f64(rstd, {rows}), hd, static_cast<float>(scale), halo_t());
      };
      auto loss = [&] {
        forward();
        double l = 0;
        for (int64_t i = 0; i < n * ch; ++i) l += g[i] * y[i];
        return l;
      };
      const std::vector<double> dx_num = central_differences(x, 1e-6, loss);
      const std::vector<double> dw_num = central_differences(w, 1e-6, loss);
      const std::vector<double> dhalo_num = central_differences(halo, 1e-6, loss);
      forward();
      const std::vector<double> dw0 = randn_f64(ch * k);  // dw accumulates: start non-zero
      std::vector<double> dx(n * ch, std::nan("")), dw = dw0, dhalo(docs * (k - 1) * ch, std::nan(""));
      std::vector<double> g_scratch = g;  // overwritten by the backward
      short_conv_l2norm_backward(ctx, cpu_f64(g_scratch, {n, ch}), cpu_f64(y, {n, ch}), cpu_f64(rstd, {rows}), hd,
                                 static_cast<float>(scale), cpu_f64(x, {n, ch}), cpu_f64(w, {ch, k}),
                                 cpu_i32(cu, {docs + 1}), cpu_f64(dx, {n, ch}), cpu_f64(dw, {ch, k}), halo_t(),
                                 with_halo ? cpu_f64(dhalo, {docs, k - 1, ch}) : Tensor{});
      for (int64_t i = 0; i < ch * k; ++i) dw[i] -= dw0[i];
      EXPECT_LT(rel_err(dx, dx_num), 1e-7);
      EXPECT_LT(rel_err(dw, dw_num), 1e-7);
      if (with_halo) {
        EXPECT_LT(rel_err(dhalo, dhalo_num), 1e-7);
      }
    }
  }
}

TEST(OpsShortConv, ConvL2normErrorsNameTheArgument) {
  ExecContext ctx(Device::cpu());
  std::vector<int32_t> cu = {0, 6};
  std::vector<float> x(6 * 8), w(8 * 4), y(6 * 8), rstd(12), dx(6 * 8), dw(8 * 4), bad(5);
  std::vector<double> rstd64(12);
  auto fwd = [&](const Tensor& r, int64_t hd) {
    short_conv_l2norm_forward(ctx, cpu_f32(x, {6, 8}), cpu_f32(w, {8, 4}), cpu_i32(cu, {2}), cpu_f32(y, {6, 8}), r, hd,
                              1.0f);
  };
  expect_error_mentioning([&] { fwd(cpu_f32(rstd, {12}), 3); }, "head_dim");
  expect_error_mentioning([&] { fwd(cpu_f32(bad, {5}), 4); }, "rstd");
  expect_error_mentioning([&] { fwd(cpu_f64(rstd64, {12}), 4); }, "rstd");
  expect_error_mentioning(
      [&] {
        short_conv_l2norm_backward(ctx, cpu_f32(dx, {6, 8}), cpu_f32(bad, {5}), cpu_f32(rstd, {12}), 4, 1.0f,
                                   cpu_f32(x, {6, 8}), cpu_f32(w, {8, 4}), cpu_i32(cu, {2}), cpu_f32(dx, {6, 8}),
                                   cpu_f32(dw, {8, 4}));
      },
      "'y'");
}

}  // namespace
}  // namespace hyd::kernels

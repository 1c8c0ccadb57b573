// CPU attention: forward against a masked dense formula and single-token documents, backward
// against finite differences (double) for GQA ratios 1 and 2 over several packed documents, float
// vs double agreement, dispatcher errors.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::central_differences;
using test::expect_error_naming;
using test::randn_f64;
using test::rel_err;
using test::to_f32;
using test::to_f64;

struct Problem {
  std::vector<int32_t> cu;  // [D + 1]
  int64_t n, hq, hkv, d;
  double scale;
  std::vector<double> q, k, v;
};

Problem make_problem(const std::vector<int32_t>& lengths, int64_t hq, int64_t hkv, int64_t d) {
  Problem p;
  p.cu = {0};
  for (int32_t len : lengths) p.cu.push_back(p.cu.back() + len);
  p.n = p.cu.back();
  p.hq = hq;
  p.hkv = hkv;
  p.d = d;
  p.scale = 1.0 / std::sqrt(static_cast<double>(d));
  p.q = randn_f64(p.n * hq * d);
  p.k = randn_f64(p.n * hkv * d);
  p.v = randn_f64(p.n * hkv * d);
  return p;
}

int64_t num_docs(const Problem& p) { return static_cast<int64_t>(p.cu.size()) - 1; }

void forward_f64(const Problem& p, std::vector<double>& o, std::vector<double>& lse) {
  o.assign(p.n * p.hq * p.d, std::numeric_limits<double>::quiet_NaN());
  lse.assign(p.n * p.hq, std::numeric_limits<double>::quiet_NaN());
  cpu::attention_forward<double>(p.q.data(), p.k.data(), p.v.data(), p.cu.data(), num_docs(p), o.data(), lse.data(),
                                 p.n, p.hq, p.hkv, p.d, p.scale);
}

// Dense formula: a full [N, N] score matrix per head with -inf outside (same document, j <= i).
void dense_reference(const Problem& p, std::vector<double>& o, std::vector<double>& lse) {
  std::vector<int> doc(p.n);
  for (size_t dd = 0; dd + 1 < p.cu.size(); ++dd)
    for (int32_t t = p.cu[dd]; t < p.cu[dd + 1]; ++t) doc[t] = static_cast<int>(dd);
  o.assign(p.n * p.hq * p.d, 0.0);
  lse.assign(p.n * p.hq, 0.0);
  const int64_t group = p.hq / p.hkv;
  for (int64_t h = 0; h < p.hq; ++h) {
    for (int64_t i = 0; i < p.n; ++i) {
      std::vector<double> s(p.n, -INFINITY);
      double mx = -INFINITY;
      for (int64_t j = 0; j < p.n; ++j) {
        if (doc[j] != doc[i] || j > i) continue;
        double acc = 0;
        for (int64_t c = 0; c < p.d; ++c) acc += p.q[(i * p.hq + h) * p.d + c] * p.k[(j * p.hkv + h / group) * p.d + c];
        s[j] = p.scale * acc;
        mx = std::max(mx, s[j]);
      }
      double z = 0;
      for (int64_t j = 0; j < p.n; ++j) z += std::exp(s[j] - mx);
      lse[i * p.hq + h] = mx + std::log(z);
      for (int64_t j = 0; j < p.n; ++j) {
        const double w = std::exp(s[j] - mx) / z;
        for (int64_t c = 0; c < p.d; ++c) o[(i * p.hq + h) * p.d + c] += w * p.v[(j * p.hkv + h / group) * p.d + c];
      }
    }
  }
}

TEST(OpsAttention, ForwardMatchesDenseMaskedFormula) {
  for (int64_t hkv : {4, 2, 1}) {
    SCOPED_TRACE("hkv=" + std::to_string(hkv));
    const Problem p = make_problem({5, 1, 9, 3}, 4, hkv, 8);
    std::vector<double> o, lse, o_ref, lse_ref;
    forward_f64(p, o, lse);
    dense_reference(p, o_ref, lse_ref);
    EXPECT_LT(rel_err(o, o_ref), 1e-13);
    EXPECT_LT(rel_err(lse, lse_ref), 1e-13);
  }
}

TEST(OpsAttention, SingleTokenDocumentReturnsItsValue) {
  // Each length-1 document attends only to itself: o = v (of its kv head), lse = scale <q, k>.
  const Problem p = make_problem({1, 1, 1}, 4, 2, 16);
  std::vector<double> o, lse;
  forward_f64(p, o, lse);
  for (int64_t i = 0; i < p.n; ++i) {
    for (int64_t h = 0; h < p.hq; ++h) {
      const int64_t kh = h / 2;
      double s = 0;
      for (int64_t c = 0; c < p.d; ++c) {
        EXPECT_DOUBLE_EQ(o[(i * p.hq + h) * p.d + c], p.v[(i * p.hkv + kh) * p.d + c]);
        s += p.q[(i * p.hq + h) * p.d + c] * p.k[(i * p.hkv + kh) * p.d + c];
      }
      EXPECT_NEAR(lse[i * p.hq + h], p.scale * s, 1e-12);
    }
  }
}

TEST(OpsAttention, BackwardMatchesFiniteDifferences) {
  for (int64_t hkv : {4, 2}) {  // GQA ratios 1 and 2
    SCOPED_TRACE("hkv=" + std::to_string(hkv));
    Problem p = make_problem({5, 1, 7, 3}, 4, hkv, 8);
    const std::vector<double> dout = randn_f64(p.n * p.hq * p.d);
    std::vector<double> o, lse;
    forward_f64(p, o, lse);
    std::vector<double> dq(p.q.size(), NAN), dk(p.k.size(), NAN), dv(p.v.size(), NAN);
    cpu::attention_backward<double>(dout.data(), p.q.data(), p.k.data(), p.v.data(), o.data(), lse.data(), p.cu.data(),
                                    num_docs(p), dq.data(), dk.data(), dv.data(), p.n, p.hq, p.hkv, p.d, p.scale);
    // L = <dout, o>.
    auto loss = [&] {
      std::vector<double> oo, ll;
      forward_f64(p, oo, ll);
      double s = 0;
      for (size_t i = 0; i < oo.size(); ++i) s += dout[i] * oo[i];
      return s;
    };
    auto numeric = [&](std::vector<double>& param) { return central_differences(param, 1e-5, loss); };
    EXPECT_LT(rel_err(dq, numeric(p.q)), 1e-7);
    EXPECT_LT(rel_err(dk, numeric(p.k)), 1e-7);
    EXPECT_LT(rel_err(dv, numeric(p.v)), 1e-7);
  }
}

TEST(OpsAttention, DispatcherFloatMatchesDouble) {
  ExecContext ctx(Device::cpu());
  Problem p = make_problem({17, 1, 30, 8}, 8, 2, 16);
  const std::vector<double> dout = randn_f64(p.n * p.hq * p.d);
  std::vector<double> o, lse;
  forward_f64(p, o, lse);
  std::vector<double> dq(p.q.size()), dk(p.k.size()), dv(p.v.size());
  cpu::attention_backward<double>(dout.data(), p.q.data(), p.k.data(), p.v.data(), o.data(), lse.data(), p.cu.data(),
                                  num_docs(p), dq.data(), dk.data(), dv.data(), p.n, p.hq, p.hkv, p.d, p.scale);

  std::vector<float> qf = to_f32(p.q), kf = to_f32(p.k), vf = to_f32(p.v), df = to_f32(dout);
  std::vector<float> of(o.size(), NAN), lf(lse.size(), NAN), dqf(dq.size(), NAN), dkf(dk.size(), NAN),
      dvf(dv.size(), NAN);
  std::vector<int32_t> cu = p.cu;
  const Device cpu = Device::cpu();
  const Tensor tq(qf.data(), DType::f32, cpu, {p.n, p.hq, p.d}), tk(kf.data(), DType::f32, cpu, {p.n, p.hkv, p.d}),
      tv(vf.data(), DType::f32, cpu, {p.n, p.hkv, p.d}), to(of.data(), DType::f32, cpu, {p.n, p.hq, p.d}),
      tl(lf.data(), DType::f32, cpu, {p.n, p.hq}), tcu(cu.data(), DType::i32, cpu, {int64_t(cu.size())}),
      tdo(df.data(), DType::f32, cpu, {p.n, p.hq, p.d}), tdq(dqf.data(), DType::f32, cpu, {p.n, p.hq, p.d}),
      tdk(dkf.data(), DType::f32, cpu, {p.n, p.hkv, p.d}), tdv(dvf.data(), DType::f32, cpu, {p.n, p.hkv, p.d});
  attention_forward(ctx, tq, tk, tv, tcu, p.n, to, tl, float(p.scale));
  attention_backward(ctx, tdo, tq, tk, tv, to, tl, tcu, p.n, tdq, tdk, tdv, float(p.scale));
  EXPECT_LT(rel_err(to_f64(of), o), 1e-6);
  EXPECT_LT(rel_err(to_f64(lf), lse), 1e-6);
  EXPECT_LT(rel_err(to_f64(dqf), dq), 1e-5);
  EXPECT_LT(rel_err(to_f64(dkf), dk), 1e-5);
  EXPECT_LT(rel_err(to_f64(dvf), dv), 1e-5);
}

TEST(OpsAttention, DispatcherRejectsBadArguments) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 6, d = 4;
  std::vector<float> q(n * 4 * d), k(n * 4 * d), v(n * 4 * d), o(n * 4 * d), lse(n * 4);
  std::vector<int32_t> cu = {0, 2, 6}, cu_bad = {0, 2, 5}, cu_dec = {0, 4, 2, 6};
  const Device cpu = Device::cpu();
  auto t = [&](std::vector<float>& x, std::initializer_list<int64_t> dims) {
    return Tensor(x.data(), DType::f32, cpu, dims);
  };
  const Tensor tcu(cu.data(), DType::i32, cpu, {3});
  // 4 query heads over 3 kv heads.
  expect_error_naming(
      [&] {
        attention_forward(ctx, t(q, {n, 4, d}), t(k, {n, 3, d}), t(v, {n, 3, d}), tcu, n, t(o, {n, 4, d}),
                          t(lse, {n, 4}), 1.f);
      },
      "attention_forward", "'k'");
  expect_error_naming(
      [&] {
        attention_forward(ctx, t(q, {n, 4, d}), t(k, {n, 2, d}), t(v, {n, 4, d}), tcu, n, t(o, {n, 4, d}),
                          t(lse, {n, 4}), 1.f);
      },
      "attention_forward", "'v'");
  expect_error_naming(
      [&] {
        attention_forward(ctx, t(q, {n, 4, d}), t(k, {n, 2, d}), t(v, {n, 2, d}), tcu, n, t(o, {n, 2, d}),
                          t(lse, {n, 4}), 1.f);
      },
      "attention_forward", "'o'");
  expect_error_naming(
      [&] {
        attention_forward(ctx, t(q, {n, 4, d}), t(k, {n, 2, d}), t(v, {n, 2, d}), tcu, n, t(o, {n, 4, d}),
                          t(lse, {n, 2}), 1.f);
      },
      "attention_forward", "'lse'");
  const Tensor cu_f32(lse.data(), DType::f32, cpu, {3});
  expect_error_naming(
      [&] {
        attention_forward(ctx, t(q, {n, 4, d}), t(k, {n, 2, d}), t(v, {n, 2, d}), cu_f32, n, t(o, {n, 4, d}),
                          t(lse, {n, 4}), 1.f);
      },
      "attention_forward", "'cu_seqlens'");
  const Tensor tcu_bad(cu_bad.data(), DType::i32, cpu, {3}), tcu_dec(cu_dec.data(), DType::i32, cpu, {4});
  expect_error_naming(
      [&] {
        attention_forward(ctx, t(q, {n, 4, d}), t(k, {n, 2, d}), t(v, {n, 2, d}), tcu_bad, n, t(o, {n, 4, d}),
                          t(lse, {n, 4}), 1.f);
      },
      "attention_forward", "'cu_seqlens'");
  expect_error_naming(
      [&] {
        attention_forward(ctx, t(q, {n, 4, d}), t(k, {n, 2, d}), t(v, {n, 2, d}), tcu_dec, n, t(o, {n, 4, d}),
                          t(lse, {n, 4}), 1.f);
      },
      "attention_forward", "'cu_seqlens'");
  std::vector<float> dq(q.size()), dk(n * 2 * d), dv(n * 2 * d), dout(q.size());
  expect_error_naming(
      [&] {
        attention_backward(ctx, t(dout, {n, 4, d}), t(q, {n, 4, d}), t(k, {n, 2, d}), t(v, {n, 2, d}), t(o, {n, 4, d}),
                           t(lse, {n, 4}), tcu, n, t(dq, {n, 4, d}), t(dk, {n, 4, d}), t(dv, {n, 2, d}), 1.f);
      },
      "attention_backward", "'dk'");
  // The max-length bound: negative, or shorter than a document (the second holds 4 tokens).
  for (const int64_t max_len : {int64_t(-1), int64_t(3)})
    expect_error_naming(
        [&] {
          attention_forward(ctx, t(q, {n, 4, d}), t(k, {n, 2, d}), t(v, {n, 2, d}), tcu, max_len, t(o, {n, 4, d}),
                            t(lse, {n, 4}), 1.f);
        },
        "attention_forward", "'max_len'");
  attention_forward(ctx, t(q, {n, 4, d}), t(k, {n, 2, d}), t(v, {n, 2, d}), tcu, 4, t(o, {n, 4, d}), t(lse, {n, 4}),
                    1.f);  // the exact bound is valid
}

}  // namespace
}  // namespace hyd::kernels

// CPU attention with separate query and key boundaries (query offset, kernels/attention.h):
//   * forward against a dense masked formula (j <= i + len_k - len_q per document) for documents with
//     len_q < len_k, len_q == len_k, len_q > len_k (fully masked rows), length-1 documents, a document
//     without queries and one without keys; fully masked rows are exactly o = 0, lse = -inf;
//   * backward against finite differences (double) for dq, dk, dv, GQA ratios 1, 2 and 4; fully masked
//     rows and keys no query sees get exactly zero gradients;
//   * LASP-2H slicing: running each query slice of a packed sequence against the keys of
//     [sequence start, slice end) gives the rows of the full attention (o, lse, dq), and the slices'
//     dk/dv add up to the full backward's;
//   * the f32 dispatcher (two-boundary overload) against double, no NaN; dispatcher errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
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

// Per document: (len_q, len_k).
using Lengths = std::vector<std::pair<int32_t, int32_t>>;

struct Problem {
  std::vector<int32_t> cu_q, cu_k;  // [D + 1]
  int64_t n_q, n_k, hq, hkv, d;
  double scale;
  std::vector<double> q, k, v;
  int64_t num_docs() const { return static_cast<int64_t>(cu_q.size()) - 1; }
};

Problem make_problem(const Lengths& lengths, int64_t hq, int64_t hkv, int64_t d) {
  Problem p;
  p.cu_q = {0};
  p.cu_k = {0};
  for (auto [lq, lk] : lengths) {
    p.cu_q.push_back(p.cu_q.back() + lq);
    p.cu_k.push_back(p.cu_k.back() + lk);
  }
  p.n_q = p.cu_q.back();
  p.n_k = p.cu_k.back();
  p.hq = hq;
  p.hkv = hkv;
  p.d = d;
  p.scale = 1.0 / std::sqrt(static_cast<double>(d));
  p.q = randn_f64(p.n_q * hq * d);
  p.k = randn_f64(p.n_k * hkv * d);
  p.v = randn_f64(p.n_k * hkv * d);
  return p;
}

void forward_f64(const Problem& p, std::vector<double>& o, std::vector<double>& lse) {
  o.assign(p.n_q * p.hq * p.d, std::numeric_limits<double>::quiet_NaN());
  lse.assign(p.n_q * p.hq, std::numeric_limits<double>::quiet_NaN());
  cpu::attention_forward<double>(p.q.data(), p.k.data(), p.v.data(), p.cu_q.data(), p.cu_k.data(), p.num_docs(),
                                 o.data(), lse.data(), p.n_q, p.n_k, p.hq, p.hkv, p.d, p.scale);
}

void backward_f64(const Problem& p, const std::vector<double>& dout, const std::vector<double>& o,
                  const std::vector<double>& lse, std::vector<double>& dq, std::vector<double>& dk,
                  std::vector<double>& dv) {
  dq.assign(p.q.size(), std::numeric_limits<double>::quiet_NaN());
  dk.assign(p.k.size(), std::numeric_limits<double>::quiet_NaN());
  dv.assign(p.v.size(), std::numeric_limits<double>::quiet_NaN());
  cpu::attention_backward<double>(dout.data(), p.q.data(), p.k.data(), p.v.data(), o.data(), lse.data(), p.cu_q.data(),
                                  p.cu_k.data(), p.num_docs(), dq.data(), dk.data(), dv.data(), p.n_q, p.n_k, p.hq,
                                  p.hkv, p.d, p.scale);
}

// mask[i][j]: query row i may attend key row j (same document, j_local <= i_local + len_k - len_q).
std::vector<std::vector<bool>> dense_mask(const Problem& p) {
  std::vector<std::vector<bool>> m(p.n_q, std::vector<bool>(p.n_k, false));
  for (int64_t doc = 0; doc < p.num_docs(); ++doc) {
    const int64_t len_q = p.cu_q[doc + 1] - p.cu_q[doc], len_k = p.cu_k[doc + 1] - p.cu_k[doc];
    for (int64_t i = 0; i < len_q; ++i)
      for (int64_t j = 0; j < len_k; ++j)
        if (j <= i + len_k - len_q) m[p.cu_q[doc] + i][p.cu_k[doc] + j] = true;
  }
  return m;
}

// Dense formula: a full [N_q, N_k] score matrix per head with -inf outside the mask.
void dense_reference(const Problem& p, std::vector<double>& o, std::vector<double>& lse) {
  const auto mask = dense_mask(p);
  o.assign(p.n_q * p.hq * p.d, 0.0);
  lse.assign(p.n_q * p.hq, -INFINITY);
  const int64_t group = p.hq / p.hkv;
  for (int64_t h = 0; h < p.hq; ++h) {
    for (int64_t i = 0; i < p.n_q; ++i) {
      std::vector<double> s(p.n_k, -INFINITY);
      double mx = -INFINITY;
      for (int64_t j = 0; j < p.n_k; ++j) {
        if (!mask[i][j]) continue;
        double acc = 0;
        for (int64_t c = 0; c < p.d; ++c) acc += p.q[(i * p.hq + h) * p.d + c] * p.k[(j * p.hkv + h / group) * p.d + c];
        s[j] = p.scale * acc;
        mx = std::max(mx, s[j]);
      }
      if (mx == -INFINITY) continue;  // no visible key: o = 0, lse = -inf
      double z = 0;
      for (int64_t j = 0; j < p.n_k; ++j) z += std::exp(s[j] - mx);
      lse[i * p.hq + h] = mx + std::log(z);
      for (int64_t j = 0; j < p.n_k; ++j) {
        const double w = std::exp(s[j] - mx) / z;
        for (int64_t c = 0; c < p.d; ++c) o[(i * p.hq + h) * p.d + c] += w * p.v[(j * p.hkv + h / group) * p.d + c];
      }
    }
  }
}

// Query rows that see no key, and key rows that no query sees.
std::vector<int64_t> masked_query_rows(const Problem& p) {
  const auto mask = dense_mask(p);
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < p.n_q; ++i)
    if (std::none_of(mask[i].begin(), mask[i].end(), [](bool b) { return b; })) rows.push_back(i);
  return rows;
}
std::vector<int64_t> unseen_key_rows(const Problem& p) {
  const auto mask = dense_mask(p);
  std::vector<int64_t> rows;
  for (int64_t j = 0; j < p.n_k; ++j) {
    bool seen = false;
    for (int64_t i = 0; i < p.n_q; ++i) seen = seen || mask[i][j];
    if (!seen) rows.push_back(j);
  }
  return rows;
}

// lse compared where finite; where the reference is -inf the value must be -inf too.
template <class T>
double lse_rel_err(const std::vector<T>& out, const std::vector<double>& ref) {
  std::vector<double> a, b;
  for (size_t x = 0; x < ref.size(); ++x) {
    if (std::isinf(ref[x]) && ref[x] < 0) {
      if (!(std::isinf(out[x]) && out[x] < 0)) return std::numeric_limits<double>::infinity();
      continue;
    }
    a.push_back(static_cast<double>(out[x]));
    b.push_back(ref[x]);
  }
  return rel_err(a, b);
}

// Every case: len_q < len_k, len_q == len_k, len_q > len_k (3 and 5 fully masked rows), length-1
// documents (alone and as a single query over several keys), no queries, no keys.
const Lengths kMixedDocuments = {{3, 7}, {4, 4}, {6, 3}, {1, 1}, {1, 5}, {0, 3}, {5, 0}, {2, 6}};

TEST(OpsAttentionOffset, ForwardMatchesDenseMaskedFormula) {
  for (int64_t hkv : {4, 2, 1}) {
    SCOPED_TRACE("hkv=" + std::to_string(hkv));
    const Problem p = make_problem(kMixedDocuments, 4, hkv, 8);
    std::vector<double> o, lse, o_ref, lse_ref;
    forward_f64(p, o, lse);
    dense_reference(p, o_ref, lse_ref);
    EXPECT_LT(rel_err(o, o_ref), 1e-13);
    EXPECT_LT(lse_rel_err(lse, lse_ref), 1e-13);
    const std::vector<int64_t> masked = masked_query_rows(p);
    ASSERT_EQ(masked.size(), 3u + 5u);  // rows 0..2 of the (6, 3) document, all of the (5, 0) one
    for (int64_t i : masked) {
      for (int64_t h = 0; h < p.hq; ++h) {
        EXPECT_TRUE(std::isinf(lse[i * p.hq + h]) && lse[i * p.hq + h] < 0) << "row " << i;
        for (int64_t c = 0; c < p.d; ++c) EXPECT_EQ(o[(i * p.hq + h) * p.d + c], 0.0) << "row " << i;
      }
    }
  }
}

TEST(OpsAttentionOffset, EqualBoundariesMatchSingleBoundaryOverload) {
  // cu_q == cu_k (distinct arrays) is exactly the ordinary causal document mask.
  Problem p = make_problem({{5, 5}, {1, 1}, {9, 9}}, 4, 2, 8);
  std::vector<double> o, lse;
  forward_f64(p, o, lse);
  std::vector<double> o1(o.size(), NAN), lse1(lse.size(), NAN);
  cpu::attention_forward<double>(p.q.data(), p.k.data(), p.v.data(), p.cu_q.data(), p.num_docs(), o1.data(),
                                 lse1.data(), p.n_q, p.hq, p.hkv, p.d, p.scale);
  EXPECT_EQ(o, o1);
  EXPECT_EQ(lse, lse1);
}

TEST(OpsAttentionOffset, BackwardMatchesFiniteDifferences) {
  for (int64_t hkv : {4, 2, 1}) {  // GQA ratios 1, 2, 4
    SCOPED_TRACE("hkv=" + std::to_string(hkv));
    Problem p = make_problem(kMixedDocuments, 4, hkv, 4);
    const std::vector<double> dout = randn_f64(p.n_q * p.hq * p.d);
    std::vector<double> o, lse, dq, dk, dv;
    forward_f64(p, o, lse);
    backward_f64(p, dout, o, lse, dq, dk, dv);
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
    // Exact zeros where nothing flows: fully masked query rows, keys no query sees.
    for (int64_t i : masked_query_rows(p))
      for (int64_t x = 0; x < p.hq * p.d; ++x) EXPECT_EQ(dq[i * p.hq * p.d + x], 0.0) << "query row " << i;
    const std::vector<int64_t> unseen = unseen_key_rows(p);
    EXPECT_EQ(unseen.size(), 3u);  // the (0, 3) document
    for (int64_t j : unseen) {
      for (int64_t x = 0; x < p.hkv * p.d; ++x) {
        EXPECT_EQ(dk[j * p.hkv * p.d + x], 0.0) << "key row " << j;
        EXPECT_EQ(dv[j * p.hkv * p.d + x], 0.0) << "key row " << j;
      }
    }
  }
}

// ---------------------------------------------------------------- LASP-2H slices

// The query slice [a, b) of a packed sequence with document boundaries `cu` attends the keys
// [0, b): per document, q = document ∩ [a, b), k = document ∩ [0, b).
void slice_boundaries(const std::vector<int32_t>& cu, int32_t a, int32_t b, std::vector<int32_t>& cu_q,
                      std::vector<int32_t>& cu_k) {
  cu_q.clear();
  cu_k.clear();
  for (int32_t x : cu) {
    cu_q.push_back(std::clamp(x, a, b) - a);
    cu_k.push_back(std::min(x, b));
  }
}

TEST(OpsAttentionOffset, QuerySlicesReproduceFullAttention) {
  // Documents 5, 1, 12, 1, 9 (28 tokens) cut by slices [0, 7), [7, 8), [8, 19), [19, 28): slices
  // start and end inside documents, one is a single token.
  const std::vector<int32_t> lengths = {5, 1, 12, 1, 9};
  const std::vector<int32_t> cuts = {0, 7, 8, 19, 28};
  for (int64_t hkv : {4, 1}) {
    SCOPED_TRACE("hkv=" + std::to_string(hkv));
    Lengths same;
    for (int32_t l : lengths) same.push_back({l, l});
    const Problem full = make_problem(same, 4, hkv, 8);
    const int64_t n = full.n_q, rq = full.hq * full.d, rk = full.hkv * full.d;
    const std::vector<double> dout = randn_f64(n * rq);
    std::vector<double> o, lse, dq, dk, dv;
    forward_f64(full, o, lse);
    backward_f64(full, dout, o, lse, dq, dk, dv);

    std::vector<double> dk_sum(dk.size(), 0.0), dv_sum(dv.size(), 0.0);
    for (size_t s = 0; s + 1 < cuts.size(); ++s) {
      const int32_t a = cuts[s], b = cuts[s + 1];
      SCOPED_TRACE("slice [" + std::to_string(a) + ", " + std::to_string(b) + ")");
      Problem p = full;
      slice_boundaries(full.cu_q, a, b, p.cu_q, p.cu_k);
      p.n_q = b - a;
      p.n_k = b;
      p.q.assign(full.q.begin() + a * rq, full.q.begin() + b * rq);
      p.k.assign(full.k.begin(), full.k.begin() + b * rk);
      p.v.assign(full.v.begin(), full.v.begin() + b * rk);
      const std::vector<double> dout_s(dout.begin() + a * rq, dout.begin() + b * rq);
      std::vector<double> os, lses, dqs, dks, dvs;
      forward_f64(p, os, lses);
      backward_f64(p, dout_s, os, lses, dqs, dks, dvs);
      EXPECT_LT(rel_err(os, std::vector<double>(o.begin() + a * rq, o.begin() + b * rq)), 1e-14);
      EXPECT_LT(rel_err(lses, std::vector<double>(lse.begin() + a * full.hq, lse.begin() + b * full.hq)), 1e-14);
      EXPECT_LT(rel_err(dqs, std::vector<double>(dq.begin() + a * rq, dq.begin() + b * rq)), 1e-13);
      for (size_t x = 0; x < dks.size(); ++x) {
        dk_sum[x] += dks[x];
        dv_sum[x] += dvs[x];
      }
    }
    EXPECT_LT(rel_err(dk_sum, dk), 1e-13);
    EXPECT_LT(rel_err(dv_sum, dv), 1e-13);
  }
}

// ---------------------------------------------------------------- dispatcher

TEST(OpsAttentionOffset, DispatcherFloatMatchesDouble) {
  ExecContext ctx(Device::cpu());
  const Lengths lengths = {{17, 40}, {1, 1}, {30, 30}, {8, 3}, {1, 12}, {0, 4}};
  Problem p = make_problem(lengths, 8, 2, 16);
  const std::vector<double> dout = randn_f64(p.n_q * p.hq * p.d);
  std::vector<double> o, lse, dq, dk, dv;
  forward_f64(p, o, lse);
  backward_f64(p, dout, o, lse, dq, dk, dv);

  std::vector<float> qf = to_f32(p.q), kf = to_f32(p.k), vf = to_f32(p.v), df = to_f32(dout);
  std::vector<float> of(o.size(), NAN), lf(lse.size(), NAN), dqf(dq.size(), NAN), dkf(dk.size(), NAN),
      dvf(dv.size(), NAN);
  std::vector<int32_t> cu_q = p.cu_q, cu_k = p.cu_k;
  const int64_t nd = p.num_docs() + 1;
  const Tensor tq = test::cpu_f32(qf, {p.n_q, p.hq, p.d}), tk = test::cpu_f32(kf, {p.n_k, p.hkv, p.d}),
               tv = test::cpu_f32(vf, {p.n_k, p.hkv, p.d}), to = test::cpu_f32(of, {p.n_q, p.hq, p.d}),
               tl = test::cpu_f32(lf, {p.n_q, p.hq}), tcq = test::cpu_i32(cu_q, {nd}), tck = test::cpu_i32(cu_k, {nd}),
               tdo = test::cpu_f32(df, {p.n_q, p.hq, p.d}), tdq = test::cpu_f32(dqf, {p.n_q, p.hq, p.d}),
               tdk = test::cpu_f32(dkf, {p.n_k, p.hkv, p.d}), tdv = test::cpu_f32(dvf, {p.n_k, p.hkv, p.d});
  // The exact bounds (30 queries, 40 keys): the CPU path checks them against the boundaries.
  attention_forward(ctx, tq, tk, tv, tcq, tck, 30, 40, to, tl, float(p.scale));
  attention_backward(ctx, tdo, tq, tk, tv, to, tl, tcq, tck, 30, 40, tdq, tdk, tdv, float(p.scale));
  EXPECT_LT(rel_err(to_f64(of), o), 1e-6);
  EXPECT_LT(lse_rel_err(lf, lse), 1e-6);
  EXPECT_LT(rel_err(to_f64(dqf), dq), 1e-5);
  EXPECT_LT(rel_err(to_f64(dkf), dk), 1e-5);
  EXPECT_LT(rel_err(to_f64(dvf), dv), 1e-5);
  EXPECT_EQ(masked_query_rows(p).size(), 5u);  // rows 0..4 of the (8, 3) document
  for (int64_t i : masked_query_rows(p))
    for (int64_t h = 0; h < p.hq; ++h) EXPECT_TRUE(std::isinf(lf[i * p.hq + h]) && lf[i * p.hq + h] < 0);
}

TEST(OpsAttentionOffset, DispatcherRejectsBadArguments) {
  ExecContext ctx(Device::cpu());
  const int64_t nq = 4, nk = 6, d = 4;
  std::vector<float> q(nq * 4 * d), k(nk * 2 * d), v(nk * 2 * d), o(nq * 4 * d), lse(nq * 4), dout(q.size()),
      dq(q.size()), dk(k.size()), dv(v.size());
  std::vector<int32_t> cu_q = {0, 1, 4}, cu_k = {0, 2, 6}, cu_k_short = {0, 6}, cu_k_end = {0, 2, 5},
                       cu_q_end = {0, 1, 5}, cu_k_dec = {0, 3, 2};
  auto t = [](std::vector<float>& x, std::initializer_list<int64_t> dims) { return test::cpu_f32(x, dims); };
  auto c = [](std::vector<int32_t>& x) { return test::cpu_i32(x, {int64_t(x.size())}); };
  const Tensor tq = t(q, {nq, 4, d}), tk = t(k, {nk, 2, d}), tv = t(v, {nk, 2, d}), to = t(o, {nq, 4, d}),
               tl = t(lse, {nq, 4});
  auto fwd = [&](const Tensor& cq, const Tensor& ck, int64_t max_q = 3, int64_t max_k = 4) {
    attention_forward(ctx, tq, tk, tv, cq, ck, max_q, max_k, to, tl, 1.f);
  };
  // The valid call works (documents of 1 and 3 queries, 2 and 4 keys).
  fwd(c(cu_q), c(cu_k));
  // Length bounds: negative, or below a document's length.
  expect_error_naming([&] { fwd(c(cu_q), c(cu_k), -1, 4); }, "attention_forward", "'max_len_q'");
  expect_error_naming([&] { fwd(c(cu_q), c(cu_k), 2, 4); }, "attention_forward", "'max_len_q'");
  expect_error_naming([&] { fwd(c(cu_q), c(cu_k), 3, 3); }, "attention_forward", "'max_len_k'");
  expect_error_naming([&] { fwd(c(cu_q), c(cu_k_short)); }, "attention_forward", "'cu_seqlens_k'");
  expect_error_naming([&] { fwd(c(cu_q), c(cu_k_end)); }, "attention_forward", "'cu_seqlens_k'");
  expect_error_naming([&] { fwd(c(cu_q), c(cu_k_dec)); }, "attention_forward", "'cu_seqlens_k'");
  expect_error_naming([&] { fwd(c(cu_q_end), c(cu_k)); }, "attention_forward", "'cu_seqlens_q'");
  // k and v with different row counts; lse with N_k rows; o with N_k rows.
  expect_error_naming(
      [&] {
        attention_forward(ctx, tq, tk, t(v, {nk - 1, 2, d}), c(cu_q), c(cu_k), nq, nk, to, tl, 1.f);
      },
      "attention_forward", "'v'");
  std::vector<float> big(nk * 4 * d);
  expect_error_naming(
      [&] {
        attention_forward(ctx, tq, tk, tv, c(cu_q), c(cu_k), nq, nk, to, t(big, {nk, 4}), 1.f);
      },
      "attention_forward", "'lse'");
  expect_error_naming(
      [&] {
        attention_forward(ctx, tq, tk, tv, c(cu_q), c(cu_k), nq, nk, t(big, {nk, 4, d}), tl, 1.f);
      },
      "attention_forward", "'o'");
  // One boundary array: q and k must have the same rows.
  expect_error_naming([&] { attention_forward(ctx, tq, tk, tv, c(cu_q), nq, to, tl, 1.f); }, "attention_forward",
                      "'k'");
  // Backward: dk/dv have N_k rows, dq N_q rows.
  auto bwd = [&](const Tensor& tdq, const Tensor& tdk, const Tensor& tdv) {
    attention_backward(ctx, t(dout, {nq, 4, d}), tq, tk, tv, to, tl, c(cu_q), c(cu_k), nq, nk, tdq, tdk, tdv, 1.f);
  };
  bwd(t(dq, {nq, 4, d}), t(dk, {nk, 2, d}), t(dv, {nk, 2, d}));
  expect_error_naming(
      [&] {
        bwd(t(dq, {nq, 4, d}), t(dk, {nq, 2, d}), t(dv, {nk, 2, d}));
      },
      "attention_backward", "'dk'");
  expect_error_naming(
      [&] {
        bwd(t(dq, {nq, 4, d}), t(dk, {nk, 2, d}), t(dv, {nq, 2, d}));
      },
      "attention_backward", "'dv'");
  expect_error_naming(
      [&] {
        bwd(t(big, {nk, 4, d}), t(dk, {nk, 2, d}), t(dv, {nk, 2, d}));
      },
      "attention_backward", "'dq'");
  expect_error_naming(
      [&] {
        attention_backward(ctx, t(dout, {nq, 4, d}), tq, tk, tv, to, tl, c(cu_q), c(cu_k_end), nq, nk,
                           t(dq, {nq, 4, d}), t(dk, {nk, 2, d}), t(dv, {nk, 2, d}), 1.f);
      },
      "attention_backward", "'cu_seqlens_k'");
}

}  // namespace
}  // namespace hyd::kernels

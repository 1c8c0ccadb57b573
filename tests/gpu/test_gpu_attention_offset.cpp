// CUDA attention with query offset (kernels/attention.h, two boundary arrays) and the sigmoid output
// gate (kernels/output_gate.h) against the CPU f32 references on the same bf16-rounded inputs.
// Outputs are poisoned (NaN) before every run; inputs are fresh random numbers (HYD_TEST_SEED replays).
//
// Attention: GQA ratios 1, 4, 8 (Hq/Hkv = 2/2, 8/2, 8/1), head dims 64 and 128 (the flash kernels), and
// GQA 4 with d 32 (the simple kernels), over three layouts of one packed batch of documents of 1, 17,
// 128 and 1000 tokens:
//   plain      no offset (the single-boundary overload the dense model uses);
//   slice      LASP-2H: the query slice [10, 700) against the keys [0, 700) (q = document ∩ slice,
//              k = document ∩ [0, slice end)); the 1-token document has keys and no queries;
//   mixed      per document (len_q, len_k): (1,1), (17,5) (12 fully masked rows), (128,128), (1,40),
//              (0,7) (keys nobody sees), (300,1000), (3,0) (a document without keys).
// Checks: o, dq, dk, dv rel_err < 1e-2; lse rel_err < 1e-3 where finite and exactly -inf on fully
// masked rows; o and dq exactly 0 on fully masked rows, dk and dv exactly 0 on unseen keys; o = v
// exactly for documents of one query and one key; no NaN/Inf in any bf16 output.
// The CPU references (seconds each for the 1000-token document) run concurrently, one thread per case.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <future>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kernels/attention.h"
#include "kernels/output_gate.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::all_finite;
using test::DeviceBuffers;
using test::randn;
using test::rel_err;
using test::round_bf16;

constexpr double kBf16Tol = 1e-2;
constexpr double kLseTol = 1e-3;

void expect_close(const std::vector<float>& out, const std::vector<float>& ref, double tol, const std::string& what) {
  const double e = rel_err(out, ref);
  std::printf("  %-64s rel_err %.3g (tol %.0e)\n", what.c_str(), e, tol);
  EXPECT_LT(e, tol) << what << ": rel_err " << e;
  EXPECT_TRUE(all_finite(out)) << what << " holds NaN/Inf";
}

// lse: compared where the reference is finite; where it is -inf (fully masked row) the output must be -inf.
void expect_lse_close(const std::vector<float>& out, const std::vector<float>& ref, const std::string& what) {
  ASSERT_EQ(out.size(), ref.size());
  std::vector<float> a, b;
  int64_t masked = 0;
  for (size_t x = 0; x < ref.size(); ++x) {
    if (std::isinf(ref[x]) && ref[x] < 0) {
      ++masked;
      EXPECT_TRUE(std::isinf(out[x]) && out[x] < 0) << what << ": lse[" << x << "] = " << out[x] << ", expected -inf";
      continue;
    }
    a.push_back(out[x]);
    b.push_back(ref[x]);
  }
  expect_close(a, b, kLseTol, what + " (" + std::to_string(masked) + " masked)");
}

struct Layout {
  std::string name;
  std::vector<int32_t> cu_q, cu_k;
  bool offset;  // false: the single-boundary overload (cu_q == cu_k)
  int64_t n_q() const { return cu_q.back(); }
  int64_t n_k() const { return cu_k.back(); }
  int64_t num_docs() const { return static_cast<int64_t>(cu_q.size()) - 1; }
  // The longest document's queries / keys: the flash kernels' grid bounds.
  static int64_t longest(const std::vector<int32_t>& cu) {
    int64_t m = 0;
    for (size_t i = 1; i < cu.size(); ++i) m = std::max<int64_t>(m, cu[i] - cu[i - 1]);
    return m;
  }
  int64_t max_len_q() const { return longest(cu_q); }
  int64_t max_len_k() const { return longest(cu_k); }
};

const std::vector<int32_t> kLengths = {1, 17, 128, 1000};

Layout plain_layout() {
  Layout l{"plain", {0}, {0}, false};
  for (int32_t len : kLengths) l.cu_q.push_back(l.cu_q.back() + len);
  l.cu_k = l.cu_q;
  return l;
}

Layout slice_layout(int32_t a, int32_t b) {
  Layout l{"slice[" + std::to_string(a) + "," + std::to_string(b) + ")", {}, {}, true};
  int32_t x = 0;
  for (size_t doc = 0; doc <= kLengths.size(); ++doc) {
    l.cu_q.push_back(std::clamp(x, a, b) - a);
    l.cu_k.push_back(std::min(x, b));
    if (doc < kLengths.size()) x += kLengths[doc];
  }
  return l;
}

Layout mixed_layout() {
  Layout l{"mixed", {0}, {0}, true};
  for (auto [lq, lk] :
       std::vector<std::pair<int32_t, int32_t>>{{1, 1}, {17, 5}, {128, 128}, {1, 40}, {0, 7}, {300, 1000}, {3, 0}}) {
    l.cu_q.push_back(l.cu_q.back() + lq);
    l.cu_k.push_back(l.cu_k.back() + lk);
  }
  return l;
}

struct HeadCase {
  int64_t hq, hkv, d;
};

struct Job {
  Layout layout;
  HeadCase c;
  float scale;
  std::vector<float> q, k, v, dout;                           // bf16-rounded inputs
  std::vector<float> o_ref, lse_ref, dq_ref, dk_ref, dv_ref;  // CPU f32 reference
  std::string what() const {
    return "attention " + layout.name + " hq=" + std::to_string(c.hq) + " hkv=" + std::to_string(c.hkv) +
           " d=" + std::to_string(c.d);
  }
};

void run_cpu_reference(Job& j) {
  const Layout& l = j.layout;
  const int64_t nq = l.n_q(), nk = l.n_k();
  j.o_ref.assign(j.q.size(), NAN);
  j.lse_ref.assign(nq * j.c.hq, NAN);
  j.dq_ref.assign(j.q.size(), NAN);
  j.dk_ref.assign(j.k.size(), NAN);
  j.dv_ref.assign(j.v.size(), NAN);
  cpu::attention_forward<float>(j.q.data(), j.k.data(), j.v.data(), l.cu_q.data(), l.cu_k.data(), l.num_docs(),
                                j.o_ref.data(), j.lse_ref.data(), nq, nk, j.c.hq, j.c.hkv, j.c.d, j.scale);
  cpu::attention_backward<float>(j.dout.data(), j.q.data(), j.k.data(), j.v.data(), j.o_ref.data(), j.lse_ref.data(),
                                 l.cu_q.data(), l.cu_k.data(), l.num_docs(), j.dq_ref.data(), j.dk_ref.data(),
                                 j.dv_ref.data(), nq, nk, j.c.hq, j.c.hkv, j.c.d, j.scale);
}

void run_and_compare(const Job& j) {
  const std::string what = j.what();
  SCOPED_TRACE(what);
  const Layout& l = j.layout;
  const int64_t nq = l.n_q(), nk = l.n_k(), hq = j.c.hq, hkv = j.c.hkv, d = j.c.d;
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0), size_t(64) << 20);
  const Tensor tq = buf.upload(j.q, {nq, hq, d}, DType::bf16), tk = buf.upload(j.k, {nk, hkv, d}, DType::bf16),
               tv = buf.upload(j.v, {nk, hkv, d}, DType::bf16), tdo = buf.upload(j.dout, {nq, hq, d}, DType::bf16),
               tcq = buf.upload_i32(l.cu_q, {l.num_docs() + 1}), tck = buf.upload_i32(l.cu_k, {l.num_docs() + 1});
  const Tensor to = buf.poisoned({nq, hq, d}, DType::bf16), tlse = buf.poisoned({nq, hq}, DType::f32),
               tdq = buf.poisoned({nq, hq, d}, DType::bf16), tdk = buf.poisoned({nk, hkv, d}, DType::bf16),
               tdv = buf.poisoned({nk, hkv, d}, DType::bf16);
  test::device_sync();
  const int64_t max_q = l.max_len_q(), max_k = l.max_len_k();
  if (l.offset) {
    attention_forward(ctx, tq, tk, tv, tcq, tck, max_q, max_k, to, tlse, j.scale);
    attention_backward(ctx, tdo, tq, tk, tv, to, tlse, tcq, tck, max_q, max_k, tdq, tdk, tdv, j.scale);
  } else {
    attention_forward(ctx, tq, tk, tv, tcq, max_q, to, tlse, j.scale);
    attention_backward(ctx, tdo, tq, tk, tv, to, tlse, tcq, max_q, tdq, tdk, tdv, j.scale);
  }
  ctx.synchronize();
  const std::vector<float> o = DeviceBuffers::download(to), lse = DeviceBuffers::download(tlse),
                           dq = DeviceBuffers::download(tdq), dk = DeviceBuffers::download(tdk),
                           dv = DeviceBuffers::download(tdv);
  expect_close(o, j.o_ref, kBf16Tol, what + " o");
  expect_lse_close(lse, j.lse_ref, what + " lse");
  expect_close(dq, j.dq_ref, kBf16Tol, what + " dq");
  expect_close(dk, j.dk_ref, kBf16Tol, what + " dk");
  expect_close(dv, j.dv_ref, kBf16Tol, what + " dv");

  // Exact values: fully masked rows, unseen keys, one-query-one-key documents.
  const int64_t group = hq / hkv;
  int64_t masked_rows = 0, unseen_keys = 0;
  for (int64_t doc = 0; doc < l.num_docs(); ++doc) {
    const int64_t qb = l.cu_q[doc], len_q = l.cu_q[doc + 1] - qb, kb = l.cu_k[doc], len_k = l.cu_k[doc + 1] - kb;
    for (int64_t i = 0; i < len_q; ++i) {
      if (i + len_k - len_q >= 0) continue;  // sees key 0 at least
      ++masked_rows;
      for (int64_t x = 0; x < hq * d; ++x) {
        ASSERT_EQ(o[(qb + i) * hq * d + x], 0.f) << "masked query row " << qb + i;
        ASSERT_EQ(dq[(qb + i) * hq * d + x], 0.f) << "masked query row " << qb + i;
      }
    }
    for (int64_t jk = 0; jk < len_k; ++jk) {
      if (len_q > 0) continue;  // the document's last query (len_q - 1 + len_k - len_q >= jk) sees every key
      ++unseen_keys;
      for (int64_t x = 0; x < hkv * d; ++x) {
        ASSERT_EQ(dk[(kb + jk) * hkv * d + x], 0.f) << "unseen key row " << kb + jk;
        ASSERT_EQ(dv[(kb + jk) * hkv * d + x], 0.f) << "unseen key row " << kb + jk;
      }
    }
    if (len_q == 1 && len_k == 1) {
      for (int64_t h = 0; h < hq; ++h)
        for (int64_t e = 0; e < d; ++e)
          ASSERT_EQ(o[(qb * hq + h) * d + e], j.v[(kb * hkv + h / group) * d + e]) << "1-token document " << doc;
    }
  }
  std::printf("  %s: %lld fully masked query rows, %lld unseen key rows checked exactly\n", what.c_str(),
              static_cast<long long>(masked_rows), static_cast<long long>(unseen_keys));
}

TEST(GpuAttentionOffset, ForwardBackwardMatchesCpuAllLayouts) {
  HYD_REQUIRE_GPU();
  const std::vector<Layout> layouts = {plain_layout(), slice_layout(10, 700), mixed_layout()};
  // d 64 and 128 run the flash kernels, d 32 the simple ones (the dispatcher's choice, kernels/attention.h).
  const std::vector<HeadCase> heads = {{2, 2, 64}, {2, 2, 128}, {8, 2, 64}, {8, 2, 128},
                                       {8, 1, 64}, {8, 1, 128}, {4, 1, 32}};
  // Inputs drawn here (the random generator is not thread-safe), references computed concurrently.
  std::vector<Job> jobs;
  for (const Layout& l : layouts) {
    for (HeadCase c : heads) {
      Job j{l, c, 1.f / std::sqrt(static_cast<float>(c.d)), {}, {}, {}, {}, {}, {}, {}, {}, {}};
      j.q = round_bf16(randn(l.n_q() * c.hq * c.d));
      j.k = round_bf16(randn(l.n_k() * c.hkv * c.d));
      j.v = round_bf16(randn(l.n_k() * c.hkv * c.d));
      j.dout = round_bf16(randn(l.n_q() * c.hq * c.d));
      jobs.push_back(std::move(j));
    }
  }
  std::vector<std::future<void>> refs;
  for (Job& j : jobs) refs.push_back(std::async(std::launch::async, [&j] { run_cpu_reference(j); }));
  for (auto& f : refs) f.get();
  // The layouts hold what they are meant to test.
  ASSERT_EQ(layouts[1].n_q(), 690);
  ASSERT_EQ(layouts[1].n_k(), 700);
  for (const Job& j : jobs) run_and_compare(j);
}

// ---------------------------------------------------------------- output gate

TEST(GpuAttentionOffset, OutputGateMatchesCpu) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  struct Shape {
    int64_t rows, cols;
  };
  // 16-byte packs (cols % 8 == 0) and the scalar path (37 x 100 = 3700 elements, not a multiple of 8).
  for (Shape s : {Shape{1146, 8 * 128}, Shape{37, 100}}) {
    const std::string what = "output_gate " + std::to_string(s.rows) + "x" + std::to_string(s.cols);
    SCOPED_TRACE(what);
    DeviceBuffers buf(Device::cuda(0), size_t(64) << 20);
    const int64_t n = s.rows * s.cols;
    std::vector<float> o = round_bf16(randn(n)), g = round_bf16(randn(n, 3.f)), dy = round_bf16(randn(n));
    // Saturated gates: sigmoid underflows / rounds to 1; nothing may become NaN.
    for (int64_t x = 0; x < n; x += 97) g[x] = (x / 97) % 2 ? 100.f : -100.f;
    std::vector<float> y_ref(n), do_ref(n), dg_ref(n);
    cpu::output_gate_forward<float>(o.data(), g.data(), y_ref.data(), n);
    cpu::output_gate_backward<float>(dy.data(), o.data(), g.data(), do_ref.data(), dg_ref.data(), n);
    const Tensor to = buf.upload(o, {s.rows, s.cols}, DType::bf16), tg = buf.upload(g, {s.rows, s.cols}, DType::bf16),
                 tdy = buf.upload(dy, {s.rows, s.cols}, DType::bf16);
    const Tensor ty = buf.poisoned({s.rows, s.cols}, DType::bf16), tdo = buf.poisoned({s.rows, s.cols}, DType::bf16),
                 tdg = buf.poisoned({s.rows, s.cols}, DType::bf16);
    test::device_sync();
    output_gate_forward(ctx, to, tg, ty);
    output_gate_backward(ctx, tdy, to, tg, tdo, tdg);
    ctx.synchronize();
    expect_close(DeviceBuffers::download(ty), y_ref, kBf16Tol, what + " y");
    expect_close(DeviceBuffers::download(tdo), do_ref, kBf16Tol, what + " do");
    expect_close(DeviceBuffers::download(tdg), dg_ref, kBf16Tol, what + " dgate");
  }
}

}  // namespace
}  // namespace hyd::kernels

// FlashAttention-style CUDA kernels (kernels/flash_attention.h), reached through the attention
// dispatcher of kernels/attention.h (which runs them for bf16 head dims 64 and 128), against the CPU
// f32 reference on the same bf16-rounded inputs, outputs poisoned (NaN) before every run, fresh random
// inputs (HYD_TEST_SEED replays): GQA ratios 1, 4, 8; head dims 64, 128; packed documents of lengths
// 1, 17, 128, 1000; query offsets (len_q < len_k) and fully masked rows (len_q > len_k, len_k = 0); a
// long document against the simple CUDA kernel. Tolerances: bf16 outputs and gradients rel_err <
// 1e-2, lse 1e-3. The FlashAttentionCpu tests need no GPU: they check the dispatcher's CPU path (the
// attention reference with query offsets) against a direct float64 evaluation of the end-aligned
// mask, and run with --gtest_filter=FlashAttentionCpu.* on any machine.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "kernels/attention.h"
#include "kernels/flash_attention.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::all_finite;
using test::DeviceBuffers;
using test::randn;
using test::rel_err;
using test::round_bf16;

constexpr double kBf16Tol = 1e-2;

void expect_close(const std::vector<float>& out, const std::vector<float>& ref, double tol, const std::string& what) {
  const double e = rel_err(out, ref);
  std::printf("  %-64s rel_err %.3g (tol %.0e)\n", what.c_str(), e, tol);
  EXPECT_LT(e, tol) << what << ": rel_err " << e;
  EXPECT_TRUE(all_finite(out)) << what << " holds NaN/Inf";
}

// Documents given as (len_q, len_k) pairs.
struct Layout {
  std::vector<int32_t> cu_q{0}, cu_k{0};
  int64_t max_q = 0, max_k = 0;
  explicit Layout(const std::vector<std::pair<int32_t, int32_t>>& docs) {
    for (auto [lq, lk] : docs) {
      cu_q.push_back(cu_q.back() + lq);
      cu_k.push_back(cu_k.back() + lk);
      max_q = std::max<int64_t>(max_q, lq);
      max_k = std::max<int64_t>(max_k, lk);
    }
  }
  int64_t nq() const { return cu_q.back(); }
  int64_t nk() const { return cu_k.back(); }
  int64_t docs() const { return static_cast<int64_t>(cu_q.size()) - 1; }
};

// Direct float64 evaluation of the end-aligned mask (query i of a document sees keys j <= i + len_k - len_q).
struct Direct {
  std::vector<double> o, lse, dq, dk, dv;
};
Direct direct_attention(const Layout& L, const std::vector<float>& q, const std::vector<float>& k,
                        const std::vector<float>& v, const std::vector<float>& dout, int64_t hq, int64_t hkv,
                        int64_t d, double scale) {
  const int64_t group = hq / hkv;
  Direct r;
  r.o.assign(q.size(), 0.0);
  r.lse.assign(L.nq() * hq, -INFINITY);
  r.dq.assign(q.size(), 0.0);
  r.dk.assign(k.size(), 0.0);
  r.dv.assign(v.size(), 0.0);
  for (int64_t doc = 0; doc < L.docs(); ++doc) {
    const int64_t q0 = L.cu_q[doc], k0 = L.cu_k[doc], lq = L.cu_q[doc + 1] - q0, lk = L.cu_k[doc + 1] - k0;
    for (int64_t i = 0; i < lq; ++i) {
      const int64_t visible = std::clamp<int64_t>(i + lk - lq + 1, 0, lk);
      if (visible == 0) continue;
      for (int64_t h = 0; h < hq; ++h) {
        const int64_t qr = ((q0 + i) * hq + h) * d;
        auto krow = [&](int64_t j) { return ((k0 + j) * hkv + h / group) * d; };
        std::vector<double> s(visible);
        double mx = -INFINITY;
        for (int64_t j = 0; j < visible; ++j) {
          double x = 0;
          for (int64_t c = 0; c < d; ++c) x += double(q[qr + c]) * k[krow(j) + c];
          s[j] = scale * x;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (double x : s) sum += std::exp(x - mx);
        const double lse = mx + std::log(sum);
        r.lse[(q0 + i) * hq + h] = lse;
        for (int64_t j = 0; j < visible; ++j)
          for (int64_t c = 0; c < d; ++c) r.o[qr + c] += std::exp(s[j] - lse) * v[krow(j) + c];
        double di = 0;
        for (int64_t c = 0; c < d; ++c) di += double(dout[qr + c]) * r.o[qr + c];
        for (int64_t j = 0; j < visible; ++j) {
          const double p = std::exp(s[j] - lse);
          double dp = 0;
          for (int64_t c = 0; c < d; ++c) dp += double(dout[qr + c]) * v[krow(j) + c];
          const double ds = p * (dp - di);
          for (int64_t c = 0; c < d; ++c) {
            r.dv[krow(j) + c] += p * dout[qr + c];
            r.dq[qr + c] += scale * ds * k[krow(j) + c];
            r.dk[krow(j) + c] += scale * ds * q[qr + c];
          }
        }
      }
    }
  }
  return r;
}

// Rows of `lse` that are -inf in the reference must be -inf; the finite ones are compared by rel_err.
void expect_lse(const std::vector<float>& lse, const std::vector<float>& ref, double tol, const std::string& what) {
  std::vector<float> a, b;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i]) && ref[i] < 0) {
      EXPECT_TRUE(std::isinf(lse[i]) && lse[i] < 0) << what << ": row " << i << " sees no key, lse " << lse[i];
    } else {
      a.push_back(lse[i]);
      b.push_back(ref[i]);
    }
  }
  if (!b.empty()) expect_close(a, b, tol, what);
}

// Rows (token, all heads) of fully masked queries: o and dq exactly 0.
void expect_masked_rows_zero(const Layout& L, const std::vector<float>& o, const std::vector<float>& dq, int64_t hq,
                             int64_t d, const std::string& what) {
  int64_t rows = 0;
  for (int64_t doc = 0; doc < L.docs(); ++doc) {
    const int64_t lq = L.cu_q[doc + 1] - L.cu_q[doc], lk = L.cu_k[doc + 1] - L.cu_k[doc];
    for (int64_t i = 0; i < lq - lk; ++i, ++rows)
      for (int64_t x = 0; x < hq * d; ++x) {
        const int64_t idx = (L.cu_q[doc] + i) * hq * d + x;
        ASSERT_EQ(o[idx], 0.f) << what << ": o of fully masked query " << L.cu_q[doc] + i;
        ASSERT_EQ(dq[idx], 0.f) << what << ": dq of fully masked query " << L.cu_q[doc] + i;
      }
  }
  std::printf("  %-64s %lld fully masked query rows are 0\n", what.c_str(), static_cast<long long>(rows));
}

// ---------------------------------------------------------------- CPU path (no GPU needed)

// Two equal boundary arrays through the dispatcher (the query-offset overload) give the causal reference.
TEST(FlashAttentionCpu, SameBoundariesIsTheCausalReference) {
  std::vector<int32_t> cu = {0, 1, 18, 60}, cu_q = cu, cu_k = cu;
  const int64_t n = 60, hq = 4, hkv = 2, d = 8;
  const float scale = 0.3f;  // the dispatcher takes a float: the reference gets the same value
  std::vector<float> q = randn(n * hq * d), k = randn(n * hkv * d), v = randn(n * hkv * d), dout = randn(n * hq * d);
  std::vector<float> o1(q.size()), o2(q.size()), l1(n * hq), l2(n * hq);
  cpu::attention_forward<float>(q.data(), k.data(), v.data(), cu.data(), 3, o1.data(), l1.data(), n, hq, hkv, d,
                                scale);
  ExecContext ctx(Device::cpu());
  const Tensor tq = test::cpu_f32(q, {n, hq, d}), tk = test::cpu_f32(k, {n, hkv, d}),
               tv = test::cpu_f32(v, {n, hkv, d}), tcq = test::cpu_i32(cu_q, {4}), tck = test::cpu_i32(cu_k, {4});
  attention_forward(ctx, tq, tk, tv, tcq, tck, 42, 42, test::cpu_f32(o2, {n, hq, d}), test::cpu_f32(l2, {n, hq}),
                    scale);
  EXPECT_EQ(o1, o2);
  EXPECT_EQ(l1, l2);
  std::vector<float> dq1(q.size()), dk1(k.size()), dv1(v.size()), dq2(q.size()), dk2(k.size()), dv2(v.size());
  cpu::attention_backward<float>(dout.data(), q.data(), k.data(), v.data(), o1.data(), l1.data(), cu.data(), 3,
                                 dq1.data(), dk1.data(), dv1.data(), n, hq, hkv, d, scale);
  attention_backward(ctx, test::cpu_f32(dout, {n, hq, d}), tq, tk, tv, test::cpu_f32(o1, {n, hq, d}),
                     test::cpu_f32(l1, {n, hq}), tcq, tck, 42, 42, test::cpu_f32(dq2, {n, hq, d}),
                     test::cpu_f32(dk2, {n, hkv, d}), test::cpu_f32(dv2, {n, hkv, d}), scale);
  EXPECT_EQ(dq1, dq2);
  EXPECT_EQ(dk1, dk2);
  EXPECT_EQ(dv1, dv2);
}

TEST(FlashAttentionCpu, QueryOffsetsAndMaskedRowsMatchDirectEvaluation) {
  // (len_q, len_k): offsets, equal, a length-1 document, len_q > len_k (fully masked rows), no keys, no queries.
  const Layout L({{5, 40}, {16, 16}, {1, 1}, {12, 7}, {3, 0}, {0, 9}, {20, 33}});
  const int64_t hq = 6, hkv = 2, d = 8;
  const double scale = 0.35;
  std::vector<float> q = randn(L.nq() * hq * d), k = randn(L.nk() * hkv * d), v = randn(L.nk() * hkv * d),
                     dout = randn(L.nq() * hq * d);
  const Direct ref = direct_attention(L, q, k, v, dout, hq, hkv, d, scale);
  std::vector<float> o(q.size(), NAN), lse(L.nq() * hq, NAN), dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN);
  // Through the Tensor dispatcher (CPU f32 path).
  ExecContext ctx(Device::cpu());
  std::vector<int32_t> cq = L.cu_q, ck = L.cu_k;
  const Tensor tcq = test::cpu_i32(cq, {L.docs() + 1}), tck = test::cpu_i32(ck, {L.docs() + 1});
  attention_forward(ctx, test::cpu_f32(q, {L.nq(), hq, d}), test::cpu_f32(k, {L.nk(), hkv, d}),
                    test::cpu_f32(v, {L.nk(), hkv, d}), tcq, tck, L.max_q, L.max_k, test::cpu_f32(o, {L.nq(), hq, d}),
                    test::cpu_f32(lse, {L.nq(), hq}), float(scale));
  attention_backward(ctx, test::cpu_f32(dout, {L.nq(), hq, d}), test::cpu_f32(q, {L.nq(), hq, d}),
                     test::cpu_f32(k, {L.nk(), hkv, d}), test::cpu_f32(v, {L.nk(), hkv, d}),
                     test::cpu_f32(o, {L.nq(), hq, d}), test::cpu_f32(lse, {L.nq(), hq}), tcq, tck, L.max_q, L.max_k,
                     test::cpu_f32(dq, {L.nq(), hq, d}), test::cpu_f32(dk, {L.nk(), hkv, d}),
                     test::cpu_f32(dv, {L.nk(), hkv, d}), float(scale));
  expect_close(o, test::to_f32(ref.o), 1e-5, "cpu flash o");
  expect_lse(lse, test::to_f32(ref.lse), 1e-5, "cpu flash lse");
  expect_close(dq, test::to_f32(ref.dq), 1e-5, "cpu flash dq");
  expect_close(dk, test::to_f32(ref.dk), 1e-5, "cpu flash dk");
  expect_close(dv, test::to_f32(ref.dv), 1e-5, "cpu flash dv");
  expect_masked_rows_zero(L, o, dq, hq, d, "cpu flash");
}

TEST(FlashAttentionCpu, DispatcherNamesBadArguments) {
  ExecContext ctx(Device::cpu());
  std::vector<float> q(4 * 2 * 8), k(6 * 1 * 8), v(6 * 1 * 8), o(q.size()), lse(4 * 2);
  std::vector<int32_t> cq = {0, 4}, ck = {0, 6}, ck_bad = {0, 3, 6};
  const Tensor tq = test::cpu_f32(q, {4, 2, 8}), tk = test::cpu_f32(k, {6, 1, 8}), tv = test::cpu_f32(v, {6, 1, 8}),
               to = test::cpu_f32(o, {4, 2, 8}), tl = test::cpu_f32(lse, {4, 2});
  const Tensor tcq = test::cpu_i32(cq, {2}), tck = test::cpu_i32(ck, {2}), tbad = test::cpu_i32(ck_bad, {3});
  attention_forward(ctx, tq, tk, tv, tcq, tck, 4, 6, to, tl, 0.5f);  // valid
  EXPECT_TRUE(all_finite(o));
  test::expect_error_naming([&] { attention_forward(ctx, tq, tk, tv, tcq, tbad, 4, 6, to, tl, 0.5f); },
                            "attention_forward", "cu_seqlens_k");
  test::expect_error_naming([&] { attention_forward(ctx, tq, tk, tv, tcq, tck, 4, 6, to, tk, 0.5f); },
                            "attention_forward", "lse");
  test::expect_error_naming([&] { attention_forward(ctx, tq, tk, tv, tcq, tck, -1, 6, to, tl, 0.5f); },
                            "attention_forward", "max_len_q");
  // Bounds below the documents' lengths would leave CUDA rows unwritten: the CPU path refuses them.
  test::expect_error_naming([&] { attention_forward(ctx, tq, tk, tv, tcq, tck, 3, 6, to, tl, 0.5f); },
                            "attention_forward", "max_len_q");
  test::expect_error_naming([&] { attention_forward(ctx, tq, tk, tv, tcq, tck, 4, 5, to, tl, 0.5f); },
                            "attention_forward", "max_len_k");
  std::vector<int32_t> ck_short = {0, 5};
  test::expect_error_naming(
      [&] { attention_forward(ctx, tq, tk, tv, tcq, test::cpu_i32(ck_short, {2}), 4, 6, to, tl, 0.5f); },
      "attention_forward", "cu_seqlens_k");
  EXPECT_TRUE(flash_attention_supported(128, DType::bf16));
  EXPECT_TRUE(flash_attention_supported(64, DType::bf16));
  EXPECT_FALSE(flash_attention_supported(80, DType::bf16));
  EXPECT_FALSE(flash_attention_supported(128, DType::f32));
}

// ---------------------------------------------------------------- CUDA vs CPU

struct Heads {
  int64_t hq, hkv, d;
};

// Runs the CUDA kernels and the CPU path on the same bf16-rounded inputs and compares everything.
void compare_with_cpu(const Layout& L, Heads c, const std::string& what) {
  SCOPED_TRACE(what);
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0), size_t(128) << 20);
  const float scale = 1.f / std::sqrt(static_cast<float>(c.d));
  const int64_t nq = L.nq(), nk = L.nk();
  const std::vector<float> q = round_bf16(randn(nq * c.hq * c.d)), k = round_bf16(randn(nk * c.hkv * c.d)),
                           v = round_bf16(randn(nk * c.hkv * c.d)), dout = round_bf16(randn(nq * c.hq * c.d));
  ASSERT_TRUE(flash_attention_supported(c.d, DType::bf16)) << "the dispatcher would not run the flash kernels";
  std::vector<float> o_ref(q.size()), lse_ref(nq * c.hq), dq_ref(q.size()), dk_ref(k.size()), dv_ref(v.size());
  cpu::attention_forward<float>(q.data(), k.data(), v.data(), L.cu_q.data(), L.cu_k.data(), L.docs(), o_ref.data(),
                                lse_ref.data(), nq, nk, c.hq, c.hkv, c.d, scale);
  cpu::attention_backward<float>(dout.data(), q.data(), k.data(), v.data(), o_ref.data(), lse_ref.data(), L.cu_q.data(),
                                 L.cu_k.data(), L.docs(), dq_ref.data(), dk_ref.data(), dv_ref.data(), nq, nk, c.hq,
                                 c.hkv, c.d, scale);

  const Tensor tq = buf.upload(q, {nq, c.hq, c.d}, DType::bf16), tk = buf.upload(k, {nk, c.hkv, c.d}, DType::bf16),
               tv = buf.upload(v, {nk, c.hkv, c.d}, DType::bf16), tdo = buf.upload(dout, {nq, c.hq, c.d}, DType::bf16),
               tcq = buf.upload_i32(L.cu_q, {L.docs() + 1}), tck = buf.upload_i32(L.cu_k, {L.docs() + 1});
  // Every forward kernel (HYD_FLASH_FWD: 0 = the default: the wgmma kernel for d = 128 in Hopper builds, else 4 warps
  // of 32 query rows with double-buffered K / V; 3 = the latter always; 1 = 8 warps of 16 rows; 2 = 4 warps of 32
  // rows with single buffers), each followed by the backward on its own outputs (HYD_FLASH_BWD: 0 = the default, the
  // wgmma kernel for d = 128 in Hopper builds, else the mma.sync one; 1 = the mma.sync one always), also with other
  // block orders (HYD_FLASH_PACK: 0 = the packs the launcher picks, 1 = one (document, head) group after the other,
  // 3 = packs of 3 groups, the last one partial for most head counts here).
  struct Variant {
    const char *fwd, *pack, *bwd;
  };
  const test::ScopedEnv forward("HYD_FLASH_FWD"), pack("HYD_FLASH_PACK"), backward("HYD_FLASH_BWD");
  for (const Variant& x :
       {Variant{"0", "0", "0"}, Variant{"1", "0", "0"}, Variant{"2", "0", "0"}, Variant{"3", "0", "1"},
        Variant{"3", "1", "1"}, Variant{"3", "3", "1"}, Variant{"0", "1", "0"}, Variant{"0", "3", "0"}}) {
    forward.set(x.fwd);
    pack.set(x.pack);
    backward.set(x.bwd);
    const std::string tag =
        what + " (forward kernel " + x.fwd + ", pack " + x.pack + ", backward kernel " + x.bwd + ")";
    const Tensor to = buf.poisoned({nq, c.hq, c.d}, DType::bf16), tlse = buf.poisoned({nq, c.hq}, DType::f32);
    const Tensor tdq = buf.poisoned({nq, c.hq, c.d}, DType::bf16), tdk = buf.poisoned({nk, c.hkv, c.d}, DType::bf16),
                 tdv = buf.poisoned({nk, c.hkv, c.d}, DType::bf16);
    test::device_sync();
    attention_forward(ctx, tq, tk, tv, tcq, tck, L.max_q, L.max_k, to, tlse, scale);
    attention_backward(ctx, tdo, tq, tk, tv, to, tlse, tcq, tck, L.max_q, L.max_k, tdq, tdk, tdv, scale);
    ctx.synchronize();
    const std::vector<float> o = DeviceBuffers::download(to), dq = DeviceBuffers::download(tdq);
    expect_close(o, o_ref, kBf16Tol, tag + " o");
    expect_lse(DeviceBuffers::download(tlse), lse_ref, 1e-3, tag + " lse");
    expect_close(dq, dq_ref, kBf16Tol, tag + " dq");
    expect_close(DeviceBuffers::download(tdk), dk_ref, kBf16Tol, tag + " dk");
    expect_close(DeviceBuffers::download(tdv), dv_ref, kBf16Tol, tag + " dv");
    expect_masked_rows_zero(L, o, dq, c.hq, c.d, tag);
  }
}

std::string name(const char* tag, Heads c) {
  return std::string(tag) + " hq=" + std::to_string(c.hq) + " hkv=" + std::to_string(c.hkv) +
         " d=" + std::to_string(c.d);
}

TEST(GpuFlashAttention, PackedDocumentsAllRatiosAndHeadDims) {
  HYD_REQUIRE_GPU();
  const Layout L({{1, 1}, {17, 17}, {128, 128}, {1000, 1000}, {1, 1}});
  for (Heads c : {Heads{2, 2, 64}, Heads{4, 1, 64}, Heads{8, 1, 64}, Heads{2, 2, 128}, Heads{4, 1, 128},
                  Heads{8, 1, 128}})
    compare_with_cpu(L, c, name("packed 1/17/128/1000", c));
}

TEST(GpuFlashAttention, QueryOffsetsAndFullyMaskedRows) {
  HYD_REQUIRE_GPU();
  // len_q < len_k (LASP-2H slices, tile-unaligned), equal, len_q > len_k (fully masked leading
  // rows), a document without keys and one without queries.
  const Layout L({{5, 40}, {64, 200}, {130, 130}, {1, 1}, {100, 333}, {50, 20}, {3, 0}, {0, 17}, {129, 300}});
  for (Heads c : {Heads{4, 4, 64}, Heads{8, 2, 128}, Heads{8, 1, 64}, Heads{4, 1, 128}})
    compare_with_cpu(L, c, name("query offsets", c));
}

TEST(GpuFlashAttention, LongDocumentMatchesSimpleKernel) {
  HYD_REQUIRE_GPU();
  // One 4096-token document, H=16, d=128: flash (the dispatcher's choice for d = 128) vs the simple CUDA
  // kernel of kernels/attention.h, called directly.
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0), size_t(512) << 20);
  const int64_t n = 4096, h = 16, d = 128;
  const float scale = 1.f / std::sqrt(float(d));
  const Tensor tq = buf.upload(randn(n * h * d), {n, h, d}, DType::bf16),
               tk = buf.upload(randn(n * h * d), {n, h, d}, DType::bf16),
               tv = buf.upload(randn(n * h * d), {n, h, d}, DType::bf16),
               tdo = buf.upload(randn(n * h * d), {n, h, d}, DType::bf16),
               tcu = buf.upload_i32({0, static_cast<int32_t>(n)}, {2});
  auto outputs = [&] {
    return std::vector<Tensor>{buf.poisoned({n, h, d}, DType::bf16), buf.poisoned({n, h}, DType::f32),
                               buf.poisoned({n, h, d}, DType::bf16), buf.poisoned({n, h, d}, DType::bf16),
                               buf.poisoned({n, h, d}, DType::bf16)};
  };
  const std::vector<Tensor> ref = outputs(), fl = outputs();
  test::device_sync();
#ifdef HYD_WITH_CUDA
  cuda::attention_forward(tq.ptr<bf16>(), tk.ptr<bf16>(), tv.ptr<bf16>(), tcu.ptr<int32_t>(), tcu.ptr<int32_t>(), 1,
                          ref[0].ptr<bf16>(), ref[1].ptr<float>(), n, n, h, h, d, scale, ctx.stream());
  cuda::attention_backward(tdo.ptr<bf16>(), tq.ptr<bf16>(), tk.ptr<bf16>(), tv.ptr<bf16>(), ref[0].ptr<bf16>(),
                           ref[1].ptr<float>(), tcu.ptr<int32_t>(), tcu.ptr<int32_t>(), 1, ref[2].ptr<bf16>(),
                           ref[3].ptr<bf16>(), ref[4].ptr<bf16>(), n, n, h, h, d, scale, ctx.stream());
#endif
  ctx.synchronize();
  attention_forward(ctx, tq, tk, tv, tcu, n, fl[0], fl[1], scale);  // warm-up
  ctx.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  attention_forward(ctx, tq, tk, tv, tcu, n, fl[0], fl[1], scale);
  ctx.synchronize();
  const auto t1 = std::chrono::steady_clock::now();
  attention_backward(ctx, tdo, tq, tk, tv, fl[0], fl[1], tcu, n, fl[2], fl[3], fl[4], scale);
  ctx.synchronize();
  const auto t2 = std::chrono::steady_clock::now();
  std::printf("flash T=4096 H=16 d=128: fwd %.2f ms, bwd %.2f ms (first bwd call)\n",
              std::chrono::duration<double, std::milli>(t1 - t0).count(),
              std::chrono::duration<double, std::milli>(t2 - t1).count());
  const char* names[] = {"o", "lse", "dq", "dk", "dv"};
  for (int i = 0; i < 5; ++i)
    expect_close(DeviceBuffers::download(fl[i]), DeviceBuffers::download(ref[i]), i == 1 ? 1e-3 : kBf16Tol,
                 std::string("T=4096 flash vs simple kernel ") + names[i]);
}

}  // namespace
}  // namespace hyd::kernels

// CUDA kernels B (gemm, linear, attention, cross-entropy, AdamW, sum of squares) against the CPU f32
// references on the same bf16-rounded inputs. Outputs are poisoned (NaN) before every run, inputs
// are fresh random numbers (HYD_TEST_SEED replays). Tolerances: bf16 outputs rel_err < 1e-2; fp32
// statistics (lse, losses) tighter; AdamW master/moments 1e-5.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/cross_entropy.h"
#include "kernels/global_norm.h"
#include "kernels/matmul.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::all_finite;
using test::DeviceBuffers;
using test::randint;
using test::randn;
using test::rel_err;
using test::round_bf16;

constexpr double kBf16Tol = 1e-2;

void expect_close(const std::vector<float>& out, const std::vector<float>& ref, double tol, const std::string& what) {
  const double e = rel_err(out, ref);
  std::printf("  %-60s rel_err %.3g (tol %.0e)\n", what.c_str(), e, tol);
  EXPECT_LT(e, tol) << what << ": rel_err " << e;
  EXPECT_TRUE(all_finite(out)) << what << " holds NaN/Inf";
}

// ---------------------------------------------------------------- gemm / linear

TEST(GpuKernelsB, GemmAllTransposesBothOutputTypes) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0));
  struct Size {
    int64_t m, n, k;
  };
  for (Size sz : {Size{37, 96, 80}, Size{128, 33, 257}, Size{1, 7, 5}}) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        for (bool c_f32 : {true, false}) {
          for (float beta : {0.f, 1.f}) {
            const std::string what = "gemm m=" + std::to_string(sz.m) + " n=" + std::to_string(sz.n) +
                                     " k=" + std::to_string(sz.k) + " ta=" + std::to_string(ta) +
                                     " tb=" + std::to_string(tb) + (c_f32 ? " c=f32" : " c=bf16") +
                                     " beta=" + std::to_string(beta);
            SCOPED_TRACE(what);
            const float alpha = 0.75f;
            const std::vector<float> a = round_bf16(randn(sz.m * sz.k)), b = round_bf16(randn(sz.k * sz.n));
            std::vector<float> c = randn(sz.m * sz.n);
            if (!c_f32) c = round_bf16(c);
            std::vector<float> ref = c;
            cpu::gemm<float>(ta, tb, sz.m, sz.n, sz.k, alpha, a.data(), b.data(), beta, ref.data());
            const Tensor ta_t = buf.upload(a, {ta ? sz.k : sz.m, ta ? sz.m : sz.k}, DType::bf16);
            const Tensor tb_t = buf.upload(b, {tb ? sz.n : sz.k, tb ? sz.k : sz.n}, DType::bf16);
            const DType ct = c_f32 ? DType::f32 : DType::bf16;
            const Tensor tc = beta == 0.f ? buf.poisoned({sz.m, sz.n}, ct) : buf.upload(c, {sz.m, sz.n}, ct);
            gemm(ctx, ta, tb, alpha, ta_t, tb_t, beta, tc);
            ctx.synchronize();
            expect_close(DeviceBuffers::download(tc), ref, c_f32 ? 1e-3 : kBf16Tol, what);
            buf.arena().reset();
          }
        }
      }
    }
  }
}

void linear_with_bias_case(int64_t m, int64_t n, int64_t k) {
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0), size_t(64) << 20);
  const std::vector<float> x = round_bf16(randn(m * k)), w = round_bf16(randn(n * k, 0.1f)),
                           bias = round_bf16(randn(n)), dy = round_bf16(randn(m * n));
  const std::vector<float> dw0 = randn(n * k), db0 = randn(n), dx0 = round_bf16(randn(m * k));
  // CPU reference.
  std::vector<float> y_ref(m * n), dx_ref(m * k), dx_acc_ref = dx0, dw_ref = dw0, db_ref = db0;
  cpu::gemm<float>(false, true, m, n, k, 1.f, x.data(), w.data(), 0.f, y_ref.data());
  cpu::bias_add<float>(y_ref.data(), bias.data(), m, n);
  cpu::gemm<float>(false, false, m, k, n, 1.f, dy.data(), w.data(), 0.f, dx_ref.data());
  cpu::gemm<float>(false, false, m, k, n, 1.f, dy.data(), w.data(), 1.f, dx_acc_ref.data());
  cpu::gemm<float>(true, false, n, k, m, 1.f, dy.data(), x.data(), 1.f, dw_ref.data());
  cpu::bias_grad<float>(dy.data(), db_ref.data(), m, n);

  const Tensor tx = buf.upload(x, {m, k}, DType::bf16), tw = buf.upload(w, {n, k}, DType::bf16),
               tb = buf.upload(bias, {n}, DType::bf16), tdy = buf.upload(dy, {m, n}, DType::bf16);
  const Tensor ty = buf.poisoned({m, n}, DType::bf16), tdx = buf.poisoned({m, k}, DType::bf16);
  const Tensor tdw = buf.upload(dw0, {n, k}, DType::f32), tdb = buf.upload(db0, {n}, DType::f32);
  linear_forward(ctx, tx, tw, tb, ty);
  linear_backward(ctx, tdy, tx, tw, tdx, false, tdw, tdb);
  ctx.synchronize();
  expect_close(DeviceBuffers::download(ty), y_ref, kBf16Tol, "linear y");
  expect_close(DeviceBuffers::download(tdx), dx_ref, kBf16Tol, "linear dx");
  expect_close(DeviceBuffers::download(tdw), dw_ref, 1e-3, "linear dw (f32, accumulated)");
  expect_close(DeviceBuffers::download(tdb), db_ref, 1e-4, "linear dbias (f32, accumulated)");

  // accumulate_dx: dx += dy w on top of the existing contents.
  const Tensor tdx_acc = buf.upload(dx0, {m, k}, DType::bf16);
  linear_backward(ctx, tdy, tx, tw, tdx_acc, true, Tensor{}, Tensor{});
  ctx.synchronize();
  expect_close(DeviceBuffers::download(tdx_acc), dx_acc_ref, kBf16Tol, "linear dx accumulated");
}

// Three shapes: 96 columns (the 8-wide bias kernels), 2050 rows x 1024 columns (many row segments of the bias
// gradient, the last one ragged), 1003 columns (not a multiple of 8: the scalar kernels).
TEST(GpuKernelsB, LinearForwardBackwardWithBias) {
  HYD_REQUIRE_GPU();
  for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{67, 96, 80}, {2050, 1024, 64}, {300, 1003, 48}}) {
    SCOPED_TRACE("m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k));
    linear_with_bias_case(m, n, k);
  }
}

// y = x w^T + residual through the cuBLASLt epilogue, into a poisoned output and in place over the residual, at a
// few shapes (odd ones included) and for a residual that is a row slice of a larger buffer.
TEST(GpuKernelsB, LinearForwardResidualMatchesCpu) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  for (auto [m, n, k] :
       {std::tuple<int64_t, int64_t, int64_t>{67, 96, 80}, {256, 1024, 1024}, {1, 8, 8}, {300, 1024, 2816}}) {
    SCOPED_TRACE("m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k));
    DeviceBuffers buf(Device::cuda(0), size_t(64) << 20);
    const std::vector<float> x = round_bf16(randn(m * k)), w = round_bf16(randn(n * k, 0.05f)),
                             r = round_bf16(randn((m + 3) * n));
    std::vector<float> ref(m * n);
    cpu::gemm<float>(false, true, m, n, k, 1.f, x.data(), w.data(), 0.f, ref.data());
    for (int64_t i = 0; i < m * n; ++i) ref[i] += r[3 * n + i];  // rows 3.. of the residual buffer
    const Tensor tx = buf.upload(x, {m, k}, DType::bf16), tw = buf.upload(w, {n, k}, DType::bf16);
    const Tensor tr = buf.upload(r, {m + 3, n}, DType::bf16).slice0(3, m + 3);
    const Tensor ty = buf.poisoned({m, n}, DType::bf16);
    linear_forward_residual(ctx, tx, tw, tr, ty);
    ctx.synchronize();
    expect_close(DeviceBuffers::download(ty), ref, kBf16Tol, "y = x w^T + residual");
    // In place: the residual buffer itself receives the sum; the rows before the slice stay.
    linear_forward_residual(ctx, tx, tw, tr, tr);
    ctx.synchronize();
    expect_close(DeviceBuffers::download(tr), ref, kBf16Tol, "residual += x w^T");
  }
}

// ---------------------------------------------------------------- attention

struct AttnCase {
  int64_t hq, hkv, d;
};

TEST(GpuKernelsB, AttentionForwardBackwardMatchesCpu) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  const std::vector<int32_t> lengths = {1, 17, 128, 300, 1};
  std::vector<int32_t> cu = {0};
  for (int32_t l : lengths) cu.push_back(cu.back() + l);
  const int64_t n = cu.back(), num_docs = static_cast<int64_t>(lengths.size());
  // Head dims 64 and 128 run the flash kernels, 256 and 80 the simple ones (kernels/attention.h).
  for (AttnCase c : {AttnCase{4, 4, 64}, AttnCase{8, 2, 128}, AttnCase{8, 1, 64}, AttnCase{8, 8, 128},
                     AttnCase{4, 1, 128}, AttnCase{2, 2, 256}, AttnCase{4, 2, 80}}) {
    const std::string what =
        "attention hq=" + std::to_string(c.hq) + " hkv=" + std::to_string(c.hkv) + " d=" + std::to_string(c.d);
    SCOPED_TRACE(what);
    DeviceBuffers buf(Device::cuda(0), size_t(64) << 20);
    const float scale = 1.f / std::sqrt(static_cast<float>(c.d));
    const std::vector<float> q = round_bf16(randn(n * c.hq * c.d)), k = round_bf16(randn(n * c.hkv * c.d)),
                             v = round_bf16(randn(n * c.hkv * c.d)), dout = round_bf16(randn(n * c.hq * c.d));
    std::vector<float> o_ref(q.size()), lse_ref(n * c.hq), dq_ref(q.size()), dk_ref(k.size()), dv_ref(v.size());
    cpu::attention_forward<float>(q.data(), k.data(), v.data(), cu.data(), num_docs, o_ref.data(), lse_ref.data(), n,
                                  c.hq, c.hkv, c.d, scale);
    cpu::attention_backward<float>(dout.data(), q.data(), k.data(), v.data(), o_ref.data(), lse_ref.data(), cu.data(),
                                   num_docs, dq_ref.data(), dk_ref.data(), dv_ref.data(), n, c.hq, c.hkv, c.d, scale);

    const Tensor tq = buf.upload(q, {n, c.hq, c.d}, DType::bf16), tk = buf.upload(k, {n, c.hkv, c.d}, DType::bf16),
                 tv = buf.upload(v, {n, c.hkv, c.d}, DType::bf16), tdo = buf.upload(dout, {n, c.hq, c.d}, DType::bf16),
                 tcu = buf.upload_i32(cu, {num_docs + 1});
    const Tensor to = buf.poisoned({n, c.hq, c.d}, DType::bf16), tlse = buf.poisoned({n, c.hq}, DType::f32);
    const Tensor tdq = buf.poisoned({n, c.hq, c.d}, DType::bf16), tdk = buf.poisoned({n, c.hkv, c.d}, DType::bf16),
                 tdv = buf.poisoned({n, c.hkv, c.d}, DType::bf16);
    attention_forward(ctx, tq, tk, tv, tcu, 300, to, tlse, scale);
    attention_backward(ctx, tdo, tq, tk, tv, to, tlse, tcu, 300, tdq, tdk, tdv, scale);
    ctx.synchronize();
    const std::vector<float> o = DeviceBuffers::download(to), lse = DeviceBuffers::download(tlse);
    expect_close(o, o_ref, kBf16Tol, what + " o");
    expect_close(lse, lse_ref, 1e-3, what + " lse");
    expect_close(DeviceBuffers::download(tdq), dq_ref, kBf16Tol, what + " dq");
    expect_close(DeviceBuffers::download(tdk), dk_ref, kBf16Tol, what + " dk");
    expect_close(DeviceBuffers::download(tdv), dv_ref, kBf16Tol, what + " dv");
    // Length-1 documents (first and last token): o is exactly v of the token's kv head.
    for (int64_t i : {int64_t(0), n - 1})
      for (int64_t h = 0; h < c.hq; ++h)
        for (int64_t e = 0; e < c.d; ++e)
          ASSERT_EQ(o[(i * c.hq + h) * c.d + e], v[(i * c.hkv + h / (c.hq / c.hkv)) * c.d + e]) << "token " << i;
  }
}

TEST(GpuKernelsB, AttentionLongDocumentFinishesQuickly) {
  HYD_REQUIRE_GPU();
  // One 4096-token document, Hq 16 / Hkv 4, d 128: forward + backward must take well under seconds.
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0));
  const int64_t n = 4096, hq = 16, hkv = 4, d = 128;
  const Tensor tq = buf.upload(randn(n * hq * d), {n, hq, d}, DType::bf16),
               tk = buf.upload(randn(n * hkv * d), {n, hkv, d}, DType::bf16),
               tv = buf.upload(randn(n * hkv * d), {n, hkv, d}, DType::bf16),
               tdo = buf.upload(randn(n * hq * d), {n, hq, d}, DType::bf16),
               tcu = buf.upload_i32({0, static_cast<int32_t>(n)}, {2});
  const Tensor to = buf.poisoned({n, hq, d}, DType::bf16), tlse = buf.poisoned({n, hq}, DType::f32),
               tdq = buf.poisoned({n, hq, d}, DType::bf16), tdk = buf.poisoned({n, hkv, d}, DType::bf16),
               tdv = buf.poisoned({n, hkv, d}, DType::bf16);
  const float scale = 1.f / std::sqrt(float(d));
  attention_forward(ctx, tq, tk, tv, tcu, n, to, tlse, scale);  // warm-up
  ctx.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  attention_forward(ctx, tq, tk, tv, tcu, n, to, tlse, scale);
  attention_backward(ctx, tdo, tq, tk, tv, to, tlse, tcu, n, tdq, tdk, tdv, scale);
  ctx.synchronize();
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("attention T=4096 Hq=16 Hkv=4 d=128 fwd+bwd: %.1f ms\n", ms);
  EXPECT_LT(ms, 2000.0);
  for (const Tensor* t : {&to, &tlse, &tdq, &tdk, &tdv}) EXPECT_TRUE(all_finite(DeviceBuffers::download(*t)));
}

// ---------------------------------------------------------------- cross-entropy

TEST(GpuKernelsB, CrossEntropyLossAndGradient) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  for (int64_t vocab : {1000, 32000, 1003}) {  // 1003: the scalar (unaligned rows) path
    SCOPED_TRACE("vocab=" + std::to_string(vocab));
    DeviceBuffers buf(Device::cuda(0), size_t(64) << 20);
    const int64_t n = 37;
    const float grad_scale = 1.f / 30.f;
    const std::vector<float> logits = round_bf16(randn(n * vocab, 3.f));
    std::vector<int32_t> targets = randint(n, 0, static_cast<int32_t>(vocab));
    targets[0] = -100;
    targets[5] = -1;
    targets[n - 1] = static_cast<int32_t>(vocab - 1);
    std::vector<float> grad_ref = logits, loss_ref(n);
    cpu::cross_entropy<float>(grad_ref.data(), targets.data(), loss_ref.data(), n, vocab, true, grad_scale);

    // Loss only: logits untouched.
    const Tensor tl = buf.upload(logits, {n, vocab}, DType::bf16), tt = buf.upload_i32(targets, {n});
    const Tensor tloss = buf.poisoned({n}, DType::f32);
    cross_entropy(ctx, tl, tt, tloss, false, grad_scale);
    ctx.synchronize();
    expect_close(DeviceBuffers::download(tloss), loss_ref, 1e-4, "losses (no grad)");
    EXPECT_EQ(DeviceBuffers::download(tl), logits);

    // Loss and in-place gradient.
    const Tensor tloss2 = buf.poisoned({n}, DType::f32);
    cross_entropy(ctx, tl, tt, tloss2, true, grad_scale);
    ctx.synchronize();
    const std::vector<float> loss = DeviceBuffers::download(tloss2), grad = DeviceBuffers::download(tl);
    expect_close(loss, loss_ref, 1e-4, "losses");
    expect_close(grad, grad_ref, kBf16Tol, "dlogits");
    EXPECT_EQ(loss[0], 0.f);
    EXPECT_EQ(loss[5], 0.f);
    for (int64_t v = 0; v < vocab; ++v) {
      ASSERT_EQ(grad[v], 0.f);
      ASSERT_EQ(grad[5 * vocab + v], 0.f);
    }
  }
}

TEST(GpuKernelsB, CrossEntropyTargetOutsideVocabGivesNaNLoss) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0), size_t(16) << 20);
  const int64_t n = 3, vocab = 100;
  const Tensor tl = buf.upload(round_bf16(randn(n * vocab)), {n, vocab}, DType::bf16);
  const Tensor tt = buf.upload_i32({1, 100, 2}, {n}), tloss = buf.poisoned({n}, DType::f32);
  cross_entropy(ctx, tl, tt, tloss, true, 1.f);
  ctx.synchronize();
  const std::vector<float> loss = DeviceBuffers::download(tloss);
  EXPECT_TRUE(std::isfinite(loss[0]) && std::isfinite(loss[2]));
  EXPECT_TRUE(std::isnan(loss[1]));
}

// ---------------------------------------------------------------- AdamW, sum of squares

TEST(GpuKernelsB, AdamWMatchesCpu) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0));
  const int64_t n = 100003;
  std::vector<float> p = randn(n), m = randn(n, 0.01f), v = randn(n, 1e-3f);
  for (float& x : v) x = std::abs(x);
  const Tensor tp = buf.upload(p, {n}, DType::f32), tm = buf.upload(m, {n}, DType::f32),
               tv = buf.upload(v, {n}, DType::f32), tw = buf.poisoned({n}, DType::bf16);
  AdamWStep s;
  s.lr = 3e-3f;
  s.weight_decay = 0.1f;
  s.grad_scale = 0.6f;
  for (int64_t step = 1; step <= 3; ++step) {
    s.step = step;
    const std::vector<float> g = randn(n);
    cpu::adamw_update<float>(p.data(), g.data(), m.data(), v.data(), n, s);
    const Tensor tg = buf.upload(g, {n}, DType::f32);
    adamw_update(ctx, tp, tg, tm, tv, step == 2 ? Tensor{} : tw, s);
  }
  ctx.synchronize();
  const std::vector<float> gp = DeviceBuffers::download(tp);
  expect_close(gp, p, 1e-5, "adamw master");
  expect_close(DeviceBuffers::download(tm), m, 1e-5, "adamw m");
  expect_close(DeviceBuffers::download(tv), v, 1e-5, "adamw v");
  EXPECT_EQ(DeviceBuffers::download(tw), round_bf16(gp));  // working copy = bf16(master), bit for bit
}

// AdamWGroup (one launch over a device table) against one adamw_update per tensor on copies of the same state:
// bit for bit, over three steps, for tensors of 1, 3, 4096, 4097 and 10003 elements, one of them misaligned (the
// scalar path), with and without a working copy and with two weight decays. Then against the CPU reference.
TEST(GpuKernelsB, AdamWGroupEqualsPerTensorUpdates) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0));
  struct Spec {
    int64_t n;
    bool misaligned, working;
    float wd;
  };
  const std::vector<Spec> specs = {{1, false, true, 0.1f},    {3, false, false, 0.f},    {4096, false, true, 0.f},
                                   {4097, false, true, 0.1f}, {10003, true, true, 0.1f}, {4099, true, false, 0.f}};
  struct State {
    Tensor p, m, v, w;
  };
  // A tensor of n elements starting 1 element into its buffer when misaligned.
  auto place = [&](const std::vector<float>& host, bool misaligned, DType dt) {
    std::vector<float> padded = host;
    if (misaligned) padded.insert(padded.begin(), 0.f);
    const Tensor t = buf.upload(padded, {static_cast<int64_t>(padded.size())}, dt);
    return misaligned ? t.slice0(1, static_cast<int64_t>(padded.size())) : t;
  };
  std::vector<State> a, b;
  std::vector<Tensor> grads;
  std::vector<std::vector<float>> cpu_p, cpu_m, cpu_v;
  std::vector<kernels::AdamWGroup::Item> items;
  for (const Spec& sp : specs) {
    const std::vector<float> p = randn(sp.n), m = randn(sp.n, 0.1f), v = randn(sp.n, 0.1f);
    std::vector<float> v_abs(v.size());
    for (size_t i = 0; i < v.size(); ++i) v_abs[i] = std::abs(v[i]);
    for (std::vector<State>* st : {&a, &b})
      st->push_back({place(p, sp.misaligned, DType::f32), place(m, sp.misaligned, DType::f32),
                     place(v_abs, sp.misaligned, DType::f32),
                     sp.working ? place(std::vector<float>(sp.n, 0.f), sp.misaligned, DType::bf16) : Tensor{}});
    grads.push_back(place(std::vector<float>(sp.n, 0.f), sp.misaligned, DType::f32));
    cpu_p.push_back(p);
    cpu_m.push_back(m);
    cpu_v.push_back(v_abs);
    items.push_back({b.back().p, grads.back(), b.back().m, b.back().v, b.back().w, sp.wd});
  }
  const kernels::AdamWGroup group(Device::cuda(0), items);
  AdamWStep s;
  s.lr = 3e-3f;
  s.grad_scale = 0.6f;
  for (int64_t step = 1; step <= 3; ++step) {
    s.step = step;
    for (size_t i = 0; i < specs.size(); ++i) {
      const std::vector<float> g = randn(specs[i].n);
      copy_tensor(grads[i], buf.upload(g, {specs[i].n}, DType::f32));
      AdamWStep one = s;
      one.weight_decay = specs[i].wd;
      cpu::adamw_update<float>(cpu_p[i].data(), g.data(), cpu_m[i].data(), cpu_v[i].data(), specs[i].n, one);
      adamw_update(ctx, a[i].p, grads[i], a[i].m, a[i].v, a[i].w, one);
    }
    s.weight_decay = 123.f;  // not used by the group
    group.update(ctx, s);
    ctx.synchronize();
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    SCOPED_TRACE("n=" + std::to_string(specs[i].n) + (specs[i].misaligned ? " misaligned" : ""));
    const std::vector<float> pa = DeviceBuffers::download(a[i].p), pb = DeviceBuffers::download(b[i].p);
    EXPECT_EQ(pa, pb);
    EXPECT_EQ(DeviceBuffers::download(a[i].m), DeviceBuffers::download(b[i].m));
    EXPECT_EQ(DeviceBuffers::download(a[i].v), DeviceBuffers::download(b[i].v));
    if (specs[i].working) {
      EXPECT_EQ(DeviceBuffers::download(a[i].w), DeviceBuffers::download(b[i].w));
      EXPECT_EQ(DeviceBuffers::download(b[i].w), round_bf16(pb));
    }
    expect_close(pb, cpu_p[i], 1e-5, "group master vs cpu");
    expect_close(DeviceBuffers::download(b[i].m), cpu_m[i], 1e-5, "group m vs cpu");
    expect_close(DeviceBuffers::download(b[i].v), cpu_v[i], 1e-5, "group v vs cpu");
  }
}

TEST(GpuKernelsB, SumSquaresMatchesCpu) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0));
  const std::vector<float> a = randn((1 << 22) + 17), b = randn(1001, 5.f);
  float ref = 1.5f;
  cpu::sum_squares_accumulate<float>(a.data(), int64_t(a.size()), &ref);
  cpu::sum_squares_accumulate<float>(b.data(), int64_t(b.size()), &ref);
  const Tensor out = buf.upload({1.5f}, {1}, DType::f32);
  sum_squares_accumulate(ctx, buf.upload(a, {int64_t(a.size())}, DType::f32), out);
  sum_squares_accumulate(ctx, buf.upload(b, {int64_t(b.size())}, DType::f32), out);
  ctx.synchronize();
  expect_close(DeviceBuffers::download(out), {ref}, 1e-5, "sum of squares");
}

}  // namespace
}  // namespace hyd::kernels

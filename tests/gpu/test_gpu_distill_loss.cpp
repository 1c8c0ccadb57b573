// CUDA fused distillation loss against the CPU f32 reference on the same bf16-rounded inputs, for
// vocabularies of 1000, 12000, 32000, 32768 (the row-in-registers kernel: 1, 3, 8 and 8 full packs of 8 per thread;
// the last three in its split version, part of the row in shared memory), 1001 (odd: the scalar-load path) and 151936
// (the 8-wide kernel that re-reads its row), with masked tokens,
// ignored labels and tau 1 and 2. Outputs are poisoned before every run. Tolerances: kl, ce (f32)
// rel_err < 1e-3; dlogits (bf16) < 1e-2; top1 exact (argmax of the same bf16 values, first index
// on ties). Also: student == teacher gives zero KL and dlogits; +-1e4 logits stay finite; the split version equals
// the all-register one (HYD_DISTILL_SPLIT=0) bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/distill_loss.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::all_finite;
using test::DeviceBuffers;
using test::randint;
using test::randn;
using test::rel_err;
using test::round_bf16;

constexpr double kBf16Tol = 1e-2, kStatTol = 1e-3;

void expect_close(const std::vector<float>& out, const std::vector<float>& ref, double tol, const std::string& what) {
  const double e = rel_err(out, ref);
  std::printf("  %-60s rel_err %.3g (tol %.0e)\n", what.c_str(), e, tol);
  EXPECT_LT(e, tol) << what << ": rel_err " << e;
  EXPECT_TRUE(all_finite(out)) << what << " holds NaN/Inf";
}

// DeviceBuffers converts through f32; u8 tensors go byte for byte.
Tensor upload_u8(DeviceBuffers& buf, const std::vector<uint8_t>& host) {
  const int64_t n = static_cast<int64_t>(host.size());
  Tensor t = buf.arena().alloc({n}, DType::u8);
  HostTensor h({n}, DType::u8);
  std::memcpy(h.t.data, host.data(), host.size());
  copy_tensor(t, h.t);
  return t;
}
std::vector<uint8_t> download_u8(const Tensor& t) {
  HostTensor h({t.numel()}, DType::u8);
  copy_tensor(h.t, t);
  const uint8_t* p = h.ptr<uint8_t>();
  return std::vector<uint8_t>(p, p + t.numel());
}

struct GpuOutputs {
  std::vector<float> kl, ce, grad;
  std::vector<uint8_t> top1;
};

// Runs the op on bf16 copies of (s, t) with poisoned outputs and downloads everything.
GpuOutputs run_gpu(const ExecContext& ctx, DeviceBuffers& buf, const std::vector<float>& s, const std::vector<float>& t,
                   const std::vector<int32_t>& labels, const std::vector<uint8_t>& mask, int64_t n, int64_t vocab,
                   const DistillLossOptions& opt) {
  const Tensor ts = buf.upload(s, {n, vocab}, DType::bf16), tt = buf.upload(t, {n, vocab}, DType::bf16);
  const Tensor tl = labels.empty() ? Tensor{} : buf.upload_i32(labels, {n});
  const Tensor tm = mask.empty() ? Tensor{} : upload_u8(buf, mask);
  const Tensor tkl = buf.poisoned({n}, DType::f32), tce = buf.poisoned({n}, DType::f32),
               ttop = buf.poisoned({n}, DType::u8);
  test::device_sync();
  distill_loss(ctx, ts, tt, tl, tm, tkl, tce, ttop, opt);
  ctx.synchronize();
  GpuOutputs o{DeviceBuffers::download(tkl), DeviceBuffers::download(tce), DeviceBuffers::download(ts),
               download_u8(ttop)};
  EXPECT_EQ(DeviceBuffers::download(tt), t) << "teacher logits were written";
  return o;
}

TEST(GpuDistillLoss, MatchesCpuReference) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  struct Case {
    int64_t vocab, n;
  };
  for (Case c : {Case{1000, 37}, Case{1001, 19}, Case{12000, 17}, Case{32000, 23}, Case{32768, 11}, Case{151936, 9}}) {
    for (float tau : {1.f, 2.f}) {
      const std::string tag = "V=" + std::to_string(c.vocab) + " tau=" + std::to_string(static_cast<int>(tau));
      SCOPED_TRACE(tag);
      DeviceBuffers buf(Device::cuda(0), size_t(64) << 20);
      const int64_t n = c.n, vocab = c.vocab;
      // Teacher and student: independent rows, and rows where the student is close to the teacher.
      const std::vector<float> t = round_bf16(randn(n * vocab, 3.f));
      std::vector<float> s = randn(n * vocab, 3.f);
      for (int64_t i = 0; i < n; i += 2)
        for (int64_t v = 0; v < vocab; ++v) s[i * vocab + v] = t[i * vocab + v] + 0.1f * s[i * vocab + v];
      s = round_bf16(s);
      std::vector<int32_t> labels = randint(n, 0, static_cast<int32_t>(vocab));
      labels[1] = -100;
      labels[n - 1] = static_cast<int32_t>(vocab - 1);
      std::vector<uint8_t> mask(n, 1);
      mask[2] = 0;
      mask[n - 2] = 0;
      DistillLossOptions opt;
      opt.temperature = tau;
      opt.w_kl = 0.7f;
      opt.w_ce = 0.3f;
      opt.grad_scale = 1.f / 30;

      std::vector<float> grad_ref = s, kl_ref(n), ce_ref(n);
      std::vector<uint8_t> top1_ref(n);
      DistillLossOptions ref_opt = opt;
      ref_opt.write_grad = true;
      cpu::distill_loss<float>(grad_ref.data(), t.data(), labels.data(), mask.data(), kl_ref.data(), ce_ref.data(),
                               top1_ref.data(), n, vocab, ref_opt);

      // Losses only: the student is left alone.
      const GpuOutputs a = run_gpu(ctx, buf, s, t, labels, mask, n, vocab, opt);
      expect_close(a.kl, kl_ref, kStatTol, tag + " kl (no grad)");
      expect_close(a.ce, ce_ref, kStatTol, tag + " ce (no grad)");
      EXPECT_EQ(a.top1, top1_ref);
      EXPECT_EQ(a.grad, s) << "write_grad = false changed the student logits";

      // Losses and the in-place gradient.
      opt.write_grad = true;
      const GpuOutputs b = run_gpu(ctx, buf, s, t, labels, mask, n, vocab, opt);
      expect_close(b.kl, kl_ref, kStatTol, tag + " kl");
      expect_close(b.ce, ce_ref, kStatTol, tag + " ce");
      expect_close(b.grad, grad_ref, kBf16Tol, tag + " dlogits");
      EXPECT_EQ(b.top1, top1_ref);
      for (int64_t i : {int64_t(2), n - 2}) {  // masked tokens: nothing at all
        EXPECT_EQ(b.kl[i], 0.f);
        EXPECT_EQ(b.ce[i], 0.f);
        EXPECT_EQ(b.top1[i], 0);
        for (int64_t v = 0; v < vocab; ++v) ASSERT_EQ(b.grad[i * vocab + v], 0.f) << "row " << i << " v " << v;
      }
      EXPECT_EQ(b.ce[1], 0.f);  // ignored label
      EXPECT_GT(b.kl[1], 0.f);
      // Per row, the near-equal rows (small KL) on their own scale.
      for (int64_t i = 0; i < n; i += 2) {
        if (mask[i] == 0) continue;
        EXPECT_NEAR(b.kl[i], kl_ref[i], kStatTol * kl_ref[i] + 1e-6) << "row " << i;
      }
    }
  }
}

TEST(GpuDistillLoss, StudentEqualToTeacherGivesZeros) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0), size_t(64) << 20);
  const int64_t n = 7, vocab = 32000;
  const std::vector<float> t = round_bf16(randn(n * vocab, 3.f));
  for (float tau : {1.f, 2.f}) {
    DistillLossOptions opt;
    opt.temperature = tau;
    opt.w_ce = 0;
    opt.write_grad = true;
    const GpuOutputs o = run_gpu(ctx, buf, t, t, randint(n, 0, static_cast<int32_t>(vocab)), {}, n, vocab, opt);
    // Both rows go through the same f32 arithmetic, so the zeros should be exact; the bound only
    // leaves room for a different FMA contraction of the two statistics (one ulp of a probability).
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_LE(std::abs(o.kl[i]), 1e-6f) << "row " << i;
      EXPECT_TRUE(std::isfinite(o.ce[i]) && o.ce[i] > 0.f);
      EXPECT_EQ(o.top1[i], 1);
    }
    for (float g : o.grad) ASSERT_LE(std::abs(g), 1e-7f);
    buf.arena().reset();
  }
}

TEST(GpuDistillLoss, ExtremeLogitsStayFinite) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0), size_t(64) << 20);
  const int64_t n = 6, vocab = 4096;
  std::vector<float> s = randn(n * vocab), t = randn(n * vocab, 30.f);
  for (int64_t k = 0; k < n * vocab; ++k) {
    if (k % 7 == 0) s[k] = s[k] > 0 ? 1e4f : -1e4f;
    if (k % 5 == 0) t[k] = t[k] > 0 ? 1e4f : -1e4f;
  }
  s = round_bf16(s);
  t = round_bf16(t);
  const std::vector<int32_t> labels = randint(n, 0, static_cast<int32_t>(vocab));
  DistillLossOptions opt;
  opt.temperature = 2;
  opt.w_kl = 0.5f;
  opt.w_ce = 0.5f;
  opt.write_grad = true;
  std::vector<float> grad_ref = s, kl_ref(n), ce_ref(n);
  cpu::distill_loss<float>(grad_ref.data(), t.data(), labels.data(), nullptr, kl_ref.data(), ce_ref.data(), nullptr, n,
                           vocab, opt);
  const GpuOutputs o = run_gpu(ctx, buf, s, t, labels, {}, n, vocab, opt);
  expect_close(o.kl, kl_ref, kStatTol, "kl, logits +-1e4");
  expect_close(o.ce, ce_ref, kStatTol, "ce, logits +-1e4");
  expect_close(o.grad, grad_ref, kBf16Tol, "dlogits, logits +-1e4");
}

// The split version (packs 2.. of each thread in shared memory, two blocks per SM) against the all-register kernel
// (HYD_DISTILL_SPLIT=0): the same packs summed in the same order, so every output is bit-identical. 600 rows keep
// several blocks per SM in flight; with and without top1, labels and the gradient.
TEST(GpuDistillLoss, SplitKernelEqualsRegisterKernel) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  const test::ScopedEnv split("HYD_DISTILL_SPLIT");  // put back at the end
  for (int64_t vocab : {int64_t(12000), int64_t(32000), int64_t(32768)}) {
    const int64_t n = 600;  // 7 bf16 copies of [n, vocab] per setting below
    DeviceBuffers buf(Device::cuda(0), static_cast<size_t>(n * vocab) * 16 + (size_t(16) << 20));
    const std::vector<float> t = round_bf16(randn(n * vocab, 3.f));
    std::vector<float> s = randn(n * vocab, 3.f);
    for (int64_t i = 0; i < n; i += 3)  // near-equal rows: the small-d branch of the KL terms
      for (int64_t v = 0; v < vocab; ++v) s[i * vocab + v] = t[i * vocab + v] + 0.05f * s[i * vocab + v];
    s = round_bf16(s);
    std::vector<int32_t> labels = randint(n, 0, static_cast<int32_t>(vocab));
    labels[5] = -100;
    std::vector<uint8_t> mask(n, 1);
    mask[7] = 0;
    for (float tau : {1.f, 2.f}) {
      const std::string tag = "V=" + std::to_string(vocab) + " tau=" + std::to_string(static_cast<int>(tau));
      SCOPED_TRACE(tag);
      DistillLossOptions opt;
      opt.temperature = tau;
      opt.w_kl = 0.6f;
      opt.w_ce = 0.4f;
      opt.grad_scale = 1.f / 512;
      opt.write_grad = true;
      split.set("0");
      const GpuOutputs ref = run_gpu(ctx, buf, s, t, labels, mask, n, vocab, opt);
      split.set("1");
      const GpuOutputs out = run_gpu(ctx, buf, s, t, labels, mask, n, vocab, opt);
      EXPECT_EQ(out.kl, ref.kl);
      EXPECT_EQ(out.ce, ref.ce);
      EXPECT_EQ(out.top1, ref.top1);
      EXPECT_EQ(out.grad, ref.grad);
      EXPECT_TRUE(all_finite(out.grad) && all_finite(out.kl));
      // Without top1 (the other instance) and without labels.
      const Tensor tt = buf.upload(t, {n, vocab}, DType::bf16);
      std::vector<std::vector<float>> outs;  // per mode: kl, then the gradient
      for (const char* mode : {"0", "1"}) {
        split.set(mode);
        const Tensor sc = buf.upload(s, {n, vocab}, DType::bf16);
        const Tensor tkl = buf.poisoned({n}, DType::f32), tce = buf.poisoned({n}, DType::f32);
        test::device_sync();
        distill_loss(ctx, sc, tt, Tensor{}, Tensor{}, tkl, tce, Tensor{}, opt);
        ctx.synchronize();
        outs.push_back(DeviceBuffers::download(tkl));
        outs.push_back(DeviceBuffers::download(sc));
      }
      EXPECT_EQ(outs[2], outs[0]) << "kl without top1 / labels";
      EXPECT_EQ(outs[3], outs[1]) << "dlogits without top1 / labels";
      buf.arena().reset();
    }
  }
}

}  // namespace
}  // namespace hyd::kernels

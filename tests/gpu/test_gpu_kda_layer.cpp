// The KDA layer on CUDA (bf16 activations and weights; f32 A_log, dt_bias, gates, statistics and
// gradients) against the CPU f32 layer with identical weights: FLA's initialisation (std 0.02) with a
// random g_proj.1 bias and o_norm weight, every bf16 weight rounded to bf16 on both sides, the same
// bf16-rounded input and output gradient, documents of 1, 63, 64, 65 and 200 tokens packed (chunk
// boundaries on both sides of 64), grouped value heads and dk = dv = 64, then ungrouped heads (one value head per key
// head) at dk = dv = 128. Saved activations and outputs are poisoned (NaN) before every run.
//
// Tolerances. A bf16 rounding costs ~1.65e-3 relative (rms), and the layer stores ~4 of them in series before the
// output (projection, conv, l2 norm, KDA output, gated norm); emulating exactly those storage roundings on the CPU f32
// path (the KDA core itself exact) gave out 5.5e-3, dx and every weight gradient 5-6e-3, and dA_log up to 1.2e-2 (4
// values, each a sum over N dk terms with cancellation). The CUDA chunked KDA kernels add their own bf16 operand
// rounding, so: out < 1.5e-2, dx and gradients < 2.5e-2, dA_log < 5e-2. The decay-gate parameters (f_proj.*, dt_bias,
// A_log) get their gradient only through the log-decay gradient dg, which the tensor-core KDA core
// (kernels/cuda/kda_mma.cu) computes from bf16 operands (1e-3 to 3.5e-3 relative in gpu.test_gpu_kda, against ~3e-4
// for the fp32 version 1); dt_bias and A_log sum it over every token (cancellation): f_proj.* < 5e-2, dt_bias and
// A_log < 1e-1. A_log has one value per value head, and its relative error is a norm over them: with 2 and 4 value
// heads (this test until stop 20) a norm near zero came now and then, and A_log's error was heavy-tailed (one H100, 30
// runs of fresh inputs: median 3e-2, 2 runs over 1e-1, worst 2.5e-1, deterministic on replay), so both cases now have
// 8 value heads, and A_log's error is taken against a lower bound of its terms' scale (compare_layers). The errors are
// printed.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kernels/elementwise.h"
#include "kernels/kda.h"
#include "tests/common/test_util.h"
#include "trainer/layer_kda.h"

namespace hyd {
namespace {

using test::device_sync;
using test::DeviceBuffers;
using test::rel_err;

constexpr double kOutTol = 1.5e-2;
constexpr double kGradTol = 2.5e-2;
constexpr double kGateGradTol = 5e-2;         // f_proj.* (see above)
constexpr double kSummedGateGradTol = 1e-1;   // A_log, dt_bias

std::vector<double> to_double_bf16(const std::vector<float>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = bf16_to_float(float_to_bf16(v[i]));
  return r;
}

struct LayerResult {
  std::vector<double> out, dx;
  std::vector<std::vector<double>> grads;  // in params() order
};

// CPU f32 reference.
LayerResult run_cpu(KdaLayerWeights& w, std::vector<int32_t> cu, const std::vector<double>& x_in,
                    const std::vector<double>& dout_in) {
  const ExecContext ctx(Device::cpu());
  const int64_t n = cu.back(), d = w.layer().cfg.hidden;
  Arena act("act", Device::cpu(), size_t(256) << 20), scratch("scratch", Device::cpu(), size_t(256) << 20);
  PackedSequence seq;
  seq.num_tokens = n;
  seq.num_docs = static_cast<int64_t>(cu.size()) - 1;
  seq.cu_seqlens = Tensor(cu.data(), DType::i32, Device::cpu(), {seq.num_docs + 1});
  std::vector<float> x(x_in.begin(), x_in.end()), dout(dout_in.begin(), dout_in.end());
  std::vector<float> out(n * d, std::nanf("")), dx(n * d, std::nanf(""));
  const Tensor tx(x.data(), DType::f32, Device::cpu(), {n, d}), tout(out.data(), DType::f32, Device::cpu(), {n, d});
  const Tensor tdout(dout.data(), DType::f32, Device::cpu(), {n, d}), tdx(dx.data(), DType::f32, Device::cpu(), {n, d});
  KdaLayer::Saved saved = w.layer().alloc_saved(act, n, DType::f32);
  w.zero_grad();
  w.layer().forward(ctx, seq, tx, tout, saved, scratch);
  scratch.reset();
  w.layer().backward(ctx, seq, saved, tdout, tdx, scratch);
  LayerResult r{std::vector<double>(out.begin(), out.end()), std::vector<double>(dx.begin(), dx.end()), {}};
  for (const auto& p : w.params()) r.grads.push_back(w.get_grad(p.name));
  return r;
}

LayerResult run_cuda(KdaLayerWeights& w, const std::vector<int32_t>& cu, const std::vector<double>& x_in,
                     const std::vector<double>& dout_in) {
  const ExecContext ctx(Device::cuda(0));
  const int64_t n = cu.back(), d = w.layer().cfg.hidden;
  DeviceBuffers buf(Device::cuda(0), size_t(64) << 20);
  Arena act("act", Device::cuda(0), size_t(256) << 20), scratch("scratch", Device::cuda(0), size_t(256) << 20);
  PackedSequence seq;
  seq.num_tokens = n;
  seq.num_docs = static_cast<int64_t>(cu.size()) - 1;
  seq.cu_seqlens = buf.upload_i32(cu, {seq.num_docs + 1});
  const Tensor x = buf.upload(std::vector<float>(x_in.begin(), x_in.end()), {n, d}, DType::bf16);
  const Tensor dout = buf.upload(std::vector<float>(dout_in.begin(), dout_in.end()), {n, d}, DType::bf16);
  const Tensor out = buf.poisoned({n, d}, DType::bf16), dx = buf.poisoned({n, d}, DType::bf16);
  KdaLayer::Saved saved = w.layer().alloc_saved(act, n, DType::bf16);
  for (const Tensor* t :
       {&saved.q_lin, &saved.k_lin, &saved.v_lin, &saved.q, &saved.k, &saved.v, &saved.q_rstd, &saved.k_rstd,
        &saved.fg_lowT, &saved.g, &saved.beta, &saved.gate, &saved.o, &saved.o_rstd, &saved.on})
    kernels::fill(ctx, *t, std::numeric_limits<float>::quiet_NaN());
  saved.keep_core = KdaLayer::keep_core_from_env();  // the default; HYD_KDA_SAVE=0: the ctest variant .kda_recompute
  w.zero_grad();
  device_sync();
  w.layer().forward(ctx, seq, x, out, saved, scratch);
  if (saved.keep_core && kernels::kda_split_forward_supported(saved.k, saved.v)) {
    EXPECT_FALSE(saved.core.empty()) << "keep_core: the core kept its forward work";
  } else {
    EXPECT_TRUE(saved.core.empty());
  }
  scratch.reset();
  w.layer().backward(ctx, seq, saved, dout, dx, scratch);
  device_sync();
  LayerResult r;
  for (float v : DeviceBuffers::download(out)) r.out.push_back(v);
  for (float v : DeviceBuffers::download(dx)) r.dx.push_back(v);
  for (const auto& p : w.params()) r.grads.push_back(w.get_grad(p.name));
  return r;
}

void compare_layers(const KdaConfig& cfg) {
  const std::vector<int32_t> cu = {0, 1, 64, 128, 193, 393};  // documents of 1, 63, 64, 65, 200 tokens
  const int64_t n = cu.back();
  KdaLayerWeights wc(cfg, Device::cpu(), DType::f32), wg(cfg, Device::cuda(0), DType::bf16);
  wc.init_random(test::rng()(), 0.02f);
  wc.set_param("g_proj.1.bias", test::randn_f64(cfg.value_dim(), 0.5));
  wc.set_param("o_norm.weight", test::randn_f64(cfg.dv, 0.2, 1.0));
  // Identical weights: bf16 values rounded once, A_log and dt_bias f32 on both.
  for (const auto& p : wc.params()) {
    std::vector<double> v = wc.get_param(p.name);
    if (wg.param(p.name).ref->value.dtype == DType::bf16) {
      for (double& e : v) e = bf16_to_float(float_to_bf16(static_cast<float>(e)));
      wc.set_param(p.name, v);
    }
    wg.set_param(p.name, v);
  }
  const std::vector<double> x = to_double_bf16(test::randn(n * cfg.hidden));
  const std::vector<double> dout = to_double_bf16(test::randn(n * cfg.hidden));

  const LayerResult ref = run_cpu(wc, cu, x, dout);
  const LayerResult got = run_cuda(wg, cu, x, dout);
  const double out_err = rel_err(got.out, ref.out), dx_err = rel_err(got.dx, ref.dx);
  std::printf("  %-18s rel err %.3e\n  %-18s rel err %.3e\n", "out", out_err, "dx", dx_err);
  EXPECT_LT(out_err, kOutTol) << "out";
  EXPECT_LT(dx_err, kGradTol) << "dx";
  const auto& params = wc.params();
  auto index_of = [&](const std::string& name) {
    for (size_t i = 0; i < params.size(); ++i)
      if (params[i].name == name) return i;
    ADD_FAILURE() << "no parameter " << name;
    return size_t{0};
  };
  const size_t i_alog = index_of("A_log"), i_dt = index_of("dt_bias");
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string& name = params[i].name;
    double err = rel_err(got.grads[i], ref.grads[i]);
    std::printf("  %-18s rel err %.3e", name.c_str(), err);
    if (i == i_alog) {
      // dA_log[h] = sum over tokens and channels of dg g: with cancellation its value can be far below its terms,
      // and the rounding errors of the terms add up at the scale of the terms. The error is taken against the larger
      // of |dA_log[h]| and S_h = sum_i |ddt_bias[h, i]| (reference values): ddt_bias sums the same dg against
      // d g / d dt_bias = -a sigmoid(z), and |g| = a softplus(z) >= a sigmoid(z), so S_h is a lower bound of
      // sum |dg g|. (The plain relative error over the heads was heavy-tailed: 2 of 30 H100 runs over 1e-1.)
      const int64_t dk = cfg.dk;
      double num = 0, den = 0;
      for (size_t h = 0; h < ref.grads[i].size(); ++h) {
        double scale = 0;
        for (int64_t c = 0; c < dk; ++c) scale += std::fabs(ref.grads[i_dt][h * dk + c]);
        const double d = got.grads[i][h] - ref.grads[i][h];
        num += d * d;
        den += std::max(ref.grads[i][h] * ref.grads[i][h], scale * scale);
      }
      err = std::sqrt(num / std::max(den, 1e-300));
      std::printf(", against max(|dA_log|, sum |ddt_bias|) %.3e", err);
    }
    std::printf("\n");
    const bool summed = name == "A_log" || name == "dt_bias";
    EXPECT_LT(err, summed ? kSummedGateGradTol : name.starts_with("f_proj") ? kGateGradTol : kGradTol) << name;
  }
}

TEST(GpuKdaLayer, MatchesCpuLayerWithGroupedValueHeads) {
  HYD_REQUIRE_GPU();
  KdaConfig cfg;
  cfg.hidden = 256;
  cfg.heads = 4;
  cfg.v_heads = 8;
  cfg.dk = 64;
  cfg.dv = 64;
  compare_layers(cfg);
}

TEST(GpuKdaLayer, MatchesCpuLayerAtHeadDim128) {
  HYD_REQUIRE_GPU();
  KdaConfig cfg;
  cfg.hidden = 384;
  cfg.heads = 8;
  cfg.v_heads = 8;
  cfg.dk = 128;
  cfg.dv = 128;
  compare_layers(cfg);
}

}  // namespace
}  // namespace hyd

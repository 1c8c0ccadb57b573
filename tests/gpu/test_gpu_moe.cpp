// MoE on CUDA (kernels/moe.h, trainer/layer_moe.h) against the CPU f32 reference, on fresh random inputs
// (HYD_TEST_SEED replays) with every output poisoned first (NaN / 0x7f7f7f7f):
//   routing: given the same f32 logits, scores and combine weights (rel < 1e-5) and expert ids, counts,
//            offsets, order and position identical (softmax / sigmoid, selection bias, norm_topk_prob,
//            route_scale, k = 1 and 8, E = 64, ties, an expert with zero rows, every token to one expert,
//            thousands of pairs so the device sort runs over many chunks);
//   row ops: permute / unpermute (exact), combine and permute backward (= and +=), combine backward,
//            router backward (both score functions, with and without renormalisation and aux term), the
//            aux statistics; D = 96 (vectorised copies) and D = 37;
//   grouped GEMMs, every implementation (cuBLAS grouped, cuBLAS loop, WMMA; kernels/moe.h MoeGemm, chosen
//            explicitly): y = x W_e^T, dx = dy W_e, dW_e += dy^T x over uneven groups incl. empty experts (their
//            dW_e untouched, bit for bit), all rows in one expert, E = 64, odd sizes (the grouped path's loop
//            fallback), host counts that do not match (an error); and the WMMA block programs emulated on the
//            host, the HYD_MOE_GEMM choice and the host-count checks (MoeGemmEmulation: runs without a GPU);
//   the whole MoeLayer forward / backward (out, L_aux, dx, router, expert and shared-expert gradients), once
//            per GEMM implementation, against the CPU layer with the same bf16-representable weights and inputs
//            (the host counts kept for the backward checked too); inputs are redrawn
//            until every token's k-th / (k+1)-th selection margin is far above f32 rounding, so that both
//            devices route identically (asserted);
//   qwen3_moe and dots1 models: HybridModel (all T) and DenseModel on CUDA against the CPU, loss, logits and
//            every gradient, with weights and batch redrawn until every MoE layer's selection scores (router
//            logits; dots1: sigmoid of them plus the selection bias) have a top-k gap well above bf16 noise and
//            the CUDA model's own residual stream picks the same experts (a bf16 router may otherwise swap a
//            near-tied pair of experts). dots1 adds the shared MLP, the routed scaling and the selection bias,
//            which the CUDA models read as an f32 copy of their bf16 parameter.
// Tolerances: bf16 outputs rel_err < 1e-2, f32 outputs < 1e-3 (1e-5 where only the order of f32 sums
// differs); whole layer: out 1e-2, gradients 2e-2 (router 5e-2: a softmax Jacobian with cancellation);
// models: as tests/gpu/test_gpu_model.cpp (loss 1e-2, logits 2e-2, gradients 5e-2).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/moe_gemm.cuh"
#include "kernels/cuda/moe_router.cuh"
#include "kernels/moe.h"
#include "tests/common/test_util.h"
#include "tests/common/tiny_model.h"
#include "trainer/hybrid_model.h"
#include "trainer/layer_moe.h"
#include "trainer/model.h"

namespace hyd {
namespace {

using test::DeviceBuffers;
using test::randn;
using test::rel_err;
using test::round_bf16;

constexpr double kBf16Tol = 1e-2;
constexpr double kF32Tol = 1e-3;

void expect_close(const std::vector<float>& out, const std::vector<float>& ref, double tol, const std::string& what) {
  const double e = rel_err(out, ref);
  std::printf("  %-64s rel_err %.3g (tol %.0e)\n", what.c_str(), e, tol);
  EXPECT_LT(e, tol) << what << ": rel_err " << e;
  EXPECT_TRUE(test::all_finite(out)) << what << " holds NaN/Inf";
}

std::vector<float> host_f32(const Tensor& t) {
  const float* p = t.ptr<float>();
  return std::vector<float>(p, p + t.numel());
}
std::vector<int32_t> host_i32(const Tensor& t) {
  const int32_t* p = t.ptr<int32_t>();
  return std::vector<int32_t>(p, p + t.numel());
}
std::vector<int32_t> download_i32(const Tensor& t) {
  const std::vector<float> v = DeviceBuffers::download(t);  // exact for |values| < 2^24
  return std::vector<int32_t>(v.begin(), v.end());
}

// A CPU tensor over a host vector (the vector must outlive it).
Tensor view(std::vector<float>& v, std::initializer_list<int64_t> dims) { return test::cpu_f32(v, dims); }

MoeRouting poisoned_routing(DeviceBuffers& buf, int64_t n, int64_t k, int64_t e) {
  MoeRouting r;
  r.tokens = n;
  r.top_k = k;
  r.num_experts = e;
  r.expert = buf.poisoned({n, k}, DType::i32);
  r.weight = buf.poisoned({n, k}, DType::f32);
  r.counts = buf.poisoned({e}, DType::i32);
  r.offsets = buf.poisoned({e + 1}, DType::i32);
  r.order = buf.poisoned({n * k}, DType::i32);
  r.position = buf.poisoned({n * k}, DType::i32);
  return r;
}

MoeRouting upload_routing(DeviceBuffers& buf, const MoeRouting& h) {
  MoeRouting r;
  r.tokens = h.tokens;
  r.top_k = h.top_k;
  r.num_experts = h.num_experts;
  const int64_t n = h.tokens, k = h.top_k, e = h.num_experts;
  r.expert = buf.upload_i32(host_i32(h.expert), {n, k});
  r.weight = buf.upload(host_f32(h.weight), {n, k}, DType::f32);
  r.counts = buf.upload_i32(host_i32(h.counts), {e});
  r.offsets = buf.upload_i32(host_i32(h.offsets), {e + 1});
  r.order = buf.upload_i32(host_i32(h.order), {n * k});
  r.position = buf.upload_i32(host_i32(h.position), {n * k});
  return r;
}

// ------------------------------------------------------------------------------------------- routing

struct RouteCase {
  const char* name;
  int64_t n, e, k;
  bool sigmoid, norm;
  float scale;
  bool bias;
  int mode;  // 0 random logits; 1 expert 3 never chosen; 2 every token to expert 5 (k = 1); 3 integer logits (ties)
};

std::vector<float> route_logits(const RouteCase& c) {
  std::vector<float> l = randn(c.n * c.e, 2.0f);
  for (int64_t t = 0; t < c.n; ++t) {
    if (c.mode == 1) l[t * c.e + 3] = -60.f;
    if (c.mode == 2) l[t * c.e + 5] = 60.f;
    if (c.mode == 3)
      for (int64_t e = 0; e < c.e; ++e) l[t * c.e + e] = std::round(std::clamp(l[t * c.e + e], -2.f, 2.f) / 2.f);
  }
  return l;
}

kernels::MoeRouterOptions options(const RouteCase& c) {
  kernels::MoeRouterOptions o;
  o.sigmoid = c.sigmoid;
  o.norm_topk_prob = c.norm;
  o.route_scale = c.scale;
  return o;
}

// CPU routing of `logits` into `arena` (scores in `scores`).
MoeRouting cpu_route(const RouteCase& c, Arena& arena, std::vector<float>& scores, std::vector<float>& bias) {
  const ExecContext cpu(Device::cpu());
  MoeRouting r = MoeRouting::alloc(arena, c.n, c.k, c.e, DType::f32);
  kernels::moe_route(cpu, options(c), view(scores, {c.n, c.e}), c.bias ? view(bias, {c.e}) : Tensor{}, r);
  return r;
}

// min over tokens of sel(k-th) - sel((k+1)-th), sel = scores + bias (inf when k = E).
double selection_gap(const RouteCase& c, const std::vector<float>& scores, const std::vector<float>& bias) {
  double gap = INFINITY;
  if (c.k == c.e) return gap;
  std::vector<double> sel(c.e);
  for (int64_t t = 0; t < c.n; ++t) {
    for (int64_t e = 0; e < c.e; ++e) sel[e] = double(scores[t * c.e + e]) + (c.bias ? double(bias[e]) : 0.0);
    std::sort(sel.begin(), sel.end(), std::greater<double>());
    gap = std::min(gap, sel[c.k - 1] - sel[c.k]);
  }
  return gap;
}

TEST(GpuMoe, RoutingMatchesCpu) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0));
  for (const RouteCase& c : {RouteCase{"softmax E8 k2", 37, 8, 2, false, false, 1.f, false, 0},
                             RouteCase{"softmax norm E64 k8", 100, 64, 8, false, true, 1.f, false, 0},
                             RouteCase{"sigmoid bias scale E16 k1", 50, 16, 1, true, false, 2.5f, true, 0},
                             RouteCase{"expert 3 gets no rows", 40, 8, 2, false, true, 1.f, false, 1},
                             RouteCase{"every token to expert 5, k1", 33, 8, 1, false, false, 1.f, false, 2},
                             RouteCase{"ties go to the lower index", 29, 6, 3, false, false, 1.f, false, 3},
                             RouteCase{"sigmoid bias norm E64 k8, 8000 pairs", 1000, 64, 8, true, true, 2.f, true, 0},
                             RouteCase{"softmax E128 k4, one token", 1, 128, 4, false, true, 1.f, false, 0}}) {
    SCOPED_TRACE(c.name);
    std::printf(" %s\n", c.name);
    // Logits redrawn until every token's k-th / (k+1)-th selection gap is far above the ulps by which the
    // devices' exp may differ (exact ties, mode 3, are the same on both devices and stay).
    std::vector<float> logits, bias, scores;
    Arena host("host", Device::cpu(), size_t(4) << 20);
    MoeRouting ref;
    for (int attempt = 0; attempt < 100; ++attempt) {
      logits = route_logits(c);
      bias = randn(c.e, 0.05f);
      scores = logits;
      host.reset();
      ref = cpu_route(c, host, scores, bias);
      if (c.mode == 3 || selection_gap(c, scores, bias) > 1e-5) break;
      logits.clear();
    }
    ASSERT_FALSE(logits.empty()) << "no draw with clear top-k gaps";

    const Tensor s_d = buf.upload(logits, {c.n, c.e}, DType::f32);
    const Tensor b_d = buf.upload(bias, {c.e}, DType::f32);
    const MoeRouting r = poisoned_routing(buf, c.n, c.k, c.e);
    test::device_sync();
    kernels::moe_route(ctx, options(c), s_d, c.bias ? b_d : Tensor{}, r);
    ctx.synchronize();
    expect_close(DeviceBuffers::download(s_d), scores, 1e-5, "scores");
    expect_close(DeviceBuffers::download(r.weight), host_f32(ref.weight), 1e-5, "combine weights");
    EXPECT_EQ(download_i32(r.expert), host_i32(ref.expert)) << "expert ids";
    EXPECT_EQ(download_i32(r.counts), host_i32(ref.counts)) << "counts";
    EXPECT_EQ(download_i32(r.offsets), host_i32(ref.offsets)) << "offsets";
    EXPECT_EQ(download_i32(r.order), host_i32(ref.order)) << "order";
    EXPECT_EQ(download_i32(r.position), host_i32(ref.position)) << "position";
    EXPECT_EQ(r.counts_host(), ref.counts_host());
    if (c.mode == 1) {
      EXPECT_EQ(ref.counts.ptr<int32_t>()[3], 0);
    }
    if (c.mode == 2) {
      EXPECT_EQ(ref.counts.ptr<int32_t>()[5], c.n);
    }
    buf.arena().reset();
  }
}

// The CUDA router's per-token programs (kernels/cuda/moe_router.cuh) on the host against the CPU reference:
// the same choices (ties included) and weights, and the same logits gradient (runs without a GPU; ctest's
// unit.moe_gemm_emulation runs it on every machine).
TEST(MoeRouterEmulation, TokenProgramsMatchCpuReference) {
  const ExecContext cpu(Device::cpu());
  for (const RouteCase& c : {RouteCase{"softmax E8 k2", 37, 8, 2, false, false, 1.f, false, 0},
                             RouteCase{"softmax norm E64 k8", 100, 64, 8, false, true, 1.f, false, 0},
                             RouteCase{"sigmoid bias scale E16 k1", 50, 16, 1, true, false, 2.5f, true, 0},
                             RouteCase{"every token to expert 5, k1", 33, 8, 1, false, false, 1.f, false, 2},
                             RouteCase{"ties go to the lower index", 29, 6, 3, false, false, 1.f, false, 3},
                             RouteCase{"sigmoid bias norm E64 k8", 200, 64, 8, true, true, 2.f, true, 0},
                             RouteCase{"k = E", 9, 4, 4, false, true, 1.f, false, 0}}) {
    SCOPED_TRACE(c.name);
    std::printf(" %s\n", c.name);
    const int64_t N = c.n, E = c.e, K = c.k;
    const std::vector<float> logits = route_logits(c);
    std::vector<float> bias = randn(E, 0.05f), scores = logits;
    Arena host("host", Device::cpu(), size_t(4) << 20);
    const MoeRouting ref = cpu_route(c, host, scores, bias);
    std::vector<float> st = logits, weight(N * K);
    std::vector<int32_t> expert(N * K);
    for (int64_t t = 0; t < N; ++t)
      kernels::moe_router::route_token(st.data() + t * E, c.bias ? bias.data() : nullptr, static_cast<int>(E),
                                       static_cast<int>(K), c.sigmoid, c.norm, c.scale, expert.data() + t * K,
                                       weight.data() + t * K);
    expect_close(st, scores, 1e-6, "scores");
    expect_close(weight, host_f32(ref.weight), 1e-6, "combine weights");
    EXPECT_EQ(expert, host_i32(ref.expert)) << "expert ids";

    std::vector<float> dweight = randn(N * K), frac(E), dl_ref(N * E), dl(N * E);
    for (float& v : frac) v = static_cast<float>(test::randint(1, 0, 20)[0]) / 20.f;
    for (const double aux_scale : {0.0, 0.37}) {
      kernels::moe_router_backward(cpu, options(c), view(scores, {N, E}), ref, view(dweight, {N, K}), view(frac, {E}),
                                   aux_scale, view(dl_ref, {N, E}));
      for (int64_t t = 0; t < N; ++t)
        kernels::moe_router::router_backward_token(scores.data() + t * E, expert.data() + t * K, dweight.data() + t * K,
                                                   frac.data(), static_cast<float>(aux_scale), dl.data() + t * E,
                                                   static_cast<int>(E), static_cast<int>(K), c.sigmoid, c.norm,
                                                   c.scale);
      expect_close(dl, dl_ref, 1e-6, "d_logits, aux_scale " + std::to_string(aux_scale));
    }
  }
}

// ------------------------------------------------------------------------------------------- row ops

TEST(GpuMoe, RowOpsAndRouterBackwardMatchCpu) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  const ExecContext cpu(Device::cpu());
  DeviceBuffers buf(Device::cuda(0));
  for (const RouteCase& c : {RouteCase{"softmax norm E8 k2, expert 3 empty", 45, 8, 2, false, true, 1.f, false, 1},
                             RouteCase{"sigmoid bias scale E16 k4", 30, 16, 4, true, false, 2.5f, true, 0},
                             RouteCase{"sigmoid norm E64 k8", 70, 64, 8, true, true, 1.f, false, 0}}) {
    for (const int64_t D : {int64_t(96), int64_t(37)}) {
      const std::string tag = std::string(c.name) + ", D=" + std::to_string(D);
      SCOPED_TRACE(tag);
      std::printf(" %s\n", tag.c_str());
      const int64_t N = c.n, K = c.k, E = c.e, NK = N * K;
      std::vector<float> scores = route_logits(c), bias = randn(E, 0.05f);
      Arena host("host", Device::cpu(), size_t(4) << 20);
      const MoeRouting hr = cpu_route(c, host, scores, bias);
      const MoeRouting r = upload_routing(buf, hr);

      // permute / unpermute: copies, exact.
      std::vector<float> x = round_bf16(randn(N * D)), xp_ref(NK * D), pairs_ref(NK * D);
      kernels::moe_permute(cpu, hr, view(x, {N, D}), view(xp_ref, {NK, D}));
      kernels::moe_unpermute(cpu, hr, view(xp_ref, {NK, D}), view(pairs_ref, {NK, D}));
      const Tensor x_d = buf.upload(x, {N, D}, DType::bf16), xp_d = buf.poisoned({NK, D}, DType::bf16),
                   pairs_d = buf.poisoned({NK, D}, DType::bf16);
      test::device_sync();
      kernels::moe_permute(ctx, r, x_d, xp_d);
      kernels::moe_unpermute(ctx, r, xp_d, pairs_d);
      ctx.synchronize();
      expect_close(DeviceBuffers::download(xp_d), xp_ref, 1e-7, "permute");
      expect_close(DeviceBuffers::download(pairs_d), pairs_ref, 1e-7, "unpermute");

      // combine (= and +=) and permute backward.
      std::vector<float> yp = round_bf16(randn(NK * D)), out0 = round_bf16(randn(N * D));
      std::vector<float> comb_ref(N * D), comb_acc_ref = out0, pb_ref(N * D);
      kernels::moe_combine(cpu, hr, view(yp, {NK, D}), view(comb_ref, {N, D}), false);
      kernels::moe_combine(cpu, hr, view(yp, {NK, D}), view(comb_acc_ref, {N, D}), true);
      kernels::moe_permute_backward(cpu, hr, view(yp, {NK, D}), view(pb_ref, {N, D}), false);
      const Tensor yp_d = buf.upload(yp, {NK, D}, DType::bf16), comb_d = buf.poisoned({N, D}, DType::bf16),
                   comb_acc_d = buf.upload(out0, {N, D}, DType::bf16), pb_d = buf.poisoned({N, D}, DType::bf16);
      test::device_sync();
      kernels::moe_combine(ctx, r, yp_d, comb_d, false);
      kernels::moe_combine(ctx, r, yp_d, comb_acc_d, true);
      kernels::moe_permute_backward(ctx, r, yp_d, pb_d, false);
      ctx.synchronize();
      expect_close(DeviceBuffers::download(comb_d), comb_ref, kBf16Tol, "combine");
      expect_close(DeviceBuffers::download(comb_acc_d), comb_acc_ref, kBf16Tol, "combine, accumulated");
      expect_close(DeviceBuffers::download(pb_d), pb_ref, kBf16Tol, "permute backward");

      // combine backward.
      std::vector<float> dout = round_bf16(randn(N * D)), dyp_ref(NK * D), dw_ref(NK);
      kernels::moe_combine_backward(cpu, hr, view(dout, {N, D}), view(yp, {NK, D}), view(dyp_ref, {NK, D}),
                                    view(dw_ref, {N, K}));
      const Tensor dout_d = buf.upload(dout, {N, D}, DType::bf16), dyp_d = buf.poisoned({NK, D}, DType::bf16),
                   dw_d = buf.poisoned({N, K}, DType::f32);
      test::device_sync();
      kernels::moe_combine_backward(ctx, r, dout_d, yp_d, dyp_d, dw_d);
      ctx.synchronize();
      expect_close(DeviceBuffers::download(dyp_d), dyp_ref, kBf16Tol, "combine backward d_yp");
      expect_close(DeviceBuffers::download(dw_d), dw_ref, 1e-5, "combine backward d_weight (f32)");

      // aux statistics and router backward (f32 in and out).
      std::vector<float> frac_ref(E), prob_ref(E);
      kernels::moe_aux_stats(cpu, hr, view(scores, {N, E}), view(frac_ref, {E}), view(prob_ref, {E}));
      const Tensor scores_d = buf.upload(scores, {N, E}, DType::f32), frac_d = buf.poisoned({E}, DType::f32),
                   prob_d = buf.poisoned({E}, DType::f32);
      test::device_sync();
      kernels::moe_aux_stats(ctx, r, scores_d, frac_d, prob_d);
      ctx.synchronize();
      expect_close(DeviceBuffers::download(frac_d), frac_ref, 1e-6, "aux fraction f_e");
      expect_close(DeviceBuffers::download(prob_d), prob_ref, 1e-5, "aux mean score P_e");
      std::vector<float> dweight = randn(NK);
      const Tensor dweight_d = buf.upload(dweight, {N, K}, DType::f32);
      for (const double aux_scale : {0.0, 0.37}) {
        std::vector<float> dl_ref(N * E);
        kernels::moe_router_backward(cpu, options(c), view(scores, {N, E}), hr, view(dweight, {N, K}),
                                     view(frac_ref, {E}), aux_scale, view(dl_ref, {N, E}));
        const Tensor dl_d = buf.poisoned({N, E}, DType::f32);
        test::device_sync();
        kernels::moe_router_backward(ctx, options(c), scores_d, r, dweight_d, frac_d, aux_scale, dl_d);
        ctx.synchronize();
        expect_close(DeviceBuffers::download(dl_d), dl_ref, kF32Tol,
                     "router backward d_logits, aux_scale " + std::to_string(aux_scale));
      }
      buf.arena().reset();
    }
  }
}

// ------------------------------------------------------------------------------------------- grouped GEMMs

struct GroupCase {
  const char* name;
  std::vector<int32_t> counts;
  int64_t n, k;
};

// Every CUDA implementation of the grouped GEMMs (kernels/moe.h MoeGemm), chosen explicitly.
constexpr kernels::MoeGemm kAllGemms[] = {kernels::MoeGemm::grouped, kernels::MoeGemm::loop, kernels::MoeGemm::wmma,
                                          kernels::MoeGemm::automatic};

TEST(GpuMoe, GroupedLinearMatchesCpu) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  const ExecContext cpu(Device::cpu());
  DeviceBuffers buf(Device::cuda(0));
  std::vector<int32_t> many(64);
  for (int32_t& v : many) v = test::randint(1, 0, 4)[0] == 0 ? 0 : test::randint(1, 1, 40)[0];
  // The cuBLAS grouped path needs n and k multiples of 8 (else it takes the loop): the first three cases
  // run it, "odd sizes" checks the fallback.
  for (const kernels::MoeGemm impl : kAllGemms)
    for (const GroupCase& c :
         {GroupCase{"uneven, experts 0 and 4 empty", {0, 1, 65, 130, 0, 7}, 80, 72},
          GroupCase{"every row in expert 2", {0, 0, 150, 0}, 64, 40}, GroupCase{"E=64, random loads", many, 48, 32},
          GroupCase{"odd sizes", {5, 70, 2}, 37, 19}}) {
      const std::string what = std::string(c.name) + ", gemm " + kernels::moe_gemm_name(impl);
      SCOPED_TRACE(what);
      std::printf(" %s\n", what.c_str());
      const int64_t E = static_cast<int64_t>(c.counts.size()), n = c.n, k = c.k;
      std::vector<int32_t> offsets(E + 1, 0);
      for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + c.counts[e];
      const int64_t R = offsets[E];
      std::vector<float> x = round_bf16(randn(R * k)), w = round_bf16(randn(E * n * k, 1.f / std::sqrt(float(k))));
      std::vector<float> dy = round_bf16(randn(R * n)), dw0 = randn(E * n * k);
      std::vector<float> y_ref(R * n), dx_ref(R * k), dw_ref = dw0;
      kernels::cpu::moe_grouped_linear_forward<float>(offsets.data(), x.data(), w.data(), y_ref.data(), E, n, k);
      kernels::cpu::moe_grouped_linear_backward<float>(offsets.data(), dy.data(), x.data(), w.data(), dx_ref.data(),
                                                       dw_ref.data(), E, n, k);
      // The dispatcher's CPU branch is the same reference.
      std::vector<float> y_disp(R * n);
      const kernels::MoeGemmPlan plan{impl, c.counts};
      kernels::moe_grouped_linear_forward(cpu, test::cpu_i32(offsets, {E + 1}), view(x, {R, k}), view(w, {E, n, k}),
                                          view(y_disp, {R, n}), plan);
      EXPECT_EQ(y_disp, y_ref);

      const Tensor off_d = buf.upload_i32(offsets, {E + 1});
      const Tensor x_d = buf.upload(x, {R, k}, DType::bf16), w_d = buf.upload(w, {E, n, k}, DType::bf16),
                   dy_d = buf.upload(dy, {R, n}, DType::bf16);
      const Tensor y_d = buf.poisoned({R, n}, DType::bf16), dx_d = buf.poisoned({R, k}, DType::bf16),
                   dw_d = buf.upload(dw0, {E, n, k}, DType::f32);
      test::device_sync();
      kernels::moe_grouped_linear_forward(ctx, off_d, x_d, w_d, y_d, plan);
      kernels::moe_grouped_linear_backward(ctx, off_d, dy_d, x_d, w_d, dx_d, dw_d, plan);
      ctx.synchronize();
      if (impl == kernels::MoeGemm::grouped) std::printf("  grouped dW path: %s\n", kernels::moe_grouped_dw_path());
      expect_close(DeviceBuffers::download(y_d), y_ref, kBf16Tol, "y = x W_e^T");
      expect_close(DeviceBuffers::download(dx_d), dx_ref, kBf16Tol, "dx = dy W_e");
      const std::vector<float> dw = DeviceBuffers::download(dw_d);
      expect_close(dw, dw_ref, kF32Tol, "dW_e += dy^T x (f32)");
      for (int64_t e = 0; e < E; ++e) {
        if (c.counts[e] != 0) continue;
        EXPECT_TRUE(std::equal(dw.begin() + e * n * k, dw.begin() + (e + 1) * n * k, dw0.begin() + e * n * k))
            << "expert " << e << " has no rows: its dW must stay untouched";
      }
      // dx and dW alone (the other empty), as the layer never calls them but the op allows.
      if (impl != kernels::MoeGemm::wmma) {
        const Tensor dx2 = buf.poisoned({R, k}, DType::bf16), dw2 = buf.upload(dw0, {E, n, k}, DType::f32);
        test::device_sync();
        kernels::moe_grouped_linear_backward(ctx, off_d, dy_d, x_d, w_d, dx2, Tensor{}, plan);
        kernels::moe_grouped_linear_backward(ctx, off_d, dy_d, x_d, w_d, Tensor{}, dw2, plan);
        ctx.synchronize();
        expect_close(DeviceBuffers::download(dx2), dx_ref, kBf16Tol, "dx alone");
        expect_close(DeviceBuffers::download(dw2), dw_ref, kF32Tol, "dW alone");
      }
      // The cuBLAS implementations need host counts that describe these offsets.
      if (impl != kernels::MoeGemm::wmma) {
        test::expect_error_mentioning(
            [&] {
              kernels::moe_grouped_linear_forward(ctx, off_d, x_d, w_d, y_d, kernels::MoeGemmPlan{impl, {}});
            },
            "host counts");
        std::vector<int32_t> wrong = c.counts;
        wrong[0] += 1;
        test::expect_error_mentioning(
            [&] {
              kernels::moe_grouped_linear_backward(ctx, off_d, dy_d, x_d, w_d, dx_d, dw_d, {impl, wrong});
            },
            "sum to");
      }
      buf.arena().reset();
    }
}

// The choice of implementation (HYD_MOE_GEMM) and the checks of a plan's host counts on the CPU, and the
// host-count staging on CPU tensors (no GPU needed; ctest's unit.moe_gemm_emulation runs it everywhere).
TEST(MoeGemmEmulation, ImplementationChoiceAndHostCounts) {
  {
    const test::ScopedEnv gemm("HYD_MOE_GEMM");  // put back at the end of the block
    for (const kernels::MoeGemm g : kAllGemms) {
      gemm.set(kernels::moe_gemm_name(g));
      EXPECT_EQ(kernels::moe_gemm_from_env(), g);
      MoeLayer layer;
      EXPECT_EQ(layer.gemm, g) << "a layer takes HYD_MOE_GEMM when made";
    }
    gemm.set("");
    EXPECT_EQ(kernels::moe_gemm_from_env(), kernels::MoeGemm::automatic);
    gemm.set("cutlass");
    test::expect_error([] { kernels::moe_gemm_from_env(); }, {"HYD_MOE_GEMM", "cutlass", "grouped"});
    ::unsetenv("HYD_MOE_GEMM");
    EXPECT_EQ(kernels::moe_gemm_from_env(), kernels::MoeGemm::automatic);
  }

  // automatic: the per-expert loop only when the mean expert with rows does kMoeLoopMinMacs multiply-adds or
  // more (rows x macs per row); the stop-18 H100 points: D = 2048, 64 experts of F = 1408 and 128 of F = 768.
  using kernels::moe_gemm_uses_grouped;
  const kernels::MoeGemm a = kernels::MoeGemm::automatic;
  const int64_t f1408 = 3 * 2048 * 1408, f768 = 3 * 2048 * 768;
  EXPECT_TRUE(moe_gemm_uses_grouped(a, std::vector<int32_t>(64, 256), f1408));   // grouped measured faster
  EXPECT_FALSE(moe_gemm_uses_grouped(a, std::vector<int32_t>(64, 512), f1408));  // the loop measured faster
  EXPECT_TRUE(moe_gemm_uses_grouped(a, std::vector<int32_t>(128, 512), f768));
  EXPECT_FALSE(moe_gemm_uses_grouped(a, std::vector<int32_t>(128, 1024), f768));
  const int64_t per_row = kernels::kMoeLoopMinMacs / 1024;  // the threshold at exactly 1024 rows
  EXPECT_TRUE(moe_gemm_uses_grouped(a, std::vector<int32_t>{1023, 0, 1023}, per_row));
  EXPECT_FALSE(moe_gemm_uses_grouped(a, std::vector<int32_t>{1024, 0, 1024}, per_row));  // empty experts do not count
  EXPECT_FALSE(moe_gemm_uses_grouped(a, std::vector<int32_t>{0, 0, 0}, per_row));        // nothing to run
  EXPECT_TRUE(moe_gemm_uses_grouped(kernels::MoeGemm::grouped, std::vector<int32_t>{1024, 1024}, per_row));
  EXPECT_FALSE(moe_gemm_uses_grouped(kernels::MoeGemm::loop, std::vector<int32_t>{1, 1}, per_row));
  {
    const test::ScopedEnv macs("HYD_MOE_LOOP_MIN_MACS");  // put back at the end of the block
    macs.set("20");
    EXPECT_EQ(kernels::moe_loop_min_macs(), 20);
    EXPECT_FALSE(moe_gemm_uses_grouped(a, std::vector<int32_t>{2, 3}, 10));  // mean 2.5 x 10 >= 20
    EXPECT_TRUE(moe_gemm_uses_grouped(a, std::vector<int32_t>{1, 2}, 10));   // mean 1.5 x 10 < 20
    macs.set("0");
    test::expect_error([] { kernels::moe_loop_min_macs(); }, {"HYD_MOE_LOOP_MIN_MACS", "positive"});
    macs.set("1e9");
    test::expect_error([] { kernels::moe_loop_min_macs(); }, {"HYD_MOE_LOOP_MIN_MACS", "1e9"});
  }

  const ExecContext cpu(Device::cpu());
  std::vector<int32_t> counts = {2, 0, 3}, offsets = {0, 2, 2, 5};
  std::vector<float> x = randn(5 * 4), w = randn(3 * 6 * 4), y(5 * 6), y_ref(5 * 6);
  const Tensor off = test::cpu_i32(offsets, {4});
  kernels::moe_grouped_linear_forward(cpu, off, view(x, {5, 4}), view(w, {3, 6, 4}), view(y_ref, {5, 6}));
  kernels::moe_grouped_linear_forward(cpu, off, view(x, {5, 4}), view(w, {3, 6, 4}), view(y, {5, 6}),
                                      {kernels::MoeGemm::grouped, counts});
  EXPECT_EQ(y, y_ref);
  std::vector<int32_t> swapped = {0, 2, 3}, short_counts = {2, 3};
  test::expect_error(
      [&] {
        kernels::moe_grouped_linear_forward(cpu, off, view(x, {5, 4}), view(w, {3, 6, 4}), view(y, {5, 6}),
                                            {kernels::MoeGemm::loop, swapped});
      },
      {"expert 0", "offsets"});
  test::expect_error(
      [&] {
        kernels::moe_grouped_linear_forward(cpu, off, view(x, {5, 4}), view(w, {3, 6, 4}), view(y, {5, 6}),
                                            {kernels::MoeGemm::loop, short_counts});
      },
      {"2 entries", "expected 3"});

  kernels::MoeHostCounts staging;
  std::vector<int32_t> got;
  staging.start(cpu, test::cpu_i32(counts, {3}));
  staging.wait(got);
  EXPECT_EQ(got, counts);
  test::expect_error([&] { staging.wait(got); }, {"MoeHostCounts::wait"});
}

// The grouped-GEMM block programs (kernels/cuda/moe_gemm.cuh) run serially on the host over their whole
// grids (the grid sizes of kernels/cuda/moe.cu), shared memory filled with NaN before every block, threads
// of a phase in both orders: checks their indexing without a GPU (the binary runs it directly; ctest's
// unit.moe_gemm_emulation runs it on every machine).
TEST(MoeGemmEmulation, ProgramsOnHostMatchCpuReference) {
  namespace g = kernels::moe_gemm;
  auto to_bf16_vec = [](const std::vector<float>& v) {
    std::vector<bf16> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = float_to_bf16(v[i]);
    return o;
  };
  auto to_f32_vec = [](const std::vector<bf16>& v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = bf16_to_float(v[i]);
    return o;
  };
  const auto sm = std::make_unique<g::GemmSmem>();
  const auto ex = std::make_unique<g::HostExec>();
  using V1 = std::integral_constant<int, 1>;
  using V8 = std::integral_constant<int, 8>;
  for (const GroupCase& c :
       {GroupCase{"uneven, experts 0 and 4 empty", {0, 1, 65, 130, 0, 7}, 80, 72},
        GroupCase{"every row in expert 2", {0, 0, 150, 0}, 64, 40}, GroupCase{"odd sizes", {5, 70, 2}, 37, 19},
        GroupCase{"one row, k < 32", {1}, 3, 5}, GroupCase{"n aligned, k odd", {3, 0, 66}, 48, 21}}) {
    // Packs of 8 where the CUDA launcher would take them (kernels/cuda/moe.cu), else, and always once, 1.
    for (const bool allow_vec : {true, false}) {
      for (const bool reverse : {false, true}) {
        const int64_t E = static_cast<int64_t>(c.counts.size()), n = c.n, k = c.k;
        std::vector<int32_t> offsets(E + 1, 0);
        for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + c.counts[e];
        const int64_t R = offsets[E];
        const std::vector<float> xf = round_bf16(randn(R * k)), wf = round_bf16(randn(E * n * k, 0.3f)),
                                 dyf = round_bf16(randn(R * n)), dw0 = randn(E * n * k);
        std::vector<float> y_ref(R * n), dx_ref(R * k), dw_ref = dw0;
        kernels::cpu::moe_grouped_linear_forward<float>(offsets.data(), xf.data(), wf.data(), y_ref.data(), E, n, k);
        kernels::cpu::moe_grouped_linear_backward<float>(offsets.data(), dyf.data(), xf.data(), wf.data(),
                                                         dx_ref.data(), dw_ref.data(), E, n, k);
        const std::vector<bf16> x = to_bf16_vec(xf), w = to_bf16_vec(wf), dy = to_bf16_vec(dyf);
        std::vector<bf16> y(R * n, bf16{0x7fc0}), dx(R * k, bf16{0x7fc0});
        std::vector<float> dw = dw0;
        const bool v_fwd = allow_vec && g::rows_vec8(x.data(), w.data(), k, n, true);
        const bool v_dx = allow_vec && g::rows_vec8(dy.data(), w.data(), n, k, false);
        const bool v_dw = allow_vec && g::wgrad_vec8(dy.data(), x.data(), n, k);
        const std::string what = std::string(c.name) + ", packs fwd/dx/dw " + (v_fwd ? "8" : "1") + "/" +
                                 (v_dx ? "8" : "1") + "/" + (v_dw ? "8" : "1") +
                                 (reverse ? ", threads last to first" : "");
        SCOPED_TRACE(what);
        std::printf(" %s\n", what.c_str());
        ex->reverse = reverse;
        g::RowTile tile{};
        auto fresh = [&] {
          std::memset(static_cast<void*>(sm.get()), 0xff, sizeof(g::GemmSmem));  // NaN everywhere
          tile = g::RowTile{-2, -2, -2};
        };
        const int64_t row_tiles = (R + g::BM - 1) / g::BM + E;
        auto rows_fwd = [&](auto v) {
          for (int64_t bx = 0; bx < row_tiles; ++bx)
            for (int64_t by = 0; by < (n + g::BN - 1) / g::BN; ++by) {
              fresh();
              g::grouped_rows_program<true, decltype(v)::value>(*ex, bx, by, offsets.data(), static_cast<int>(E),
                                                                x.data(), w.data(), y.data(), k, n, *sm, tile);
            }
        };
        auto rows_dx = [&](auto v) {
          for (int64_t bx = 0; bx < row_tiles; ++bx)
            for (int64_t by = 0; by < (k + g::BN - 1) / g::BN; ++by) {
              fresh();
              g::grouped_rows_program<false, decltype(v)::value>(*ex, bx, by, offsets.data(), static_cast<int>(E),
                                                                 dy.data(), w.data(), dx.data(), n, k, *sm, tile);
            }
        };
        auto wgrad = [&](auto v) {
          for (int64_t e = 0; e < E; ++e)
            for (int64_t by = 0; by < (n + g::BM - 1) / g::BM; ++by)
              for (int64_t bx = 0; bx < (k + g::BN - 1) / g::BN; ++bx) {
                fresh();
                g::grouped_wgrad_program<decltype(v)::value>(*ex, bx, by, e, offsets.data(), dy.data(), x.data(),
                                                             dw.data(), n, k, *sm);
              }
        };
        v_fwd ? rows_fwd(V8{}) : rows_fwd(V1{});
        v_dx ? rows_dx(V8{}) : rows_dx(V1{});
        v_dw ? wgrad(V8{}) : wgrad(V1{});
        expect_close(to_f32_vec(y), y_ref, kBf16Tol, "y = x W_e^T (rows program)");
        expect_close(to_f32_vec(dx), dx_ref, kBf16Tol, "dx = dy W_e (rows program)");
        expect_close(dw, dw_ref, 1e-5, "dW_e += dy^T x (weight-gradient program)");
        for (int64_t e = 0; e < E; ++e) {
          if (c.counts[e] != 0) continue;
          EXPECT_TRUE(std::equal(dw.begin() + e * n * k, dw.begin() + (e + 1) * n * k, dw0.begin() + e * n * k))
              << "expert " << e;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------- the layer

struct LayerCase {
  const char* name;
  MoeConfig cfg;
  int64_t n;
  // Selection-bias entries set by hand (sigmoid scores lie in (0, 1): -1 starves an expert, +2 takes every
  // token when k = 1).
  std::vector<std::pair<int64_t, float>> bias_set = {};
};

MoeConfig layer_config(int64_t D, int64_t E, int64_t K, int64_t F, int64_t S, int64_t Fs, bool sigmoid, bool norm,
                       float scale, bool bias, float aux) {
  MoeConfig c;
  c.hidden = D;
  c.num_experts = E;
  c.top_k = K;
  c.expert_ffn = F;
  c.num_shared_experts = S;
  c.shared_ffn = Fs;
  c.score_func = sigmoid ? "sigmoid" : "softmax";
  c.norm_topk_prob = norm;
  c.route_scale = scale;
  c.use_selection_bias = bias;
  c.aux_loss_coef = aux;
  return c;
}

// min over tokens of sel(k-th) - sel((k+1)-th) for the CPU layer's last forward (inf when k = E).
double selection_margin(const MoeConfig& c, const MoeLayer::Saved& s, const std::vector<float>& bias) {
  const int64_t N = s.scores.size(0), E = c.num_experts, K = c.top_k;
  double margin = INFINITY;
  if (K == E) return margin;
  std::vector<double> sel(E);
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t e = 0; e < E; ++e) sel[e] = s.scores.ptr<float>()[t * E + e] + (c.use_selection_bias ? bias[e] : 0.f);
    std::sort(sel.begin(), sel.end(), std::greater<double>());
    margin = std::min(margin, sel[K - 1] - sel[K]);
  }
  return margin;
}

TEST(GpuMoe, LayerForwardBackwardMatchesCpu) {
  HYD_REQUIRE_GPU();
  for (const LayerCase& lc :
       {LayerCase{"softmax E8 k2 norm", layer_config(64, 8, 2, 24, 0, 0, false, true, 1.f, false, 0.f), 40},
        LayerCase{"sigmoid + bias + 2 shared + aux, E16 k4, scale 2.5",
                  layer_config(64, 16, 4, 32, 2, 48, true, true, 2.5f, true, 0.01f), 50},
        LayerCase{"softmax E64 k8 + aux", layer_config(32, 64, 8, 16, 0, 0, false, false, 1.f, false, 0.02f), 64},
        LayerCase{"softmax E8 k1 + 1 shared", layer_config(48, 8, 1, 24, 1, 24, false, false, 1.f, false, 0.f), 37},
        LayerCase{"sigmoid + bias, experts 0 and 6 get no rows, E8 k2",
                  layer_config(64, 8, 2, 24, 0, 0, true, true, 1.f, true, 0.f),
                  40,
                  {{0, -1.f}, {6, -1.f}}},
        LayerCase{"sigmoid + bias, every token to expert 5, E8 k1 + aux",
                  layer_config(64, 8, 1, 24, 0, 0, true, false, 1.f, true, 0.01f),
                  40,
                  {{5, 2.f}}}}) {
    SCOPED_TRACE(lc.name);
    std::printf(" %s\n", lc.name);
    const MoeConfig& c = lc.cfg;
    const int64_t N = lc.n, D = c.hidden, E = c.num_experts;
    // CPU layer: bf16-representable weights (router N(0, 4 / D): the choice depends on x).
    MoeLayerWeights w(c, Device::cpu(), DType::f32);
    test::randomize_moe_weights(w, [](size_t n, float sd) { return round_bf16(randn(n, sd)); }, lc.bias_set);
    const MoeLayer& L = w.layer();
    std::vector<float> bias_host = c.use_selection_bias ? host_f32(L.selection_bias) : std::vector<float>(E, 0.f);

    // x with a routing margin far above f32 rounding (both devices then choose the same experts).
    ExecContext cctx(Device::cpu());
    Arena cact("act", Device::cpu(), size_t(16) << 20), cscr("scratch", Device::cpu(), size_t(16) << 20);
    std::vector<float> x, out_c(N * D);
    MoeLayer::Saved sc;
    double aux_c = 0;
    for (int attempt = 0; attempt < 200; ++attempt) {
      x = round_bf16(randn(N * D));
      cact.reset();
      sc = L.alloc_saved(cact, N, DType::f32);
      aux_c = L.forward(cctx, view(x, {N, D}), view(out_c, {N, D}), sc);
      if (selection_margin(c, sc, bias_host) > 1e-5) break;
      x.clear();
    }
    ASSERT_FALSE(x.empty()) << "no input with a clear routing margin";

    // The CPU backward of sum(dout * out) + L_aux.
    std::vector<float> dout = round_bf16(randn(N * D)), dx_c(N * D);
    w.zero_grad();
    L.backward(cctx, sc, view(dout, {N, D}), view(dx_c, {N, D}), cscr, 1.0);
    const std::vector<int64_t> load = sc.routing.counts_host();
    for (const auto& [e, v] : lc.bias_set) EXPECT_EQ(load[e], v < 0 ? 0 : N) << "expert " << e;

    // The same layer on the device, once per GEMM implementation: bf16 weights, f32 gradients (zero), f32
    // selection bias.
    for (const kernels::MoeGemm impl : kAllGemms) {
      SCOPED_TRACE(kernels::moe_gemm_name(impl));
      std::printf("  gemm %s\n", kernels::moe_gemm_name(impl));
      DeviceBuffers buf(Device::cuda(0));
      MoeLayer G = test::device_moe_layer(L, buf, impl);
      ExecContext gctx(Device::cuda(0));
      ArenaSizer saved_size, scratch_size;
      G.alloc_saved(saved_size, N, DType::bf16);
      G.alloc_scratch(scratch_size, N, DType::bf16);
      Arena gact("act", Device::cuda(0), saved_size.used()), gscr("scratch", Device::cuda(0), scratch_size.used());
      MoeLayer::Saved sg = G.alloc_saved(gact, N, DType::bf16);
      const Tensor x_d = buf.upload(x, {N, D}, DType::bf16), out_d = buf.poisoned({N, D}, DType::bf16);
      test::device_sync();
      const double aux_g = G.forward(gctx, x_d, out_d, sg);
      gctx.synchronize();
      EXPECT_EQ(download_i32(sg.routing.expert), host_i32(sc.routing.expert)) << "expert ids";
      EXPECT_EQ(download_i32(sg.routing.order), host_i32(sc.routing.order)) << "order";
      EXPECT_EQ(sg.gemm, impl);
      if (impl == kernels::MoeGemm::wmma) {
        EXPECT_TRUE(sg.counts_host.empty()) << "wmma needs no host counts";
      } else {
        EXPECT_EQ(std::vector<int64_t>(sg.counts_host.begin(), sg.counts_host.end()), load) << "saved host counts";
      }
      expect_close(DeviceBuffers::download(out_d), out_c, kBf16Tol, "out");
      std::printf("  aux cpu %.6g gpu %.6g\n", aux_c, aux_g);
      EXPECT_NEAR(aux_g, aux_c, 1e-4 * std::abs(aux_c) + 1e-12);

      const Tensor dout_d = buf.upload(dout, {N, D}, DType::bf16), dx_d = buf.poisoned({N, D}, DType::bf16);
      test::device_sync();
      G.backward(gctx, sg, dout_d, dx_d, gscr, 1.0);
      gctx.synchronize();
      expect_close(DeviceBuffers::download(dx_d), dx_c, 2e-2, "dx");
      expect_close(DeviceBuffers::download(G.router.grad), host_f32(L.router.grad), 5e-2, "router grad");
      expect_close(DeviceBuffers::download(G.gate_up.grad), host_f32(L.gate_up.grad), 2e-2, "experts gate_up grad");
      expect_close(DeviceBuffers::download(G.down.grad), host_f32(L.down.grad), 2e-2, "experts down grad");
      if (c.num_shared_experts > 0) {
        expect_close(DeviceBuffers::download(G.shared_gate_up.grad), host_f32(L.shared_gate_up.grad), 2e-2,
                     "shared gate_up grad");
        expect_close(DeviceBuffers::download(G.shared_down.grad), host_f32(L.shared_down.grad), 2e-2,
                     "shared down grad");
      }
      // An expert without rows has an exactly zero gradient on both devices (its dW is never written).
      const std::vector<float> gu = DeviceBuffers::download(G.gate_up.grad), dn = DeviceBuffers::download(G.down.grad);
      const int64_t per = 2 * c.expert_ffn * D;
      for (int64_t e = 0; e < E; ++e) {
        if (load[e] != 0) continue;
        EXPECT_TRUE(std::all_of(gu.begin() + e * per, gu.begin() + (e + 1) * per, [](float v) { return v == 0.f; }))
            << "expert " << e << " gate_up";
        EXPECT_TRUE(
            std::all_of(dn.begin() + e * per / 2, dn.begin() + (e + 1) * per / 2, [](float v) { return v == 0.f; }))
            << "expert " << e << " down";
      }
    }
  }
}

// ------------------------------------------------------------------------------------------- models

// qwen3_moe on a D = 64 skeleton (q/k norm, tied), 3 layers: 0 and 2 MoE (E = 8, top 2, F = 32, renormalised),
// 1 dense through mlp_only_layers. dots1: the same skeleton and experts with a sigmoid router, a selection
// bias, routed scaling 2.5 and one shared expert (F_s = 32); layer 0 dense through first_k_dense_replace,
// 1 and 2 MoE.
ModelConfig moe_model_config(bool dots1 = false) {
  ModelConfig m = test::tiny_dense_variant("qwen3");
  m.family = "qwen3_moe";
  m.hidden_size = 64;
  m.intermediate_size = 80;
  m.head_dim = 16;
  m.num_layers = 3;
  m.num_experts = 8;
  m.num_experts_per_tok = 2;
  m.moe_intermediate_size = 32;
  m.norm_topk_prob = true;
  m.decoder_sparse_step = 1;
  if (dots1)
    test::make_dots1(m, 2.5, 1);
  else
    m.mlp_only_layers = {1};
  m.finalize("test");
  return m;
}

struct TwinBatch {
  test::PackedBatch host;
  test::DeviceBuffers buffers{Device::cuda(0), size_t(1) << 20};
  Batch gpu;
};

// Matrices N(0, 1 / (16 fan_in)) (half the scale of tests/gpu/test_gpu_model.cpp: bf16 noise amplified less
// through the layers), embeddings N(0, 4 / D), norms 1 + N(0, 0.05), routers N(0, 9 / D): router logits of
// O(3) with wide top-k gaps. fan_in: the last dimension. Measured on the CPU: multiplying every weight by
// 1 + 0.4 u xi (u = 2^-8, a proxy for the CUDA path's bf16 rounding) moves these router logits by 0.008 rms,
// 0.03 at most. Selection biases (dots1) N(0, 0.01): of the order of the sigmoid scores' gaps. Every value is
// bf16-representable, so both devices hold the same weights (the selection bias included).
std::vector<std::pair<std::string, std::vector<float>>> draw_weights(const std::vector<ParamInfo>& params) {
  std::vector<std::pair<std::string, std::vector<float>>> out;
  for (const ParamInfo& p : params) {
    const float fan_in = static_cast<float>(p.shape.back());
    std::vector<float> v;
    if (p.name.ends_with("norm"))
      v = randn(p.numel, 0.05f, 1.0f);
    else if (p.name == "embed")
      v = randn(p.numel, 2.0f / std::sqrt(fan_in));
    else if (p.name.ends_with("mlp.gate.weight"))
      v = randn(p.numel, 3.0f / std::sqrt(fan_in));
    else if (p.name.ends_with("mlp.gate.e_score_correction_bias"))
      v = randn(p.numel, 0.01f);
    else
      v = randn(p.numel, 0.25f / std::sqrt(fan_in));
    out.emplace_back(p.name, round_bf16(v));
  }
  return out;
}

// Every MoE layer's selection scores [row][expert] (rows: layers in order, then tokens) and their slopes
// d score / d logit: the router logits themselves for a softmax router (softmax keeps their order; slope 1),
// sigmoid(logit) + the selection bias for dots1 (slope sigmoid'(logit)).
struct Selection {
  std::vector<std::vector<double>> score, slope;
};

// The selection scores as `m` computes them on `batch`, from its own residual stream: the MoE block's input is
// layer input + mixer output, its router sees RMSNorm of it (evaluated here in double from the model's
// activations, f32 on the CPU, bf16 on CUDA). buffers: device memory for the activations when m is on CUDA.
Selection selection_scores(HybridModel& m, const Batch& batch, DeviceBuffers* buffers) {
  const ModelConfig& mc = m.config().model;
  const int64_t N = batch.num_tokens, D = mc.hidden_size, E = mc.num_experts, L = mc.num_layers;
  const bool on_gpu = buffers != nullptr;
  ExecContext ctx(on_gpu ? Device::cuda(0) : Device::cpu());
  std::vector<std::vector<float>> in(L, std::vector<float>(N * D)), mix(L, std::vector<float>(N * D));
  std::vector<Tensor> ti, tm;
  for (int64_t l = 0; l < L; ++l) {
    ti.push_back(on_gpu ? buffers->poisoned({N, D}, DType::bf16) : view(in[l], {N, D}));
    tm.push_back(on_gpu ? buffers->poisoned({N, D}, DType::bf16) : view(mix[l], {N, D}));
  }
  m.forward_layer_inputs(ctx, batch, ti, tm);
  ctx.synchronize();
  if (on_gpu)
    for (int64_t l = 0; l < L; ++l) {
      in[l] = DeviceBuffers::download(ti[l]);
      mix[l] = DeviceBuffers::download(tm[l]);
    }
  Selection out;
  for (int64_t l = 0; l < L; ++l) {
    if (!mc.is_moe_layer(l)) continue;
    const std::string p = "layers." + std::to_string(l) + ".";
    const std::vector<float> g = m.get_param(p + "mlp_norm"), wr = m.get_param(p + "mlp.gate.weight");
    const std::vector<float> bias =
        mc.moe_selection_bias ? m.get_param(p + "mlp.gate.e_score_correction_bias") : std::vector<float>(E, 0.0f);
    for (int64_t t = 0; t < N; ++t) {
      std::vector<double> h(D), logits(E, 0.0);
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) {
        h[i] = double(in[l][t * D + i]) + double(mix[l][t * D + i]);
        ss += h[i] * h[i];
      }
      const double rstd = 1.0 / std::sqrt(ss / double(D) + mc.rms_norm_eps);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t i = 0; i < D; ++i) logits[e] += h[i] * rstd * g[i] * wr[e * D + i];
      std::vector<double> slope(E, 1.0);
      if (mc.moe_score_func == "sigmoid")
        for (int64_t e = 0; e < E; ++e) {
          const double sg = 1.0 / (1.0 + std::exp(-logits[e]));
          logits[e] = sg + double(bias[e]);
          slope[e] = sg * (1.0 - sg);
        }
      out.score.push_back(logits);
      out.slope.push_back(slope);
    }
  }
  return out;
}

// The k chosen experts of every row (as a sorted set) and the smallest k-th / (k+1)-th gap, in logit units:
// the score gap divided by the mean slope of the two experts (for a softmax router the logit gap itself), so
// that one bound on the logits' bf16 noise serves both score functions.
std::vector<std::vector<int64_t>> top_k_sets(const Selection& sel, int64_t k, double& gap) {
  gap = INFINITY;
  std::vector<std::vector<int64_t>> sets;
  for (size_t r = 0; r < sel.score.size(); ++r) {
    const std::vector<double>& row = sel.score[r];
    const std::vector<double>& slope = sel.slope[r];
    std::vector<int64_t> idx(row.size());
    std::iota(idx.begin(), idx.end(), int64_t(0));
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return row[a] > row[b]; });
    if (k < static_cast<int64_t>(row.size())) {
      const int64_t a = idx[k - 1], b = idx[k];
      gap = std::min(gap, (row[a] - row[b]) * 2.0 / (slope[a] + slope[b]));
    }
    idx.resize(k);
    std::sort(idx.begin(), idx.end());
    sets.push_back(idx);
  }
  return sets;
}

// Both models: loss, logits and every gradient agree (the bounds of tests/gpu/test_gpu_model.cpp).
template <class Model>
void compare_models(Model& cpu, Model& gpu, const Batch& bc, const Batch& bg) {
  ExecContext cctx(Device::cpu()), gctx(Device::cuda(0));
  const double l_cpu = cpu.forward_loss(cctx, bc);
  const double l_gpu = gpu.forward_loss(gctx, bg);
  std::printf("  loss cpu %.6f gpu %.6f (rel %.2e)\n", l_cpu, l_gpu, std::abs(l_gpu - l_cpu) / l_cpu);
  ASSERT_TRUE(std::isfinite(l_gpu));
  EXPECT_LT(std::abs(l_gpu - l_cpu), 1e-2 * std::abs(l_cpu));
  const double ez = rel_err(gpu.forward_logits(gctx, bg), cpu.forward_logits(cctx, bc));
  std::printf("  logits rel_err %.2e\n", ez);
  EXPECT_LT(ez, 2e-2);
  for (Model* m : {&cpu, &gpu}) {  // poisoned gradients: zero_grad must clear every element
    const Tensor g = m->flat_grads();
    std::vector<float> nan(static_cast<size_t>(g.numel()), NAN);
    copy_tensor(g, Tensor(nan.data(), DType::f32, Device::cpu(), {g.numel()}));
    m->zero_grad();
  }
  const double fb_cpu = cpu.forward_backward(cctx, bc);
  const double fb_gpu = gpu.forward_backward(gctx, bg);
  EXPECT_NEAR(fb_cpu, l_cpu, 1e-6 * l_cpu);
  EXPECT_LT(std::abs(fb_gpu - l_cpu), 1e-2 * std::abs(l_cpu));
  for (const ParamInfo& p : cpu.params()) {
    const double e = rel_err(gpu.get_grad(p.name), cpu.get_grad(p.name));
    std::printf("  grad %-26s rel_err %.2e\n", p.name.c_str(), e);
    EXPECT_LT(e, 5e-2) << p.name;
  }
}

// Both model classes on CUDA against the CPU for the MoE config `mc`, with weights and batch redrawn until every
// token's top-k selection gap (top_k_sets: in logit units) is at least 0.1 on the CPU (3x the largest
// bf16-noise move of a logit measured, see draw_weights) and the CUDA model, fed the same weights, picks the
// same experts for every token of every MoE layer (from its own bf16 residual stream) with a gap of at least
// 0.02: a swap of near-tied experts would make the comparison meaningless, not wrong.
void check_models_match_cpu(const ModelConfig& mc) {
  HybridConfig hc;
  hc.model = mc;
  hc.pattern = "TTT";
  hc.finalize("test");
  const int64_t K = hc.model.num_experts_per_tok;
  TwinBatch b;
  HybridModel hcpu(hc, Device::cpu(), 32), hgpu(hc, Device::cuda(0), 32);
  DeviceBuffers acts(Device::cuda(0), size_t(4) << 20);
  std::vector<std::pair<std::string, std::vector<float>>> weights;
  bool found = false;
  int attempt = 0;
  double cpu_gap = 0, gpu_gap = 0;
  for (; attempt < 3000 && !found; ++attempt) {
    b.host = test::pack_documents(test::random_documents({11, 13}, hc.model.vocab_size),
                                  [](int64_t i) { return i % 7 == 3; });
    weights = draw_weights(hcpu.params());
    for (const auto& [name, v] : weights) hcpu.set_param(name, v.data(), static_cast<int64_t>(v.size()));
    const std::vector<std::vector<int64_t>> cpu_sets =
        top_k_sets(selection_scores(hcpu, b.host.batch, nullptr), K, cpu_gap);
    if (!(cpu_gap > 0.1)) continue;
    for (const auto& [name, v] : weights) hgpu.set_param(name, v.data(), static_cast<int64_t>(v.size()));
    b.buffers.arena().reset();
    b.gpu = test::upload_batch(b.buffers, b.host);
    acts.arena().reset();
    const std::vector<std::vector<int64_t>> gpu_sets = top_k_sets(selection_scores(hgpu, b.gpu, &acts), K, gpu_gap);
    found = gpu_sets == cpu_sets && gpu_gap > 0.02;
  }
  std::printf("  draw %d: smallest top-k selection gap cpu %.4f, cuda %.4f\n", attempt, cpu_gap, gpu_gap);
  ASSERT_TRUE(found) << "no draw with clear routing";

  {
    SCOPED_TRACE("HybridModel TTT");
    std::printf(" HybridModel TTT\n");
    compare_models(hcpu, hgpu, b.host.batch, b.gpu);
  }
  {
    SCOPED_TRACE("DenseModel");
    std::printf(" DenseModel\n");
    DenseModel dcpu(hc.model, Device::cpu(), 32), dgpu(hc.model, Device::cuda(0), 32);
    for (const auto& [name, v] : weights) {
      ASSERT_TRUE(dcpu.has_param(name)) << name;
      dcpu.set_param(name, v.data(), static_cast<int64_t>(v.size()));
      dgpu.set_param(name, v.data(), static_cast<int64_t>(v.size()));
    }
    compare_models(dcpu, dgpu, b.host.batch, b.gpu);
  }
}

TEST(GpuMoe, Qwen3MoeModelsMatchCpu) {
  HYD_REQUIRE_GPU();
  const ModelConfig mc = moe_model_config();
  ASSERT_TRUE(mc.is_moe_layer(0));
  ASSERT_FALSE(mc.is_moe_layer(1));
  check_models_match_cpu(mc);
}

// dots1: sigmoid scores plus the selection bias, routed scaling, the shared MLP (its gradients compared too),
// and the selection bias's gradient, 0 on the CPU, must be 0 on CUDA.
TEST(GpuMoe, Dots1ModelsMatchCpu) {
  HYD_REQUIRE_GPU();
  const ModelConfig mc = moe_model_config(/*dots1=*/true);
  ASSERT_FALSE(mc.is_moe_layer(0));
  ASSERT_TRUE(mc.is_moe_layer(1));
  check_models_match_cpu(mc);
}

}  // namespace
}  // namespace hyd

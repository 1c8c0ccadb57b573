// CUDA kernels of the KDA layer's ops (short_conv, l2norm, kda_gates, gated_rmsnorm) vs the CPU f32
// reference. Both sides see the same bf16-rounded inputs (and the same f32 gate parameters and gate
// gradients); outputs are poisoned (NaN) before every run; inputs are fresh random numbers each run.
// Shapes include odd sizes (scalar paths), multiples of 8 (vector paths), empty and one-token
// documents, kernel sizes on both sides of the 4-tap fast path, short conv halos (dhalo included),
// and head boundaries inside a 32-column block. Tolerances: bf16 outputs rel_err < 1e-2; f32 outputs
// computed from the same inputs (g, beta, rstd) < 1e-4; f32 sums over tokens (dw, dA_log, ddt_bias)
// < 1e-3.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "kernels/gated_rmsnorm.h"
#include "kernels/kda_gates.h"
#include "kernels/l2norm.h"
#include "kernels/short_conv.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::cpu_f32;
using test::cpu_i32;
using test::device_sync;
using test::DeviceBuffers;
using test::expect_error_mentioning;
using test::randint;
using test::randn;
using test::rel_err;
using test::round_bf16;

constexpr double kBf16Tol = 1e-2;
constexpr double kF32ElementwiseTol = 1e-4;
constexpr double kF32SumTol = 1e-3;

class GpuKdaLayerOps : public ::testing::Test {
 protected:
  void SetUp() override {
    HYD_REQUIRE_GPU();
    ctx_ = std::make_unique<ExecContext>(Device::cuda(0));
    buf_ = std::make_unique<DeviceBuffers>(Device::cuda(0), size_t(1) << 30);
    cpu_ = std::make_unique<ExecContext>(Device::cpu());
  }
  const ExecContext& gpu() const { return *ctx_; }
  const ExecContext& cpu() const { return *cpu_; }
  DeviceBuffers& buf() { return *buf_; }
  std::unique_ptr<ExecContext> ctx_, cpu_;
  std::unique_ptr<DeviceBuffers> buf_;
};

// Increment of an accumulated output: after - before (so a random start cannot hide errors).
std::vector<float> increment(std::vector<float> after, const std::vector<float>& before) {
  for (size_t i = 0; i < after.size(); ++i) after[i] -= before[i];
  return after;
}

// cu_seqlens of documents with the given lengths.
std::vector<int32_t> offsets(const std::vector<int32_t>& lengths) {
  std::vector<int32_t> cu = {0};
  for (int32_t l : lengths) cu.push_back(cu.back() + l);
  return cu;
}

// ------------------------------------------------------------------------------------------ short_conv

TEST_F(GpuKdaLayerOps, ShortConvForwardAndBackward) {
  struct Case {
    std::vector<int32_t> lengths;
    int64_t channels, kernel;
  };
  std::vector<int32_t> many;  // 120 documents of 0..20 tokens (empty ones included)
  for (int32_t l : randint(120, 0, 21)) many.push_back(l);
  // (10 channels: paired, not a multiple of 8, so the kernels without the shared-memory tile.)
  const std::vector<Case> cases = {
      {{1, 63, 64, 65, 7}, 96, 4}, {{3, 0, 7}, 5, 4}, {{200}, 64, 1}, {{2, 30, 1}, 40, 3},
      {{17, 1, 40}, 24, 7},        {{50, 9}, 33, 16}, {many, 48, 4},  {{1500, 1, 499}, 1024, 4},
      {{300, 0, 45}, 10, 4},
  };
  for (const Case& cs : cases) {
    const std::vector<int32_t> cu = offsets(cs.lengths);
    const int64_t n = cu.back(), ch = cs.channels, k = cs.kernel, docs = static_cast<int64_t>(cs.lengths.size());
    SCOPED_TRACE("n=" + std::to_string(n) + " docs=" + std::to_string(docs) + " C=" + std::to_string(ch) +
                 " K=" + std::to_string(k));
    buf().arena().reset();
    std::vector<float> x = round_bf16(randn(n * ch, 1.5f)), w = round_bf16(randn(ch * k, 0.5f));
    std::vector<float> dy = round_bf16(randn(n * ch)), dw0 = randn(ch * k);
    std::vector<int32_t> cu_host = cu;

    std::vector<float> y_ref(n * ch), dx_ref(n * ch), dw_ref = dw0;
    short_conv_forward(cpu(), cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}), cpu_i32(cu_host, {docs + 1}),
                       cpu_f32(y_ref, {n, ch}));
    short_conv_backward(cpu(), cpu_f32(dy, {n, ch}), cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}),
                        cpu_i32(cu_host, {docs + 1}), cpu_f32(dx_ref, {n, ch}), cpu_f32(dw_ref, {ch, k}));

    Tensor d_x = buf().upload(x, {n, ch}, DType::bf16), d_w = buf().upload(w, {ch, k}, DType::bf16);
    Tensor d_cu = buf().upload_i32(cu, {docs + 1});
    Tensor d_y = buf().poisoned({n, ch}, DType::bf16), d_dy = buf().upload(dy, {n, ch}, DType::bf16);
    Tensor d_dx = buf().poisoned({n, ch}, DType::bf16), d_dw = buf().upload(dw0, {ch, k}, DType::f32);
    device_sync();
    short_conv_forward(gpu(), d_x, d_w, d_cu, d_y);
    short_conv_backward(gpu(), d_dy, d_x, d_w, d_cu, d_dx, d_dw);
    device_sync();
    EXPECT_LT(rel_err(DeviceBuffers::download(d_y), y_ref), kBf16Tol);
    EXPECT_LT(rel_err(DeviceBuffers::download(d_dx), dx_ref), kBf16Tol);
    EXPECT_LT(rel_err(increment(DeviceBuffers::download(d_dw), dw0), increment(dw_ref, dw0)), kF32SumTol);
  }
}

// With a halo (the K-1 rows before each document, sequence parallelism): y, dx, dhalo and dw against
// the CPU. Documents shorter than K-1 and empty ones (dhalo rows zero), K = 1 (a halo of no rows),
// runs that start inside a document's first K-1 tokens (the many short documents); dhalo poisoned.
TEST_F(GpuKdaLayerOps, ShortConvWithHaloForwardAndBackward) {
  struct Case {
    std::vector<int32_t> lengths;
    int64_t channels, kernel;
  };
  std::vector<int32_t> many;  // 150 documents of 0..20 tokens (empty ones included)
  for (int32_t l : randint(150, 0, 21)) many.push_back(l);
  const std::vector<Case> cases = {
      {{1, 63, 64, 65, 7}, 96, 4}, {{3, 0, 1, 2, 7}, 5, 4}, {{200}, 64, 1},    {{2, 30, 1}, 40, 3},
      {{17, 1, 2, 40}, 24, 7},     {{50, 2, 9}, 33, 16},    {many, 48, 4},     {many, 40, 2},
      {{1500, 1, 499}, 1024, 4},   {{2, 1, 0, 5}, 32, 2},   {{0, 3, 0}, 8, 4}, {{300, 0, 45}, 10, 4},
  };
  for (const Case& cs : cases) {
    const std::vector<int32_t> cu = offsets(cs.lengths);
    const int64_t n = cu.back(), ch = cs.channels, k = cs.kernel, docs = static_cast<int64_t>(cs.lengths.size());
    const int64_t h = k - 1;
    SCOPED_TRACE("n=" + std::to_string(n) + " docs=" + std::to_string(docs) + " C=" + std::to_string(ch) +
                 " K=" + std::to_string(k));
    buf().arena().reset();
    std::vector<float> x = round_bf16(randn(n * ch, 1.5f)), w = round_bf16(randn(ch * k, 0.5f));
    std::vector<float> halo = round_bf16(randn(docs * h * ch, 1.5f));
    std::vector<float> dy = round_bf16(randn(n * ch)), dw0 = randn(ch * k);
    std::vector<int32_t> cu_host = cu;

    std::vector<float> y_ref(n * ch), dx_ref(n * ch), dhalo_ref(docs * h * ch), dw_ref = dw0;
    short_conv_forward(cpu(), cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}), cpu_i32(cu_host, {docs + 1}),
                       cpu_f32(y_ref, {n, ch}), cpu_f32(halo, {docs, h, ch}));
    short_conv_backward(cpu(), cpu_f32(dy, {n, ch}), cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}),
                        cpu_i32(cu_host, {docs + 1}), cpu_f32(dx_ref, {n, ch}), cpu_f32(dw_ref, {ch, k}),
                        cpu_f32(halo, {docs, h, ch}), cpu_f32(dhalo_ref, {docs, h, ch}));

    Tensor d_x = buf().upload(x, {n, ch}, DType::bf16), d_w = buf().upload(w, {ch, k}, DType::bf16);
    Tensor d_halo = buf().upload(halo, {docs, h, ch}, DType::bf16), d_cu = buf().upload_i32(cu, {docs + 1});
    Tensor d_y = buf().poisoned({n, ch}, DType::bf16), d_dy = buf().upload(dy, {n, ch}, DType::bf16);
    Tensor d_dx = buf().poisoned({n, ch}, DType::bf16), d_dw = buf().upload(dw0, {ch, k}, DType::f32);
    Tensor d_dhalo = buf().poisoned({docs, h, ch}, DType::bf16);
    device_sync();
    short_conv_forward(gpu(), d_x, d_w, d_cu, d_y, d_halo);
    short_conv_backward(gpu(), d_dy, d_x, d_w, d_cu, d_dx, d_dw, d_halo, d_dhalo);
    device_sync();
    EXPECT_LT(rel_err(DeviceBuffers::download(d_y), y_ref), kBf16Tol);
    const std::vector<float> dx = DeviceBuffers::download(d_dx);
    EXPECT_LT(rel_err(dx, dx_ref), kBf16Tol);
    EXPECT_LT(rel_err(DeviceBuffers::download(d_dhalo), dhalo_ref), kBf16Tol);
    EXPECT_LT(rel_err(increment(DeviceBuffers::download(d_dw), dw0), increment(dw_ref, dw0)), kF32SumTol);

    // Without dhalo: the same dx and dw.
    Tensor d_dx2 = buf().poisoned({n, ch}, DType::bf16), d_dw2 = buf().upload(dw0, {ch, k}, DType::f32);
    device_sync();
    short_conv_backward(gpu(), d_dy, d_x, d_w, d_cu, d_dx2, d_dw2, d_halo);
    device_sync();
    EXPECT_EQ(rel_err(DeviceBuffers::download(d_dx2), dx), 0.0);
    EXPECT_LT(rel_err(increment(DeviceBuffers::download(d_dw2), dw0), increment(dw_ref, dw0)), kF32SumTol);
  }
}

// ------------------------------------------------------------------------------ convolution + l2 norm

// The q / k op against the CPU (the two ops in f32) and, exactly, against the two CUDA ops in turn (y, rstd, dx,
// dhalo and the overwritten dy bit for bit; dw's f32 atomics add in another order): heads of 128 and 64 (the fused
// forward), kernel sizes 4, 3, 2, 1, a head of 32 and a kernel of 5 (the two-kernel forward); many short and empty
// documents, token counts that are no multiple of the 64 / 128 tokens of a block; with and without a halo.
TEST_F(GpuKdaLayerOps, ShortConvL2normForwardAndBackward) {
  struct Case {
    std::vector<int32_t> lengths;
    int64_t channels, head_dim, kernel;
    bool halo;
  };
  std::vector<int32_t> many;  // 150 documents of 0..20 tokens (empty ones included)
  for (int32_t l : randint(150, 0, 21)) many.push_back(l);
  const std::vector<Case> cases = {
      {{1500, 1, 499}, 1024, 128, 4, false},
      {{1, 63, 64, 65, 7}, 256, 128, 4, true},
      {many, 256, 128, 4, true},
      {many, 128, 64, 3, false},
      {{200, 3, 0, 91}, 192, 64, 4, true},
      {{2, 30, 1}, 128, 128, 2, true},
      {{300, 45}, 128, 128, 1, false},
      {{77, 5}, 96, 32, 4, true},
      {{60, 9}, 128, 64, 5, true},
  };
  for (const Case& cs : cases) {
    const std::vector<int32_t> cu = offsets(cs.lengths);
    const int64_t n = cu.back(), ch = cs.channels, hd = cs.head_dim, k = cs.kernel, hl = k - 1;
    const int64_t docs = static_cast<int64_t>(cs.lengths.size()), rows = n * (ch / hd);
    const float scale = static_cast<float>(1.0 / std::sqrt(double(hd)));
    SCOPED_TRACE("n=" + std::to_string(n) + " docs=" + std::to_string(docs) + " C=" + std::to_string(ch) +
                 " hd=" + std::to_string(hd) + " K=" + std::to_string(k) + (cs.halo ? " halo" : ""));
    buf().arena().reset();
    std::vector<float> x = round_bf16(randn(n * ch, 1.5f)), w = round_bf16(randn(ch * k, 0.5f));
    std::vector<float> halo = round_bf16(randn(docs * hl * ch, 1.5f));
    std::vector<float> dy = round_bf16(randn(n * ch)), dw0 = randn(ch * k);
    std::vector<int32_t> cu_host = cu;
    const Tensor c_halo = cs.halo ? cpu_f32(halo, {docs, hl, ch}) : Tensor{};

    std::vector<float> y_ref(n * ch), rstd_ref(rows);
    short_conv_l2norm_forward(cpu(), cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}), cpu_i32(cu_host, {docs + 1}),
                              cpu_f32(y_ref, {n, ch}), cpu_f32(rstd_ref, {rows}), hd, scale, c_halo);
    // The backward reads y and rstd: both sides get the same bf16-rounded y and the same rstd.
    std::vector<float> y_in = round_bf16(y_ref), dx_ref(n * ch), dw_ref = dw0, dhalo_ref(docs * hl * ch);
    std::vector<float> dy_cpu = dy;  // the backward overwrites its dy
    short_conv_l2norm_backward(cpu(), cpu_f32(dy_cpu, {n, ch}), cpu_f32(y_in, {n, ch}), cpu_f32(rstd_ref, {rows}), hd,
                               scale, cpu_f32(x, {n, ch}), cpu_f32(w, {ch, k}), cpu_i32(cu_host, {docs + 1}),
                               cpu_f32(dx_ref, {n, ch}), cpu_f32(dw_ref, {ch, k}), c_halo,
                               cs.halo ? cpu_f32(dhalo_ref, {docs, hl, ch}) : Tensor{});

    Tensor d_x = buf().upload(x, {n, ch}, DType::bf16), d_w = buf().upload(w, {ch, k}, DType::bf16);
    Tensor d_cu = buf().upload_i32(cu, {docs + 1});
    Tensor d_halo = cs.halo ? buf().upload(halo, {docs, hl, ch}, DType::bf16) : Tensor{};
    Tensor d_y = buf().poisoned({n, ch}, DType::bf16), d_rstd = buf().poisoned({rows}, DType::f32);
    Tensor d_yin = buf().upload(y_in, {n, ch}, DType::bf16), d_rin = buf().upload(rstd_ref, {rows}, DType::f32);
    Tensor d_dy = buf().upload(dy, {n, ch}, DType::bf16), d_dy2 = buf().upload(dy, {n, ch}, DType::bf16);
    Tensor d_dx = buf().poisoned({n, ch}, DType::bf16), d_dw = buf().upload(dw0, {ch, k}, DType::f32);
    Tensor d_dhalo = cs.halo ? buf().poisoned({docs, hl, ch}, DType::bf16) : Tensor{};
    device_sync();
    short_conv_l2norm_forward(gpu(), d_x, d_w, d_cu, d_y, d_rstd, hd, scale, d_halo);
    short_conv_l2norm_backward(gpu(), d_dy, d_yin, d_rin, hd, scale, d_x, d_w, d_cu, d_dx, d_dw, d_halo, d_dhalo);
    device_sync();
    const std::vector<float> y = DeviceBuffers::download(d_y), rstd = DeviceBuffers::download(d_rstd);
    const std::vector<float> dx = DeviceBuffers::download(d_dx);
    EXPECT_LT(rel_err(y, y_ref), kBf16Tol);
    // rstd from the bf16-rounded conv outputs (as the two CUDA ops compute it) against the f32 ones: ~1e-4.
    EXPECT_LT(rel_err(rstd, rstd_ref), 1e-3);
    EXPECT_LT(rel_err(dx, dx_ref), kBf16Tol);
    // dw sums the conv output's gradient, which the CUDA path rounds to bf16 (as the two ops store it between
    // them) and the CPU keeps in f32: bf16-class.
    EXPECT_LT(rel_err(increment(DeviceBuffers::download(d_dw), dw0), increment(dw_ref, dw0)), kBf16Tol);
    if (cs.halo) {
      EXPECT_LT(rel_err(DeviceBuffers::download(d_dhalo), dhalo_ref), kBf16Tol);
    }

    // The two CUDA ops in turn: the same bits.
    Tensor d_y2 = buf().poisoned({n, ch}, DType::bf16), d_rstd2 = buf().poisoned({rows}, DType::f32);
    Tensor d_g2 = buf().poisoned({n, ch}, DType::bf16), d_dx2 = buf().poisoned({n, ch}, DType::bf16);
    Tensor d_dw2 = buf().upload(dw0, {ch, k}, DType::f32);
    Tensor d_dhalo2 = cs.halo ? buf().poisoned({docs, hl, ch}, DType::bf16) : Tensor{};
    device_sync();
    short_conv_forward(gpu(), d_x, d_w, d_cu, d_y2, d_halo);
    l2norm_forward(gpu(), d_y2.view({rows, hd}), d_y2.view({rows, hd}), d_rstd2, scale);
    l2norm_backward(gpu(), d_dy2.view({rows, hd}), d_yin.view({rows, hd}), d_rin, d_g2.view({rows, hd}), scale);
    short_conv_backward(gpu(), d_g2, d_x, d_w, d_cu, d_dx2, d_dw2, d_halo, d_dhalo2);
    device_sync();
    EXPECT_EQ(rel_err(DeviceBuffers::download(d_y2), y), 0.0);
    EXPECT_EQ(rel_err(DeviceBuffers::download(d_rstd2), rstd), 0.0);
    EXPECT_EQ(rel_err(DeviceBuffers::download(d_dx2), dx), 0.0);
    EXPECT_EQ(rel_err(DeviceBuffers::download(d_g2), DeviceBuffers::download(d_dy)), 0.0);  // dy: the conv's gradient
    if (cs.halo) {
      EXPECT_EQ(rel_err(DeviceBuffers::download(d_dhalo2), DeviceBuffers::download(d_dhalo)), 0.0);
    }
    EXPECT_LT(rel_err(increment(DeviceBuffers::download(d_dw2), dw0), increment(DeviceBuffers::download(d_dw), dw0)),
              1e-5);
  }
}

// ------------------------------------------------------------------------------------------ l2norm

TEST_F(GpuKdaLayerOps, L2normForwardAndBackward) {
  struct Shape {
    int64_t rows, dim;
  };
  for (Shape s : {Shape{37, 64}, Shape{1000, 128}, Shape{5, 77}, Shape{3001, 256}, Shape{2, 1000}, Shape{9, 32},
                  Shape{20000, 128}, Shape{1, 128}}) {
    for (float scale : {1.0f, static_cast<float>(1.0 / std::sqrt(double(s.dim)))}) {
      SCOPED_TRACE("rows=" + std::to_string(s.rows) + " dim=" + std::to_string(s.dim) +
                   " scale=" + std::to_string(scale));
      buf().arena().reset();
      const int64_t r = s.rows, d = s.dim;
      std::vector<float> x = round_bf16(randn(r * d, 2.0f)), dy = round_bf16(randn(r * d));
      std::vector<float> y_ref(r * d), rstd_ref(r);
      l2norm_forward(cpu(), cpu_f32(x, {r, d}), cpu_f32(y_ref, {r, d}), cpu_f32(rstd_ref, {r}), scale);
      // The backward reads y: both sides get the same bf16-rounded y and the same rstd.
      std::vector<float> y_in = round_bf16(y_ref), dx_ref(r * d);
      l2norm_backward(cpu(), cpu_f32(dy, {r, d}), cpu_f32(y_in, {r, d}), cpu_f32(rstd_ref, {r}),
                      cpu_f32(dx_ref, {r, d}), scale);

      Tensor d_x = buf().upload(x, {r, d}, DType::bf16), d_y = buf().poisoned({r, d}, DType::bf16);
      Tensor d_rstd = buf().poisoned({r}, DType::f32);
      Tensor d_yin = buf().upload(y_in, {r, d}, DType::bf16), d_rin = buf().upload(rstd_ref, {r}, DType::f32);
      Tensor d_dy = buf().upload(dy, {r, d}, DType::bf16), d_dx = buf().poisoned({r, d}, DType::bf16);
      device_sync();
      l2norm_forward(gpu(), d_x, d_y, d_rstd, scale);
      l2norm_backward(gpu(), d_dy, d_yin, d_rin, d_dx, scale);
      device_sync();
      EXPECT_LT(rel_err(DeviceBuffers::download(d_y), y_ref), kBf16Tol);
      EXPECT_LT(rel_err(DeviceBuffers::download(d_rstd), rstd_ref), kF32ElementwiseTol);
      const std::vector<float> dx = DeviceBuffers::download(d_dx);
      EXPECT_LT(rel_err(dx, dx_ref), kBf16Tol);

      // In place: y over x and dx over dy give the same results.
      Tensor d_x2 = buf().upload(x, {r, d}, DType::bf16), d_r2 = buf().poisoned({r}, DType::f32);
      Tensor d_dy2 = buf().upload(dy, {r, d}, DType::bf16);
      device_sync();
      l2norm_forward(gpu(), d_x2, d_x2, d_r2, scale);
      l2norm_backward(gpu(), d_dy2, d_yin, d_rin, d_dy2, scale);
      device_sync();
      EXPECT_EQ(rel_err(DeviceBuffers::download(d_x2), DeviceBuffers::download(d_y)), 0.0);
      EXPECT_EQ(rel_err(DeviceBuffers::download(d_dy2), dx), 0.0);
    }
  }
}

// ------------------------------------------------------------------------------------------ kda_gates

TEST_F(GpuKdaLayerOps, KdaGatesForwardAndBackward) {
  struct Shape {
    int64_t n, hv, dk;
  };
  for (Shape s : {Shape{37, 4, 64}, Shape{500, 16, 128}, Shape{7, 3, 5}, Shape{1000, 2, 24}, Shape{3000, 1, 48}}) {
    SCOPED_TRACE("n=" + std::to_string(s.n) + " hv=" + std::to_string(s.hv) + " dk=" + std::to_string(s.dk));
    buf().arena().reset();
    const int64_t n = s.n, hv = s.hv, dk = s.dk, c = hv * dk;
    std::vector<float> f = round_bf16(randn(n * c, 3.0f)), b = round_bf16(randn(n * hv, 3.0f));
    f[0] = 30.f;  // far on both sides of the softplus knee
    f[1] = -30.f;
    std::vector<float> A_log = randn(hv, 0.7f, 1.0f), dt = randn(c, 1.0f, -2.0f);
    std::vector<float> dg = randn(n * c), dbeta = randn(n * hv), dA0 = randn(hv), ddt0 = randn(c);

    std::vector<float> g_ref(n * c), beta_ref(n * hv), df_ref(n * c), db_ref(n * hv), dA_ref = dA0, ddt_ref = ddt0;
    kda_gates_forward(cpu(), cpu_f32(f, {n, hv, dk}), cpu_f32(A_log, {hv}), cpu_f32(dt, {c}), cpu_f32(b, {n, hv}),
                      cpu_f32(g_ref, {n, hv, dk}), cpu_f32(beta_ref, {n, hv}));
    kda_gates_backward(cpu(), cpu_f32(dg, {n, hv, dk}), cpu_f32(dbeta, {n, hv}), cpu_f32(g_ref, {n, hv, dk}),
                       cpu_f32(beta_ref, {n, hv}), cpu_f32(A_log, {hv}), cpu_f32(df_ref, {n, hv, dk}),
                       cpu_f32(dA_ref, {hv}), cpu_f32(ddt_ref, {c}), cpu_f32(db_ref, {n, hv}));

    Tensor d_f = buf().upload(f, {n, hv, dk}, DType::bf16), d_b = buf().upload(b, {n, hv}, DType::bf16);
    Tensor d_A = buf().upload(A_log, {hv}, DType::f32), d_dt = buf().upload(dt, {c}, DType::f32);
    Tensor d_g = buf().poisoned({n, hv, dk}, DType::f32), d_beta = buf().poisoned({n, hv}, DType::f32);
    // The backward reads g and beta: both sides get the CPU's.
    Tensor d_gin = buf().upload(g_ref, {n, hv, dk}, DType::f32), d_bin = buf().upload(beta_ref, {n, hv}, DType::f32);
    Tensor d_dg = buf().upload(dg, {n, hv, dk}, DType::f32), d_dbeta = buf().upload(dbeta, {n, hv}, DType::f32);
    Tensor d_df = buf().poisoned({n, hv, dk}, DType::bf16), d_db = buf().poisoned({n, hv}, DType::bf16);
    Tensor d_dA = buf().upload(dA0, {hv}, DType::f32), d_ddt = buf().upload(ddt0, {c}, DType::f32);
    device_sync();
    kda_gates_forward(gpu(), d_f, d_A, d_dt, d_b, d_g, d_beta);
    kda_gates_backward(gpu(), d_dg, d_dbeta, d_gin, d_bin, d_A, d_df, d_dA, d_ddt, d_db);
    device_sync();
    const std::vector<float> g = DeviceBuffers::download(d_g);
    EXPECT_LT(rel_err(g, g_ref), kF32ElementwiseTol);
    EXPECT_LT(g[1], 0.f);  // softplus(-30 + dt) ~ 1e-14 does not round to 0
    EXPECT_LT(rel_err(DeviceBuffers::download(d_beta), beta_ref), kF32ElementwiseTol);
    EXPECT_LT(rel_err(DeviceBuffers::download(d_df), df_ref), kBf16Tol);
    EXPECT_LT(rel_err(DeviceBuffers::download(d_db), db_ref), kBf16Tol);
    EXPECT_LT(rel_err(increment(DeviceBuffers::download(d_dA), dA0), increment(dA_ref, dA0)), kF32SumTol);
    EXPECT_LT(rel_err(increment(DeviceBuffers::download(d_ddt), ddt0), increment(ddt_ref, ddt0)), kF32SumTol);
  }
}

// ------------------------------------------------------------------------------------------ gated_rmsnorm

TEST_F(GpuKdaLayerOps, GatedRmsnormForwardAndBackward) {
  struct Shape {
    int64_t rows, dim;
  };
  for (Shape s : {Shape{37, 128}, Shape{5, 77}, Shape{2000, 64}, Shape{3001, 128}, Shape{3, 1000}, Shape{101, 32},
                  Shape{333, 256}, Shape{1, 128}, Shape{20000, 128}}) {
    SCOPED_TRACE("rows=" + std::to_string(s.rows) + " dim=" + std::to_string(s.dim));
    buf().arena().reset();
    const int64_t r = s.rows, d = s.dim;
    const float eps = 1e-6f;
    std::vector<float> o = round_bf16(randn(r * d, 2.0f)), gate = round_bf16(randn(r * d, 2.0f));
    std::vector<float> w = round_bf16(randn(d, 0.2f, 1.0f)), dy = round_bf16(randn(r * d)), dw0 = randn(d);
    std::vector<float> y_ref(r * d), rstd_ref(r), do_ref(r * d), dgate_ref(r * d), dw_ref = dw0;
    gated_rmsnorm_forward(cpu(), cpu_f32(o, {r, d}), cpu_f32(gate, {r, d}), cpu_f32(w, {d}), cpu_f32(y_ref, {r, d}),
                          cpu_f32(rstd_ref, {r}), eps);
    gated_rmsnorm_backward(cpu(), cpu_f32(dy, {r, d}), cpu_f32(o, {r, d}), cpu_f32(gate, {r, d}), cpu_f32(w, {d}),
                           cpu_f32(rstd_ref, {r}), cpu_f32(do_ref, {r, d}), cpu_f32(dgate_ref, {r, d}),
                           cpu_f32(dw_ref, {d}));

    Tensor d_o = buf().upload(o, {r, d}, DType::bf16), d_gate = buf().upload(gate, {r, d}, DType::bf16);
    Tensor d_w = buf().upload(w, {d}, DType::bf16), d_y = buf().poisoned({r, d}, DType::bf16);
    Tensor d_rstd = buf().poisoned({r}, DType::f32), d_dy = buf().upload(dy, {r, d}, DType::bf16);
    Tensor d_do = buf().poisoned({r, d}, DType::bf16), d_dgate = buf().poisoned({r, d}, DType::bf16);
    Tensor d_dw = buf().upload(dw0, {d}, DType::f32);
    device_sync();
    gated_rmsnorm_forward(gpu(), d_o, d_gate, d_w, d_y, d_rstd, eps);
    gated_rmsnorm_backward(gpu(), d_dy, d_o, d_gate, d_w, d_rstd, d_do, d_dgate, d_dw);
    device_sync();
    EXPECT_LT(rel_err(DeviceBuffers::download(d_y), y_ref), kBf16Tol);
    EXPECT_LT(rel_err(DeviceBuffers::download(d_rstd), rstd_ref), kF32ElementwiseTol);
    EXPECT_LT(rel_err(DeviceBuffers::download(d_do), do_ref), kBf16Tol);
    EXPECT_LT(rel_err(DeviceBuffers::download(d_dgate), dgate_ref), kBf16Tol);
    EXPECT_LT(rel_err(increment(DeviceBuffers::download(d_dw), dw0), increment(dw_ref, dw0)), kF32SumTol);
  }
}

// ------------------------------------------------------------------------------------------ errors

TEST_F(GpuKdaLayerOps, CudaDtypeErrorsNameTheArgument) {
  buf().arena().reset();
  Tensor f = buf().zeros({4, 2, 8}, DType::bf16), b = buf().zeros({4, 2}, DType::bf16);
  Tensor A = buf().zeros({2}, DType::f32), dt = buf().zeros({16}, DType::f32);
  Tensor g_bf16 = buf().zeros({4, 2, 8}, DType::bf16), beta = buf().zeros({4, 2}, DType::f32);
  expect_error_mentioning([&] { kda_gates_forward(gpu(), f, A, dt, b, g_bf16, beta); }, "'g'");
  Tensor x = buf().zeros({4, 8}, DType::bf16), x32 = buf().zeros({4, 8}, DType::f32),
         w = buf().zeros({8, 4}, DType::bf16);
  Tensor cu = buf().upload_i32({0, 4}, {2});
  expect_error_mentioning([&] { short_conv_forward(gpu(), x, w, cu, x32); }, "'y'");
  Tensor w17 = buf().zeros({8, 17}, DType::bf16);
  expect_error_mentioning([&] { short_conv_forward(gpu(), x, w17, cu, x); }, "kernel size");
  Tensor halo32 = buf().zeros({1, 3, 8}, DType::f32), halo = buf().zeros({1, 3, 8}, DType::bf16);
  Tensor dw = buf().zeros({8, 4}, DType::f32);
  expect_error_mentioning([&] { short_conv_forward(gpu(), x, w, cu, x, halo32); }, "'halo'");
  expect_error_mentioning([&] { short_conv_backward(gpu(), x, x, w, cu, x, dw, Tensor{}, halo); }, "'dhalo'");
  expect_error_mentioning([&] { short_conv_backward(gpu(), x, x, w, cu, x, dw, halo, halo32); }, "'dhalo'");
  Tensor r_bf16 = buf().zeros({4}, DType::bf16);
  expect_error_mentioning([&] { l2norm_forward(gpu(), x, x, r_bf16, 1.f); }, "'rstd'");
  expect_error_mentioning([&] { l2norm_forward(*cpu_, x, x, r_bf16, 1.f); }, "context");
}

}  // namespace
}  // namespace hyd::kernels

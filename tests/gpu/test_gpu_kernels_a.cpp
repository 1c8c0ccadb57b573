// CUDA kernels vs the CPU f32 reference for embedding, rmsnorm, swiglu, rope and the elementwise
// ops. Both sides see the same bf16-rounded inputs; outputs are poisoned (NaN) before every run;
// shapes include odd sizes (scalar paths) and multiples of 8 (vector paths). Tolerances: bf16
// outputs rel_err < 1e-2, f32 outputs (rstd, dw, dtable) < 1e-3.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "kernels/elementwise.h"
#include "kernels/embedding.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::all_finite;
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
constexpr double kF32Tol = 1e-3;

class GpuKernelsA : public ::testing::Test {
 protected:
  void SetUp() override {
    HYD_REQUIRE_GPU();
    ctx_ = std::make_unique<ExecContext>(Device::cuda(0));
    buf_ = std::make_unique<DeviceBuffers>(Device::cuda(0), size_t(512) << 20);
    cpu_ = std::make_unique<ExecContext>(Device::cpu());
  }
  const ExecContext& gpu() const { return *ctx_; }
  const ExecContext& cpu() const { return *cpu_; }
  DeviceBuffers& buf() { return *buf_; }
  std::unique_ptr<ExecContext> ctx_, cpu_;
  std::unique_ptr<DeviceBuffers> buf_;
};

// ------------------------------------------------------------------------------------------ embedding

TEST_F(GpuKernelsA, EmbeddingForwardAndBackward) {
  struct Shape {
    int64_t n, vocab, dim;
  };
  for (Shape s : {Shape{37, 50, 96}, Shape{200, 7, 77}, Shape{513, 1000, 4096}, Shape{64, 3, 8}}) {
    SCOPED_TRACE("n=" + std::to_string(s.n) + " vocab=" + std::to_string(s.vocab) + " dim=" + std::to_string(s.dim));
    buf().arena().reset();
    std::vector<int32_t> ids = randint(s.n, 0, s.vocab);  // n > vocab for some shapes: repeated ids
    ids[0] = ids[1] = ids[2];
    std::vector<float> table = round_bf16(randn(s.vocab * s.dim)), dout = round_bf16(randn(s.n * s.dim));
    std::vector<float> dtable0 = randn(s.vocab * s.dim);  // dtable accumulates

    std::vector<float> out_ref(s.n * s.dim), dtable_ref = dtable0;
    embedding_forward(cpu(), cpu_i32(ids, {s.n}), cpu_f32(table, {s.vocab, s.dim}), cpu_f32(out_ref, {s.n, s.dim}));
    embedding_backward(cpu(), cpu_i32(ids, {s.n}), cpu_f32(dout, {s.n, s.dim}), cpu_f32(dtable_ref, {s.vocab, s.dim}));

    Tensor d_ids = buf().upload_i32(ids, {s.n});
    Tensor d_table = buf().upload(table, {s.vocab, s.dim}, DType::bf16);
    Tensor d_out = buf().poisoned({s.n, s.dim}, DType::bf16);
    Tensor d_dout = buf().upload(dout, {s.n, s.dim}, DType::bf16);
    Tensor d_dtable = buf().upload(dtable0, {s.vocab, s.dim}, DType::f32);
    device_sync();
    embedding_forward(gpu(), d_ids, d_table, d_out);
    embedding_backward(gpu(), d_ids, d_dout, d_dtable);
    device_sync();
    EXPECT_EQ(rel_err(DeviceBuffers::download(d_out), out_ref), 0.0);  // a copy: exact
    EXPECT_LT(rel_err(DeviceBuffers::download(d_dtable), dtable_ref), kF32Tol);
  }
}

// ------------------------------------------------------------------------------------------ rmsnorm

TEST_F(GpuKernelsA, RmsnormForwardAndBackward) {
  struct Shape {
    int64_t rows, dim;
  };
  // (Multiples of 256 up to 8192: the one-pass backward, several rows per block at 20000 x 1024 and 700 x 8192.)
  for (Shape s : {Shape{37, 96}, Shape{37, 4096}, Shape{5, 77}, Shape{1000, 128}, Shape{3001, 64}, Shape{2, 8200},
                  Shape{20000, 1024}, Shape{3, 256}, Shape{700, 8192}}) {
    SCOPED_TRACE("rows=" + std::to_string(s.rows) + " dim=" + std::to_string(s.dim));
    buf().arena().reset();
    const int64_t r = s.rows, d = s.dim;
    const float eps = 1e-6f;
    std::vector<float> x = round_bf16(randn(r * d, 2.0f)), w = round_bf16(randn(d, 0.2f, 1.0f));
    std::vector<float> dy = round_bf16(randn(r * d)), dw0 = randn(d);

    std::vector<float> y_ref(r * d), rstd_ref(r), dx_ref(r * d), dw_ref = dw0;
    rmsnorm_forward(cpu(), cpu_f32(x, {r, d}), cpu_f32(w, {d}), cpu_f32(y_ref, {r, d}), cpu_f32(rstd_ref, {r}), eps);
    rmsnorm_backward(cpu(), cpu_f32(dy, {r, d}), cpu_f32(x, {r, d}), cpu_f32(w, {d}), cpu_f32(rstd_ref, {r}),
                     cpu_f32(dx_ref, {r, d}), cpu_f32(dw_ref, {d}));

    Tensor d_x = buf().upload(x, {r, d}, DType::bf16), d_w = buf().upload(w, {d}, DType::bf16);
    Tensor d_y = buf().poisoned({r, d}, DType::bf16), d_rstd = buf().poisoned({r}, DType::f32);
    Tensor d_dy = buf().upload(dy, {r, d}, DType::bf16), d_dx = buf().poisoned({r, d}, DType::bf16);
    Tensor d_dw = buf().upload(dw0, {d}, DType::f32);
    device_sync();
    rmsnorm_forward(gpu(), d_x, d_w, d_y, d_rstd, eps);
    rmsnorm_backward(gpu(), d_dy, d_x, d_w, d_rstd, d_dx, d_dw);
    device_sync();
    EXPECT_LT(rel_err(DeviceBuffers::download(d_y), y_ref), kBf16Tol);
    EXPECT_LT(rel_err(DeviceBuffers::download(d_rstd), rstd_ref), kF32Tol);
    const std::vector<float> dx = DeviceBuffers::download(d_dx);
    EXPECT_LT(rel_err(dx, dx_ref), kBf16Tol);
    // dw: sum over rows of bf16 products; compare the increment so the random start does not hide errors.
    std::vector<float> inc = DeviceBuffers::download(d_dw), inc_ref = dw_ref;
    for (int64_t j = 0; j < d; ++j) {
      inc[j] -= dw0[j];
      inc_ref[j] -= dw0[j];
    }
    EXPECT_LT(rel_err(inc, inc_ref), kF32Tol);

    // In place: dx written over dy gives the same dx.
    Tensor d_dy2 = buf().upload(dy, {r, d}, DType::bf16), d_dw2 = buf().zeros({d}, DType::f32);
    device_sync();
    rmsnorm_backward(gpu(), d_dy2, d_x, d_w, d_rstd, d_dy2, d_dw2);
    device_sync();
    EXPECT_EQ(rel_err(DeviceBuffers::download(d_dy2), dx), 0.0);

    // With a residual gradient added in the same pass: into a fresh dx, and in place (dx = residual).
    std::vector<float> res = round_bf16(randn(r * d, 0.5f));
    std::vector<float> dxr_ref(r * d), dwr_ref(d, 0.f);
    rmsnorm_backward(cpu(), cpu_f32(dy, {r, d}), cpu_f32(x, {r, d}), cpu_f32(w, {d}), cpu_f32(rstd_ref, {r}),
                     cpu_f32(dxr_ref, {r, d}), cpu_f32(dwr_ref, {d}), cpu_f32(res, {r, d}));
    for (int64_t i = 0; i < r * d; ++i) EXPECT_EQ(dxr_ref[i], dx_ref[i] + res[i]) << "CPU residual, element " << i;
    Tensor d_res = buf().upload(res, {r, d}, DType::bf16), d_dx3 = buf().poisoned({r, d}, DType::bf16);
    Tensor d_dw3 = buf().zeros({d}, DType::f32);
    device_sync();
    rmsnorm_backward(gpu(), d_dy, d_x, d_w, d_rstd, d_dx3, d_dw3, d_res);
    device_sync();
    const std::vector<float> dx3 = DeviceBuffers::download(d_dx3);
    EXPECT_LT(rel_err(dx3, dxr_ref), kBf16Tol);
    rmsnorm_backward(gpu(), d_dy, d_x, d_w, d_rstd, d_res, d_dw3, d_res);
    device_sync();
    EXPECT_EQ(rel_err(DeviceBuffers::download(d_res), dx3), 0.0) << "in place on the residual";
  }
}

// ------------------------------------------------------------------------------------------ swiglu

TEST_F(GpuKernelsA, SwigluForwardAndBackward) {
  struct Shape {
    int64_t n, f;
  };
  for (Shape s : {Shape{37, 96}, Shape{64, 1376}, Shape{13, 77}, Shape{1, 1}}) {
    SCOPED_TRACE("n=" + std::to_string(s.n) + " f=" + std::to_string(s.f));
    buf().arena().reset();
    const int64_t n = s.n, f = s.f;
    std::vector<float> in = round_bf16(randn(n * 2 * f, 2.0f)), dout = round_bf16(randn(n * f));
    std::vector<float> out_ref(n * f), din_ref(n * 2 * f);
    swiglu_forward(cpu(), cpu_f32(in, {n, 2 * f}), cpu_f32(out_ref, {n, f}));
    swiglu_backward(cpu(), cpu_f32(dout, {n, f}), cpu_f32(in, {n, 2 * f}), cpu_f32(din_ref, {n, 2 * f}));

    Tensor d_in = buf().upload(in, {n, 2 * f}, DType::bf16), d_out = buf().poisoned({n, f}, DType::bf16);
    Tensor d_dout = buf().upload(dout, {n, f}, DType::bf16), d_din = buf().poisoned({n, 2 * f}, DType::bf16);
    device_sync();
    swiglu_forward(gpu(), d_in, d_out);
    swiglu_backward(gpu(), d_dout, d_in, d_din);
    device_sync();
    EXPECT_LT(rel_err(DeviceBuffers::download(d_out), out_ref), kBf16Tol);
    EXPECT_LT(rel_err(DeviceBuffers::download(d_din), din_ref), kBf16Tol);
  }
}

// ------------------------------------------------------------------------------------------ rope

TEST_F(GpuKernelsA, RopeForwardAndBackward) {
  struct Case {
    int64_t n, heads, head_dim;
    const char* scaling;
  };
  const int64_t max_pos = 8192;
  for (Case c :
       {Case{37, 4, 64, "default"}, Case{37, 3, 128, "llama3"}, Case{100, 8, 128, "yarn"}, Case{11, 5, 6, "linear"}}) {
    SCOPED_TRACE("n=" + std::to_string(c.n) + " heads=" + std::to_string(c.heads) +
                 " head_dim=" + std::to_string(c.head_dim) + " " + c.scaling);
    buf().arena().reset();
    const int64_t n = c.n, h = c.heads, d = c.head_dim, half = d / 2;
    RopeScaling sc;
    sc.type = c.scaling;
    sc.factor = 4;
    sc.original_max_position_embeddings = 2048;
    double af = 1;
    const std::vector<double> inv = rope_inv_freq(500000, static_cast<int>(d), sc, &af);
    std::vector<float> cos(max_pos * half), sin(max_pos * half);
    rope_build_tables(inv, af, max_pos, cos.data(), sin.data());
    std::vector<int32_t> pos = randint(n, 0, max_pos);
    pos[0] = 0;
    pos[n - 1] = max_pos - 1;
    const std::vector<float> x = round_bf16(randn(n * h * d)), dy = round_bf16(randn(n * h * d));

    std::vector<float> y_ref = x, dx_ref = dy;
    rope_forward(cpu(), cpu_f32(y_ref, {n, h, d}), cpu_i32(pos, {n}), cpu_f32(cos, {max_pos, half}),
                 cpu_f32(sin, {max_pos, half}));
    rope_backward(cpu(), cpu_f32(dx_ref, {n, h, d}), cpu_i32(pos, {n}), cpu_f32(cos, {max_pos, half}),
                  cpu_f32(sin, {max_pos, half}));

    Tensor d_pos = buf().upload_i32(pos, {n});
    Tensor d_cos = buf().upload(cos, {max_pos, half}, DType::f32),
           d_sin = buf().upload(sin, {max_pos, half}, DType::f32);
    Tensor d_x = buf().upload(x, {n, h, d}, DType::bf16), d_dy = buf().upload(dy, {n, h, d}, DType::bf16);
    device_sync();
    rope_forward(gpu(), d_x, d_pos, d_cos, d_sin);
    rope_backward(gpu(), d_dy, d_pos, d_cos, d_sin);
    device_sync();
    EXPECT_LT(rel_err(DeviceBuffers::download(d_x), y_ref), kBf16Tol);
    EXPECT_LT(rel_err(DeviceBuffers::download(d_dy), dx_ref), kBf16Tol);
  }
}

// ------------------------------------------------------------------------------------------ elementwise

TEST_F(GpuKernelsA, ElementwiseOps) {
  for (int64_t n : {int64_t(1), int64_t(1000), int64_t(100003)}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    buf().arena().reset();
    const std::vector<float> a = round_bf16(randn(n)), b = round_bf16(randn(n)), af = randn(n), bf = randn(n);

    // add_inplace bf16 and f32
    Tensor y16 = buf().upload(a, {n}, DType::bf16), x16 = buf().upload(b, {n}, DType::bf16);
    Tensor y32 = buf().upload(af, {n}, DType::f32), x32 = buf().upload(bf, {n}, DType::f32);
    device_sync();
    add_inplace(gpu(), y16, x16);
    add_inplace(gpu(), y32, x32);
    device_sync();
    std::vector<float> sum16(n), sum32(n);
    for (int64_t i = 0; i < n; ++i) {
      sum16[i] = a[i] + b[i];
      sum32[i] = af[i] + bf[i];
    }
    EXPECT_LT(rel_err(DeviceBuffers::download(y16), sum16), kBf16Tol);
    EXPECT_EQ(DeviceBuffers::download(y16), round_bf16(sum16));  // f32 sum rounded once
    EXPECT_EQ(DeviceBuffers::download(y32), sum32);

    // convert both ways, fill both dtypes, scale f32
    Tensor c16 = buf().poisoned({n}, DType::bf16), c32 = buf().poisoned({n}, DType::f32);
    Tensor src32 = buf().upload(af, {n}, DType::f32);
    Tensor f16 = buf().poisoned({n}, DType::bf16), f32 = buf().poisoned({n}, DType::f32);
    Tensor s32 = buf().upload(af, {n}, DType::f32);
    device_sync();
    convert(gpu(), c16, src32);
    convert(gpu(), c32, c16);
    fill(gpu(), f16, -0.3f);
    fill(gpu(), f32, 1.75f);
    scale_inplace(gpu(), s32, 0.5f);
    device_sync();
    EXPECT_EQ(DeviceBuffers::download(c16), round_bf16(af));
    EXPECT_EQ(DeviceBuffers::download(c32), round_bf16(af));
    EXPECT_EQ(DeviceBuffers::download(f16), std::vector<float>(n, bf16_to_float(float_to_bf16(-0.3f))));
    EXPECT_EQ(DeviceBuffers::download(f32), std::vector<float>(n, 1.75f));
    std::vector<float> half_af(n);
    for (int64_t i = 0; i < n; ++i) half_af[i] = af[i] * 0.5f;
    EXPECT_EQ(DeviceBuffers::download(s32), half_af);

    // same-dtype convert is a copy on the stream
    Tensor copy = buf().poisoned({n}, DType::f32);
    device_sync();
    convert(gpu(), copy, src32);
    device_sync();
    EXPECT_EQ(DeviceBuffers::download(copy), af);
  }
}

// f32 fill stores 16-byte vectors between a scalar head (up to the first 16-byte boundary) and a scalar tail:
// every start offset 0..3 and lengths around the vector width; the elements around the slice keep their poison.
TEST_F(GpuKernelsA, FillF32AtEveryAlignment) {
  for (int64_t off = 0; off < 4; ++off) {
    for (int64_t n : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{4}, int64_t{5}, int64_t{7}, int64_t{8}, int64_t{9},
                      int64_t{1001}, int64_t{70001}}) {
      SCOPED_TRACE("offset " + std::to_string(off) + " n " + std::to_string(n));
      buf().arena().reset();
      const Tensor all = buf().poisoned({n + 8}, DType::f32);
      device_sync();
      fill(gpu(), Tensor(static_cast<float*>(all.data) + off, DType::f32, all.device, {n}), -2.5f);
      device_sync();
      const std::vector<float> got = DeviceBuffers::download(all);
      for (int64_t i = 0; i < n + 8; ++i) {
        if (i >= off && i < off + n)
          ASSERT_EQ(got[i], -2.5f) << i;
        else
          ASSERT_TRUE(std::isnan(got[i])) << i;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ dispatch errors

TEST_F(GpuKernelsA, DispatcherRejectsWrongDtypesOnCuda) {
  Tensor x32 = buf().zeros({4, 8}, DType::f32), w = buf().zeros({8}, DType::bf16), y = buf().zeros({4, 8}, DType::bf16);
  Tensor rstd = buf().zeros({4}, DType::f32);
  expect_error_mentioning([&] { rmsnorm_forward(gpu(), x32, w, y, rstd, 1e-6f); }, "'x'");
  // CPU tensors with a CUDA tensor: a device mismatch, reported by the op.
  std::vector<float> host(32);
  expect_error_mentioning([&] { swiglu_forward(gpu(), y, cpu_f32(host, {4, 4})); }, "swiglu_forward");
  EXPECT_TRUE(all_finite(DeviceBuffers::download(y)));
}

}  // namespace
}  // namespace hyd::kernels

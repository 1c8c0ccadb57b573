// LASP-2 composition (kernels/kda_compose.h): the CUDA op (cuBLAS fp32 batched GEMMs) against the CPU
// reference on fresh random transitions, every rank position of groups of 1..5, outputs poisoned first.
// Also the CPU reference against a direct evaluation for one small case (a chain written out by hand).
// Tolerance: fp32 I/O, 1e-5 relative (different summation orders only).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/kda_compose.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::DeviceBuffers;
using test::randn;
using test::rel_err;

// M entries ~ N(0, 1/dk) so that chains of several ranks keep O(1) states.
std::vector<float> random_trans(int64_t P, int64_t S, int64_t dk, int64_t dv) {
  std::vector<float> t = randn(P * S * dk * (dk + dv));
  const float m_scale = 1.0f / std::sqrt(static_cast<float>(dk));
  for (int64_t i = 0; i < P * S; ++i)
    for (int64_t j = 0; j < dk * dk; ++j) t[i * dk * (dk + dv) + j] *= m_scale;
  return t;
}

TEST(KdaCompose, CpuMatchesAHandWrittenChain) {
  // P = 3, one state, dk = dv = 1: M and B are scalars. prefix(rank 2) = m1 b0 + b1; suffix(rank 0) = m2 l2... :
  // G = L2 at p = 2, then G = m1 G + L1 at p = 1.
  const std::vector<float> trans{2.0f, 3.0f, -1.0f, 5.0f, 0.5f, 7.0f};  // (m0, b0), (m1, b1), (m2, b2)
  const std::vector<float> adj{10.0f, 20.0f, 30.0f};
  float out = 0;
  cpu::kda_compose_prefix(trans.data(), 3, 1, 1, 1, 2, &out);
  EXPECT_FLOAT_EQ(out, -1.0f * 3.0f + 5.0f);
  cpu::kda_compose_suffix(trans.data(), adj.data(), 3, 1, 1, 1, 0, &out);
  EXPECT_FLOAT_EQ(out, -1.0f * 30.0f + 20.0f);
  cpu::kda_compose_prefix(trans.data(), 3, 1, 1, 1, 0, &out);
  EXPECT_FLOAT_EQ(out, 0.0f);
}

TEST(GpuKdaCompose, PrefixAndSuffixMatchCpu) {
  HYD_REQUIRE_GPU();
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0));
  struct Case {
    int64_t P, S, dk, dv;
  };
  for (Case c :
       {Case{1, 3, 8, 8}, Case{2, 16, 64, 64}, Case{4, 8, 128, 128}, Case{5, 3, 64, 128}, Case{3, 2, 32, 16}}) {
    const std::vector<float> trans = random_trans(c.P, c.S, c.dk, c.dv), adj = randn(c.P * c.S * c.dk * c.dv);
    const Tensor t_d = buf.upload(trans, {c.P, c.S, c.dk, c.dk + c.dv}, DType::f32);
    const Tensor a_d = buf.upload(adj, {c.P, c.S, c.dk, c.dv}, DType::f32);
    for (int rank = 0; rank < c.P; ++rank) {
      const std::string what = "P=" + std::to_string(c.P) + " S=" + std::to_string(c.S) +
                               " dk=" + std::to_string(c.dk) + " dv=" + std::to_string(c.dv) +
                               " rank=" + std::to_string(rank);
      SCOPED_TRACE(what);
      std::vector<float> ref(c.S * c.dk * c.dv);
      const Tensor out = buf.poisoned({c.S, c.dk, c.dv}, DType::f32),
                   work = buf.poisoned({c.S, c.dk, c.dv}, DType::f32);
      cpu::kda_compose_prefix(trans.data(), c.P, c.S, c.dk, c.dv, rank, ref.data());
      kda_compose_prefix(ctx, t_d, rank, out, work);
      ctx.synchronize();
      const std::vector<float> got = DeviceBuffers::download(out);
      const double e1 = rel_err(got, ref);
      cpu::kda_compose_suffix(trans.data(), adj.data(), c.P, c.S, c.dk, c.dv, rank, ref.data());
      const Tensor out2 = buf.poisoned({c.S, c.dk, c.dv}, DType::f32);
      kda_compose_suffix(ctx, t_d, a_d, rank, out2, work);
      ctx.synchronize();
      const std::vector<float> got2 = DeviceBuffers::download(out2);
      const double e2 = rel_err(got2, ref);
      std::printf("  %-40s prefix rel_err %.3g, suffix rel_err %.3g\n", what.c_str(), e1, e2);
      // rank 0's prefix and rank P-1's suffix are exactly zero.
      if (rank == 0) {
        for (float v : got) ASSERT_EQ(v, 0.0f);
      } else {
        EXPECT_LT(e1, 1e-5);
      }
      if (rank == c.P - 1) {
        for (float v : got2) ASSERT_EQ(v, 0.0f);
      } else {
        EXPECT_LT(e2, 1e-5);
      }
    }
  }
}

}  // namespace
}  // namespace hyd::kernels

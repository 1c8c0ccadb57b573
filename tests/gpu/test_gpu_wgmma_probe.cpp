// kernels/wgmma_probe.h on the device against the CPU, on random bf16 inputs (outputs poisoned first): s = q k^T
// (the K-major descriptors and the accumulator layout), then o = bf16(s) v from the device's own s (the register A
// fragments and the MN-major descriptor of v), each within fp32 summation-order error (rel_err < 1e-5).
#include <gtest/gtest.h>

#include <vector>

#include "tests/common/test_util.h"

#ifdef HYD_WITH_WGMMA
#include "kernels/wgmma_probe.h"
#endif

namespace hyd {
namespace {

using test::DeviceBuffers;

TEST(GpuWgmmaProbe, SwizzledTilesDescriptorsAndFragments) {
  HYD_REQUIRE_GPU();
#ifndef HYD_WITH_WGMMA
  GTEST_SKIP() << "built without the sm_90a kernels (HYD_CUDA_ARCH is not 90)";
#else
  constexpr int64_t R = 64, D = 128;
  const std::vector<float> q = test::round_bf16(test::randn(R * D)), k = test::round_bf16(test::randn(R * D)),
                           v = test::round_bf16(test::randn(R * D));
  DeviceBuffers buf(Device::cuda(0), size_t(4) << 20);
  const Tensor tq = buf.upload(q, {R, D}, DType::bf16), tk = buf.upload(k, {R, D}, DType::bf16),
               tv = buf.upload(v, {R, D}, DType::bf16);
  const Tensor ts = buf.poisoned({R, R}, DType::f32), to = buf.poisoned({R, D}, DType::f32);
  test::device_sync();
  kernels::cuda::wgmma_probe(static_cast<const bf16*>(tq.data), static_cast<const bf16*>(tk.data),
                             static_cast<const bf16*>(tv.data), static_cast<float*>(ts.data),
                             static_cast<float*>(to.data), nullptr);
  test::device_sync();
  const std::vector<float> s = DeviceBuffers::download(ts), o = DeviceBuffers::download(to);

  std::vector<float> s_ref(R * R), o_ref(R * D);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < R; ++c) {
      double acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(q[r * D + d]) * k[c * D + d];
      s_ref[r * R + c] = static_cast<float>(acc);
    }
  const std::vector<float> p = test::round_bf16(s);  // the device's s, rounded as the kernel rounds it
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) {
      double acc = 0;
      for (int64_t c = 0; c < R; ++c) acc += static_cast<double>(p[r * R + c]) * v[c * D + d];
      o_ref[r * D + d] = static_cast<float>(acc);
    }
  ASSERT_TRUE(test::all_finite(s)) << "s has unwritten (poisoned) elements";
  ASSERT_TRUE(test::all_finite(o)) << "o has unwritten (poisoned) elements";
  EXPECT_LT(test::rel_err(s, s_ref), 1e-5);
  EXPECT_LT(test::rel_err(o, o_ref), 1e-5);
#endif
}

}  // namespace
}  // namespace hyd

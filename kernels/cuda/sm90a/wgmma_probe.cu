// kernels/wgmma_probe.h: one block of 128 threads (one warpgroup).
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/sm90a/wgmma.cuh"
#include "kernels/wgmma_probe.h"

namespace hyd::kernels::cuda {

using namespace cuda_detail;

namespace {

constexpr int kRows = 64, kD = 128, kTileBytes = kRows * kD * 2;  // 16 KB per operand

// A [64][128] bf16 global matrix (row stride 128) into the two-block swizzled layout at shared address dst.
__device__ __forceinline__ void load_tile(uint32_t dst, const __nv_bfloat16* src) {
  for (int i = threadIdx.x; i < kRows * kD / 8; i += blockDim.x) {
    const int r = i / (kD / 8), c = (i % (kD / 8)) * 8;
    ptx::cp_async16(dst + wgmma::tile128_offset(kRows, r, c), src + r * kD + c, true);
  }
}

__global__ void __launch_bounds__(128) wgmma_probe_kernel(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                          const __nv_bfloat16* v, float* s_out, float* o_out) {
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (ptx::smem_addr(smem_raw) + 1023u) & ~1023u;  // swizzle atoms are 1024-byte aligned
  const uint32_t sq = base, sk = base + kTileBytes, sv = base + 2 * kTileBytes;
  load_tile(sq, q);
  load_tile(sk, k);
  load_tile(sv, v);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  wgmma::fence_proxy_async();
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // s = q k^T: both K-major; k16 step j reads columns 16 j.. of q and k (block j / 4, 32 (j % 4) bytes in).
  float s[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = 0.f;
  wgmma::fence();
#pragma unroll
  for (int j = 0; j < kD / 16; ++j) {
    const uint32_t off = static_cast<uint32_t>((j >> 2) * kRows * 128 + (j & 3) * 32);
    wgmma::mma_m64n64k16_ss(s, wgmma::desc_sw128(sq + off, 16, 1024), wgmma::desc_sw128(sk + off, 16, 1024), j > 0);
  }
  wgmma::commit();
  wgmma::wait<0>();
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = 16 * warp + g, c = 8 * i + 2 * t;
    s_out[r * kRows + c] = s[4 * i];
    s_out[r * kRows + c + 1] = s[4 * i + 1];
    s_out[(r + 8) * kRows + c] = s[4 * i + 2];
    s_out[(r + 8) * kRows + c + 1] = s[4 * i + 3];
  }

  // o = bf16(s) v: A from registers (the k16 slice j of s is d[8 j .. 8 j + 7]), v MN-major (keys 16 j.. start
  // 2048 j bytes in; the two 64-column blocks kRows * 128 bytes apart).
  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  wgmma::fence();
#pragma unroll
  for (int j = 0; j < kRows / 16; ++j) {
    const uint32_t a[4] = {ptx::pack_bf16(s[8 * j], s[8 * j + 1]), ptx::pack_bf16(s[8 * j + 2], s[8 * j + 3]),
                           ptx::pack_bf16(s[8 * j + 4], s[8 * j + 5]), ptx::pack_bf16(s[8 * j + 6], s[8 * j + 7])};
    wgmma::mma_m64n128k16_rs_tb(o, a, wgmma::desc_sw128(sv + 2048 * j, kRows * 128, 1024), j > 0);
  }
  wgmma::commit();
  wgmma::wait<0>();
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int r = 16 * warp + g, c = 8 * i + 2 * t;
    o_out[r * kD + c] = o[4 * i];
    o_out[r * kD + c + 1] = o[4 * i + 1];
    o_out[(r + 8) * kD + c] = o[4 * i + 2];
    o_out[(r + 8) * kD + c + 1] = o[4 * i + 3];
  }
}

}  // namespace

void wgmma_probe(const bf16* q, const bf16* k, const bf16* v, float* s, float* o, void* stream) {
  constexpr int smem = 3 * kTileBytes + 1024;
  CHECK_CUDA(cudaFuncSetAttribute(wgmma_probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  wgmma_probe_kernel<<<1, 128, smem, as_stream(stream)>>>(as_nv(q), as_nv(k), as_nv(v), s, o);
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

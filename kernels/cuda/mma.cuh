// PTX wrappers shared by the tensor-core kernels (flash attention, KDA): cp.async, ldmatrix,
// mma.sync m16n8k16 bf16 -> fp32, bf16 packing, and the XOR-swizzled shared-memory tile layout.
//
// MMA fragment layouts (PTX ISA, m16n8k16 .bf16; lane = 4 g + t): A a0 (row g, k 2t..2t+1), a1 (row
// g+8), a2 (row g, k 2t+8..), a3 (row g+8, k 2t+8..); B b0 (k 2t..2t+1, col g), b1 (k 2t+8..);
// C c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8). ldmatrix x4: lanes 8i..8i+7 give the row
// addresses of matrix i, register i returns matrix i (non-trans: row lane/4, elements 2t, 2t+1;
// .trans: the transposed 8x8 block, i.e. stored rows 2t, 2t+1 of column lane/4).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

namespace hyd::kernels::cuda::ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; with valid == false nothing is read and the destination is zeroed.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a b for one m16n8k16 tile (bf16 inputs, fp32 accumulators).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a bf16 pair: `lo` in the low half (the lower column index of a fragment).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}
__device__ __forceinline__ float2 unpack_bf16(uint32_t u) {
  __nv_bfloat162 v;
  memcpy(&v, &u, sizeof(u));
  return __bfloat1622float2(v);
}

constexpr float kLog2e = 1.4426950408889634f;  // log2(e): exp(x) = 2^(x log2 e)
constexpr float kLn2 = 0.6931471805599453f;    // ln(2): ln(x) = log2(x) ln 2

// 2^x; exact 0 for x = -inf.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Byte offset of 16-byte chunk c of row r in a row-major bf16 tile with CHUNKS chunks (8 elements)
// per row. The chunk index is XORed with r mod 8, so the 8 rows an ldmatrix matrix reads (same
// logical chunk, consecutive rows) hit 8 different bank groups. CHUNKS >= 8.
template <int CHUNKS>
__device__ __forceinline__ uint32_t swz(int r, int c) {
  return static_cast<uint32_t>((r * CHUNKS + (c ^ (r & 7))) * 16);
}

// Starts copying rows [0, ROWS) of a ROWS x D bf16 tile (row r at src + r * stride elements) into
// the swizzled tile at shared address dst; rows >= valid are zero-filled and not read. Row 0 must
// be a valid address. All THREADS threads of the block call it.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile_async(uint32_t dst, const __nv_bfloat16* src, int64_t stride, int valid) {
  constexpr int kChunks = D / 8;
  static_assert((ROWS * kChunks) % THREADS == 0, "tile copy must split evenly over the threads");
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / THREADS; ++it) {
    const int idx = it * THREADS + static_cast<int>(threadIdx.x);
    const int r = idx / kChunks, c = idx % kChunks;
    const bool ok = r < valid;
    cp_async16(dst + swz<kChunks>(r, c), ok ? src + r * stride + c * 8 : src, ok);
  }
}

}  // namespace hyd::kernels::cuda::ptx

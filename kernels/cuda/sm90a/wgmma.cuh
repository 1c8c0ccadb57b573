// Hopper warpgroup MMA (wgmma, sm_90a only: this folder is compiled for compute_90a / sm_90a alone) for the
// bf16 -> fp32 products of attention: shared-memory matrix descriptors of 128-byte-swizzled tiles, the fences,
// and m64nNk16 with both operands in shared memory (SS) or A in registers (RS).
//
// Tile layout (the one a descriptor with 128-byte swizzling reads, and TMA's 128-byte swizzle writes): a [rows][64]
// 128 bytes per row, 8 rows (1024 bytes, 1024-byte aligned) per swizzle atom; within an atom the 16-byte chunk c of row
// r sits at chunk c ^ (r % 8) (the same XOR pattern as ptx::swz<8> of mma.cuh). A [rows][128] tile (head dim 128) is
// two such blocks, columns 0-63 then 64-127.
//  * K-major operand (A of Q K^T: Q rows; B of Q K^T: K rows, the reduction over the head dim): SBO = 1024 (the
//    next 8 rows), LBO unused; the k16 step j starts 32 j bytes into its 64-column block.
//  * MN-major operand (B of P V: V rows are keys = the reduction dimension, columns the output's head dim):
//    SBO = 1024 (the next 8 keys), LBO = the byte distance of the two 64-column blocks (N = 128 spans both); the
//    k16 step j starts 2048 j bytes in (two atoms of 8 keys); the instruction's B-transpose flag is 1.
// Accumulators (fp32, m64nN, 128 threads; warp w of the warpgroup, lane = 4 g + t): d[4 i + 0..1] = rows 16 w + g,
// columns 8 i + 2 t, + 1; d[4 i + 2..3] = row 16 w + g + 8, the same columns. A k16 slice of them (columns 16 j ..
// 16 j + 15, d[8 j .. 8 j + 7]) packed to bf16 pairs is the A register fragment of that k step (rows g / g + 8,
// k 2 t.. / 2 t + 8..), as with mma.sync.
#pragma once

#include <cstdint>

namespace hyd::kernels::cuda::wgmma {

// The 64-bit shared-memory matrix descriptor: start address, leading / stride byte offsets (16-byte units),
// base offset 0 (atoms 1024-byte aligned), 128-byte swizzle (mode 1 in bits 62-63).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t smem_byte_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((smem_byte_addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32;
  d |= static_cast<uint64_t>(1) << 62;
  return d;
}

// d advanced by `bytes` (a multiple of 16) along its tile, e.g. to a k step's slice: the add lands in the start-address
// field (bits 0-13, 16-byte units) and cannot carry into the next one, shared memory being under 256 KB. Building a
// tile's descriptor once and advancing it per product, instead of desc_sw128 for each, took ~230 instructions off
// each flash attention kernel (1-3% faster; docs/benchmarks.md stop 35).
__device__ __forceinline__ uint64_t desc_advance(uint64_t d, uint32_t bytes) { return d + (bytes >> 4); }

// The calling thread's warp index, read from lane 0 so that the compiler knows it is the same in every lane: the
// descriptors built from it then stay in uniform registers.
__device__ __forceinline__ int warp_index() { return __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x >> 5), 0); }

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written by ordinary stores or cp.async, read next by wgmma (the async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving reads or writes of these registers across a wgmma wait or fence (the asm
// statements of an asynchronous product only name them at issue).
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int M, int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[M][N]) {
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// The fp32 accumulators of an m64nN product as asm operands (N / 2 a thread) and their operand list.
#define HYD_WGMMA_ACC32(d)                                                                                    \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),  \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define HYD_WGMMA_ACC64(d)                                                                                       \
  HYD_WGMMA_ACC32(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), \
      "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]),    \
      "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),    \
      "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),    \
      "+f"(d[63])
#define HYD_WGMMA_OPS32                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
#define HYD_WGMMA_OPS64                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "          \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "

// d (64 x 128) = A B^T (+ d when accumulate): A and B K-major descriptors (B: 128 rows).
__device__ __forceinline__ void mma_m64n128k16_ss(float (&d)[64], uint64_t a, uint64_t b, bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\nwgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " HYD_WGMMA_OPS64
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : HYD_WGMMA_ACC64(d)
      : "l"(a), "l"(b), "r"(accumulate ? 1 : 0));
#endif
}

// d (64 x 64) = A B (+ d when accumulate), both operands from shared memory: TA / TB = 0 for a K-major descriptor
// (A: rows of M; B: rows of N, i.e. B^T stored), 1 for an MN-major one (transposed read).
template <int TA, int TB>
__device__ __forceinline__ void mma_m64n64k16_ss(float (&d)[32], uint64_t a, uint64_t b, bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\nwgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " HYD_WGMMA_OPS32
      "%32, %33, p, 1, 1, %35, %36;\n}\n"
      : HYD_WGMMA_ACC32(d)
      : "l"(a), "l"(b), "r"(accumulate ? 1 : 0), "n"(TA), "n"(TB));
#endif
}

// d (64 x 128) += A B with A from registers (a: this thread's bf16 pairs of the k16 slice) and B an MN-major
// descriptor (transposed read).
__device__ __forceinline__ void mma_m64n128k16_rs_tb(float (&d)[64], const uint32_t (&a)[4], uint64_t b,
                                                     bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\nwgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " HYD_WGMMA_OPS64
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : HYD_WGMMA_ACC64(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate ? 1 : 0));
#endif
}

#undef HYD_WGMMA_ACC32
#undef HYD_WGMMA_ACC64
#undef HYD_WGMMA_OPS32
#undef HYD_WGMMA_OPS64

}  // namespace hyd::kernels::cuda::wgmma

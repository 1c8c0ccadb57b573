// Hopper tensor memory accelerator (TMA) loads and shared-memory barriers (mbarrier), sm_90a only (this folder):
// the pieces of a producer / consumer pipeline in which one thread loads 2-D tiles of a global tensor into shared
// memory and the consuming warps wait on a barrier's phase instead of a block-wide __syncthreads.
//
// Protocol of one pipeline stage (a shared buffer and two barriers, `full` and `empty`):
//  * producer: wait(empty, phase of the previous use) unless it is the first use; arrive_expect_tx(full, bytes);
//    load_2d(...) for each box (each completes `bytes` of the transaction on `full` when it lands);
//  * consumers: wait(full, use & 1); read the buffer; once their reads are complete, arrive(empty) (the empty
//    barrier's count is the number of arriving threads).
// Host side: the kernel's launcher encodes the CUtensorMap (cuTensorMapEncodeTiled) and passes it as a
// `const __grid_constant__` parameter.
#pragma once

#include <cstdint>

namespace hyd::kernels::cuda::tma {

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// After the barriers' initialisation, before the block-wide sync that publishes them to the async proxy (TMA).
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival plus `bytes` expected from asynchronous copies (complete_tx) before the phase can complete.
__device__ __forceinline__ void arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Blocks until the barrier's phase with the given parity (0 / 1) has completed.
__device__ __forceinline__ void wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
  } while (done == 0);
}

// The box of `map` at element coordinates (x: the contiguous dimension, y: rows) into shared memory at dst (1024-byte
// aligned for the 128-byte swizzle); completes its bytes on barrier bar. Out-of-bounds elements are zeros.
__device__ __forceinline__ void load_2d(uint32_t dst, const void* map, int x, int y, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
}

// Adds the shared-memory box at src (laid out as load_2d would have written it) to the box of `map` at (x, y), f32
// element-wise in the memory system (atomic per element against other blocks' adds; elements outside the tensor are
// skipped). Asynchronous: commit_group() after the adds of one buffer, wait_group_read<0>() before it is written
// again or the block exits. The writing threads' fence.proxy.async and a barrier come before the issuing thread.
__device__ __forceinline__ void reduce_add_2d(const void* map, int x, int y, uint32_t src) {
  asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(x), "r"(y), "r"(src)
               : "memory");
}
__device__ __forceinline__ void commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}

}  // namespace hyd::kernels::cuda::tma

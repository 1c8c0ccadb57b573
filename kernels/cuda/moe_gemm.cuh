// The grouped expert GEMMs of kernels/cuda/moe.cu as block programs (the design of kda_chunk.cuh): each
// program is the body of one thread block of kThreads threads, written as phases (a parallel-for over
// the phase's outputs whose threads never read what another thread of the phase writes) separated by
// block barriers, and a tile product whose multiply-accumulate is the executor's. The same code runs
//   - on the GPU (DeviceExec: phase = call + __syncthreads(), the product on bf16 tensor cores with WMMA
//     16x16x16 fragments and f32 accumulators), and
//   - serially on the host (HostExec: phase = loop over the thread ids, the product as plain loops), so
//     that the emulation test (tests/gpu/test_gpu_moe.cpp, MoeGemmEmulation) checks the indexing of the
//     programs against the CPU reference on machines without a GPU.
// Programs branch or return only on block-uniform values.
//
// Row-grouped product (forward y = x W_e^T, and dx = dy W_e): the rows of expert e are R_e = [off_e, off_e+1);
// block (bx, by) owns the bx-th (expert, 64-row tile) pair, enumerating the experts in order and each
// expert's ceil(|R_e| / 64) tiles (a bx past the last tile returns: the grid's x size, ceil(R / 64) + E,
// bounds the tile count without knowing the counts), and output columns [64 by, 64 by + 64):
//   c[R_e rows of the tile, cols] = a[those rows, 0:kdim] op(W_e),  W_e = w + e ncols kdim,
//   op(W_e)[kk, n] = W_e[n, kk] (B_TRANS: W_e [ncols, kdim])  |  W_e[kk, n] (W_e [kdim, ncols]).
// Weight gradient: block (bx, by, e) owns dW_e[64 by .. + 64, 64 bx .. + 64] (dW_e [n, k], f32) and adds
// sum over r in R_e of dy[r, :]^T x[r, :] to it; an expert without rows returns at once (dW_e untouched).
// Every output element has exactly one writer: deterministic, no atomics.
#pragma once

#include <cstddef>
#include <cstdint>

#include "trainer/core/dtype.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <mma.h>
#define HYD_MOE_HD __host__ __device__ __forceinline__
#else
#define HYD_MOE_HD inline
#endif

namespace hyd::kernels::moe_gemm {

constexpr int BM = 64, BN = 64, BK = 32;                 // block tile (rows x cols) and k-step
constexpr int kThreads = 128;                            // 4 warps in a 2 x 2 grid, each 32 x 32 = 2 x 2 WMMA fragments
constexpr int LDA = BK + 8, LDB = BN + 8, LDC = BN + 4;  // padded rows (WMMA: multiples of 8 bf16 / 4 f32)

// Shared memory of one block. Carved from a raw byte buffer (bf16 has a default member initialiser, which
// __shared__ variables may not have). Offsets of a, b, c: 0, 5120, 9728 bytes (multiples of 32: WMMA).
struct GemmSmem {
  bf16 a[BM][LDA];   // A tile (m, kk)
  bf16 b[BK][LDB];   // B tile (kk, n)
  float c[BM][LDC];  // the block's result
};

static_assert(offsetof(GemmSmem, b) % 32 == 0 && offsetof(GemmSmem, c) % 32 == 0, "WMMA needs 32-byte aligned tiles");

struct RowTile {
  int expert, row0, rows;  // expert -1: past the last tile
};

HYD_MOE_HD bf16 to_bf16(float x) {
#ifdef __CUDA_ARCH__
  const __nv_bfloat16 h = __float2bfloat16_rn(x);
  return *reinterpret_cast<const bf16*>(&h);
#else
  return float_to_bf16(x);
#endif
}
HYD_MOE_HD bf16 bf16_zero() {
  bf16 z;
  z.bits = 0;
  return z;
}

// The tile-th (expert, 64-row tile) pair over the experts in order.
HYD_MOE_HD RowTile find_row_tile(const int32_t* offsets, int e_num, int64_t tile) {
  RowTile r{-1, 0, 0};
  for (int e = 0; e < e_num; ++e) {
    const int cnt = offsets[e + 1] - offsets[e], tiles = (cnt + BM - 1) / BM;
    if (tile < tiles) {
      const int t = static_cast<int>(tile);
      r.expert = e;
      r.row0 = offsets[e] + t * BM;
      r.rows = cnt - t * BM < BM ? cnt - t * BM : BM;
      return r;
    }
    tile -= tiles;
  }
  return r;
}

// V consecutive elements along an operand's contiguous dimension, moved as one access (V = 8: 16 bytes).
template <int V>
struct alignas(2 * V) Bf16Vec {
  bf16 v[V];
};
template <int V>
HYD_MOE_HD Bf16Vec<V> load_vec(const bf16* p) {  // p aligned to 2 V bytes
  return *reinterpret_cast<const Bf16Vec<V>*>(p);
}
template <int V>
HYD_MOE_HD Bf16Vec<V> zero_vec() {
  Bf16Vec<V> z;
  for (int i = 0; i < V; ++i) z.v[i] = bf16_zero();
  return z;
}

// Whether the programs may move V = 8 elements at a time: every contiguous extent a multiple of 8 (a pack
// is then wholly inside or wholly outside an operand, and 16-byte aligned) and the bases 16-byte aligned.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline bool rows_vec8(const bf16* a, const bf16* w, int64_t kdim, int64_t ncols, bool b_trans) {
  return kdim % 8 == 0 && (b_trans || ncols % 8 == 0) && aligned16(a) && aligned16(w);
}
inline bool wgrad_vec8(const bf16* dy, const bf16* x, int64_t n, int64_t k) {
  return n % 8 == 0 && k % 8 == 0 && aligned16(dy) && aligned16(x);
}

// sm.c[m, n] = sum over kk < kdim of A(m, kk) B(kk, n). load_a(m, kk) / load_b(kk, n) give the V elements
// starting there along the operand's contiguous dimension (zeros outside the operands): A_K_FAST / B_N_FAST
// say which dimension that is (kk for A, n for B when true), and consecutive threads step along it.
template <bool A_K_FAST, bool B_N_FAST, int V, class Exec, class LoadA, class LoadB>
HYD_MOE_HD void tile_product(Exec& ex, int64_t kdim, const LoadA& load_a, const LoadB& load_b, GemmSmem& sm) {
  static_assert(BK % V == 0 && BM % V == 0 && BN % V == 0, "pack width must divide the tile");
  ex.zero_acc();
  for (int64_t k0 = 0; k0 < kdim; k0 += BK) {
    ex.phase([&](int t) {
      for (int idx = t; idx < BM * BK / V; idx += kThreads) {
        const int m = A_K_FAST ? idx / (BK / V) : (idx % (BM / V)) * V;
        const int kk = A_K_FAST ? (idx % (BK / V)) * V : idx / (BM / V);
        const Bf16Vec<V> p = load_a(m, k0 + kk);
        for (int i = 0; i < V; ++i) {
          if (A_K_FAST)
            sm.a[m][kk + i] = p.v[i];
          else
            sm.a[m + i][kk] = p.v[i];
        }
      }
      for (int idx = t; idx < BK * BN / V; idx += kThreads) {
        const int kk = B_N_FAST ? idx / (BN / V) : (idx % (BK / V)) * V;
        const int n = B_N_FAST ? (idx % (BN / V)) * V : idx / (BK / V);
        const Bf16Vec<V> p = load_b(k0 + kk, n);
        for (int i = 0; i < V; ++i) {
          if (B_N_FAST)
            sm.b[kk][n + i] = p.v[i];
          else
            sm.b[kk + i][n] = p.v[i];
        }
      }
    });
    ex.mma(sm);  // reads the tiles, then a barrier (the next k-step overwrites them)
  }
  ex.store_acc(sm);  // sm.c, then a barrier
}

// V = 8 only where rows_vec8 holds.
template <bool B_TRANS, int V, class Exec>
HYD_MOE_HD void grouped_rows_program(Exec& ex, int64_t bx, int64_t by, const int32_t* offsets, int e_num, const bf16* a,
                                     const bf16* w, bf16* c, int64_t kdim, int64_t ncols, GemmSmem& sm, RowTile& tile) {
  ex.phase([&](int t) {
    if (t == 0) tile = find_row_tile(offsets, e_num, bx);
  });
  const RowTile rt = tile;
  if (rt.expert < 0) return;
  const int64_t row0 = rt.row0, n0 = by * BN;
  const int rows = rt.rows;
  const bf16* we = w + int64_t(rt.expert) * ncols * kdim;
  auto load_a = [&](int m, int64_t kk) {
    return m < rows && kk < kdim ? load_vec<V>(a + (row0 + m) * kdim + kk) : zero_vec<V>();
  };
  auto load_b = [&](int64_t kk, int n) {
    if (kk >= kdim || n0 + n >= ncols) return zero_vec<V>();
    return load_vec<V>(B_TRANS ? we + (n0 + n) * kdim + kk : we + kk * ncols + n0 + n);
  };
  tile_product<true, !B_TRANS, V>(ex, kdim, load_a, load_b, sm);
  ex.phase([&](int t) {
    for (int idx = t; idx < BM * BN; idx += kThreads) {
      const int m = idx / BN, n = idx % BN;
      if (m < rows && n0 + n < ncols) c[(row0 + m) * ncols + n0 + n] = to_bf16(sm.c[m][n]);
    }
  });
}

// dy [R, n], x [R, k], dw [E, n, k] f32. V = 8 only where wgrad_vec8 holds.
template <int V, class Exec>
HYD_MOE_HD void grouped_wgrad_program(Exec& ex, int64_t bx, int64_t by, int64_t e, const int32_t* offsets,
                                      const bf16* dy, const bf16* x, float* dw, int64_t n, int64_t k, GemmSmem& sm) {
  const int64_t row0 = offsets[e], cnt = offsets[e + 1] - row0;
  if (cnt == 0) return;  // no rows: dW_e untouched
  const int64_t m0 = by * BM, c0 = bx * BN;
  auto load_a = [&](int m, int64_t kk) {
    return kk < cnt && m0 + m < n ? load_vec<V>(dy + (row0 + kk) * n + m0 + m) : zero_vec<V>();
  };
  auto load_b = [&](int64_t kk, int cc) {
    return kk < cnt && c0 + cc < k ? load_vec<V>(x + (row0 + kk) * k + c0 + cc) : zero_vec<V>();
  };
  tile_product<false, true, V>(ex, cnt, load_a, load_b, sm);
  float* dwe = dw + e * n * k;
  ex.phase([&](int t) {
    for (int idx = t; idx < BM * BN; idx += kThreads) {
      const int m = idx / BN, cc = idx % BN;
      if (m0 + m < n && c0 + cc < k) dwe[(m0 + m) * k + c0 + cc] += sm.c[m][cc];
    }
  });
}

#if defined(__CUDACC__)
// Every thread runs the program; the product on tensor cores.
struct DeviceExec {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];

  template <class F>
  __device__ __forceinline__ void phase(F&& f) {
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
  __device__ __forceinline__ void zero_acc() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }
  __device__ __forceinline__ void mma(const GemmSmem& sm) {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const __nv_bfloat16*>(&sm.a[wm * 32 + i * 16][ks]), LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], reinterpret_cast<const __nv_bfloat16*>(&sm.b[ks][wn * 32 + j * 16]), LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  __device__ __forceinline__ void store_acc(GemmSmem& sm) {
    const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(&sm.c[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], LDC,
                                        nvcuda::wmma::mem_row_major);
    __syncthreads();
  }
};
#endif

// Serial phases (`reverse`: threads last to first, so that a test running both orders sees any thread that
// reads what another thread of the same phase writes); the product in f32 loops over the whole tile.
struct HostExec {
  bool reverse = false;
  float acc[BM][BN];

  template <class F>
  void phase(F&& f) {
    for (int i = 0; i < kThreads; ++i) f(reverse ? kThreads - 1 - i : i);
  }
  void zero_acc() {
    for (auto& row : acc)
      for (float& v : row) v = 0.f;
  }
  void mma(const GemmSmem& sm) {
    for (int m = 0; m < BM; ++m)
      for (int kk = 0; kk < BK; ++kk) {
        const float av = bf16_to_float(sm.a[m][kk]);
        for (int n = 0; n < BN; ++n) acc[m][n] += av * bf16_to_float(sm.b[kk][n]);
      }
  }
  void store_acc(GemmSmem& sm) {
    for (int m = 0; m < BM; ++m)
      for (int n = 0; n < BN; ++n) sm.c[m][n] = acc[m][n];
  }
};

}  // namespace hyd::kernels::moe_gemm

// CUDA FlashAttention-2 style causal GQA attention over packed varlen documents with query offsets
// (math and mask in kernels/flash_attention.h). bf16 tensor-core MMAs (mma.sync m16n8k16, fp32
// accumulate), operands staged in XOR-swizzled shared memory by cp.async and read with ldmatrix.
//
// Forward (grid: query tile x query head x document; 128 query rows per block: 4 warps of 32 rows, two blocks
// per SM, the default; or 8 warps of 16 rows, HYD_FLASH_FWD=1; builds for Hopper run head dim 128 on the wgmma
// kernel of kernels/cuda/sm90a/flash_wgmma.cu instead, the same math):
//   for each 64-key tile j up to the causal limit of the tile:  S = Q K_j^T (registers, fp32),
//   masked entries -inf, running max m and sum l per row (online softmax in base 2), O = O alpha + P V_j.
//   K_j+1 is fetched while the softmax and P V_j run, V_j+1 while the next S runs.
//   o = O / l, lse = (m + log2 l) ln 2; rows that see no key: l = 0, so o = 0 and lse = -inf.
// Backward:
//   1. preprocess per (token, head): Dsum = <do, o>, L2 = lse log2(e) (+inf where lse = -inf, so that
//      P = exp2(s log2(e) - L2) is exactly 0 there), both [Hq, Nq]; the f32 dq accumulator is zeroed.
//   2. main (grid: key tile x kv head x document; 4 warps, 64 keys, 16 keys per warp): dK, dV of the
//      tile stay in registers while the block loops over the query heads of the kv group and the
//      64-query tiles that can see the keys (Q, dO, L2, Dsum double-buffered by cp.async):
//        S^T = K Q^T,  P^T = exp2(S^T log2(e) scale - L2),  dV += P^T dO,  dP^T = V dO^T,
//        dS^T = P^T (dP^T - Dsum),  dK += dS^T Q,  dQ += dS K  (dS^T via shared memory, fp32 atomics).
//   3. dq = bf16(scale dQ); dk = bf16(scale dK) is written by the main kernel.
//   Builds for Hopper run step 2 for head dim 128 on the wgmma kernel of kernels/cuda/sm90a/flash_wgmma.cu (128 keys
//   per block, the same math and accumulator; HYD_FLASH_BWD=1: this file's kernel).
// Rows past a document's end are zero-filled on load (and their L2, Dsum are 0), so they add exactly
// zero to every gradient; masked scores are -inf before the exp, so no NaN can arise.
// PTX wrappers and fragment layouts: kernels/cuda/mma.cuh.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/flash_order.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/flash_attention.h"
#ifdef HYD_WITH_WGMMA
#include "kernels/cuda/sm90a/flash_wgmma.h"
#endif

namespace hyd::kernels::cuda {

using namespace cuda_detail;
using namespace ptx;
using namespace flash_order;

namespace {

// Writes the fp32 accumulator rows of one warp (16 rows x D, C layout, times `mult[r]` for row half
// r) as bf16 into rows row0.. of a swizzled tile at generic pointer `tile`.
template <int D>
__device__ __forceinline__ void stage_rows(unsigned char* tile, int row0, const float (&acc)[D / 8][4], float mult0,
                                           float mult1) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    *reinterpret_cast<uint32_t*>(tile + swz<D / 8>(row0 + g, dn) + 4 * t) =
        pack_bf16(acc[dn][0] * mult0, acc[dn][1] * mult0);
    *reinterpret_cast<uint32_t*>(tile + swz<D / 8>(row0 + g + 8, dn) + 4 * t) =
        pack_bf16(acc[dn][2] * mult1, acc[dn][3] * mult1);
  }
}

// Copies 16 staged rows (tile rows row0..row0+15) to global rows out + r * stride for r < valid, as
// 16-byte stores by the 32 lanes of a warp.
template <int D>
__device__ __forceinline__ void store_rows(const unsigned char* tile, int row0, __nv_bfloat16* out, int64_t stride,
                                           int valid) {
  constexpr int kChunks = D / 8;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int it = 0; it < 16 * kChunks / 32; ++it) {
    const int idx = it * 32 + lane, r = idx / kChunks, c = idx % kChunks;
    if (r < valid)
      *reinterpret_cast<uint4*>(out + r * stride + c * 8) =
          *reinterpret_cast<const uint4*>(tile + swz<kChunks>(row0 + r, c));
  }
}

// ---------------------------------------------------------------- forward

// The forward kernel, 128 query rows per block in MT row tiles of 16 per warp:
// - MT = 2 (the default): 4 warps of 32 rows, two blocks per SM. Each K fragment read from shared memory feeds both
//   row tiles' S products and each V fragment both tiles' P V products: about 160 bytes of shared memory per
//   tensor-core product. Q stays in shared memory (64 more registers per thread would not fit beside the two
//   accumulators) and is re-read once per key tile. K and V are double-buffered (DB, the default; 96 KB of shared
//   memory at d = 128, still two blocks per SM): the tiles of step j + 1 load into the other buffers while step j
//   runs, with one barrier per key tile instead of four. HYD_FLASH_FWD=2 keeps single buffers (H200, stop 28,
//   B8xT4096 H16 d128: 2.18 ms double-buffered, 2.38 single).
// - MT = 1 (HYD_FLASH_FWD=1): 8 warps of 16 rows, one block per SM, Q in registers from the first tile on: 256 bytes
//   of shared memory per product, which the SM's shared-memory bandwidth does not feed at the tensor cores' rate
//   (H200, docs/benchmarks.md stop 27: 9-12% slower than MT = 2).
// Each warp stages its O in its own Q rows, which only it reads.
template <int D, int MT, bool DB = false>
struct FwdConfig {
  static constexpr int kD = D, kMT = MT, kWarps = 8 / MT, kThreads = 32 * kWarps;
  static constexpr int kBM = 16 * kMT * kWarps;  // query rows per block
  static constexpr int kBN = 64;                 // keys per tile
  static constexpr int kChunks = D / 8;
  static constexpr int kTileKV = kBN * D * 2;
  static constexpr int kSmemBytes = kBM * D * 2 + (DB ? 4 : 2) * kTileKV;  // Q, K (x2), V (x2)
};

template <int D, int MT, bool DB = false>
__global__ void __launch_bounds__(FwdConfig<D, MT, DB>::kThreads, MT == 1 ? 1 : 2)
    flash_fwd_kernel(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                     const __nv_bfloat16* __restrict__ v, const int32_t* __restrict__ cu_q,
                     const int32_t* __restrict__ cu_k, __nv_bfloat16* __restrict__ o, float* __restrict__ lse, int hq,
                     int hkv, float scale_log2, int tiles, int groups, int pack) {
  using C = FwdConfig<D, MT, DB>;
  constexpr int kBM = C::kBM, kBN = C::kBN, kChunks = C::kChunks, kT = C::kThreads, kMT = C::kMT;
  extern __shared__ __align__(128) unsigned char smem[];

  const BlockTile bt = block_tile(tiles, groups, pack);
  const int doc = bt.group / hq, h = bt.group % hq;
  const int q_begin = cu_q[doc], len_q = cu_q[doc + 1] - q_begin;
  const int k_begin = cu_k[doc], len_k = cu_k[doc + 1] - k_begin;
  const int m0 = (tiles - 1 - bt.rank) * kBM;  // the last rows see the most keys: rank 0
  if (m0 >= len_q) return;
  const int off = len_k - len_q;  // query i sees keys j <= i + off
  const int hk = h / (hq / hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t q_stride = static_cast<int64_t>(hq) * D, kv_stride = static_cast<int64_t>(hkv) * D;
  const __nv_bfloat16* k_doc = k + (static_cast<int64_t>(k_begin) * hkv + hk) * D;
  const __nv_bfloat16* v_doc = v + (static_cast<int64_t>(k_begin) * hkv + hk) * D;
  // Q, then K and V (with DB: K0, K1, V0, V1).
  const uint32_t sQ = smem_addr(smem), sK0 = sQ + kBM * D * 2, sV0 = sK0 + (DB ? 2 : 1) * C::kTileKV;

  const int n_end = min(len_k, m0 + kBM + off);  // keys that some row of the tile sees
  const int n_tiles = n_end > 0 ? (n_end + kBN - 1) / kBN : 0;
  const int row0 = m0 + warp * 16 * kMT;  // this warp's first query (document-local); row tile mt: row0 + 16 mt

  float acc[kMT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) acc[mt][dn][0] = acc[mt][dn][1] = acc[mt][dn][2] = acc[mt][dn][3] = 0.f;
  float m_run[kMT][2], l_run[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) m_run[mt][0] = m_run[mt][1] = -INFINITY, l_run[mt][0] = l_run[mt][1] = 0.f;

  uint32_t qf[kMT == 1 ? D / 16 : 1][4];  // MT = 1: this warp's Q fragments, kept from the first tile on
  if (n_tiles > 0) {
    load_tile_async<kBM, D, kT>(sQ, q + (static_cast<int64_t>(q_begin + m0) * hq + h) * D, q_stride, len_q - m0);
    load_tile_async<kBN, D, kT>(sK0, k_doc, kv_stride, len_k);
    cp_async_commit();
    load_tile_async<kBN, D, kT>(sV0, v_doc, kv_stride, len_k);
    cp_async_commit();
    if constexpr (kMT == 1) {
      cp_async_wait<1>();
      __syncthreads();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks)
        ldsm_x4(qf[ks], sQ + swz<kChunks>(warp * 16 + (lane & 15), 2 * ks + (lane >> 4)));
    }
  }

  for (int j = 0; j < n_tiles; ++j) {
    const int n0 = j * kBN;
    const uint32_t sK = sK0 + (DB ? (j & 1) * C::kTileKV : 0), sV = sV0 + (DB ? (j & 1) * C::kTileKV : 0);
    if constexpr (DB) {
      // K_j and V_j were issued a whole step ago. After the barrier every warp is done with step j - 1, whose
      // buffers take step j + 1's tiles.
      cp_async_wait<0>();
      __syncthreads();
      if (j + 1 < n_tiles) {
        const uint32_t nk = sK0 + ((j + 1) & 1) * C::kTileKV, nv = sV0 + ((j + 1) & 1) * C::kTileKV;
        load_tile_async<kBN, D, kT>(nk, k_doc + (n0 + kBN) * kv_stride, kv_stride, len_k - n0 - kBN);
        load_tile_async<kBN, D, kT>(nv, v_doc + (n0 + kBN) * kv_stride, kv_stride, len_k - n0 - kBN);
      }
      cp_async_commit();
    } else {
      cp_async_wait<1>();  // Q and K_j landed (V_j may still be in flight)
      __syncthreads();
    }
    // Some row of this warp sees a key of the tile (its last row tile sees the most); the first row tile may see
    // none, and is then masked to -inf and adds nothing.
    const bool active = n0 <= row0 + 16 * kMT - 1 + off;
    float s[kMT][8][4];
    if (active) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          if constexpr (kMT == 1) {
            a[mt][0] = qf[ks][0], a[mt][1] = qf[ks][1], a[mt][2] = qf[ks][2], a[mt][3] = qf[ks][3];
          } else {
            ldsm_x4(a[mt], sQ + swz<kChunks>(warp * 16 * kMT + mt * 16 + (lane & 15), 2 * ks + (lane >> 4)));
          }
        }
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t b[4];
          ldsm_x4(b, sK + swz<kChunks>(np * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1)));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_bf16(s[mt][2 * np], a[mt], b[0], b[1]);
            mma_bf16(s[mt][2 * np + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }
    if constexpr (!DB) {
      __syncthreads();  // every warp is done with K_j
      if (j + 1 < n_tiles) load_tile_async<kBN, D, kT>(sK, k_doc + (n0 + kBN) * kv_stride, kv_stride, len_k - n0 - kBN);
      cp_async_commit();
    }

    if (active) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const int rt = row0 + 16 * mt;  // the row tile's first query
        const bool need_mask = n0 + kBN - 1 > rt + off || n0 + kBN > len_k;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = s[mt][nt][e] * scale_log2;
            if (need_mask) {
              const int key = n0 + nt * 8 + 2 * t + (e & 1), row = rt + g + 8 * (e >> 1);
              if (key > row + off || key >= len_k) x = -INFINITY;
            }
            s[mt][nt][e] = x;
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(m_run[mt][r], mx);
          const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: keep everything 0
          const float alpha = exp2_approx(m_run[mt][r] - m_use);
          m_run[mt][r] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            s[mt][nt][2 * r] = exp2_approx(s[mt][nt][2 * r] - m_use);
            s[mt][nt][2 * r + 1] = exp2_approx(s[mt][nt][2 * r + 1] - m_use);
            sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
          }
          l_run[mt][r] = l_run[mt][r] * alpha + sum;  // per-thread partial; the quad is summed at the end
#pragma unroll
          for (int dn = 0; dn < D / 8; ++dn) {
            acc[mt][dn][2 * r] *= alpha;
            acc[mt][dn][2 * r + 1] *= alpha;
          }
        }
      }
    }

    if constexpr (!DB) {
      cp_async_wait<1>();  // V_j landed
      __syncthreads();
    }
    if (active) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t pa[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          pa[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          pa[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          pa[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          pa[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t b[4];
          ldsm_x4_trans(b, sV + swz<kChunks>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dp + (lane >> 4)));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_bf16(acc[mt][2 * dp], pa[mt], b[0], b[1]);
            mma_bf16(acc[mt][2 * dp + 1], pa[mt], b[2], b[3]);
          }
        }
      }
    }
    if constexpr (!DB) {
      __syncthreads();  // every warp is done with V_j
      if (j + 1 < n_tiles) load_tile_async<kBN, D, kT>(sV, v_doc + (n0 + kBN) * kv_stride, kv_stride, len_k - n0 - kBN);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();  // only empty groups can remain; keeps the staging below clear of copies

#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    const int rt = row0 + 16 * mt;
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      inv[r] = l > 0.f ? 1.f / l : 0.f;
      const int row = rt + g + 8 * r;
      if (t == 0 && row < len_q)
        lse[static_cast<int64_t>(q_begin + row) * hq + h] = l > 0.f ? (m_run[mt][r] + log2f(l)) * kLn2 : -INFINITY;
    }
    // This warp's own rows of the Q tile (only this warp read them, and its last read is behind it).
    stage_rows<D>(smem, warp * 16 * kMT + 16 * mt, acc[mt], inv[0], inv[1]);
    __syncwarp();
    store_rows<D>(smem, warp * 16 * kMT + 16 * mt, o + (static_cast<int64_t>(q_begin + rt) * hq + h) * D, q_stride,
                  len_q - rt);
  }
}

// ---------------------------------------------------------------- backward

// Dsum = <do, o> and L2 = lse log2(e) (+inf for lse = -inf) per (token, head), stored [Hq, Nq];
// one warp per row.
template <int D>
__global__ void flash_bwd_preprocess_kernel(const __nv_bfloat16* __restrict__ dout,
                                            const __nv_bfloat16* __restrict__ o, const float* __restrict__ lse,
                                            float* __restrict__ dsum, float* __restrict__ lse2, int64_t nq, int hq) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= nq * hq) return;
  float s = 0.f;
#pragma unroll
  for (int c = lane * 2; c < D; c += 64) {
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(dout + row * D + c));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(o + row * D + c));
    s += a.x * b.x + a.y * b.y;
  }
  s = warp_sum(s);
  if (lane == 0) {
    const int64_t token = row / hq, h = row % hq;
    dsum[h * nq + token] = s;
    const float l = lse[row];
    lse2[h * nq + token] = l == -INFINITY ? INFINITY : l * kLog2e;
  }
}

template <int D>
struct BwdConfig {
  static constexpr int kWarps = 4, kThreads = 32 * kWarps;
  static constexpr int kBN = 16 * kWarps;  // keys per block (16 per warp)
  static constexpr int kBM = 64;           // queries per inner tile
  static constexpr int kChunks = D / 8;
  static constexpr int kTileKV = kBN * D * 2, kTileQ = kBM * D * 2, kTileS = kBN * kBM * 2;
  // K, V | Q, dO (x2 buffers) | dS^T | L2, Dsum (x2 buffers)
  static constexpr int kOffV = kTileKV, kOffQ = 2 * kTileKV, kOffDo = kOffQ + 2 * kTileQ, kOffS = kOffDo + 2 * kTileQ,
                       kOffL = kOffS + kTileS, kOffD = kOffL + 2 * kBM * 4;
  static constexpr int kSmemBytes = kOffD + 2 * kBM * 4;
};

template <int D>
__global__ void __launch_bounds__(BwdConfig<D>::kThreads)
    flash_bwd_kernel(const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ q,
                     const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                     const float* __restrict__ dsum, const float* __restrict__ lse2, const int32_t* __restrict__ cu_q,
                     const int32_t* __restrict__ cu_k, float* __restrict__ dq_acc, __nv_bfloat16* __restrict__ dk,
                     __nv_bfloat16* __restrict__ dv, int64_t nq, int hq, int hkv, float scale_log2, float scale,
                     int tiles, int groups, int pack) {
  using C = BwdConfig<D>;
  constexpr int kBM = C::kBM, kBN = C::kBN, kChunks = C::kChunks, kT = C::kThreads;
  static_assert(kBM == 64, "dS^T rows are 64 queries = 8 chunks wide (swz<8>)");
  extern __shared__ __align__(128) unsigned char smem[];

  const KeyBlock kb = key_block<kBN, kBM>(tiles, groups, pack, hkv, cu_q, cu_k);
  const int hk = kb.hk, n0 = kb.n0, q_begin = kb.q_begin, len_q = kb.len_q, k_begin = kb.k_begin, len_k = kb.len_k;
  if (n0 >= len_k) return;
  const int off = kb.off, group = hq / hkv, mt_begin = kb.mt_begin, n_mt = kb.n_mt;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t q_stride = static_cast<int64_t>(hq) * D, kv_stride = static_cast<int64_t>(hkv) * D;
  const uint32_t base = smem_addr(smem);
  const uint32_t sK = base, sV = base + C::kOffV, sS = base + C::kOffS;
  const int iters = group * n_mt;

  const int64_t kv_off = (static_cast<int64_t>(k_begin + n0) * hkv + hk) * D;
  load_tile_async<kBN, D, kT>(sK, k + kv_off, kv_stride, len_k - n0);
  load_tile_async<kBN, D, kT>(sV, v + kv_off, kv_stride, len_k - n0);

  // Iteration `it` handles query head hk * group + it / n_mt and query tile mt_begin + it % n_mt.
  auto load_query_tile = [&](int it, int buf) {
    const int h = hk * group + it / n_mt, m0 = (mt_begin + it % n_mt) * kBM;
    const int64_t row_off = (static_cast<int64_t>(q_begin + m0) * hq + h) * D;
    load_tile_async<kBM, D, kT>(base + C::kOffQ + buf * C::kTileQ, q + row_off, q_stride, len_q - m0);
    load_tile_async<kBM, D, kT>(base + C::kOffDo + buf * C::kTileQ, dout + row_off, q_stride, len_q - m0);
    const int i = threadIdx.x & (kBM - 1);
    const bool ok = m0 + i < len_q;
    const int64_t src = h * nq + q_begin + m0 + (ok ? i : 0);
    if (threadIdx.x < kBM)
      cp_async4(base + C::kOffL + (buf * kBM + i) * 4, lse2 + src, ok);
    else
      cp_async4(base + C::kOffD + (buf * kBM + i) * 4, dsum + src, ok);
  };
  static_assert(kT == 2 * kBM, "one thread per L2 and per Dsum entry");
  if (iters > 0) load_query_tile(0, 0);
  cp_async_commit();

  float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[dn][e] = dv_acc[dn][e] = 0.f;

  const int key0 = n0 + warp * 16;  // this warp's first key (document-local)
  for (int it = 0; it < iters; ++it) {
    const int buf = it & 1;
    if (it + 1 < iters) load_query_tile(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // this iteration's tiles (and K, V) landed
    __syncthreads();
    const int h = hk * group + it / n_mt, m0 = (mt_begin + it % n_mt) * kBM;
    const uint32_t sQ = base + C::kOffQ + buf * C::kTileQ, sDo = base + C::kOffDo + buf * C::kTileQ;
    const float* sL = reinterpret_cast<const float*>(smem + C::kOffL) + buf * kBM;
    const float* sD = reinterpret_cast<const float*>(smem + C::kOffD) + buf * kBM;

    // S^T = K Q^T: this warp's 16 keys x 64 queries.
    float st[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[4];
      ldsm_x4(a, sK + swz<kChunks>(warp * 16 + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        ldsm_x4(b, sQ + swz<kChunks>(np * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1)));
        mma_bf16(st[2 * np], a, b[0], b[1]);
        mma_bf16(st[2 * np + 1], a, b[2], b[3]);
      }
    }
    // P^T (bf16 A fragments over the query dimension): pp[kk] covers queries 16 kk .. 16 kk + 15.
    const bool need_mask = key0 + 15 > m0 + off || key0 + 16 > len_k;
    uint32_t pp[4][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e & 1);
        float x = st[nt][e] * scale_log2;
        if (need_mask) {
          const int key = key0 + g + 8 * (e >> 1);
          if (key > m0 + col + off || key >= len_k) x = -INFINITY;
        }
        p[e] = exp2_approx(x - sL[col]);
      }
      pp[nt >> 1][2 * (nt & 1)] = pack_bf16(p[0], p[1]);
      pp[nt >> 1][2 * (nt & 1) + 1] = pack_bf16(p[2], p[3]);
    }
    // dV += P^T dO
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldsm_x4_trans(b, sDo + swz<kChunks>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dp + (lane >> 4)));
        mma_bf16(dv_acc[2 * dp], pp[kk], b[0], b[1]);
        mma_bf16(dv_acc[2 * dp + 1], pp[kk], b[2], b[3]);
      }
    }
    // dP^T = V dO^T (reuses st)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[4];
      ldsm_x4(a, sV + swz<kChunks>(warp * 16 + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        ldsm_x4(b, sDo + swz<kChunks>(np * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1)));
        mma_bf16(st[2 * np], a, b[0], b[1]);
        mma_bf16(st[2 * np + 1], a, b[2], b[3]);
      }
    }
    // dS^T = P^T (dP^T - Dsum), kept as bf16 A fragments in pp and written to shared memory for dQ.
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int col = nt * 8 + 2 * t;
      const float d0 = sD[col], d1 = sD[col + 1];
      const float2 p_lo = unpack_bf16(pp[nt >> 1][2 * (nt & 1)]), p_hi = unpack_bf16(pp[nt >> 1][2 * (nt & 1) + 1]);
      const uint32_t ds_lo = pack_bf16(p_lo.x * (st[nt][0] - d0), p_lo.y * (st[nt][1] - d1));
      const uint32_t ds_hi = pack_bf16(p_hi.x * (st[nt][2] - d0), p_hi.y * (st[nt][3] - d1));
      pp[nt >> 1][2 * (nt & 1)] = ds_lo;
      pp[nt >> 1][2 * (nt & 1) + 1] = ds_hi;
      *reinterpret_cast<uint32_t*>(smem + C::kOffS + swz<8>(warp * 16 + g, nt) + 4 * t) = ds_lo;
      *reinterpret_cast<uint32_t*>(smem + C::kOffS + swz<8>(warp * 16 + g + 8, nt) + 4 * t) = ds_hi;
    }
    // dK += dS^T Q
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldsm_x4_trans(b, sQ + swz<kChunks>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dp + (lane >> 4)));
        mma_bf16(dk_acc[2 * dp], pp[kk], b[0], b[1]);
        mma_bf16(dk_acc[2 * dp + 1], pp[kk], b[2], b[3]);
      }
    }
    __syncthreads();  // dS^T of all warps is in shared memory
    // dQ += dS K for this warp's 16 queries of the tile, 32 head dims at a time, into the f32 accumulator.
    const int qrow = m0 + warp * 16;
#pragma unroll 1  // rolled: fewer live registers (d = 128 spills 104 bytes unrolled, 72 rolled)
    for (int dc = 0; dc < D / 32; ++dc) {
      float qa[4][4];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) qa[nt][0] = qa[nt][1] = qa[nt][2] = qa[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4];
        ldsm_x4_trans(a, sS + swz<8>(kk * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * warp + ((lane >> 3) & 1)));
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          uint32_t b[4];
          ldsm_x4_trans(b, sK + swz<kChunks>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                             dc * 4 + 2 * np + (lane >> 4)));
          mma_bf16(qa[2 * np], a, b[0], b[1]);
          mma_bf16(qa[2 * np + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = qrow + g + 8 * r;
        if (i < len_q) {
          float* dst = dq_acc + (static_cast<int64_t>(q_begin + i) * hq + h) * D + dc * 32 + 2 * t;
#pragma unroll
          for (int nt = 0; nt < 4; ++nt)
            atomicAdd(reinterpret_cast<float2*>(dst + nt * 8), make_float2(qa[nt][2 * r], qa[nt][2 * r + 1]));
        }
      }
    }
    __syncthreads();  // this iteration's buffers and dS^T may be overwritten
  }
  cp_async_wait<0>();  // with no query tile, K and V copies may still be in flight
  __syncthreads();

  // dk = scale dK, dv = dV, staged in this warp's own rows of the K and V tiles.
  stage_rows<D>(smem, warp * 16, dk_acc, scale, scale);
  stage_rows<D>(smem + C::kOffV, warp * 16, dv_acc, 1.f, 1.f);
  __syncwarp();
  const int64_t out_off = (static_cast<int64_t>(k_begin + key0) * hkv + hk) * D;
  store_rows<D>(smem, warp * 16, dk + out_off, kv_stride, len_k - key0);
  store_rows<D>(smem + C::kOffV, warp * 16, dv + out_off, kv_stride, len_k - key0);
}

// dq = bf16(scale * acc), 4 elements per thread (the element count is a multiple of 64).
__global__ void flash_bwd_convert_dq_kernel(const float* __restrict__ acc, __nv_bfloat16* __restrict__ dq, int64_t n4,
                                            float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 a = reinterpret_cast<const float4*>(acc)[i];
    Bf16Pack<4> out;
    out.v[0] = to_bf(a.x * scale);
    out.v[1] = to_bf(a.y * scale);
    out.v[2] = to_bf(a.z * scale);
    out.v[3] = to_bf(a.w * scale);
    reinterpret_cast<Bf16Pack<4>*>(dq)[i] = out;
  }
}

// ---------------------------------------------------------------- launchers

// The forward kernel (HYD_FLASH_FWD, read on every call): 0 = the wgmma kernel (kernels/cuda/sm90a/flash_wgmma.cu)
// for head dim 128 in Hopper builds, else the mma.sync kernel with 2 row tiles per warp and double-buffered K / V
// (FwdConfig); 3 = that mma.sync kernel always; 1 = 1 row tile per warp; 2 = 2 row tiles with single buffers.
int forward_kernel() {
  const char* e = std::getenv("HYD_FLASH_FWD");
  return e != nullptr && e[0] >= '1' && e[0] <= '3' && e[1] == '\0' ? e[0] - '0' : 0;
}

// The backward's main kernel (HYD_FLASH_BWD, read on every call): 0 = the wgmma kernel (kernels/cuda/sm90a) for
// head dim 128 in Hopper builds, else the mma.sync kernel (flash_bwd_kernel); 1 = the mma.sync kernel always.
bool backward_mma_sync() {
  const char* e = std::getenv("HYD_FLASH_BWD");
  return e != nullptr && e[0] == '1' && e[1] == '\0';
}

template <class Config, class Kernel>
void launch_forward_with(Kernel kernel, const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_q,
                         const int32_t* cu_k, int64_t num_docs, int64_t max_len_q, int64_t max_len_k, bf16* o,
                         float* lse, int64_t hq, int64_t hkv, float scale, cudaStream_t stream) {
  const int64_t tiles = (max_len_q + Config::kBM - 1) / Config::kBM;
  if (tiles == 0 || num_docs == 0) return;
  const int64_t groups = num_docs * hq;
  HYD_CHECK(groups * tiles <= INT32_MAX, "flash_attention_forward: grid too large (", num_docs, " documents, ", hq,
            " heads, ", tiles, " query tiles)");
  CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSmemBytes));
  // Consecutive groups are heads of one document; hq / hkv of them read the same K / V head.
  const int pack = pack_groups(groups, max_len_k * Config::kD * 2 * 2 / (hq / hkv));
  kernel<<<static_cast<unsigned>(groups * tiles), Config::kThreads, Config::kSmemBytes, stream>>>(
      as_nv(q), as_nv(k), as_nv(v), cu_q, cu_k, as_nv(o), lse, static_cast<int>(hq), static_cast<int>(hkv),
      scale * kLog2e, static_cast<int>(tiles), static_cast<int>(groups), pack);
  CHECK_LAUNCH();
}

template <int D>
void launch_forward(const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_q, const int32_t* cu_k,
                    int64_t num_docs, int64_t max_len_q, int64_t max_len_k, bf16* o, float* lse, int64_t nq, int64_t nk,
                    int64_t hq, int64_t hkv, float scale, cudaStream_t stream) {
  auto go = [&](auto config, auto kernel) {
    launch_forward_with<decltype(config)>(kernel, q, k, v, cu_q, cu_k, num_docs, max_len_q, max_len_k, o, lse, hq, hkv,
                                          scale, stream);
  };
  switch (forward_kernel()) {
    case 3:
      go(FwdConfig<D, 2, true>{}, flash_fwd_kernel<D, 2, true>);
      break;
    case 1:
      go(FwdConfig<D, 1>{}, flash_fwd_kernel<D, 1>);
      break;
    case 2:
      go(FwdConfig<D, 2>{}, flash_fwd_kernel<D, 2>);
      break;
    default:
#ifdef HYD_WITH_WGMMA
      if constexpr (D == 128) {
        if (scale > 0.f && wgmma_runs_here()) {
          flash_forward_wgmma(q, k, v, cu_q, cu_k, num_docs, max_len_q, max_len_k, o, lse, nq, nk, hq, hkv, scale,
                              stream);
          return;
        }
      }
#endif
      (void)nq;
      (void)nk;
      go(FwdConfig<D, 2, true>{}, flash_fwd_kernel<D, 2, true>);
      break;
  }
}

template <int D>
void launch_backward(const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const bf16* o, const float* lse,
                     const int32_t* cu_q, const int32_t* cu_k, int64_t num_docs, int64_t max_len_q, int64_t max_len_k,
                     bf16* dq, bf16* dk, bf16* dv, int64_t nq, int64_t nk, int64_t hq, int64_t hkv, float scale,
                     cudaStream_t stream) {
  using C = BwdConfig<D>;
  if (nq > 0 && (max_len_k == 0 || num_docs == 0)) {  // no keys anywhere: every query is fully masked
    CHECK_CUDA(cudaMemsetAsync(dq, 0, static_cast<size_t>(nq * hq * D) * sizeof(bf16), stream));
    return;
  }
  const int64_t tiles = (max_len_k + C::kBN - 1) / C::kBN, groups = num_docs * hkv;
  HYD_CHECK(groups * tiles <= INT32_MAX, "flash_attention_backward: grid too large (", num_docs, " documents, ", hkv,
            " kv heads, ", tiles, " key tiles)");
  const size_t rows = static_cast<size_t>(nq * hq);
  float *dq_acc = nullptr, *stats = nullptr;
  CHECK_CUDA(cudaMallocAsync(reinterpret_cast<void**>(&dq_acc), std::max<size_t>(rows * D, 1) * sizeof(float), stream));
  CHECK_CUDA(cudaMallocAsync(reinterpret_cast<void**>(&stats), std::max<size_t>(2 * rows, 1) * sizeof(float), stream));
  float* dsum = stats;
  float* lse2 = stats + rows;
  if (rows > 0) {
    CHECK_CUDA(cudaMemsetAsync(dq_acc, 0, rows * D * sizeof(float), stream));
    constexpr int kPreWarps = 8;
    flash_bwd_preprocess_kernel<D><<<static_cast<unsigned>((rows + kPreWarps - 1) / kPreWarps), 32 * kPreWarps, 0,
                                     stream>>>(as_nv(dout), as_nv(o), lse, dsum, lse2, nq, static_cast<int>(hq));
    CHECK_LAUNCH();
  }
  const int64_t q_bytes = max_len_q * D * 2 * 2 * (hq / hkv);  // a group's Q and dO rows (the block order's packs)
  bool done = false;
#ifdef HYD_WITH_WGMMA
  if constexpr (D == 128) {
    if (scale > 0.f && !backward_mma_sync() && wgmma_runs_here()) {
      flash_backward_wgmma(dout, q, k, v, dsum, lse2, cu_q, cu_k, num_docs, max_len_k, dq_acc, dk, dv, nq, nk, hq, hkv,
                           q_bytes, scale, stream);
      done = true;
    }
  }
#endif
  if (!done) {
    CHECK_CUDA(cudaFuncSetAttribute(flash_bwd_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
    flash_bwd_kernel<D><<<static_cast<unsigned>(groups * tiles), C::kThreads, C::kSmemBytes, stream>>>(
        as_nv(dout), as_nv(q), as_nv(k), as_nv(v), dsum, lse2, cu_q, cu_k, dq_acc, as_nv(dk), as_nv(dv), nq,
        static_cast<int>(hq), static_cast<int>(hkv), scale * kLog2e, scale, static_cast<int>(tiles),
        static_cast<int>(groups), pack_groups(groups, q_bytes));
    CHECK_LAUNCH();
  }
  if (rows > 0) {
    const int64_t n4 = static_cast<int64_t>(rows) * D / 4;
    flash_bwd_convert_dq_kernel<<<grid_for(n4, 256), 256, 0, stream>>>(dq_acc, as_nv(dq), n4, scale);
    CHECK_LAUNCH();
  }
  CHECK_CUDA(cudaFreeAsync(dq_acc, stream));
  CHECK_CUDA(cudaFreeAsync(stats, stream));
}

}  // namespace

void flash_attention_forward(const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_q, const int32_t* cu_k,
                             int64_t num_docs, int64_t max_len_q, int64_t max_len_k, bf16* o, float* lse, int64_t nq,
                             int64_t nk, int64_t hq, int64_t hkv, int64_t d, float scale, void* stream) {
  if (d == 64)
    launch_forward<64>(q, k, v, cu_q, cu_k, num_docs, max_len_q, max_len_k, o, lse, nq, nk, hq, hkv, scale,
                       as_stream(stream));
  else if (d == 128)
    launch_forward<128>(q, k, v, cu_q, cu_k, num_docs, max_len_q, max_len_k, o, lse, nq, nk, hq, hkv, scale,
                        as_stream(stream));
  else
    HYD_THROW("flash_attention_forward: head dim ", d, " is not supported (64, 128)");
}

void flash_attention_backward(const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const bf16* o,
                              const float* lse, const int32_t* cu_q, const int32_t* cu_k, int64_t num_docs,
                              int64_t max_len_q, int64_t max_len_k, bf16* dq, bf16* dk, bf16* dv, int64_t nq,
                              int64_t nk, int64_t hq, int64_t hkv, int64_t d, float scale, void* stream) {
  if (d == 64)
    launch_backward<64>(dout, q, k, v, o, lse, cu_q, cu_k, num_docs, max_len_q, max_len_k, dq, dk, dv, nq, nk, hq, hkv,
                        scale, as_stream(stream));
  else if (d == 128)
    launch_backward<128>(dout, q, k, v, o, lse, cu_q, cu_k, num_docs, max_len_q, max_len_k, dq, dk, dv, nq, nk, hq, hkv,
                         scale, as_stream(stream));
  else
    HYD_THROW("flash_attention_backward: head dim ", d, " is not supported (64, 128)");
}

}  // namespace hyd::kernels::cuda

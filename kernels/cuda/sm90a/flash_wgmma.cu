// Flash attention forward on Hopper's warpgroup MMA (wgmma) and tensor memory accelerator (TMA), head dim 128:
// the math, masking, online softmax, lse and outputs of flash_fwd_kernel (kernels/cuda/flash_attention.cu), with
// the products on wgmma (the mma.sync kernel reaches ~240-270 TF/s on an H200, this one ~490-670; docs/benchmarks.md
// stop 30).
// Block: 128 query rows, 384 threads: warpgroups 0 / 1 the consumers (rows 64 wg..; 240 registers a thread after
// setmaxnreg), warpgroup 2 the producer (24 registers), whose first thread loads Q once and every K / V tile of 128
// keys with TMA (128-byte-swizzled [128 rows][64 columns] boxes, two per tile) into two stages of K and two of V,
// each with a `full` barrier (the bytes landed) and an `empty` barrier (the 8 consumer warps are done with it). The
// key tiles go from the last (the causal diagonal, the only ones that need a mask when the document is long) to
// the first.
// A consumer warpgroup's step i: issue S_i = Q K_i^T, issue O += P_{i-1} V_{i-1}, wait for S_i only (the product of
// V runs on), mask + online softmax of S_i into new probabilities, wait for P V, rescale O, pack P_i. Registers:
// O 64, S 64, P 32 (bf16 pairs) fp32 / b32 a thread.
// Rows of another document inside a Q tile, keys of another document inside a K / V tile (the TMA boxes cross
// document ends) and rows past the tensors' ends (zeros) are masked or never stored.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mutex>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/flash_order.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/sm90a/flash_wgmma.h"
#include "kernels/cuda/sm90a/tma.cuh"
#include "kernels/cuda/sm90a/wgmma.cuh"

namespace hyd::kernels::cuda {

using namespace cuda_detail;
using namespace flash_order;

namespace {

constexpr int kD = 128, kBM = 128, kBN = 128, kThreads = 384;
constexpr int kBox = 128 * 128;  // bytes of one [128 rows][64 bf16] box
constexpr int kTile = 2 * kBox;  // a [128][128] bf16 tile
// Q, K x 2, V x 2, the barriers (9 x 8 bytes), the atoms' alignment.
constexpr int kSmem = 5 * kTile + 128 + 1024;

__global__ void __launch_bounds__(kThreads, 1)
    flash_fwd_wgmma_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                           const __grid_constant__ CUtensorMap map_v, const int32_t* __restrict__ cu_q,
                           const int32_t* __restrict__ cu_k, __nv_bfloat16* __restrict__ o, float* __restrict__ lse,
                           int hq, int hkv, float scale_log2, int tiles, int groups, int pack) {
  extern __shared__ unsigned char smem_raw[];
  const BlockTile bt = block_tile(tiles, groups, pack);
  const int doc = bt.group / hq, h = bt.group % hq;
  const int q_begin = cu_q[doc], len_q = cu_q[doc + 1] - q_begin;
  const int k_begin = cu_k[doc], len_k = cu_k[doc + 1] - k_begin;
  const int m0 = (tiles - 1 - bt.rank) * kBM;
  if (m0 >= len_q) return;
  const int off = len_k - len_q;  // query i sees keys j <= i + off
  const int hk = h / (hq / hkv);
  const int n_end = min(len_k, m0 + kBM + off);
  const int n_tiles = n_end > 0 ? (n_end + kBN - 1) / kBN : 0;

  const uint32_t base = (ptx::smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base, sK0 = base + kTile, sV0 = base + 3 * kTile, bars = base + 5 * kTile;
  const uint32_t full_q = bars;
  auto full_k = [&](int s) { return bars + 8 + 8 * s; };
  auto full_v = [&](int s) { return bars + 24 + 8 * s; };
  auto empty_k = [&](int s) { return bars + 40 + 8 * s; };
  auto empty_v = [&](int s) { return bars + 56 + 8 * s; };
  const int warp = wgmma::warp_index(), lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    tma::mbar_init(full_q, 1);
    for (int s = 0; s < 2; ++s) {
      tma::mbar_init(full_k(s), 1);
      tma::mbar_init(full_v(s), 1);
      tma::mbar_init(empty_k(s), 8);
      tma::mbar_init(empty_v(s), 8);
    }
    tma::fence_barrier_init();
  }
  __syncthreads();

  if (warp >= 8) {  // the producer warpgroup: its registers go to the consumers
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    if (warp == 8 && lane == 0 && n_tiles > 0) {
      tma::arrive_expect_tx(full_q, kTile);
      tma::load_2d(sQ, &map_q, h * 128, q_begin + m0, full_q);
      tma::load_2d(sQ + kBox, &map_q, h * 128 + 64, q_begin + m0, full_q);
      for (int i = 0; i < n_tiles; ++i) {
        const int s = i & 1, use = i >> 1, y = k_begin + (n_tiles - 1 - i) * kBN;
        if (use > 0) tma::wait(empty_k(s), (use - 1) & 1);
        tma::arrive_expect_tx(full_k(s), kTile);
        tma::load_2d(sK0 + s * kTile, &map_k, hk * 128, y, full_k(s));
        tma::load_2d(sK0 + s * kTile + kBox, &map_k, hk * 128 + 64, y, full_k(s));
        if (use > 0) tma::wait(empty_v(s), (use - 1) & 1);
        tma::arrive_expect_tx(full_v(s), kTile);
        tma::load_2d(sV0 + s * kTile, &map_v, hk * 128, y, full_v(s));
        tma::load_2d(sV0 + s * kTile + kBox, &map_v, hk * 128 + 64, y, full_v(s));
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
  // The consumers. warp w of warpgroup wg: rows row0 + g (+ 8) of the document, row0 = m0 + 64 wg + 16 w.
  const int wg = warp >> 2, g = lane >> 2, t = lane & 3;
  const int row0 = m0 + 64 * wg + 16 * (warp & 3);
  auto release = [&](uint32_t bar) {
    __syncwarp();
    if (lane == 0) tma::arrive(bar);
  };
  float acc[64];  // O: acc[4 dn + e] = rows row0 + g (+ 8 for e >= 2), columns 8 dn + 2 t (+ 1)
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  float s[64];  // S, then P: s[4 nt + e] = rows row0 + g (+ 8), keys n0 + 8 nt + 2 t (+ 1)
  uint32_t pa[kBN / 16][4];
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, alpha[2];
  const uint32_t q_wg = sQ + wg * 64 * 128;

  auto issue_qk = [&](uint32_t sK) {
    const uint64_t d_q = wgmma::desc_sw128(q_wg, 16, 1024), d_k = wgmma::desc_sw128(sK, 16, 1024);
    wgmma::fence();
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) {
      const uint32_t koff = static_cast<uint32_t>((ks >> 2) * kBox + (ks & 3) * 32);
      wgmma::mma_m64n128k16_ss(s, wgmma::desc_advance(d_q, koff), wgmma::desc_advance(d_k, koff), ks > 0);
    }
    wgmma::commit();
  };
  auto issue_pv = [&](uint32_t sV) {
    const uint64_t d_v = wgmma::desc_sw128(sV, kBox, 1024);
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk)
      wgmma::mma_m64n128k16_rs_tb(acc, pa[kk], wgmma::desc_advance(d_v, 2048 * kk), true);
    wgmma::commit();
  };
  // Mask and online softmax of S (keys n0..): s becomes the probabilities, alpha the rescaling of O.
  auto softmax = [&](int n0) {
    const bool need_mask = n0 + kBN - 1 > row0 + off || n0 + kBN > len_k;
    if (need_mask) {
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n0 + nt * 8 + 2 * t + (e & 1), row = row0 + g + 8 * (e >> 1);
          if (key > row + off || key >= len_k) s[4 * nt + e] = -INFINITY;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx * scale_log2);  // scale_log2 > 0 (the launcher checks)
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = ptx::exp2_approx(m_run[r] - m_use);
      m_run[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        s[4 * nt + 2 * r] = ptx::exp2_approx(fmaf(s[4 * nt + 2 * r], scale_log2, -m_use));
        s[4 * nt + 2 * r + 1] = ptx::exp2_approx(fmaf(s[4 * nt + 2 * r + 1], scale_log2, -m_use));
        sum += s[4 * nt + 2 * r] + s[4 * nt + 2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha[r] + sum;
    }
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) pa[kk][i] = ptx::pack_bf16(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
  };

  if (n_tiles > 0) {
    tma::wait(full_q, 0);
    tma::wait(full_k(0), 0);
    issue_qk(sK0);
    wgmma::wait<0>();
    wgmma::fence_regs(s);
    release(empty_k(0));
    softmax((n_tiles - 1) * kBN);
    pack_p();
    for (int i = 1; i < n_tiles; ++i) {
      const int st = i & 1, prev = (i - 1) & 1;
      tma::wait(full_k(st), (i >> 1) & 1);
      wgmma::fence_regs(pa);
      wgmma::fence_regs(acc);
      issue_qk(sK0 + st * kTile);
      tma::wait(full_v(prev), ((i - 1) >> 1) & 1);
      wgmma::fence();  // (another basic block than issue_qk's fence: ptxas would inject one)
      issue_pv(sV0 + prev * kTile);
      wgmma::wait<1>();
      wgmma::fence_regs(s);
      release(empty_k(st));
      softmax((n_tiles - 1 - i) * kBN);
      wgmma::wait<0>();
      wgmma::fence_regs(acc);
      wgmma::fence_regs(pa);
      release(empty_v(prev));
#pragma unroll
      for (int dn = 0; dn < 16; ++dn) {
        acc[4 * dn] *= alpha[0];
        acc[4 * dn + 1] *= alpha[0];
        acc[4 * dn + 2] *= alpha[1];
        acc[4 * dn + 3] *= alpha[1];
      }
      pack_p();
    }
    const int last = (n_tiles - 1) & 1;
    tma::wait(full_v(last), ((n_tiles - 1) >> 1) & 1);
    wgmma::fence_regs(pa);
    wgmma::fence_regs(acc);
    wgmma::fence();
    issue_pv(sV0 + last * kTile);
    wgmma::wait<0>();
    wgmma::fence_regs(acc);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = row0 + g + 8 * r;
    if (row < len_q) {
      if (t == 0)
        lse[static_cast<int64_t>(q_begin + row) * hq + h] = l > 0.f ? (m_run[r] + log2f(l)) * ptx::kLn2 : -INFINITY;
      __nv_bfloat16* out = o + (static_cast<int64_t>(q_begin + row) * hq + h) * kD;
#pragma unroll
      for (int dn = 0; dn < kD / 8; ++dn)
        *reinterpret_cast<uint32_t*>(out + 8 * dn + 2 * t) =
            ptx::pack_bf16(acc[4 * dn + 2 * r] * inv, acc[4 * dn + 2 * r + 1] * inv);
    }
  }
}

// ---------------------------------------------------------------- backward
// The main pass of the backward (kernels/cuda/flash_attention.cu's flash_bwd_kernel: same inputs, D = Dsum and
// L2 = lse log2(e) per (head, query) from its preprocess kernel, dQ into the f32 accumulator by atomics, dK scaled and
// dV written here), on wgmma. Block: 128 keys of one document and kv head, 384 threads: warpgroups 0 / 1 the
// consumers (keys 64 wg.. of the block; dK and dV of them in registers: 2 x 64 fp32 a thread), warpgroup 2 the
// producer: its first thread loads K and V once and Q and dO tiles of 64 queries with TMA, two stages, and all of
// its 128 threads write the stage's L2 and D (+inf / 0 past the document's end: such queries add exactly nothing).
// Per query tile (every query head of the kv group, the tiles that see some key of the block), a consumer
// warpgroup: S^T = K Q^T and dP^T = V dO^T (64 keys x 64 queries each, both issued at once); P^T = exp2(S^T scale
// log2(e) - L2) with the causal / document mask, packed to bf16 as the A operand of dV += P^T dO (issued while
// dP^T finishes); dS^T = P^T (dP^T - D) to shared memory and as the A operand of dK += dS^T Q; after both
// warpgroups' dS^T are in: dQ[:, 64 wg..] = dS K[:, 64 wg..] (dS read transposed), staged in shared memory and added
// to the accumulator by two TMA reduce-adds (f32 add in L2; 11-14% faster backward than 16 float2 atomics a thread,
// docs/benchmarks.md stop 35).
namespace bwd {
constexpr int kBN = 128, kBM = 64, kThreads = 384;
constexpr int kBoxKV = kBN * 128;                      // bytes of a [128 keys][64 bf16] box
constexpr int kBoxQ = kBM * 128;                       // bytes of a [64 queries][64 bf16] box
constexpr int kOffV = 2 * kBoxKV, kOffQ = 4 * kBoxKV;  // K, V: two boxes each
constexpr int kStage = 4 * kBoxQ;                      // Q, dO: two boxes each
constexpr int kOffDS = kOffQ + 2 * kStage;             // dS^T [128 keys][64 queries] bf16, two buffers
constexpr int kOffL = kOffDS + 2 * kBN * 128;          // L2, D: [2 stages][64] f32 each
constexpr int kOffBar = kOffL + 4 * kBM * 4;
constexpr int kBoxDQ = kBM * 128;       // bytes of a [64 queries][32 f32] box of dQ
constexpr int kOffDQ = kOffBar + 1024;  // dQ [64 queries][128] f32 as four boxes (1024-aligned)
constexpr int kSmem = kOffDQ + 4 * kBoxDQ + 1024;
}  // namespace bwd

// kTmaDq: each warpgroup's dQ goes through shared memory to the accumulator by TMA reduce-adds (its leader thread
// issues two per query tile), instead of 16 float2 atomics a thread; rows of the tile past the document's end add
// exact zeros there (their dS is 0). HYD_FLASH_DQ_ATOMIC=1 selects the atomics.
template <bool kTmaDq>
__global__ void __launch_bounds__(bwd::kThreads, 1)
    flash_bwd_wgmma_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_do,
                           const __grid_constant__ CUtensorMap map_k, const __grid_constant__ CUtensorMap map_v,
                           const __grid_constant__ CUtensorMap map_dq, const float* __restrict__ dsum,
                           const float* __restrict__ lse2, const int32_t* __restrict__ cu_q,
                           const int32_t* __restrict__ cu_k, float* __restrict__ dq_acc, __nv_bfloat16* __restrict__ dk,
                           __nv_bfloat16* __restrict__ dv, int64_t nq, int hq, int hkv, float scale_log2, float scale,
                           int tiles, int groups, int pack) {
  constexpr int kBN = bwd::kBN, kBM = bwd::kBM, kBoxKV = bwd::kBoxKV, kBoxQ = bwd::kBoxQ;  // (shadow the forward's)
  using bwd::kOffDS, bwd::kOffL, bwd::kOffBar, bwd::kOffQ, bwd::kOffV, bwd::kStage, bwd::kOffDQ, bwd::kBoxDQ;
  extern __shared__ unsigned char smem_raw[];
  const KeyBlock kb = key_block<kBN, kBM>(tiles, groups, pack, hkv, cu_q, cu_k);
  const int hk = kb.hk, n0 = kb.n0, q_begin = kb.q_begin, len_q = kb.len_q, k_begin = kb.k_begin, len_k = kb.len_k;
  if (n0 >= len_k) return;
  const int off = kb.off, group = hq / hkv, mt_begin = kb.mt_begin, n_mt = kb.n_mt;
  const int iters = group * n_mt;  // iteration it: query head hk group + it / n_mt, tile mt_begin + it % n_mt

  unsigned char* smem = smem_raw + (((ptx::smem_addr(smem_raw) + 1023u) & ~1023u) - ptx::smem_addr(smem_raw));
  const uint32_t base = ptx::smem_addr(smem);
  const uint32_t sK = base, sV = base + kOffV, bars = base + kOffBar;
  float* sL = reinterpret_cast<float*>(smem + kOffL);  // [stage][64] L2, then [stage][64] D
  const uint32_t full_kv = bars;
  auto full = [&](int s) { return bars + 8 + 8 * s; };
  auto empty = [&](int s) { return bars + 24 + 8 * s; };
  const int warp = wgmma::warp_index(), lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    tma::mbar_init(full_kv, 1);
    for (int s = 0; s < 2; ++s) {
      tma::mbar_init(full(s), 129);  // the expect_tx arrival + the 128 producer threads' L2 / D stores
      tma::mbar_init(empty(s), 8);
    }
    tma::fence_barrier_init();
  }
  __syncthreads();

  if (warp >= 8) {  // the producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    const int p = threadIdx.x - 256;
    if (p == 0 && iters > 0) {
      tma::arrive_expect_tx(full_kv, 4 * kBoxKV);
      tma::load_2d(sK, &map_k, hk * 128, k_begin + n0, full_kv);
      tma::load_2d(sK + kBoxKV, &map_k, hk * 128 + 64, k_begin + n0, full_kv);
      tma::load_2d(sV, &map_v, hk * 128, k_begin + n0, full_kv);
      tma::load_2d(sV + kBoxKV, &map_v, hk * 128 + 64, k_begin + n0, full_kv);
    }
    for (int it = 0; it < iters; ++it) {
      const int st = it & 1, use = it >> 1;
      const int h = hk * group + it / n_mt, m0 = (mt_begin + it % n_mt) * kBM;
      if (use > 0) tma::wait(empty(st), (use - 1) & 1);
      if (p == 0) {
        const uint32_t sq = base + kOffQ + st * kStage, y = q_begin + m0;
        tma::arrive_expect_tx(full(st), kStage);
        tma::load_2d(sq, &map_q, h * 128, y, full(st));
        tma::load_2d(sq + kBoxQ, &map_q, h * 128 + 64, y, full(st));
        tma::load_2d(sq + 2 * kBoxQ, &map_do, h * 128, y, full(st));
        tma::load_2d(sq + 3 * kBoxQ, &map_do, h * 128 + 64, y, full(st));
      }
      const int i = p & (kBM - 1);
      const bool ok = m0 + i < len_q;
      const int64_t src = h * nq + q_begin + m0 + i;
      if (p < kBM)
        sL[st * kBM + i] = ok ? lse2[src] : INFINITY;
      else
        sL[(2 + st) * kBM + i] = ok ? dsum[src] : 0.f;
      tma::arrive(full(st));
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");

  // The consumers. warp w of warpgroup wg: keys key0 + g (+ 8) of the document, key0 = n0 + 64 wg + 16 w.
  const int wg = warp >> 2, g = lane >> 2, t = lane & 3;
  const int key0 = n0 + 64 * wg + 16 * (warp & 3);
  const bool keys_out = key0 + 16 > len_k;
  float dk_acc[64], dv_acc[64];  // acc[4 dn + e]: keys key0 + g (+ 8 for e >= 2), head dims 8 dn + 2 t (+ 1)
#pragma unroll
  for (int i = 0; i < 64; ++i) dk_acc[i] = dv_acc[i] = 0.f;
  const uint32_t k_wg = sK + wg * 64 * 128, v_wg = sV + wg * 64 * 128;
  // (descriptors built once per tile and advanced per product: wgmma::desc_advance)
  const uint64_t d_kwg = wgmma::desc_sw128(k_wg, 16, 1024), d_vwg = wgmma::desc_sw128(v_wg, 16, 1024),
                 d_kt = wgmma::desc_sw128(sK + wg * kBoxKV, 8192, 1024);

  if (iters > 0) tma::wait(full_kv, 0);
  for (int it = 0; it < iters; ++it) {
    const int st = it & 1;
    const int h = hk * group + it / n_mt, m0 = (mt_begin + it % n_mt) * kBM;
    const uint32_t sQ = base + kOffQ + st * kStage, sDo = sQ + 2 * kBoxQ, sDS = base + kOffDS + st * kBN * 128;
    const float* L2 = sL + st * kBM;
    const float* Dv = sL + (2 + st) * kBM;
    tma::wait(full(st), (it >> 1) & 1);

    const uint64_t d_q = wgmma::desc_sw128(sQ, 16, 1024), d_do = wgmma::desc_sw128(sDo, 16, 1024),
                   d_qt = wgmma::desc_sw128(sQ, kBoxQ, 1024), d_dot = wgmma::desc_sw128(sDo, kBoxQ, 1024),
                   d_dst = wgmma::desc_sw128(sDS, 8192, 1024);
    float s_t[32], dp_t[32];  // [4 i + e]: keys key0 + g (+ 8), queries m0 + 8 i + 2 t (+ 1)
    // acc (64 keys x 64 queries) = rows of a (K or V, this warpgroup's keys) times rows of b (Q or dO)
    auto issue_t = [&](float(&acc)[32], uint64_t da, uint64_t db) {
#pragma unroll
      for (int ks = 0; ks < 8; ++ks)
        wgmma::mma_m64n64k16_ss<0, 0>(acc, wgmma::desc_advance(da, (ks >> 2) * kBoxKV + (ks & 3) * 32),
                                      wgmma::desc_advance(db, (ks >> 2) * kBoxQ + (ks & 3) * 32), ks > 0);
      wgmma::commit();
    };
    wgmma::fence();
    issue_t(s_t, d_kwg, d_q);
    issue_t(dp_t, d_vwg, d_do);
    wgmma::wait<1>();
    wgmma::fence_regs(s_t);

    // P^T, in place, and its bf16 A fragments (queries 16 kk.. of the k16 step kk).
    const bool need_mask = keys_out || key0 + 15 > m0 + off;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * i + 2 * t + (e & 1);
        float x = s_t[4 * i + e] * scale_log2;
        if (need_mask) {
          const int key = key0 + g + 8 * (e >> 1);
          if (key > m0 + col + off || key >= len_k) x = -INFINITY;
        }
        s_t[4 * i + e] = ptx::exp2_approx(x - L2[col]);
      }
    uint32_t pp[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int j = 0; j < 4; ++j) pp[kk][j] = ptx::pack_bf16(s_t[8 * kk + 2 * j], s_t[8 * kk + 2 * j + 1]);
    wgmma::fence_regs(dv_acc);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma::mma_m64n128k16_rs_tb(dv_acc, pp[kk], wgmma::desc_advance(d_dot, 2048 * kk), true);
    wgmma::commit();
    wgmma::wait<1>();
    wgmma::fence_regs(dp_t);

    // dS^T = P^T (dP^T - D) (P^T as rounded to bf16 for dV): bf16 A fragments, and [128 keys][64 queries] in shared
    // memory (128-byte swizzle).
    uint32_t ds[4][4];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int col = 8 * i + 2 * t;
      const float d0 = Dv[col], d1 = Dv[col + 1];
      const float2 p_lo = ptx::unpack_bf16(pp[i >> 1][2 * (i & 1)]),
                   p_hi = ptx::unpack_bf16(pp[i >> 1][2 * (i & 1) + 1]);
      const uint32_t lo = ptx::pack_bf16(p_lo.x * (dp_t[4 * i] - d0), p_lo.y * (dp_t[4 * i + 1] - d1));
      const uint32_t hi = ptx::pack_bf16(p_hi.x * (dp_t[4 * i + 2] - d0), p_hi.y * (dp_t[4 * i + 3] - d1));
      ds[i >> 1][2 * (i & 1)] = lo;
      ds[i >> 1][2 * (i & 1) + 1] = hi;
      const int r = 64 * wg + 16 * (warp & 3) + g;  // row of the block's keys; r % 8 = g
      *reinterpret_cast<uint32_t*>(smem + kOffDS + st * kBN * 128 + r * 128 + ((i ^ g) << 4) + 4 * t) = lo;
      *reinterpret_cast<uint32_t*>(smem + kOffDS + st * kBN * 128 + (r + 8) * 128 + ((i ^ g) << 4) + 4 * t) = hi;
    }
    wgmma::fence_regs(dk_acc);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma::mma_m64n128k16_rs_tb(dk_acc, ds[kk], wgmma::desc_advance(d_qt, 2048 * kk), true);
    wgmma::commit();
    wgmma::fence_proxy_async();  // dS^T's stores, read next by wgmma
    // (the leader's wait: the last tile's dQ adds have read the buffer before anyone passes the barrier)
    if (kTmaDq && threadIdx.x % 128 == 0) tma::wait_group_read<0>();
    asm volatile("bar.sync 1, 256;\n" ::: "memory");

    // dQ[:, 64 wg..] = dS K[:, 64 wg..]: A = dS^T read transposed, B = K's column block wg read transposed.
    float dq[32];  // [4 i + e]: queries m0 + 16 w + g (+ 8), head dims 64 wg + 8 i + 2 t (+ 1)
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
      wgmma::mma_m64n64k16_ss<1, 1>(dq, wgmma::desc_advance(d_dst, 2048 * kk), wgmma::desc_advance(d_kt, 2048 * kk),
                                    kk > 0);
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_regs(dq);
    wgmma::fence_regs(dk_acc);
    wgmma::fence_regs(dv_acc);
    __syncwarp();
    if (lane == 0) tma::arrive(empty(st));
    if constexpr (kTmaDq) {
      // This warpgroup's two boxes (head dims 64 wg + 32 b..), 128-byte swizzle: the 16-byte chunk of row r XOR r % 8.
      unsigned char* box = smem + kOffDQ + 2 * wg * kBoxDQ;
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = 16 * (warp & 3) + g + 8 * r, chunk = 2 * (i & 3) + (t >> 1);  // row % 8 = g
          *reinterpret_cast<float2*>(box + (i >> 2) * kBoxDQ + row * 128 + ((chunk ^ g) << 4) + 8 * (t & 1)) =
              make_float2(dq[4 * i + 2 * r], dq[4 * i + 2 * r + 1]);
        }
      wgmma::fence_proxy_async();
      asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
      if (threadIdx.x % 128 == 0) {
        const uint32_t src = base + kOffDQ + 2 * wg * kBoxDQ;
        tma::reduce_add_2d(&map_dq, h * 128 + 64 * wg, q_begin + m0, src);
        tma::reduce_add_2d(&map_dq, h * 128 + 64 * wg + 32, q_begin + m0, src + kBoxDQ);
        tma::commit_group();
      }
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int qi = m0 + 16 * (warp & 3) + g + 8 * r;
        if (qi < len_q) {
          float* dst = dq_acc + (static_cast<int64_t>(q_begin + qi) * hq + h) * 128 + 64 * wg + 2 * t;
#pragma unroll
          for (int i = 0; i < 8; ++i)
            atomicAdd(reinterpret_cast<float2*>(dst + 8 * i), make_float2(dq[4 * i + 2 * r], dq[4 * i + 2 * r + 1]));
        }
      }
    }
  }
  if (kTmaDq && threadIdx.x % 128 == 0) tma::wait_group_read<0>();  // (the buffer outlives the adds' reads)

  // dk = scale dK, dv = dV.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + g + 8 * r;
    if (key < len_k) {
      const int64_t row = (static_cast<int64_t>(k_begin + key) * hkv + hk) * 128 + 2 * t;
#pragma unroll
      for (int dn = 0; dn < 16; ++dn) {
        *reinterpret_cast<uint32_t*>(dk + row + 8 * dn) =
            ptx::pack_bf16(dk_acc[4 * dn + 2 * r] * scale, dk_acc[4 * dn + 2 * r + 1] * scale);
        *reinterpret_cast<uint32_t*>(dv + row + 8 * dn) =
            ptx::pack_bf16(dv_acc[4 * dn + 2 * r], dv_acc[4 * dn + 2 * r + 1]);
      }
    }
  }
}

// A [rows][heads x 128] bf16 (f32: the dQ accumulator) tensor as 2-D TMA boxes of [box_rows][128 bytes of columns],
// 128-byte swizzled.
CUtensorMap tile_map(const void* ptr, int64_t heads, int64_t rows, uint32_t box_rows, const char* what,
                     bool f32 = false) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    cudaDriverEntryPointQueryResult found{};
    void* fn = nullptr;
    CHECK_CUDA(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    HYD_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
              "flash attention (wgmma): the driver has no cuTensorMapEncodeTiled");
    encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  });
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(heads * kD), static_cast<cuuint64_t>(rows)};
  const int bytes = f32 ? 4 : 2;
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(heads * kD * bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(128 / bytes), box_rows}, unit[2] = {1, 1};
  const CUresult r =
      encode(&map, f32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(ptr),
             dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  HYD_CHECK(r == CUDA_SUCCESS, "flash attention (wgmma): cuTensorMapEncodeTiled failed for ", what, " (error ",
            static_cast<int>(r), ", ", rows, " rows x ", heads, " heads)");
  return map;
}

}  // namespace

bool wgmma_runs_here() {  // (attribute queries: well under a microsecond, no cache needed)
  int dev = 0, major = 0, minor = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major == 9 && minor == 0;
}

void flash_forward_wgmma(const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_q, const int32_t* cu_k,
                         int64_t num_docs, int64_t max_len_q, int64_t max_len_k, bf16* o, float* lse, int64_t nq,
                         int64_t nk, int64_t hq, int64_t hkv, float scale, void* stream) {
  HYD_CHECK(scale > 0.f, "flash_attention_forward (wgmma): the softmax scale must be positive, got ", scale);
  const int64_t tiles = (max_len_q + kBM - 1) / kBM;
  if (tiles == 0 || num_docs == 0 || nq == 0) return;
  const int64_t groups = num_docs * hq;
  HYD_CHECK(groups * tiles <= INT32_MAX, "flash_attention_forward (wgmma): grid too large (", num_docs, " documents, ",
            hq, " heads, ", tiles, " query tiles)");
  // Keys (and the tensors' rows) may be empty: a map needs one row, and no block loads a tile then.
  const CUtensorMap mq = tile_map(q, hq, nq, kBM, "q"), mk = tile_map(k, hkv, std::max<int64_t>(nk, 1), kBN, "k"),
                    mv = tile_map(v, hkv, std::max<int64_t>(nk, 1), kBN, "v");
  CHECK_CUDA(cudaFuncSetAttribute(flash_fwd_wgmma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  // Consecutive groups are heads of one document; hq / hkv of them read the same K / V head.
  const int pack = pack_groups(groups, max_len_k * kD * 2 * 2 / (hq / hkv));
  flash_fwd_wgmma_kernel<<<static_cast<unsigned>(groups * tiles), kThreads, kSmem, as_stream(stream)>>>(
      mq, mk, mv, cu_q, cu_k, as_nv(o), lse, static_cast<int>(hq), static_cast<int>(hkv), scale * ptx::kLog2e,
      static_cast<int>(tiles), static_cast<int>(groups), pack);
  CHECK_LAUNCH();
}

void flash_backward_wgmma(const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* dsum,
                          const float* lse2, const int32_t* cu_q, const int32_t* cu_k, int64_t num_docs,
                          int64_t max_len_k, float* dq_acc, bf16* dk, bf16* dv, int64_t nq, int64_t nk, int64_t hq,
                          int64_t hkv, int64_t q_bytes_per_group, float scale, void* stream) {
  const int64_t tiles = (max_len_k + bwd::kBN - 1) / bwd::kBN, groups = num_docs * hkv;
  if (tiles == 0 || groups == 0 || nk == 0) return;
  HYD_CHECK(groups * tiles <= INT32_MAX, "flash_attention_backward (wgmma): grid too large (", num_docs, " documents, ",
            hkv, " kv heads, ", tiles, " key tiles)");
  const int64_t rows_q = std::max<int64_t>(nq, 1);
  const CUtensorMap mq = tile_map(q, hq, rows_q, bwd::kBM, "q"), mdo = tile_map(dout, hq, rows_q, bwd::kBM, "dout"),
                    mk = tile_map(k, hkv, nk, bwd::kBN, "k"), mv = tile_map(v, hkv, nk, bwd::kBN, "v"),
                    mdq = tile_map(dq_acc, hq, rows_q, bwd::kBM, "dq accumulator", true);
  static const bool atomic_dq = [] {
    const char* e = std::getenv("HYD_FLASH_DQ_ATOMIC");
    return e != nullptr && e[0] == '1';
  }();
  const auto kernel = atomic_dq ? flash_bwd_wgmma_kernel<false> : flash_bwd_wgmma_kernel<true>;
  CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bwd::kSmem));
  const int pack = pack_groups(groups, q_bytes_per_group);
  kernel<<<static_cast<unsigned>(groups * tiles), bwd::kThreads, bwd::kSmem, as_stream(stream)>>>(
      mq, mdo, mk, mv, mdq, dsum, lse2, cu_q, cu_k, dq_acc, as_nv(dk), as_nv(dv), nq, static_cast<int>(hq),
      static_cast<int>(hkv), scale * ptx::kLog2e, scale, static_cast<int>(tiles), static_cast<int>(groups), pack);
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

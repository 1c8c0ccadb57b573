// KDA core on tensor cores, version 2 (kernels/cuda/kda_mma.h). Notation as at the top of
// kernels/cuda/kda.cu (chunk C = 64, G = per-channel cumulative sum of g within the chunk).
//
// Forward = two kernels:
//  1. prep (grid: chunk x value head; 8 warps): everything that does not depend on the state.
//     A[r,c] = beta_r sum_i k_r k_c exp(G_r - G_c) and Aqk[r,c] = sum_i q_r k_c exp(G_r - G_c) on
//     tensor cores, in 16-row blocks I with the reference R = G_{16 I} (the block's first row):
//       (x_r exp(G_r - R)) . (k_c exp(R - G_c)),
//     both factors <= 1 for c < 16 I (G is non-increasing), so nothing overflows; on the diagonal
//     block the second factor is exp(R - G_c) <= exp(span), span = max_i (G_{16I} - G_{16I+15}); when
//     span > kSafeSpan the diagonal block is recomputed exactly (fp32, exp of the difference).
//     X = (I + A)^-1 in fp32: 16 x 16 diagonal blocks by substitution, then X_IJ = -X_II sum A_IM X_MJ.
//     w = X Diag(beta) (exp(G) k) and u = X Diag(beta) v on tensor cores with X Diag(beta) split
//     into two bf16 terms (hi + lo, ~16 significant bits), kG and v as bf16 operands.
//     Out (global scratch, per chunk and value head): w, qg = q exp(G), kg = k exp(G_last - G), Aqk
//     (bf16 MMA operands), u and gl = exp(G_last) (f32).
//  2. state pass (grid: document x value head x 32-column tile of the state; 8 warps): the fp32
//     state tile lives in the mma accumulators; per chunk (next chunk's operands prefetched by
//     cp.async into the other buffer):
//       v_new = u - w S,   o = qg S + Aqk v_new,   S <- Diag(gl) S + kg^T v_new,
//     with S and v_new as hi + lo bf16 pairs in the products that feed the state (fp32-class
//     state arithmetic), v_new as one bf16 term in Aqk v_new (o is bf16).
#include "kernels/cuda/kda_mma.h"

#include <algorithm>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/kda_chunk.cuh"
#include "kernels/cuda/mma.cuh"

namespace hyd::kernels::cuda::kda_mma {

using namespace cuda_detail;
using namespace ptx;

namespace {

constexpr int C = 64;
constexpr int kThreads = 256;
constexpr int kBV = 32;             // state columns per block of the state pass
constexpr float kSafeSpan = 60.f;   // exp(60) ~ 1e26: safe in the factored diagonal products

// Byte offset of 16-byte chunk c of row r in a swizzled bf16 tile with CH chunks per row (CH = 4 or a
// power of two >= 8). ldmatrix reads 8 consecutive rows at one logical chunk: the swizzle spreads
// them over 8 distinct 16-byte bank groups.
template <int CH>
__device__ __forceinline__ uint32_t toff(int r, int c) {
  if constexpr (CH >= 8) {
    return static_cast<uint32_t>((r * CH + (c ^ (r & 7))) * 16);
  } else {
    static_assert(CH == 4, "tiles are 32 or a power of two >= 64 columns wide");
    return static_cast<uint32_t>((r * 4 + (c ^ ((r >> 1) & 3))) * 16);
  }
}
// Byte offset of element (r, col) of such a tile.
template <int COLS>
__device__ __forceinline__ uint32_t eoff(int r, int col) {
  return toff<COLS / 8>(r, col >> 3) + static_cast<uint32_t>((col & 7) * 2);
}

// Starts the copy of a ROWS x COLS bf16 tile (row r at src + r * stride) into the swizzled tile at
// shared address dst; rows >= valid are zero-filled. All threads of the block call it.
template <int ROWS, int COLS>
__device__ __forceinline__ void copy_tile(uint32_t dst, const __nv_bfloat16* src, int64_t stride, int valid) {
  constexpr int CH = COLS / 8;
  for (int idx = static_cast<int>(threadIdx.x); idx < ROWS * CH; idx += kThreads) {
    const int r = idx / CH, c = idx % CH;
    const bool ok = r < valid;
    cp_async16(dst + toff<CH>(r, c), ok ? src + r * stride + c * 8 : src, ok);
  }
}

// (x0, x1) as hi + lo bf16 pairs: hi = bf16(x), lo = bf16(x - hi).
__device__ __forceinline__ void split_pair(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  hi = pack_bf16(x0, x1);
  const float2 h = unpack_bf16(hi);
  lo = pack_bf16(x0 - h.x, x1 - h.y);
}

__device__ __forceinline__ void zero(float (&a)[4]) { a[0] = a[1] = a[2] = a[3] = 0.f; }

// ---------------------------------------------------------------- prep

template <int DK, int DV>
struct PrepLayout {
  static constexpr int kLdG = DK + 8;  // f32 row stride of G (float2 fragment reads: no bank conflicts)
  static constexpr int kLdB = DK + 8;  // bf16 row stride of k, q
  static constexpr int kLdM = C + 1;   // f32 64 x 64 matrices
  static constexpr size_t oG = 0;
  static constexpr size_t oK = oG + size_t{C} * kLdG * 4;
  static constexpr size_t oQ = oK + size_t{C} * kLdB * 2;
  static constexpr size_t oA = oQ + size_t{C} * kLdB * 2;
  static constexpr size_t oX = oA + size_t{C} * kLdM * 4;
  static constexpr size_t oY = oX + size_t{C} * kLdM * 4;  // 3 blocks of 16 x 17
  static constexpr size_t oKG = oY + (3 * 16 * 17 * 4 + 15) / 16 * 16;
  static constexpr size_t oV = oKG + size_t{C} * DK * 2;
  static constexpr size_t oBeta = oV + size_t{C} * DV * 2;
  static constexpr size_t bytes = oBeta + C * 4;
};

// rows ra, rb = ra + 8 of T = X Diag(beta) times the swizzled [C][N] bf16 tile at `tile`, for the
// 16-row block I (T is lower triangular: column blocks 0..I), written as bf16 rows of out [C][N].
template <int N, int LDM, class OutT>
__device__ __forceinline__ void t_times_tile(const float* xs, const float* bs, uint32_t tile, int I, OutT* out) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int ra = 16 * I + gq, rb = ra + 8;
  float acc[N / 8][4];
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) zero(acc[nt]);
  for (int kk = 0; kk <= I; ++kk) {
    const int c0 = 16 * kk + 2 * tq, c1 = c0 + 8;
    uint32_t hi[4], lo[4];
    split_pair(xs[ra * LDM + c0] * bs[c0], xs[ra * LDM + c0 + 1] * bs[c0 + 1], hi[0], lo[0]);
    split_pair(xs[rb * LDM + c0] * bs[c0], xs[rb * LDM + c0 + 1] * bs[c0 + 1], hi[1], lo[1]);
    split_pair(xs[ra * LDM + c1] * bs[c1], xs[ra * LDM + c1 + 1] * bs[c1 + 1], hi[2], lo[2]);
    split_pair(xs[rb * LDM + c1] * bs[c1], xs[rb * LDM + c1 + 1] * bs[c1 + 1], hi[3], lo[3]);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];
      ldsm_x4_trans(b, tile + toff<N / 8>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * np + (lane >> 4)));
      mma_bf16(acc[2 * np], hi, b[0], b[1]);
      mma_bf16(acc[2 * np + 1], hi, b[2], b[3]);
      mma_bf16(acc[2 * np], lo, b[0], b[1]);
      mma_bf16(acc[2 * np + 1], lo, b[2], b[3]);
    }
  }
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) {
    const int col = 8 * nt + 2 * tq;
    if constexpr (std::is_same_v<OutT, float>) {
      *reinterpret_cast<float2*>(out + ra * N + col) = make_float2(acc[nt][0], acc[nt][1]);
      *reinterpret_cast<float2*>(out + rb * N + col) = make_float2(acc[nt][2], acc[nt][3]);
    } else {
      *reinterpret_cast<uint32_t*>(out + ra * N + col) = pack_bf16(acc[nt][0], acc[nt][1]);
      *reinterpret_cast<uint32_t*>(out + rb * N + col) = pack_bf16(acc[nt][2], acc[nt][3]);
    }
  }
}

template <int DK, int DV>
__global__ void __launch_bounds__(kThreads, 1)
    prep_kernel(KdaDims s, const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                const __nv_bfloat16* __restrict__ v, const float* __restrict__ g, const float* __restrict__ beta,
                const int32_t* __restrict__ cu, const int32_t* __restrict__ chunk_off, __nv_bfloat16* w_out,
                float* u_out, __nv_bfloat16* qg_out, __nv_bfloat16* kg_out, __nv_bfloat16* aqk_out,
                float* gl_out) {
  using Lt = PrepLayout<DK, DV>;
  constexpr int kLdG = Lt::kLdG, kLdB = Lt::kLdB, kLdM = Lt::kLdM;
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t c = blockIdx.x;
  const int hv = static_cast<int>(blockIdx.y);
  if (c >= chunk_off[s.num_docs]) return;
  const kda_chunk::ChunkSpan sp = kda_chunk::locate_chunk(cu, chunk_off, s.num_docs, c);
  const int L = sp.len, H = static_cast<int>(s.h), HV = static_cast<int>(s.hv);
  const int h = hv / (HV / H);
  const int64_t ch = c * HV + hv;
  const bool has_q = q != nullptr;

  float* gs = reinterpret_cast<float*>(smem + Lt::oG);
  __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(smem + Lt::oK);
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem + Lt::oQ);
  float* as = reinterpret_cast<float*>(smem + Lt::oA);
  float* xs = reinterpret_cast<float*>(smem + Lt::oX);
  float* ys = reinterpret_cast<float*>(smem + Lt::oY);
  unsigned char* kgt = smem + Lt::oKG;
  float* bs = reinterpret_cast<float*>(smem + Lt::oBeta);
  const uint32_t s_kg = smem_addr(kgt), s_v = smem_addr(smem + Lt::oV);
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;

  // 1. Loads (rows past the chunk's end are zero).
  copy_tile<C, DV>(s_v, v + (sp.start * HV + hv) * DV, static_cast<int64_t>(HV) * DV, L);
  cp_async_commit();
  for (int idx = tid; idx < C * DK / 8; idx += kThreads) {
    const int r = idx / (DK / 8), c8 = idx % (DK / 8);
    uint4 kv = make_uint4(0, 0, 0, 0), qv = make_uint4(0, 0, 0, 0);
    if (r < L) {
      const int64_t off = ((sp.start + r) * H + h) * DK + c8 * 8;
      kv = *reinterpret_cast<const uint4*>(k + off);
      if (has_q) qv = *reinterpret_cast<const uint4*>(q + off);
    }
    *reinterpret_cast<uint4*>(ks + r * kLdB + c8 * 8) = kv;
    *reinterpret_cast<uint4*>(qs + r * kLdB + c8 * 8) = qv;
  }
  for (int idx = tid; idx < C * DK / 4; idx += kThreads) {
    const int r = idx / (DK / 4), c4 = idx % (DK / 4);
    float4 gv = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < L) gv = *reinterpret_cast<const float4*>(g + ((sp.start + r) * HV + hv) * DK + c4 * 4);
    *reinterpret_cast<float4*>(gs + r * kLdG + c4 * 4) = gv;
  }
  if (tid < C) bs[tid] = tid < L ? beta[(sp.start + tid) * HV + hv] : 0.f;
  for (int idx = tid; idx < C * kLdM; idx += kThreads) xs[idx] = 0.f;
  __syncthreads();

  // 2. G = cumulative sum of g over the rows, per channel.
  if (tid < DK) {
    float acc = 0.f;
    for (int r = 0; r < C; ++r) {
      acc += gs[r * kLdG + tid];
      gs[r * kLdG + tid] = acc;
    }
  }
  __syncthreads();

  // 3a. Elementwise: the kG = k exp(G) operand tile; qg, kg, gl to global.
  const float* glast = gs + (C - 1) * kLdG;
  for (int idx = tid; idx < C * DK / 2; idx += kThreads) {
    const int r = idx / (DK / 2), i = (idx % (DK / 2)) * 2;
    const float2 G = *reinterpret_cast<const float2*>(gs + r * kLdG + i);
    const float2 GL = *reinterpret_cast<const float2*>(glast + i);
    const float2 kf = unpack_bf16(*reinterpret_cast<const uint32_t*>(ks + r * kLdB + i));
    const float e0 = __expf(G.x), e1 = __expf(G.y);
    *reinterpret_cast<uint32_t*>(kgt + eoff<DK>(r, i)) = pack_bf16(kf.x * e0, kf.y * e1);
    const int64_t o = (ch * C + r) * DK + i;
    *reinterpret_cast<uint32_t*>(kg_out + o) = pack_bf16(kf.x * __expf(GL.x - G.x), kf.y * __expf(GL.y - G.y));
    if (has_q) {
      const float2 qf = unpack_bf16(*reinterpret_cast<const uint32_t*>(qs + r * kLdB + i));
      *reinterpret_cast<uint32_t*>(qg_out + o) = pack_bf16(qf.x * e0, qf.y * e1);
    }
  }
  if (tid < DK) gl_out[ch * DK + tid] = __expf(glast[tid]);

  // 3b. A (warps 0-3) and Aqk (warps 4-7), row block I = warp % 4, on tensor cores.
  {
    const int I = warp & 3;
    const bool qjob = warp >= 4;
    if (!qjob || has_q) {
      const __nv_bfloat16* xr = qjob ? qs : ks;
      const float* R = gs + 16 * I * kLdG;
      // (x[r][i], x[r][i+1]) exp(G_r - R) or (k[r][i], k[r][i+1]) exp(R - G_r), as a bf16 pair.
      auto row_pair = [&](const __nv_bfloat16* x, int r, int i, bool minus_ref) {
        const float2 xv = unpack_bf16(*reinterpret_cast<const uint32_t*>(x + r * kLdB + i));
        const float2 G = *reinterpret_cast<const float2*>(gs + r * kLdG + i);
        const float2 Rv = *reinterpret_cast<const float2*>(R + i);
        return minus_ref ? pack_bf16(xv.x * __expf(G.x - Rv.x), xv.y * __expf(G.y - Rv.y))
                         : pack_bf16(xv.x * __expf(Rv.x - G.x), xv.y * __expf(Rv.y - G.y));
      };
      const int ntn = 2 * (I + 1);
      const int ra = 16 * I + gq, rb = ra + 8;
      float acc[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) zero(acc[nt]);
#pragma unroll 2
      for (int kst = 0; kst < DK / 16; ++kst) {
        const int i0 = 16 * kst + 2 * tq, i1 = i0 + 8;
        const uint32_t a[4] = {row_pair(xr, ra, i0, true), row_pair(xr, rb, i0, true), row_pair(xr, ra, i1, true),
                               row_pair(xr, rb, i1, true)};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          if (nt < ntn) {
            const int cc = 8 * nt + gq;
            mma_bf16(acc[nt], a, row_pair(ks, cc, i0, false), row_pair(ks, cc, i1, false));
          }
        }
      }
      float span = 0.f;
      for (int i = lane; i < DK; i += 32) span = fmaxf(span, R[i] - gs[(16 * I + 15) * kLdG + i]);
      span = warp_max(span);
      __nv_bfloat16* aqk_c = aqk_out + ch * C * C;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = ra + 8 * half, col = 8 * nt + 2 * tq;
          const float v0 = nt < ntn ? acc[nt][2 * half] : 0.f, v1 = nt < ntn ? acc[nt][2 * half + 1] : 0.f;
          if (qjob) {
            *reinterpret_cast<uint32_t*>(aqk_c + r * C + col) =
                pack_bf16(col <= r ? v0 : 0.f, col + 1 <= r ? v1 : 0.f);
          } else {
            as[r * kLdM + col] = col < r ? bs[r] * v0 : 0.f;
            as[r * kLdM + col + 1] = col + 1 < r ? bs[r] * v1 : 0.f;
          }
        }
      }
      if (span > kSafeSpan) {  // strong decay inside the block: its diagonal part exactly
        __syncwarp();
        for (int p = lane; p < 16 * 17 / 2; p += 32) {
          int rl = 0;
          while ((rl + 1) * (rl + 2) / 2 <= p) ++rl;
          const int r = 16 * I + rl, cc = 16 * I + (p - rl * (rl + 1) / 2);
          float sum = 0.f;
          for (int i = 0; i < DK; ++i)
            sum += __bfloat162float(xr[r * kLdB + i]) * __bfloat162float(ks[cc * kLdB + i]) *
                   expf(gs[r * kLdG + i] - gs[cc * kLdG + i]);
          if (qjob)
            aqk_c[r * C + cc] = __float2bfloat16_rn(sum);
          else if (cc < r)
            as[r * kLdM + cc] = bs[r] * sum;
        }
      }
    }
  }
  cp_async_wait<0>();  // the v tile
  __syncthreads();

  // 4. X = (I + A)^-1: diagonal blocks by substitution (warps 0-3), then the blocks below.
  if (warp < 4 && lane < 16) {
    const int b0 = 16 * warp, j = lane;
    xs[(b0 + j) * kLdM + b0 + j] = 1.f;
    __syncwarp(0xffffu);
    for (int rl = 1; rl < 16; ++rl) {
      if (j < rl) {
        float sum = 0.f;
        for (int m = j; m < rl; ++m) sum += as[(b0 + rl) * kLdM + b0 + m] * xs[(b0 + m) * kLdM + b0 + j];
        xs[(b0 + rl) * kLdM + b0 + j] = -sum;
      }
      __syncwarp(0xffffu);
    }
  }
  __syncthreads();
  for (int I = 1; I < 4; ++I) {
    for (int idx = tid; idx < I * 256; idx += kThreads) {
      const int J = idx >> 8, rr = (idx >> 4) & 15, cc = idx & 15;
      float sum = 0.f;
      for (int m = 16 * J; m < 16 * I; ++m) sum += as[(16 * I + rr) * kLdM + m] * xs[m * kLdM + 16 * J + cc];
      ys[(J * 16 + rr) * 17 + cc] = sum;
    }
    __syncthreads();
    for (int idx = tid; idx < I * 256; idx += kThreads) {
      const int J = idx >> 8, rr = (idx >> 4) & 15, cc = idx & 15;
      float sum = 0.f;
      for (int m = 0; m <= rr; ++m) sum += xs[(16 * I + rr) * kLdM + 16 * I + m] * ys[(J * 16 + m) * 17 + cc];
      xs[(16 * I + rr) * kLdM + 16 * J + cc] = -sum;
    }
    __syncthreads();
  }

  // 5. w = T kG (warps 0-3), u = T v (warps 4-7).
  if (warp < 4)
    t_times_tile<DK, kLdM>(xs, bs, s_kg, warp, w_out + ch * C * DK);
  else
    t_times_tile<DV, kLdM>(xs, bs, s_v, warp - 4, u_out + ch * C * DV);  // u in f32: it is not an MMA operand
}

// ---------------------------------------------------------------- state pass

template <int DK>
struct StateLayout {
  // One buffer per chunk in flight: w, qg, kg [C][DK], Aqk [C][C] (swizzled bf16), u [C][kLdU] f32,
  // gl [DK] f32.
  static constexpr int kLdU = kBV + 8;
  static constexpr size_t oW = 0, oQG = oW + size_t{C} * DK * 2, oKG = oQG + size_t{C} * DK * 2,
                          oAQK = oKG + size_t{C} * DK * 2, oU = oAQK + size_t{C} * C * 2, oGL = oU + size_t{C} * kLdU * 4,
                          buf = oGL + size_t{DK} * 4;
  // State staging (hi, lo) [DK][kBV] and v_new staging (hi, lo) [C][kBV].
  static constexpr size_t oShi = 2 * buf, oSlo = oShi + size_t{DK} * kBV * 2, oVhi = oSlo + size_t{DK} * kBV * 2,
                          oVlo = oVhi + size_t{C} * kBV * 2, bytes = oVlo + size_t{C} * kBV * 2;
};

template <int DK, int DV>
__global__ void __launch_bounds__(kThreads, 1)
    state_kernel(KdaDims s, const int32_t* __restrict__ cu, const int32_t* __restrict__ chunk_off,
                 const __nv_bfloat16* __restrict__ w, const float* __restrict__ u,
                 const __nv_bfloat16* __restrict__ qg, const __nv_bfloat16* __restrict__ kg,
                 const __nv_bfloat16* __restrict__ aqk, const float* __restrict__ gl, const float* __restrict__ initial,
                 __nv_bfloat16* __restrict__ o, float* __restrict__ final_state) {
  using Lt = StateLayout<DK>;
  constexpr int MT = DK / 16;       // m-tiles of the state
  constexpr int SN = 4 * MT / 8;    // n-tiles (of 8 columns) of the state per warp
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t d = blockIdx.x;
  const int hv = static_cast<int>(blockIdx.y), j0 = static_cast<int>(blockIdx.z) * kBV;
  const int HV = static_cast<int>(s.hv);
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int64_t c0 = chunk_off[d], c1 = chunk_off[d + 1];
  const int64_t sbase = (d * HV + hv) * DK * DV + j0;
  const uint32_t s0 = smem_addr(smem);
  const uint32_t s_shi = s0 + Lt::oShi, s_slo = s0 + Lt::oSlo, s_vhi = s0 + Lt::oVhi, s_vlo = s0 + Lt::oVlo;

  // This warp's part of the state: rows 16 sm + gq (+8), columns 8 (sn0 + n) + 2 tq (+1).
  const int sm = warp % MT, sn0 = (warp / MT) * SN;
  float st[SN][4];
#pragma unroll
  for (int n = 0; n < SN; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = 16 * sm + gq + 8 * (e >> 1), j = 8 * (sn0 + n) + 2 * tq + (e & 1);
      st[n][e] = initial ? initial[sbase + i * DV + j] : 0.f;
    }
  auto stage_state = [&]() {
#pragma unroll
    for (int n = 0; n < SN; ++n)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = 16 * sm + gq + 8 * half, j = 8 * (sn0 + n) + 2 * tq;
        uint32_t hi, lo;
        split_pair(st[n][2 * half], st[n][2 * half + 1], hi, lo);
        *reinterpret_cast<uint32_t*>(smem + Lt::oShi + eoff<kBV>(i, j)) = hi;
        *reinterpret_cast<uint32_t*>(smem + Lt::oSlo + eoff<kBV>(i, j)) = lo;
      }
  };
  stage_state();

  auto load_chunk = [&](int64_t c, int b) {
    const int64_t ch = c * HV + hv;
    const uint32_t base = s0 + static_cast<uint32_t>(b * Lt::buf);
    copy_tile<C, DK>(base + Lt::oW, w + ch * C * DK, DK, C);
    copy_tile<C, DK>(base + Lt::oQG, qg + ch * C * DK, DK, C);
    copy_tile<C, DK>(base + Lt::oKG, kg + ch * C * DK, DK, C);
    copy_tile<C, C>(base + Lt::oAQK, aqk + ch * C * C, C, C);
    for (int idx = tid; idx < C * kBV / 4; idx += kThreads) {
      const int r = idx / (kBV / 4), c4 = idx % (kBV / 4);
      cp_async16(base + Lt::oU + (r * Lt::kLdU + c4 * 4) * 4, u + (ch * C + r) * DV + j0 + c4 * 4, true);
    }
    for (int idx = tid; idx < DK / 4; idx += kThreads) cp_async16(base + Lt::oGL + idx * 16, gl + ch * DK + idx * 4, true);
  };
  if (c0 < c1) load_chunk(c0, 0);
  cp_async_commit();

  const int I = warp & 3, nb = 2 * (warp >> 2);  // v_new / o: row block I, n-tiles nb, nb + 1
  for (int64_t c = c0; c < c1; ++c) {
    const int b = static_cast<int>((c - c0) & 1);
    if (c + 1 < c1) load_chunk(c + 1, b ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // chunk c's operands and the staged state are visible
    const uint32_t base = s0 + static_cast<uint32_t>(b * Lt::buf);
    const unsigned char* gbase = smem + b * Lt::buf;
    const int64_t start = cu[d] + (c - c0) * C;
    const int L = static_cast<int>(min(static_cast<int64_t>(C), cu[d + 1] - start));

    // (a) v_new = u - w S
    {
      float acc[2][4];
      zero(acc[0]);
      zero(acc[1]);
#pragma unroll
      for (int kst = 0; kst < DK / 16; ++kst) {
        uint32_t a[4], bh[4], bl[4];
        ldsm_x4(a, base + Lt::oW + toff<DK / 8>(16 * I + (lane & 15), 2 * kst + (lane >> 4)));
        const uint32_t so = toff<kBV / 8>(16 * kst + (lane & 7) + (((lane >> 3) & 1) << 3), nb + (lane >> 4));
        ldsm_x4_trans(bh, s_shi + so);
        ldsm_x4_trans(bl, s_slo + so);
        mma_bf16(acc[0], a, bh[0], bh[1]);
        mma_bf16(acc[1], a, bh[2], bh[3]);
        mma_bf16(acc[0], a, bl[0], bl[1]);
        mma_bf16(acc[1], a, bl[2], bl[3]);
      }
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = 16 * I + gq + 8 * half, col = 8 * (nb + n) + 2 * tq;
          const float2 uu = *reinterpret_cast<const float2*>(gbase + Lt::oU + (r * Lt::kLdU + col) * 4);
          uint32_t hi, lo;
          split_pair(uu.x - acc[n][2 * half], uu.y - acc[n][2 * half + 1], hi, lo);
          *reinterpret_cast<uint32_t*>(smem + Lt::oVhi + eoff<kBV>(r, col)) = hi;
          *reinterpret_cast<uint32_t*>(smem + Lt::oVlo + eoff<kBV>(r, col)) = lo;
        }
    }
    __syncthreads();  // v_new staged

    // (b) o = qg S + Aqk v_new
    if (o) {
      float acc[2][4];
      zero(acc[0]);
      zero(acc[1]);
#pragma unroll
      for (int kst = 0; kst < DK / 16; ++kst) {
        uint32_t a[4], bh[4], bl[4];
        ldsm_x4(a, base + Lt::oQG + toff<DK / 8>(16 * I + (lane & 15), 2 * kst + (lane >> 4)));
        const uint32_t so = toff<kBV / 8>(16 * kst + (lane & 7) + (((lane >> 3) & 1) << 3), nb + (lane >> 4));
        ldsm_x4_trans(bh, s_shi + so);
        ldsm_x4_trans(bl, s_slo + so);
        mma_bf16(acc[0], a, bh[0], bh[1]);
        mma_bf16(acc[1], a, bh[2], bh[3]);
        mma_bf16(acc[0], a, bl[0], bl[1]);
        mma_bf16(acc[1], a, bl[2], bl[3]);
      }
      for (int kk = 0; kk <= I; ++kk) {
        uint32_t a[4], bv[4];
        ldsm_x4(a, base + Lt::oAQK + toff<C / 8>(16 * I + (lane & 15), 2 * kk + (lane >> 4)));
        ldsm_x4_trans(bv, s_vhi + toff<kBV / 8>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), nb + (lane >> 4)));
        mma_bf16(acc[0], a, bv[0], bv[1]);
        mma_bf16(acc[1], a, bv[2], bv[3]);
      }
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = 16 * I + gq + 8 * half, col = j0 + 8 * (nb + n) + 2 * tq;
          if (r < L)
            *reinterpret_cast<uint32_t*>(o + ((start + r) * HV + hv) * DV + col) =
                pack_bf16(acc[n][2 * half], acc[n][2 * half + 1]);
        }
    }

    // (c) S <- Diag(gl) S + kg^T v_new
    {
      const float* glc = reinterpret_cast<const float*>(gbase + Lt::oGL);
      const float ga = glc[16 * sm + gq], gb = glc[16 * sm + gq + 8];
#pragma unroll
      for (int n = 0; n < SN; ++n) {
        st[n][0] *= ga;
        st[n][1] *= ga;
        st[n][2] *= gb;
        st[n][3] *= gb;
      }
#pragma unroll
      for (int kc = 0; kc < C / 16; ++kc) {
        uint32_t a[4];
        ldsm_x4_trans(a, base + Lt::oKG + toff<DK / 8>(16 * kc + (lane & 7) + ((lane >> 4) << 3), 2 * sm + ((lane >> 3) & 1)));
#pragma unroll
        for (int np = 0; np < SN / 2; ++np) {
          uint32_t bh[4], bl[4];
          const uint32_t vo =
              toff<kBV / 8>(16 * kc + (lane & 7) + (((lane >> 3) & 1) << 3), sn0 + 2 * np + (lane >> 4));
          ldsm_x4_trans(bh, s_vhi + vo);
          ldsm_x4_trans(bl, s_vlo + vo);
          mma_bf16(st[2 * np], a, bh[0], bh[1]);
          mma_bf16(st[2 * np + 1], a, bh[2], bh[3]);
          mma_bf16(st[2 * np], a, bl[0], bl[1]);
          mma_bf16(st[2 * np + 1], a, bl[2], bl[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with the staged state, v_new and this buffer
    stage_state();
  }
  cp_async_wait<0>();
  if (final_state) {
#pragma unroll
    for (int n = 0; n < SN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 16 * sm + gq + 8 * (e >> 1), j = 8 * (sn0 + n) + 2 * tq + (e & 1);
        final_state[sbase + i * DV + j] = st[n][e];
      }
  }
}

struct FwdBuffers {
  __nv_bfloat16 *w, *qg, *kg, *aqk;
  float *u, *gl;
};

size_t align16(size_t b) { return (b + 15) / 16 * 16; }

// Carves the forward scratch; with base == nullptr only counts. Returns bytes.
size_t carve(const KdaDims& s, unsigned char* base, FwdBuffers& f) {
  const size_t ch = static_cast<size_t>(kda_chunk::max_chunks(s)) * static_cast<size_t>(s.hv);
  const size_t dk = static_cast<size_t>(s.dk), dv = static_cast<size_t>(s.dv);
  size_t used = 0;
  auto take = [&](size_t bytes) {
    unsigned char* p = base ? base + used : nullptr;
    used += align16(bytes);
    return p;
  };
  f.w = reinterpret_cast<__nv_bfloat16*>(take(ch * C * dk * 2));
  f.u = reinterpret_cast<float*>(take(ch * C * dv * 4));
  f.qg = reinterpret_cast<__nv_bfloat16*>(take(ch * C * dk * 2));
  f.kg = reinterpret_cast<__nv_bfloat16*>(take(ch * C * dk * 2));
  f.aqk = reinterpret_cast<__nv_bfloat16*>(take(ch * C * C * 2));
  f.gl = reinterpret_cast<float*>(take(ch * dk * 4));
  return used;
}

template <class K>
void set_smem(K kernel, size_t bytes) {
  HYD_CHECK(bytes <= 227 * 1024, "kda: ", bytes, " bytes of shared memory exceed the per-block limit");
  CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <int DK, int DV>
void forward_impl(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                  const int32_t* cu, const int32_t* chunk_off, const float* initial_state, bf16* o, float* final_state,
                  const FwdBuffers& f, cudaStream_t st) {
  const int64_t mc = kda_chunk::max_chunks(s);
  if (mc > 0) {
    using PL = PrepLayout<DK, DV>;
    set_smem(prep_kernel<DK, DV>, PL::bytes);
    prep_kernel<DK, DV><<<dim3(static_cast<unsigned>(mc), static_cast<unsigned>(s.hv)), kThreads, PL::bytes, st>>>(
        s, as_nv(q), as_nv(k), as_nv(v), g, beta, cu, chunk_off, f.w, f.u, f.qg, f.kg, f.aqk, f.gl);
    CHECK_LAUNCH();
  }
  using SL = StateLayout<DK>;
  set_smem(state_kernel<DK, DV>, SL::bytes);
  state_kernel<DK, DV><<<dim3(static_cast<unsigned>(s.num_docs), static_cast<unsigned>(s.hv), DV / kBV), kThreads,
                         SL::bytes, st>>>(s, cu, chunk_off, f.w, f.u, f.qg, f.kg, f.aqk, f.gl, initial_state,
                                          as_nv(o), final_state);
  CHECK_LAUNCH();
}

}  // namespace

bool supports(const KdaDims& s) { return (s.dk == 64 || s.dk == 128) && (s.dv == 64 || s.dv == 128); }

size_t forward_scratch_bytes(const KdaDims& s) {
  FwdBuffers f{};
  return carve(s, nullptr, f);
}

void forward(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
             const int32_t* cu_seqlens, const int32_t* chunk_off, const float* initial_state, bf16* o,
             float* final_state, void* scratch, cudaStream_t stream) {
  HYD_CHECK(supports(s), "kda_mma::forward: dk ", s.dk, " / dv ", s.dv, " not supported");
  HYD_CHECK(s.num_docs <= 0x7fffffffLL && s.hv <= 65535, "kda_mma::forward: grid too large");
  FwdBuffers f{};
  carve(s, static_cast<unsigned char*>(scratch), f);
  auto run = [&]<int DK, int DV>() {
    forward_impl<DK, DV>(s, q, k, v, g, beta, cu_seqlens, chunk_off, initial_state, o, final_state, f, stream);
  };
  if (s.dk == 128 && s.dv == 128)
    run.template operator()<128, 128>();
  else if (s.dk == 128)
    run.template operator()<128, 64>();
  else if (s.dv == 128)
    run.template operator()<64, 128>();
  else
    run.template operator()<64, 64>();
}

}  // namespace hyd::kernels::cuda::kda_mma

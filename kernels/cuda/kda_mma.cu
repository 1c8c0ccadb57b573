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
//  2. state pass (grid: document x value head x 32-column tile of the state, flat with the tiles of a
//     (document, head) adjacent; 8 warps): the fp32 state tile lives in the mma accumulators; per chunk
//     (next chunk's operands prefetched by cp.async into the other buffer):
//       v_new = u - w S,   o = qg S + Aqk v_new,   S <- Diag(gl) S + kg^T v_new,
//     with S and v_new as hi + lo bf16 pairs in the products that feed the state (fp32-class
//     state arithmetic), v_new as one bf16 term in Aqk v_new (o is bf16).
#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/kda_chunk.cuh"
#include "kernels/cuda/kda_mma.h"
#include "kernels/cuda/mma.cuh"

namespace hyd::kernels::cuda::kda_mma {

using namespace cuda_detail;
using namespace ptx;

// Phase clocks of one block for profiling builds (-DHYD_KDA_PHASE_CLOCKS): thread 0 of block
// (300, 5) prints the cycles between marks.
#ifdef HYD_KDA_PHASE_CLOCKS
#define KDA_CLOCKS_BEGIN() \
  long long kda_clk[12];   \
  kda_clk[0] = clock64()
#define KDA_CLOCK(i) kda_clk[i] = clock64()
#define KDA_CLOCKS_PRINT(name, n)                                                          \
  if (threadIdx.x == 0 && blockIdx.x == 300 && blockIdx.y == 5) {                          \
    for (int m = 1; m < (n); ++m) printf("%s phase %d: %lld cycles\n", name, m, kda_clk[m] - kda_clk[m - 1]); \
  }
#else
#define KDA_CLOCKS_BEGIN() \
  do {                     \
  } while (0)
#define KDA_CLOCK(i) \
  do {               \
  } while (0)
#define KDA_CLOCKS_PRINT(name, n) \
  do {                            \
  } while (0)
#endif

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
// STEPPED (when the NT threads cover whole rows and a multiple of 8 of them, as every tile here): a thread keeps one
// chunk column and steps by a constant number of rows, which keeps its swizzle (toff depends on r & 7 only), so the
// copies unroll into one pointer step each instead of an index division and address computation per copy. Same
// copies in the same order either way; the reverse pass keeps the loop (stepped, it ran 16% slower at B2xT16384 H16,
// one block per SM, while every other pass gained: stop 37).
template <int ROWS, int COLS, int NT = kThreads, bool STEPPED = true>
__device__ __forceinline__ void copy_tile(uint32_t dst, const __nv_bfloat16* src, int64_t stride, int valid) {
  constexpr int CH = COLS / 8;
  if constexpr (STEPPED && NT % CH == 0 && (ROWS * CH) % NT == 0 && (NT / CH) % 8 == 0) {
    constexpr int kStep = NT / CH;
    const int r0 = static_cast<int>(threadIdx.x) / CH, c = static_cast<int>(threadIdx.x) % CH;
    const uint32_t d = dst + toff<CH>(r0, c);
    const __nv_bfloat16* p = src + r0 * stride + c * 8;
    const int64_t step = kStep * stride;
#pragma unroll
    for (int i = 0; i < ROWS * CH / NT; ++i, p += step) {
      const bool ok = r0 + i * kStep < valid;
      cp_async16(d + static_cast<uint32_t>(i * kStep * CH * 16), ok ? p : src, ok);
    }
  } else {
    for (int idx = static_cast<int>(threadIdx.x); idx < ROWS * CH; idx += NT) {
      const int r = idx / CH, c = idx % CH;
      const bool ok = r < valid;
      cp_async16(dst + toff<CH>(r, c), ok ? src + r * stride + c * 8 : src, ok);
    }
  }
}

// (x0, x1) as hi + lo bf16 pairs: hi = bf16(x), lo = bf16(x - hi).
__device__ __forceinline__ void split_pair(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  hi = pack_bf16(x0, x1);
  const float2 h = unpack_bf16(hi);
  lo = pack_bf16(x0 - h.x, x1 - h.y);
}

// acc += A B with A = ah + al (hi + lo bf16) and the fp32 B fragment (b00, b01 | b10, b11) split hi + lo: the
// hi.hi, lo.hi and hi.lo products (~16 significant bits).
__device__ __forceinline__ void mma_split3(float (&acc)[4], const uint32_t (&ah)[4], const uint32_t (&al)[4], float b00,
                                           float b01, float b10, float b11) {
  uint32_t bh0, bl0, bh1, bl1;
  split_pair(b00, b01, bh0, bl0);
  split_pair(b10, b11, bh1, bl1);
  mma_bf16(acc, ah, bh0, bh1);
  mma_bf16(acc, al, bh0, bh1);
  mma_bf16(acc, ah, bl0, bl1);
}

__device__ __forceinline__ void zero(float (&a)[4]) { a[0] = a[1] = a[2] = a[3] = 0.f; }

// sum_{m = lo}^{hi - 1} a[m sa] b[m sb] with four independent partial sums (the shared-memory loops
// of the inverse and its adjoint are latency-bound).
__device__ __forceinline__ float dot_strided(const float* a, int sa, const float* b, int sb, int lo, int hi) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int m = lo;
  for (; m + 3 < hi; m += 4) {
    s0 += a[m * sa] * b[m * sb];
    s1 += a[(m + 1) * sa] * b[(m + 1) * sb];
    s2 += a[(m + 2) * sa] * b[(m + 2) * sb];
    s3 += a[(m + 3) * sa] * b[(m + 3) * sb];
  }
  for (; m < hi; ++m) s0 += a[m * sa] * b[m * sb];
  return (s0 + s1) + (s2 + s3);
}

// ---------------------------------------------------------------- prep

// G = cumulative sum of g over the C rows of the f32 tile gs (row stride LD), per channel: thread tid < DK owns
// channel tid. The column is read into registers first, so the C additions wait on one another but not each on a
// shared-memory read (the one-row-at-a-time loop was a chain of C dependent reads); the sums are the loop's, bit for
// bit (same order).
template <int LD, int DK>
__device__ __forceinline__ void column_cumsum(float* gs, int tid) {
  if (tid >= DK) return;
  float v[C];
#pragma unroll
  for (int r = 0; r < C; ++r) v[r] = gs[r * LD + tid];
#pragma unroll
  for (int r = 1; r < C; ++r) v[r] += v[r - 1];
#pragma unroll
  for (int r = 0; r < C; ++r) gs[r * LD + tid] = v[r];
}

// X_BB = (I + A_BB)^-1 for the 16 x 16 diagonal block at row / column b0 (A strictly lower triangular; a and x f32
// with row stride LDM), one warp, lane j < 16 computing column j in registers: X[r][j] = -sum_{m < r} A[r][m]
// X[m][j] for r > j, X[j][j] = 1, X[r][j] = 0 for r < j. The rows wait only on register FMAs (A is read by
// broadcast), not on shared-memory round trips and a warp barrier per row as in row-by-row substitution.
template <int LDM>
__device__ __forceinline__ void diag_block_inverse(const float* a, float* x, int b0, int j) {
  float col[16];
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    float acc = 0.f;
#pragma unroll
    for (int m = 0; m < r; ++m) acc = fmaf(a[(b0 + r) * LDM + b0 + m], col[m], acc);
    col[r] = r < j ? 0.f : (r == j ? 1.f : -acc);
  }
#pragma unroll
  for (int r = 0; r < 16; ++r) x[(b0 + r) * LDM + b0 + j] = col[r];
}

// Row strides of the per-chunk staging shared by prep and the intra-chunk gradient: G f32 and
// k, q bf16, DK + 8 elements (fragment reads of pairs hit distinct banks).
template <int DK>
constexpr int kLdG = DK + 8;
template <int DK>
constexpr int kLdB = DK + 8;

// (x[r][i], x[r][i+1]) exp(G_r - R) (minus_ref) or exp(R - G_r), as a bf16 pair: R = reference row.
template <int DK>
__device__ __forceinline__ uint32_t decayed_pair(const __nv_bfloat16* x, const float* gs, const float* R, int r, int i,
                                                 bool minus_ref) {
  const float2 xv = unpack_bf16(*reinterpret_cast<const uint32_t*>(x + r * kLdB<DK> + i));
  const float2 G = *reinterpret_cast<const float2*>(gs + r * kLdG<DK> + i);
  const float2 Rv = *reinterpret_cast<const float2*>(R + i);
  return minus_ref ? pack_bf16(xv.x * __expf(G.x - Rv.x), xv.y * __expf(G.y - Rv.y))
                   : pack_bf16(xv.x * __expf(Rv.x - G.x), xv.y * __expf(Rv.y - G.y));
}

// (x[c][i] e, x[c+1][i] e') with e = exp(R[i] - G_c[i]) (ref_minus_g) or exp(G_c[i] - R[i]): the
// B fragment of a product that contracts over the chunk rows c.
template <int DK>
__device__ __forceinline__ uint32_t decayed_col_pair(const __nv_bfloat16* x, const float* gs, const float* R, int c,
                                                     int i, bool ref_minus_g) {
  const float x0 = __bfloat162float(x[c * kLdB<DK> + i]), x1 = __bfloat162float(x[(c + 1) * kLdB<DK> + i]);
  const float g0 = gs[c * kLdG<DK> + i], g1 = gs[(c + 1) * kLdG<DK> + i], rv = R[i];
  return ref_minus_g ? pack_bf16(x0 * __expf(rv - g0), x1 * __expf(rv - g1))
                     : pack_bf16(x0 * __expf(g0 - rv), x1 * __expf(g1 - rv));
}

// sum_i x_r[i] k_c[i] exp(G_r[i] - G_c[i]) exactly (fp32, exp of the difference).
template <int DK>
__device__ __forceinline__ float decay_dot(const __nv_bfloat16* x, const __nv_bfloat16* k, const float* gs, int r,
                                           int c) {
  float sum = 0.f;
  for (int i = 0; i < DK; ++i)
    sum += __bfloat162float(x[r * kLdB<DK> + i]) * __bfloat162float(k[c * kLdB<DK> + i]) *
           expf(gs[r * kLdG<DK> + i] - gs[c * kLdG<DK> + i]);
  return sum;
}

// For the rows of 16-row block I (one warp): acc[nt] (nt < 2 (I + 1), columns c < 16 (I + 1)) =
// sum_i x_r[i] k_c[i] exp(G_r[i] - G_c[i]) on tensor cores, factored at the reference R = G_{16 I}:
// (x_r exp(G_r - R)) . (k_c exp(R - G_c)). Returns span = max_i (G_{16I} - G_{16I+15}); the
// diagonal 16 x 16 block is only trustworthy when span <= kSafeSpan.
template <int DK>
__device__ __forceinline__ float decay_gram(const __nv_bfloat16* x, const __nv_bfloat16* k, const float* gs, int I,
                                            float (&acc)[8][4]) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const float* R = gs + 16 * I * kLdG<DK>;
  const int ntn = 2 * (I + 1);
  const int ra = 16 * I + gq, rb = ra + 8;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) zero(acc[nt]);
#pragma unroll 2
  for (int kst = 0; kst < DK / 16; ++kst) {
    const int i0 = 16 * kst + 2 * tq, i1 = i0 + 8;
    const uint32_t a[4] = {decayed_pair<DK>(x, gs, R, ra, i0, true), decayed_pair<DK>(x, gs, R, rb, i0, true),
                           decayed_pair<DK>(x, gs, R, ra, i1, true), decayed_pair<DK>(x, gs, R, rb, i1, true)};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      if (nt < ntn) {
        const int cc = 8 * nt + gq;
        mma_bf16(acc[nt], a, decayed_pair<DK>(k, gs, R, cc, i0, false), decayed_pair<DK>(k, gs, R, cc, i1, false));
      }
    }
  }
  float span = 0.f;
  for (int i = lane; i < DK; i += 32) span = fmaxf(span, R[i] - gs[(16 * I + 15) * kLdG<DK> + i]);
  return warp_max(span);
}

// A fragments (hi + lo bf16 split) of a product whose A operand comes from an fp32 C x C matrix M in
// shared memory (row stride LDM), for rows ra, rb = ra + 8 and the k block kk (k0 = 16 kk + 2 tq):
//   afrag_rows: A[m][k] = M[m][k] * (m == ra ? sa : sb)
//   afrag_cols: A[m][k] = M[k][m] * (m == ra ? sa : sb) * (kscale ? kscale[k] : 1)
template <int LDM>
__device__ __forceinline__ void afrag_rows(const float* M, int ra, int kk, float sa, float sb, uint32_t (&hi)[4],
                                           uint32_t (&lo)[4]) {
  const int k0 = 16 * kk + 2 * (threadIdx.x & 3), k1 = k0 + 8, rb = ra + 8;
  split_pair(M[ra * LDM + k0] * sa, M[ra * LDM + k0 + 1] * sa, hi[0], lo[0]);
  split_pair(M[rb * LDM + k0] * sb, M[rb * LDM + k0 + 1] * sb, hi[1], lo[1]);
  split_pair(M[ra * LDM + k1] * sa, M[ra * LDM + k1 + 1] * sa, hi[2], lo[2]);
  split_pair(M[rb * LDM + k1] * sb, M[rb * LDM + k1 + 1] * sb, hi[3], lo[3]);
}
template <int LDM>
__device__ __forceinline__ void afrag_cols(const float* M, const float* kscale, int ra, int kk, float sa, float sb,
                                           uint32_t (&hi)[4], uint32_t (&lo)[4]) {
  const int k0 = 16 * kk + 2 * (threadIdx.x & 3), k1 = k0 + 8, rb = ra + 8;
  auto ks = [&](int kx) { return kscale ? kscale[kx] : 1.f; };
  split_pair(M[k0 * LDM + ra] * sa * ks(k0), M[(k0 + 1) * LDM + ra] * sa * ks(k0 + 1), hi[0], lo[0]);
  split_pair(M[k0 * LDM + rb] * sb * ks(k0), M[(k0 + 1) * LDM + rb] * sb * ks(k0 + 1), hi[1], lo[1]);
  split_pair(M[k1 * LDM + ra] * sa * ks(k1), M[(k1 + 1) * LDM + ra] * sa * ks(k1 + 1), hi[2], lo[2]);
  split_pair(M[k1 * LDM + rb] * sb * ks(k1), M[(k1 + 1) * LDM + rb] * sb * ks(k1 + 1), hi[3], lo[3]);
}

// Calls f(r, c, exact) for the 136 entries c <= r of the diagonal 16 x 16 block I (one warp, lanes
// split the entries): exact = sum_i x_r[i] k_c[i] exp(G_r[i] - G_c[i]) in fp32.
template <int DK, class F>
__device__ __forceinline__ void exact_diag_gram(const __nv_bfloat16* x, const __nv_bfloat16* k, const float* gs, int I,
                                                F&& f) {
  for (int p = static_cast<int>(threadIdx.x & 31); p < 16 * 17 / 2; p += 32) {
    int rl = 0;
    while ((rl + 1) * (rl + 2) / 2 <= p) ++rl;
    const int r = 16 * I + rl, c = 16 * I + (p - rl * (rl + 1) / 2);
    f(r, c, decay_dot<DK>(x, k, gs, r, c));
  }
}

// Starts the cp.async copy of one chunk's rows of head h of x ([tokens][H][DK] of T) into the [C][LD] tile of T at
// shared byte address s; rows >= L are zero-filled. A thread keeps one 16-byte column and steps a constant number of
// rows (as copy_tile).
template <int DK, int LD, class T>
__device__ __forceinline__ void stage_rows(uint32_t s, const T* x, int64_t start, int L, int H, int h) {
  constexpr int V = 16 / static_cast<int>(sizeof(T)), CH = DK / V, kStep = kThreads / CH;
  static_assert(kThreads % CH == 0 && C % kStep == 0, "whole rows per pass");
  const int r0 = static_cast<int>(threadIdx.x) / CH, cv = static_cast<int>(threadIdx.x) % CH;
  const uint32_t d = s + static_cast<uint32_t>((r0 * LD + cv * V) * static_cast<int>(sizeof(T)));
  const T* p = x + ((start + r0) * H + h) * DK + cv * V;
  const int64_t step = int64_t{kStep} * H * DK;
#pragma unroll
  for (int i = 0; i < C / kStep; ++i, p += step) {
    const bool ok = r0 + i * kStep < L;
    cp_async16(d + static_cast<uint32_t>(i * kStep * LD * static_cast<int>(sizeof(T))), ok ? p : x, ok);
  }
}

// One chunk's rows of head h of x (bf16 [tokens][H][DK]) into the bf16 [C][kLdB] tile at s_x.
template <int DK>
__device__ __forceinline__ void stage_head_rows(uint32_t s_x, const __nv_bfloat16* x, int64_t start, int L, int H,
                                                int h) {
  stage_rows<DK, kLdB<DK>>(s_x, x, start, L, H, h);
}

// One chunk's rows of value head hv of g (f32 [tokens][HV][DK]) into the f32 [C][kLdG] tile at s_g.
template <int DK>
__device__ __forceinline__ void stage_g(uint32_t s_g, const float* g, int64_t start, int L, int HV, int hv) {
  stage_rows<DK, kLdG<DK>>(s_g, g, start, L, HV, hv);
}

// Starts the cp.async copies of one chunk's k, q (bf16 [C][kLdB]) and g (f32 [C][kLdG]) into
// shared memory (byte addresses s_k, s_q, s_g); rows >= L, and q when q == nullptr, are zero-filled.
template <int DK>
__device__ __forceinline__ void stage_kqg(uint32_t s_k, uint32_t s_q, uint32_t s_g, const __nv_bfloat16* k,
                                          const __nv_bfloat16* q, const float* g, int64_t start, int L, int H, int h,
                                          int HV, int hv) {
  stage_head_rows<DK>(s_k, k, start, L, H, h);
  stage_head_rows<DK>(s_q, q ? q : k, start, q ? L : 0, H, h);  // no q: every row zero-filled
  stage_g<DK>(s_g, g, start, L, HV, hv);
}

// Starts the cp.async copies of a dense fp32 C x C matrix (16-byte aligned) into shared rows of stride
// LDM: 16-byte copies when LDM keeps the rows 16-byte aligned, else 4-byte ones.
template <int LDM>
__device__ __forceinline__ void stage_matrix(uint32_t dst, const float* src) {
  if constexpr (LDM % 4 == 0) {
    for (int idx = static_cast<int>(threadIdx.x); idx < C * C / 4; idx += kThreads)
      cp_async16(dst + static_cast<uint32_t>(((idx / (C / 4)) * LDM + (idx % (C / 4)) * 4) * 4), src + 4 * idx, true);
  } else {
    for (int idx = static_cast<int>(threadIdx.x); idx < C * C; idx += kThreads)
      cp_async4(dst + static_cast<uint32_t>(((idx / C) * LDM + idx % C) * 4), src + idx, true);
  }
}

template <int DK, int DV>
struct PrepLayout {
  static constexpr int kLdG = hyd::kernels::cuda::kda_mma::kLdG<DK>;
  static constexpr int kLdB = hyd::kernels::cuda::kda_mma::kLdB<DK>;
  static constexpr int kLdM = C + 1;   // f32 64 x 64 matrices
  static constexpr size_t oG = 0;
  static constexpr size_t oK = oG + size_t{C} * kLdG * 4;
  static constexpr size_t oQ = oK + size_t{C} * kLdB * 2;
  static constexpr size_t oA = oQ + size_t{C} * kLdB * 2;
  static constexpr size_t oX = oA + size_t{C} * kLdM * 4;
  static constexpr size_t oY = oX + size_t{C} * kLdM * 4;  // 3 blocks of 16 x 17
  static constexpr size_t oBeta = oY + (3 * 16 * 17 * 4 + 15) / 16 * 16;
  static constexpr size_t bytes = oBeta + C * 4;
  // Reused regions (two blocks fit on an SM): the kG operand tile [C][DK] goes where q was (q is dead
  // after Aqk), the v tile [C][DV] where G was (G is dead once kG is formed).
  static constexpr size_t oKG = oQ, oV = oG;
  static_assert(size_t{C} * DK * 2 <= size_t{C} * kLdB * 2 && size_t{C} * DV * 2 <= size_t{C} * kLdG * 4);
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
__global__ void __launch_bounds__(kThreads, 2)
    prep_kernel(KdaDims s, const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                const __nv_bfloat16* __restrict__ v, const float* __restrict__ g, const float* __restrict__ beta,
                const int32_t* __restrict__ cu, const int32_t* __restrict__ chunk_off, __nv_bfloat16* w_out,
                float* u_out, __nv_bfloat16* qg_out, __nv_bfloat16* kg_out, __nv_bfloat16* aqk_out, float* gl_out,
                float* x_out, int64_t c_base) {
  using Lt = PrepLayout<DK, DV>;
  constexpr int kLdG = Lt::kLdG, kLdB = Lt::kLdB, kLdM = Lt::kLdM;
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t c = c_base + blockIdx.x;  // c_base: 0, or a window's first chunk
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
  KDA_CLOCKS_BEGIN();

  // 1. Loads (rows past the chunk's end are zero; v comes later, into G's place).
  stage_kqg<DK>(smem_addr(ks), smem_addr(qs), smem_addr(gs), k, q, g, sp.start, L, H, h, HV, hv);
  cp_async_commit();
  if (tid < C) bs[tid] = tid < L ? beta[(sp.start + tid) * HV + hv] : 0.f;
  for (int idx = tid; idx < C * kLdM; idx += kThreads) xs[idx] = 0.f;
  cp_async_wait<0>();
  __syncthreads();

  KDA_CLOCK(1);
  // 2. G = cumulative sum of g over the rows, per channel.
  column_cumsum<kLdG, DK>(gs, tid);
  __syncthreads();

  KDA_CLOCK(2);
  // 3a. Elementwise: qg, kg, gl to global.
  const float* glast = gs + (C - 1) * kLdG;
  for (int idx = tid; idx < C * DK / 2; idx += kThreads) {
    const int r = idx / (DK / 2), i = (idx % (DK / 2)) * 2;
    const float2 G = *reinterpret_cast<const float2*>(gs + r * kLdG + i);
    const float2 GL = *reinterpret_cast<const float2*>(glast + i);
    const float2 kf = unpack_bf16(*reinterpret_cast<const uint32_t*>(ks + r * kLdB + i));
    const float e0 = __expf(G.x), e1 = __expf(G.y);
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
      const int ntn = 2 * (I + 1);
      const int ra = 16 * I + gq;
      float acc[8][4];
      const float span = decay_gram<DK>(xr, ks, gs, I, acc);
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
        exact_diag_gram<DK>(xr, ks, gs, I, [&](int r, int cc, float sum) {
          if (qjob)
            aqk_c[r * C + cc] = __float2bfloat16_rn(sum);
          else if (cc < r)
            as[r * kLdM + cc] = bs[r] * sum;
        });
      }
    }
  }
  __syncthreads();

  KDA_CLOCK(3);
  // 4. X = (I + A)^-1: diagonal blocks by substitution (warps 0-3), then the blocks below. Meanwhile
  // warps 4-7 form the kG = k exp(G) operand tile in q's place, and v is fetched into G's place.
  if (warp >= 4) {
    for (int idx = tid - 128; idx < C * DK / 2; idx += kThreads - 128) {
      const int r = idx / (DK / 2), i = (idx % (DK / 2)) * 2;
      const float2 G = *reinterpret_cast<const float2*>(gs + r * kLdG + i);
      const float2 kf = unpack_bf16(*reinterpret_cast<const uint32_t*>(ks + r * kLdB + i));
      *reinterpret_cast<uint32_t*>(kgt + eoff<DK>(r, i)) = pack_bf16(kf.x * __expf(G.x), kf.y * __expf(G.y));
    }
  } else if (lane < 16) {
    diag_block_inverse<kLdM>(as, xs, 16 * warp, lane);
  }
  __syncthreads();
  KDA_CLOCK(4);
  copy_tile<C, DV>(s_v, v + (sp.start * HV + hv) * DV, static_cast<int64_t>(HV) * DV, L);
  cp_async_commit();
  for (int I = 1; I < 4; ++I) {
    for (int idx = tid; idx < I * 256; idx += kThreads) {
      const int J = idx >> 8, rr = (idx >> 4) & 15, cc = idx & 15;
      ys[(J * 16 + rr) * 17 + cc] = dot_strided(as + (16 * I + rr) * kLdM, 1, xs + 16 * J + cc, kLdM, 16 * J, 16 * I);
    }
    __syncthreads();
    for (int idx = tid; idx < I * 256; idx += kThreads) {
      const int J = idx >> 8, rr = (idx >> 4) & 15, cc = idx & 15;
      xs[(16 * I + rr) * kLdM + 16 * J + cc] =
          -dot_strided(xs + (16 * I + rr) * kLdM + 16 * I, 1, ys + J * 16 * 17 + cc, 17, 0, rr + 1);
    }
    __syncthreads();
  }

  cp_async_wait<0>();  // the v tile
  __syncthreads();
  KDA_CLOCK(5);
  // 5. w = T kG (warps 0-3), u = T v (warps 4-7).
  if (warp < 4)
    t_times_tile<DK, kLdM>(xs, bs, s_kg, warp, w_out + ch * C * DK);
  else
    t_times_tile<DV, kLdM>(xs, bs, s_v, warp - 4, u_out + ch * C * DV);  // u in f32: it is not an MMA operand
  if (x_out)  // X for the backward (f32 [C][C])
    for (int idx = tid; idx < C * C; idx += kThreads) x_out[ch * C * C + idx] = xs[(idx / C) * kLdM + idx % C];
  KDA_CLOCK(6);
  KDA_CLOCKS_PRINT("prep", 7);
}

// ---------------------------------------------------------------- state pass

// The (document, value head, first state column) of a state-pass block. The grid is flat with the column
// tiles of one (document, head) adjacent, so that the blocks reading the same chunk operands run at the same
// time and share them through L2 (doc_grid(); the (document, head, tile) 3-D grid before, whose waves each held
// about one tile of every pair, took 13.2 ms against 12.1 ms for KDA fwd+bwd at B8xT4096, stop 18).
struct DocTile {
  int64_t d;
  int hv, j0;
};
template <int BV = kBV>
__device__ __forceinline__ DocTile doc_tile(int HV, int DV) {
  const int tiles = DV / BV;
  const int64_t b = blockIdx.x, r = b / tiles;
  return {r / HV, static_cast<int>(r % HV), static_cast<int>(b % tiles) * BV};
}

template <int DK, bool STG = false, int BV = kBV>
struct StateLayout {
  // One buffer per chunk in flight: w, qg, kg [C][DK], Aqk [C][C] (swizzled bf16), u [C][kLdU] f32,
  // gl [DK] f32.
  static constexpr int kLdU = BV + 8;
  static constexpr size_t oW = 0, oQG = oW + size_t{C} * DK * 2, oKG = oQG + size_t{C} * DK * 2,
                          oAQK = oKG + size_t{C} * DK * 2, oU = oAQK + size_t{C} * C * 2, oGL = oU + size_t{C} * kLdU * 4,
                          buf = oGL + size_t{DK} * 4;
  // State staging (hi, lo) [DK][BV] and v_new staging (hi, lo) [C][BV].
  static constexpr size_t oShi = (STG ? 1 : 2) * buf, oSlo = oShi + size_t{DK} * BV * 2,
                          oVhi = oSlo + size_t{DK} * BV * 2, oVlo = oVhi + size_t{C} * BV * 2,
                          bytes = oVlo + size_t{C} * BV * 2;
};

// Copies a staged swizzled bf16 tile [ROWS][BV] to global rows dst + r * stride (16-byte stores).
template <int ROWS, int BV = kBV, int NT = kThreads, bool STEPPED = true>
__device__ __forceinline__ void store_staged(const unsigned char* tile, __nv_bfloat16* dst, int64_t stride) {
  constexpr int CH = BV / 8, kStep = NT / CH;  // a thread's chunk column and row step (as copy_tile)
  if constexpr (STEPPED) {
    static_assert(NT % CH == 0 && ROWS % kStep == 0 && kStep % 8 == 0, "whole rows per pass, swizzle kept");
    const int r0 = static_cast<int>(threadIdx.x) / CH, c = static_cast<int>(threadIdx.x) % CH;
    const unsigned char* t = tile + toff<CH>(r0, c);
    __nv_bfloat16* p = dst + r0 * stride + c * 8;
#pragma unroll
    for (int i = 0; i < ROWS / kStep; ++i, p += kStep * stride)
      *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(t + i * kStep * CH * 16);
  } else {
    for (int idx = static_cast<int>(threadIdx.x); idx < ROWS * CH; idx += NT) {
      const int r = idx / CH, c = idx % CH;
      *reinterpret_cast<uint4*>(dst + r * stride + c * 8) = *reinterpret_cast<const uint4*>(tile + toff<CH>(r, c));
    }
  }
}

// A warp's fragment of the DK x BV state tile of a state pass (BV: its width), in the mma accumulator layout: f[n][e]
// is row 16 sm + gq + 8 (e >> 1), column 8 (sn0 + n) + 2 tq + (e & 1).
struct StateFrag {
  int sm, sn0, gq, tq;
  __device__ __forceinline__ int row(int e) const { return 16 * sm + gq + 8 * (e >> 1); }
  __device__ __forceinline__ int col(int n, int e) const { return 8 * (sn0 + n) + 2 * tq + (e & 1); }
};

// f = src[base + row * DV + col] (zero without src).
template <int DV, int SN>
__device__ __forceinline__ void frag_load(float (&f)[SN][4], const float* src, int64_t base, const StateFrag& p) {
#pragma unroll
  for (int n = 0; n < SN; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) f[n][e] = src ? src[base + p.row(e) * DV + p.col(n, e)] : 0.f;
}

// dst[base + row * DV + col] = f.
template <int DV, int SN>
__device__ __forceinline__ void frag_store(const float (&f)[SN][4], float* dst, int64_t base, const StateFrag& p) {
#pragma unroll
  for (int n = 0; n < SN; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dst[base + p.row(e) * DV + p.col(n, e)] = f[n][e];
}

// Stages f as hi + lo bf16 pairs into the swizzled [DK][BV] tiles at hi and lo.
template <int SN, int BV = kBV>
__device__ __forceinline__ void frag_stage(const float (&f)[SN][4], unsigned char* hi, unsigned char* lo,
                                           const StateFrag& p) {
#pragma unroll
  for (int n = 0; n < SN; ++n)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = p.row(2 * half), j = p.col(n, 0);
      uint32_t h, l;
      split_pair(f[n][2 * half], f[n][2 * half + 1], h, l);
      *reinterpret_cast<uint32_t*>(hi + eoff<BV>(i, j)) = h;
      *reinterpret_cast<uint32_t*>(lo + eoff<BV>(i, j)) = l;
    }
}

// f <- Diag(gl) f (gl: the chunk's exp(G_last) per state row).
template <int SN>
__device__ __forceinline__ void frag_scale_rows(float (&f)[SN][4], const float* gl, const StateFrag& p) {
  const float ga = gl[p.row(0)], gb = gl[p.row(2)];
#pragma unroll
  for (int n = 0; n < SN; ++n) {
    f[n][0] *= ga;
    f[n][1] *= ga;
    f[n][2] *= gb;
    f[n][3] *= gb;
  }
}

// y += A S and, when with_b, z += B S for rows 16 I .. 16 I + 15 and n-tiles nb, nb + 1: A, B swizzled bf16 [.][DK]
// tiles, S the staged state (hi + lo tiles [DK][BV] at s_hi, s_lo; both terms, fp32-class). One pass over k: S's
// fragments are read once for both products.
template <int DK, int BV = kBV>
__device__ __forceinline__ void rows2_times_state(float (&y)[2][4], float (&z)[2][4], uint32_t a_tile, uint32_t b_tile,
                                                  bool with_b, uint32_t s_hi, uint32_t s_lo, int I, int nb, int lane) {
#pragma unroll
  for (int kst = 0; kst < DK / 16; ++kst) {
    uint32_t a[4], bh[4], bl[4];
    const uint32_t ao = toff<DK / 8>(16 * I + (lane & 15), 2 * kst + (lane >> 4));
    ldsm_x4(a, a_tile + ao);
    const uint32_t so = toff<BV / 8>(16 * kst + (lane & 7) + (((lane >> 3) & 1) << 3), nb + (lane >> 4));
    ldsm_x4_trans(bh, s_hi + so);
    ldsm_x4_trans(bl, s_lo + so);
    mma_bf16(y[0], a, bh[0], bh[1]);
    mma_bf16(y[1], a, bh[2], bh[3]);
    mma_bf16(y[0], a, bl[0], bl[1]);
    mma_bf16(y[1], a, bl[2], bl[3]);
    if (with_b) {
      ldsm_x4(a, b_tile + ao);
      mma_bf16(z[0], a, bh[0], bh[1]);
      mma_bf16(z[1], a, bh[2], bh[3]);
      mma_bf16(z[0], a, bl[0], bl[1]);
      mma_bf16(z[1], a, bl[2], bl[3]);
    }
  }
}

// acc += A S for rows 16 I .. 16 I + 15 and n-tiles nb, nb + 1 (rows2_times_state with A alone).
template <int DK, int BV = kBV>
__device__ __forceinline__ void rows_times_state(float (&acc)[2][4], uint32_t a_tile, uint32_t s_hi, uint32_t s_lo,
                                                 int I, int nb, int lane) {
  float unused[2][4];
  rows2_times_state<DK, BV>(acc, unused, a_tile, 0u, false, s_hi, s_lo, I, nb, lane);
}

// acc[np] = (A_hi + A_lo) S for rows 16 I .. 16 I + 15 and n-tile pairs nb0 + 2 np (np < NP): A split into the
// swizzled bf16 [.][DK] tiles a_hi, a_lo, S staged as rows_times_state takes it. Per k step the A fragments are
// read once for all pairs and S's once for both A terms; the lo.lo product (~2^-18 of the result) is left out.
template <int DK, int NP>
__device__ __forceinline__ void split_rows_times_state(float (&acc)[NP][2][4], uint32_t a_hi, uint32_t a_lo,
                                                       uint32_t s_hi, uint32_t s_lo, int I, int nb0, int lane) {
#pragma unroll
  for (int np = 0; np < NP; ++np) {
    zero(acc[np][0]);
    zero(acc[np][1]);
  }
#pragma unroll
  for (int kst = 0; kst < DK / 16; ++kst) {
    uint32_t ah[4], al[4];
    const uint32_t ao = toff<DK / 8>(16 * I + (lane & 15), 2 * kst + (lane >> 4));
    ldsm_x4(ah, a_hi + ao);
    ldsm_x4(al, a_lo + ao);
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      uint32_t bh[4], bl[4];
      const uint32_t so = toff<kBV / 8>(16 * kst + (lane & 7) + (((lane >> 3) & 1) << 3), nb0 + 2 * np + (lane >> 4));
      ldsm_x4_trans(bh, s_hi + so);
      ldsm_x4_trans(bl, s_lo + so);
      mma_bf16(acc[np][0], ah, bh[0], bh[1]);
      mma_bf16(acc[np][1], ah, bh[2], bh[3]);
      mma_bf16(acc[np][0], ah, bl[0], bl[1]);
      mma_bf16(acc[np][1], ah, bl[2], bl[3]);
      mma_bf16(acc[np][0], al, bh[0], bh[1]);
      mma_bf16(acc[np][1], al, bh[2], bh[3]);
    }
  }
}

// Calls f(r, col, x0, x1) for each pair of a warp's accumulators of row block I and n-tiles nb, nb + 1 (as
// rows_times_state leaves them): row r = 16 I + gq (+ 8), columns col, col + 1 = 8 (nb + n) + 2 tq.
template <class F>
__device__ __forceinline__ void for_acc_pairs(const float (&acc)[2][4], int I, int nb, int lane, F&& f) {
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      f(16 * I + (lane >> 2) + 8 * half, 8 * (nb + n) + 2 * (lane & 3), acc[n][2 * half], acc[n][2 * half + 1]);
}

// acc += Aqk V for rows 16 I .. 16 I + 15 and n-tiles nb, nb + 1: Aqk the swizzled bf16 [C][C] tile at aqk_tile
// (lower triangular: row block I sees blocks kk <= I), V the swizzled bf16 [C][BV] tile at v_tile.
template <int BV = kBV>
__device__ __forceinline__ void add_aqk_times_tile(float (&acc)[2][4], uint32_t aqk_tile, uint32_t v_tile, int I,
                                                   int nb, int lane) {
  for (int kk = 0; kk <= I; ++kk) {
    uint32_t a[4], bv[4];
    ldsm_x4(a, aqk_tile + toff<C / 8>(16 * I + (lane & 15), 2 * kk + (lane >> 4)));
    ldsm_x4_trans(bv, v_tile + toff<BV / 8>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), nb + (lane >> 4)));
    mma_bf16(acc[0], a, bv[0], bv[1]);
    mma_bf16(acc[1], a, bv[2], bv[3]);
  }
}

// acc = qg S + Aqk V for rows 16 I .. 16 I + 15 and n-tiles nb, nb + 1 (a chunk's outputs, or their correction):
// qg the swizzled bf16 [C][DK] tile at qg_tile, S staged as rows_times_state takes it, Aqk [C][C] (lower
// triangular: row block I sees blocks kk <= I) at aqk_tile, V the swizzled bf16 [C][BV] tile at v_tile.
template <int DK, int BV = kBV>
__device__ __forceinline__ void chunk_outputs(float (&acc)[2][4], uint32_t qg_tile, uint32_t s_hi, uint32_t s_lo,
                                              uint32_t aqk_tile, uint32_t v_tile, int I, int nb, int lane) {
  zero(acc[0]);
  zero(acc[1]);
  rows_times_state<DK, BV>(acc, qg_tile, s_hi, s_lo, I, nb, lane);
  add_aqk_times_tile<BV>(acc, aqk_tile, v_tile, I, nb, lane);
}

// A state pass's window: chunks [ws, we) of the packed batch (all by default). A document cut by a window edge
// takes its state from `carry` (laid out as the initial / final states) where the window starts inside it, and
// leaves it there where the window ends inside it; the passes over consecutive windows carry it in f32, as from
// chunk to chunk. An empty document belongs to the first window.
struct PassWindow {
  int64_t ws = 0, we = INT64_MAX;
  float* carry = nullptr;
};
// This document's chunks [c0, c1) within the window (false: none of them; an empty document: its own empty range,
// in the first window only). c0 / c1 equal to the document's own first / last bound: the window holds its start /
// end, so the pass reads / writes the caller's states there and the carry elsewhere.
__device__ __forceinline__ bool window_chunks(const PassWindow& win, int64_t c0d, int64_t c1d, int64_t& c0,
                                              int64_t& c1) {
  c0 = c0d;
  c1 = c1d;
  if (c0d == c1d) return win.ws == 0;
  c0 = max(c0d, win.ws);
  c1 = min(c1d, win.we);
  return c0 < c1;
}

template <int DK, int DV, bool STG = false, int BV = kBV>
__global__ void __launch_bounds__(BV * 8, (STG && BV == kBV) ? 2 : 1)
    state_kernel(KdaDims s, const int32_t* __restrict__ cu, const int32_t* __restrict__ chunk_off,
                 const __nv_bfloat16* __restrict__ w, const float* __restrict__ u, const __nv_bfloat16* __restrict__ qg,
                 const __nv_bfloat16* __restrict__ kg, const __nv_bfloat16* __restrict__ aqk,
                 const float* __restrict__ gl, const float* __restrict__ initial, __nv_bfloat16* __restrict__ o,
                 float* __restrict__ final_state, __nv_bfloat16* __restrict__ states_hi,
                 __nv_bfloat16* __restrict__ states_lo, __nv_bfloat16* __restrict__ vn, PassWindow win) {
  using Lt = StateLayout<DK, STG, BV>;
  constexpr int NT = BV * 8, NW = NT / 32;  // threads, warps: 8 per 32 state columns
  constexpr int MT = DK / 16;       // m-tiles of the state
  constexpr int SN = (BV / 8) * MT / NW;  // n-tiles (of 8 columns) of the state per warp
  extern __shared__ __align__(128) unsigned char smem[];
  const int HV = static_cast<int>(s.hv);
  const DocTile dt = doc_tile<BV>(HV, DV);
  const int64_t d = dt.d;
  const int hv = dt.hv, j0 = dt.j0;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int64_t c0d = chunk_off[d], c1d = chunk_off[d + 1];
  int64_t c0, c1;
  if (!window_chunks(win, c0d, c1d, c0, c1)) return;
  const float* state_in = c0 == c0d ? initial : win.carry;
  float* state_out = c1 == c1d ? final_state : win.carry;
  const int64_t sbase = (d * HV + hv) * DK * DV + j0;
  const uint32_t s0 = smem_addr(smem);
  const uint32_t s_shi = s0 + Lt::oShi, s_slo = s0 + Lt::oSlo, s_vhi = s0 + Lt::oVhi, s_vlo = s0 + Lt::oVlo;

  // This warp's part of the state.
  const int sm = warp % MT, sn0 = (warp / MT) * SN;
  const StateFrag fp{sm, sn0, gq, tq};
  float st[SN][4];
  frag_load<DV>(st, state_in, sbase, fp);
  frag_stage<SN, BV>(st, smem + Lt::oShi, smem + Lt::oSlo, fp);

  // Chunk c's operands in two groups: (w, u), read by step (a) only, and (qg, Aqk, kg, gl), read by (b) and (c).
  auto load_wu = [&](int64_t c, int b) {
    const int64_t ch = c * HV + hv;
    const uint32_t base = s0 + static_cast<uint32_t>(b * Lt::buf);
    copy_tile<C, DK, NT>(base + Lt::oW, w + ch * C * DK, DK, C);
    for (int idx = tid; idx < C * BV / 4; idx += NT) {
      const int r = idx / (BV / 4), c4 = idx % (BV / 4);
      cp_async16(base + Lt::oU + (r * Lt::kLdU + c4 * 4) * 4, u + (ch * C + r) * DV + j0 + c4 * 4, true);
    }
  };
  auto load_rest = [&](int64_t c, int b) {
    const int64_t ch = c * HV + hv;
    const uint32_t base = s0 + static_cast<uint32_t>(b * Lt::buf);
    copy_tile<C, DK, NT>(base + Lt::oQG, qg + ch * C * DK, DK, C);
    copy_tile<C, DK, NT>(base + Lt::oKG, kg + ch * C * DK, DK, C);
    copy_tile<C, C, NT>(base + Lt::oAQK, aqk + ch * C * C, C, C);
    for (int idx = tid; idx < DK / 4; idx += NT)
      cp_async16(base + Lt::oGL + idx * 16, gl + ch * DK + idx * 4, true);
  };
  if (c0 < c1) {
    load_wu(c0, 0);
    if (STG) cp_async_commit();
    load_rest(c0, 0);
  }
  cp_async_commit();

  const int I = warp & 3, nb = 2 * (warp >> 2);  // v_new / o: row block I, n-tiles nb, nb + 1
  for (int64_t c = c0; c < c1; ++c) {
    const int b = STG ? 0 : static_cast<int>((c - c0) & 1);
    if (!STG) {
      if (c + 1 < c1) {
        load_wu(c + 1, b ^ 1);
        load_rest(c + 1, b ^ 1);
      }
      cp_async_commit();
    }
    cp_async_wait<1>();  // STG: (w, u) of chunk c (its (qg, Aqk, kg, gl) may still be in flight)
    __syncthreads();  // chunk c's operands and the staged state are visible
    const uint32_t base = s0 + static_cast<uint32_t>(b * Lt::buf);
    const unsigned char* gbase = smem + b * Lt::buf;
    const int64_t start = cu[d] + (c - c0d) * C;
    const int L = static_cast<int>(min(static_cast<int64_t>(C), cu[d + 1] - start));
    const int64_t ch = c * HV + hv;
    if (states_hi) {  // S entering the chunk (hi + lo), for the backward
      store_staged<DK, BV, NT>(smem + Lt::oShi, states_hi + ch * DK * DV + j0, DV);
      store_staged<DK, BV, NT>(smem + Lt::oSlo, states_lo + ch * DK * DV + j0, DV);
    }

    // (a) v_new = u - w S
    {
      float acc[2][4];
      zero(acc[0]);
      zero(acc[1]);
      rows_times_state<DK, BV>(acc, base + Lt::oW, s_shi, s_slo, I, nb, lane);
      for_acc_pairs(acc, I, nb, lane, [&](int r, int col, float x0, float x1) {
        const float2 uu = *reinterpret_cast<const float2*>(gbase + Lt::oU + (r * Lt::kLdU + col) * 4);
        uint32_t hi, lo;
        split_pair(uu.x - x0, uu.y - x1, hi, lo);
        *reinterpret_cast<uint32_t*>(smem + Lt::oVhi + eoff<BV>(r, col)) = hi;
        *reinterpret_cast<uint32_t*>(smem + Lt::oVlo + eoff<BV>(r, col)) = lo;
      });
    }
    if (STG) cp_async_wait<0>();  // (qg, Aqk, kg, gl) of chunk c
    __syncthreads();              // v_new staged; STG: w and u free, the rest visible
    if (STG) {                    // the next chunk's (w, u) into their places while (b) and (c) run
      if (c + 1 < c1) load_wu(c + 1, 0);
      cp_async_commit();
    }
    if (vn) store_staged<C, BV, NT>(smem + Lt::oVhi, vn + ch * C * DV + j0, DV);  // v_new (bf16) for the backward

    // (b) o = qg S + Aqk v_new
    if (o) {
      float acc[2][4];
      chunk_outputs<DK, BV>(acc, base + Lt::oQG, s_shi, s_slo, base + Lt::oAQK, s_vhi, I, nb, lane);
      for_acc_pairs(acc, I, nb, lane, [&](int r, int col, float x0, float x1) {
        if (r < L) *reinterpret_cast<uint32_t*>(o + ((start + r) * HV + hv) * DV + j0 + col) = pack_bf16(x0, x1);
      });
    }

    // (c) S <- Diag(gl) S + kg^T v_new
    {
      frag_scale_rows(st, reinterpret_cast<const float*>(gbase + Lt::oGL), fp);
#pragma unroll
      for (int kc = 0; kc < C / 16; ++kc) {
        uint32_t a[4];
        ldsm_x4_trans(a, base + Lt::oKG + toff<DK / 8>(16 * kc + (lane & 7) + ((lane >> 4) << 3), 2 * sm + ((lane >> 3) & 1)));
#pragma unroll
        for (int np = 0; np < SN / 2; ++np) {
          uint32_t bh[4], bl[4];
          const uint32_t vo =
              toff<BV / 8>(16 * kc + (lane & 7) + (((lane >> 3) & 1) << 3), sn0 + 2 * np + (lane >> 4));
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
    if (STG) {        // the next chunk's (qg, Aqk, kg, gl): in flight during its step (a)
      if (c + 1 < c1) load_rest(c + 1, 0);
      cp_async_commit();
    }
    frag_stage<SN, BV>(st, smem + Lt::oShi, smem + Lt::oSlo, fp);
  }
  cp_async_wait<0>();
  if (state_out) frag_store<DV>(st, state_out, sbase, fp);
}

// ---------------------------------------------------------------- forward: LASP-2's parallel correction

template <int DK>
struct CorrectLayout {
  // P_c (hi, lo) [DK][DK], the row operand (w or kg), qg [C][DK], Aqk [C][C] (swizzled bf16); dS staging (hi, lo)
  // [DK][kBV] (swizzled); -w dS [C][kBV] (bf16, swizzled).
  static constexpr size_t oPhi = 0, oPlo = oPhi + size_t{DK} * DK * 2, oW = oPlo + size_t{DK} * DK * 2,
                          oQG = oW + size_t{C} * DK * 2, oAQK = oQG + size_t{C} * DK * 2,
                          oShi = oAQK + size_t{C} * C * 2, oSlo = oShi + size_t{DK} * kBV * 2,
                          oY = oSlo + size_t{DK} * kBV * 2, oTiles = oY + size_t{C} * kBV * 2;
  // Two buffers of one column tile's inputs, filled by cp.async while the other tile computes: S_in as hi + lo
  // [DK][kBV] (swizzled bf16, the operand of P_c S_in as it is), and (row stride kLd elements: 16-byte rows,
  // conflict-free fragment reads) the kept state's old hi and lo [DK][kLd], old v_new (or -dv_new) and old o
  // [C][kLd] (bf16).
  static constexpr int kLd = kBV + 8;
  static constexpr size_t tSinHi = 0, tSinLo = tSinHi + size_t{DK} * kBV * 2, tShi = tSinLo + size_t{DK} * kBV * 2,
                          tSlo = tShi + size_t{DK} * kLd * 2, tVn = tSlo + size_t{DK} * kLd * 2,
                          tO = tVn + size_t{C} * kLd * 2, tile = tO + size_t{C} * kLd * 2, bytes = oTiles + 2 * tile;
};

// Before the correction: every document's incoming state (adjoint) S_in [DK][DV] f32 as hi + lo bf16 (row-major, the
// correction's operand; hi = bf16(x), lo = bf16(x - hi)) and whether it is nonzero (nonzero[doc x HV + head]: a
// rank's documents other than each row's continuing one have none, and their chunks are left alone). One block per
// document and value head; the halves are written only for a nonzero state.
template <int DK, int DV>
__global__ void __launch_bounds__(kThreads)
    split_incoming_kernel(int HV, const float* __restrict__ initial, __nv_bfloat16* __restrict__ sin_hi,
                          __nv_bfloat16* __restrict__ sin_lo, int32_t* __restrict__ nonzero) {
  constexpr int kPer = DK * DV / 4 / kThreads;  // float4 per thread
  static_assert(DK * DV % (4 * kThreads) == 0, "whole float4 per thread");
  const int64_t base = static_cast<int64_t>(blockIdx.x) * DK * DV;
  const float4* src = reinterpret_cast<const float4*>(initial + base);
  const int tid = static_cast<int>(threadIdx.x);
  float4 x[kPer];
  bool any = false;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    x[i] = src[tid + i * kThreads];
    any = any || x[i].x != 0.f || x[i].y != 0.f || x[i].z != 0.f || x[i].w != 0.f;
  }
  const bool block_any = __syncthreads_or(any);
  if (tid == 0) nonzero[blockIdx.x] = block_any ? 1 : 0;
  if (!block_any) return;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    uint2 h, l;
    split_pair(x[i].x, x[i].y, h.x, l.x);
    split_pair(x[i].z, x[i].w, h.y, l.y);
    const int64_t at = base + 4 * static_cast<int64_t>(tid + i * kThreads);
    *reinterpret_cast<uint2*>(sin_hi + at) = h;
    *reinterpret_cast<uint2*>(sin_lo + at) = l;
  }
}

// Forward (o given): the state pass's results from initial state S_in, given those from a zero state and the
// transitions P_c (the state entering chunk c of the pass from the identity with zero values): the recurrence is
// affine in the state, so with dS = P_c S_in (rows = w),
//   S_c += dS,   v_new_c -= w_c dS,   o_c += qg_c dS - Aqk_c (w_c dS)
// (kept states as hi + lo bf16 pairs, v_new and o bf16: each rounded once more than the sequential pass's).
// Backward (o null): the reverse pass's from the final-state adjoint dS_out, given those from a zero one and R_c
// (its per-chunk adjoints from the identity with zero do): with dS = R_c dS_out (rows = kg, states = dS_out of
// every chunk, vn = -dv_new), dS_out_c += dS, -dv_new_c -= kg_c dS.
// One block per chunk and value head (blockIdx.x = chunk x HV + head) over the DV / kBV column tiles; no
// sequential dependence between chunks, so after LASP-2's exchange it replaces a latency-bound pass. A tile's
// inputs (S_in, the old kept state, v_new, o) arrive by cp.async while the previous tile computes, and its
// results leave by plain stores, so no step waits on a global read (the first version read them in place: 0.70 ms
// per layer at B1xT16384 H8 in LASP-2's profile, 2 x H200; with the prefetch 0.46 ms; 16 warps instead of 8, P_c
// S_in over all of them, did not help: 0.48 ms). Chunks of documents whose incoming state (adjoint) is zero return
// without touching anything. S_in comes split (split_incoming_kernel): its tiles go by cp.async straight into the
// operand of P_c S_in.
template <int DK, int DV>
__global__ void __launch_bounds__(kThreads, 1)
    correct_kernel(KdaDims s, const int32_t* __restrict__ cu, const int32_t* __restrict__ chunk_off,
                   const __nv_bfloat16* __restrict__ sin_hi, const __nv_bfloat16* __restrict__ sin_lo,
                   const int32_t* __restrict__ nonzero, const __nv_bfloat16* __restrict__ p_hi,
                   const __nv_bfloat16* __restrict__ p_lo, const __nv_bfloat16* __restrict__ w,
                   const __nv_bfloat16* __restrict__ qg, const __nv_bfloat16* __restrict__ aqk,
                   __nv_bfloat16* __restrict__ states_hi, __nv_bfloat16* __restrict__ states_lo,
                   __nv_bfloat16* __restrict__ vn, __nv_bfloat16* __restrict__ o) {
  using Lt = CorrectLayout<DK>;
  constexpr int MT = DK / 16, SN = 4 * MT / 8, kLd = Lt::kLd, kTiles = DV / kBV;
  extern __shared__ __align__(128) unsigned char smem[];
  const int HV = static_cast<int>(s.hv);
  const int64_t ch = blockIdx.x, c = ch / HV;
  const int hv = static_cast<int>(ch % HV);
  if (c >= chunk_off[s.num_docs]) return;
  const kda_chunk::ChunkSpan sp = kda_chunk::locate_chunk(cu, chunk_off, s.num_docs, c);
  const int64_t start = sp.start;
  const int L = sp.len;
  const int64_t sin_at = (sp.doc * HV + hv) * DK * DV;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const uint32_t s0 = smem_addr(smem);
  // A thread's part of a tile (as copy_tile): chunk column c8 of rows r0 + 64 i of the kept state, row r0 of v_new
  // and o; per tile only the column offset j0 moves.
  constexpr int kStateStep = kThreads / (kBV / 8);
  static_assert(kThreads % (kBV / 8) == 0 && DK % kStateStep == 0 && C * kBV / 8 == kThreads, "one row pass");
  const int r0 = tid / (kBV / 8), c8 = tid % (kBV / 8);
  const int64_t state_at = ch * DK * DV + int64_t(r0) * DV + c8 * 8, vn_at = (ch * C + r0) * DV + c8 * 8;
  const bool o_ok = r0 < L;
  const __nv_bfloat16* o_src = o && o_ok ? o + ((start + r0) * HV + hv) * DV + c8 * 8 : o;
  const uint32_t state_off = static_cast<uint32_t>((r0 * kLd + c8 * 8) * 2);
  auto load_tile = [&](int t, int b) {
    const int j0 = t * kBV;
    const uint32_t tb = s0 + static_cast<uint32_t>(Lt::oTiles + b * Lt::tile);
    copy_tile<DK, kBV>(tb + Lt::tSinHi, sin_hi + sin_at + j0, DV, DK);
    copy_tile<DK, kBV>(tb + Lt::tSinLo, sin_lo + sin_at + j0, DV, DK);
#pragma unroll
    for (int i = 0; i < DK / kStateStep; ++i) {
      const int64_t at = state_at + int64_t{i} * kStateStep * DV + j0;
      const uint32_t so = state_off + static_cast<uint32_t>(i * kStateStep * kLd * 2);
      cp_async16(tb + Lt::tShi + so, states_hi + at, true);
      cp_async16(tb + Lt::tSlo + so, states_lo + at, true);
    }
    cp_async16(tb + Lt::tVn + state_off, vn + vn_at + j0, true);
    if (o) cp_async16(tb + Lt::tO + state_off, o_ok ? o_src + j0 : o, o_ok);
  };
  // A zero incoming state (adjoint) changes nothing, and nothing is loaded (a rank's documents other than each row's
  // continuing first one).
  if (nonzero[sp.doc * HV + hv] == 0) return;
  copy_tile<DK, DK>(s0 + Lt::oPhi, p_hi + ch * DK * DK, DK, DK);
  copy_tile<DK, DK>(s0 + Lt::oPlo, p_lo + ch * DK * DK, DK, DK);
  copy_tile<C, DK>(s0 + Lt::oW, w + ch * C * DK, DK, C);
  if (o) {
    copy_tile<C, DK>(s0 + Lt::oQG, qg + ch * C * DK, DK, C);
    copy_tile<C, C>(s0 + Lt::oAQK, aqk + ch * C * C, C, C);
  }
  load_tile(0, 0);
  cp_async_commit();

  const StateFrag fp{warp % MT, (warp / MT) * SN, gq, tq};
  const uint32_t s_shi = s0 + Lt::oShi, s_slo = s0 + Lt::oSlo;
  const int I = warp & 3, nb = 2 * (warp >> 2);  // w dS and o: row block I, n-tiles nb, nb + 1
  for (int t = 0; t < kTiles; ++t) {
    const int j0 = t * kBV;
    if (t + 1 < kTiles) load_tile(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // tile t's inputs (and the chunk's operands) visible; the staging is free
    const unsigned char* tb = smem + Lt::oTiles + (t & 1) * Lt::tile;
    const uint32_t tba = s0 + static_cast<uint32_t>(Lt::oTiles + (t & 1) * Lt::tile);
    float st[SN][4];
    {  // dS = P_c S_in (both split hi + lo)
      float acc[SN / 2][2][4];
      split_rows_times_state<DK, SN / 2>(acc, s0 + Lt::oPhi, s0 + Lt::oPlo, tba + Lt::tSinHi, tba + Lt::tSinLo, fp.sm,
                                         fp.sn0, lane);
#pragma unroll
      for (int np = 0; np < SN / 2; ++np)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          st[2 * np][e] = acc[np][0][e];
          st[2 * np + 1][e] = acc[np][1][e];
        }
    }
    // The kept state += dS.
#pragma unroll
    for (int n = 0; n < SN; ++n)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = fp.row(2 * half), col = fp.col(n, 0);
        const size_t so = static_cast<size_t>(row * kLd + col) * 2;
        const float2 h = unpack_bf16(*reinterpret_cast<const uint32_t*>(tb + Lt::tShi + so));
        const float2 l = unpack_bf16(*reinterpret_cast<const uint32_t*>(tb + Lt::tSlo + so));
        uint32_t nh, nl;
        split_pair(h.x + l.x + st[n][2 * half], h.y + l.y + st[n][2 * half + 1], nh, nl);
        const int64_t at = ch * DK * DV + int64_t(row) * DV + j0 + col;
        *reinterpret_cast<uint32_t*>(states_hi + at) = nh;
        *reinterpret_cast<uint32_t*>(states_lo + at) = nl;
      }
    frag_stage(st, smem + Lt::oShi, smem + Lt::oSlo, fp);  // (the last tile's readers passed its closing barrier)
    __syncthreads();                                        // dS staged
    // y = w dS (and z = qg dS for o, in the same pass over dS): v_new -= y, and -y staged for Aqk
    float y[2][4], z[2][4];
    zero(y[0]);
    zero(y[1]);
    zero(z[0]);
    zero(z[1]);
    rows2_times_state<DK>(y, z, s0 + Lt::oW, s0 + Lt::oQG, o != nullptr, s_shi, s_slo, I, nb, lane);
    for_acc_pairs(y, I, nb, lane, [&](int r, int col, float y0, float y1) {
      *reinterpret_cast<uint32_t*>(smem + Lt::oY + eoff<kBV>(r, col)) = pack_bf16(-y0, -y1);
      const float2 old = unpack_bf16(*reinterpret_cast<const uint32_t*>(tb + Lt::tVn + (r * kLd + col) * 2));
      *reinterpret_cast<uint32_t*>(vn + (ch * C + r) * DV + j0 + col) = pack_bf16(old.x - y0, old.y - y1);
    });
    if (o != nullptr) {
      __syncthreads();  // -y staged
      // o += qg dS - Aqk y
      add_aqk_times_tile(z, s0 + Lt::oAQK, s0 + Lt::oY, I, nb, lane);
      for_acc_pairs(z, I, nb, lane, [&](int r, int col, float x0, float x1) {
        if (r < L) {
          const float2 old = unpack_bf16(*reinterpret_cast<const uint32_t*>(tb + Lt::tO + (r * kLd + col) * 2));
          *reinterpret_cast<uint32_t*>(o + ((start + r) * HV + hv) * DV + j0 + col) = pack_bf16(old.x + x0, old.y + x1);
        }
      });
    }
    __syncthreads();  // this tile's buffer and the staging are free
  }
}

// ---------------------------------------------------------------- backward: reverse state pass

template <int DK, bool STG = false, int BV = kBV>
struct ReverseLayout {
  // One buffer per chunk in flight: w, qg, kg [C][DK], Aqk [C][C], do [C][BV] (swizzled bf16), gl [DK] f32.
  // STG: one buffer, with a second do tile after it (oDO2).
  static constexpr size_t oW = 0, oQG = oW + size_t{C} * DK * 2, oKG = oQG + size_t{C} * DK * 2,
                          oAQK = oKG + size_t{C} * DK * 2, oDO = oAQK + size_t{C} * C * 2,
                          oGL = oDO + size_t{C} * BV * 2, buf = oGL + size_t{DK} * 4, oDO2 = buf;
  // dS staging (hi, lo) [DK][BV], -dv_new staging (hi, lo) [C][BV].
  static constexpr size_t oShi = STG ? buf + size_t{C} * BV * 2 : 2 * buf, oSlo = oShi + size_t{DK} * BV * 2,
                          oVhi = oSlo + size_t{DK} * BV * 2, oVlo = oVhi + size_t{C} * BV * 2,
                          bytes = oVlo + size_t{C} * BV * 2;
};

// The state adjoint backwards over the chunks of one document (grid as state_kernel). With dS the
// adjoint of the state leaving chunk c (dfinal_state for the last):
//   dv_new = Aqk^T do + kg dS,   dS <- Diag(gl) dS + qg^T do - w^T dv_new.
// Writes dS_out of every chunk (dstates, as hi + lo bf16), -dv_new (ndvn, bf16) and dinitial_state.
template <int DK, int DV, bool STG = false, int BV = kBV>
__global__ void __launch_bounds__(BV * 8, (STG && BV == kBV) ? 2 : 1)
    reverse_kernel(KdaDims s, const int32_t* __restrict__ cu, const int32_t* __restrict__ chunk_off,
                   const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ qg,
                   const __nv_bfloat16* __restrict__ kg, const __nv_bfloat16* __restrict__ aqk,
                   const float* __restrict__ gl, const __nv_bfloat16* __restrict__ dout,
                   const float* __restrict__ dfinal, __nv_bfloat16* __restrict__ dstates_hi,
                   __nv_bfloat16* __restrict__ dstates_lo, __nv_bfloat16* __restrict__ ndvn, float* __restrict__ dinit,
                   PassWindow win) {
  using Lt = ReverseLayout<DK, STG, BV>;
  constexpr int NT = BV * 8, NW = NT / 32;  // threads, warps: 8 per 32 state columns
  constexpr int MT = DK / 16, SN = (BV / 8) * MT / NW;
  extern __shared__ __align__(128) unsigned char smem[];
  const int HV = static_cast<int>(s.hv);
  const DocTile dt = doc_tile<BV>(HV, DV);
  const int64_t d = dt.d;
  const int hv = dt.hv, j0 = dt.j0;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int64_t c0d = chunk_off[d], c1d = chunk_off[d + 1];
  int64_t c0, c1;
  if (!window_chunks(win, c0d, c1d, c0, c1)) return;
  const float* adj_in = c1 == c1d ? dfinal : win.carry;
  float* adj_out = c0 == c0d ? dinit : win.carry;
  const int64_t sbase = (d * HV + hv) * DK * DV + j0;
  const uint32_t s0 = smem_addr(smem);
  const uint32_t s_shi = s0 + Lt::oShi, s_slo = s0 + Lt::oSlo, s_vhi = s0 + Lt::oVhi, s_vlo = s0 + Lt::oVlo;
  const int sm = warp % MT, sn0 = (warp / MT) * SN;
  const StateFrag fp{sm, sn0, gq, tq};

  float ds[SN][4];
  frag_load<DV>(ds, adj_in, sbase, fp);
  frag_stage<SN, BV>(ds, smem + Lt::oShi, smem + Lt::oSlo, fp);

  // Chunk c's operands in two groups: (Aqk, kg, do), read by step (a) (do also by (b): STG keeps two do tiles),
  // and (qg, w, gl), read by (b) only. do_off: the do tile's offset from the buffer (b: the chunk's parity).
  auto do_off = [&](int b) { return STG ? (b ? Lt::oDO2 : Lt::oDO) : Lt::oDO; };
  auto load_a = [&](int64_t c, int b) {
    const int64_t ch = c * HV + hv;
    const int64_t start = cu[d] + (c - c0d) * C;
    const int L = static_cast<int>(min(static_cast<int64_t>(C), cu[d + 1] - start));
    const uint32_t base = s0 + static_cast<uint32_t>(STG ? 0 : b * Lt::buf);
    copy_tile<C, DK, NT, false>(base + Lt::oKG, kg + ch * C * DK, DK, C);
    copy_tile<C, C, NT, false>(base + Lt::oAQK, aqk + ch * C * C, C, C);
    if (dout)
      copy_tile<C, BV, NT, false>(base + do_off(b), dout + (start * HV + hv) * DV + j0, static_cast<int64_t>(HV) * DV,
                                  L);
    else  // zero output gradients (the adjoint transition pass)
      copy_tile<C, BV, NT, false>(base + do_off(b), w, 0, 0);
  };
  auto load_b = [&](int64_t c, int b) {
    const int64_t ch = c * HV + hv;
    const uint32_t base = s0 + static_cast<uint32_t>(STG ? 0 : b * Lt::buf);
    copy_tile<C, DK, NT, false>(base + Lt::oW, w + ch * C * DK, DK, C);
    copy_tile<C, DK, NT, false>(base + Lt::oQG, qg + ch * C * DK, DK, C);
    for (int idx = tid; idx < DK / 4; idx += NT)
      cp_async16(base + Lt::oGL + idx * 16, gl + ch * DK + idx * 4, true);
  };
  if (c0 < c1) {
    load_a(c1 - 1, 0);
    if (STG) cp_async_commit();
    load_b(c1 - 1, 0);
  }
  cp_async_commit();

  const int I = warp & 3, nb = 2 * (warp >> 2);
  for (int64_t c = c1 - 1; c >= c0; --c) {
    const int b = static_cast<int>((c1 - 1 - c) & 1);
    if (!STG) {
      if (c - 1 >= c0) {
        load_a(c - 1, b ^ 1);
        load_b(c - 1, b ^ 1);
      }
      cp_async_commit();
    }
    cp_async_wait<1>();  // STG: (Aqk, kg, do) of chunk c (its (qg, w, gl) may still be in flight)
    __syncthreads();
    const uint32_t base = s0 + static_cast<uint32_t>(STG ? 0 : b * Lt::buf);
    const unsigned char* gbase = smem + (STG ? 0 : b * Lt::buf);
    const uint32_t s_do = base + do_off(b);
    const int64_t ch = c * HV + hv;
    if (dstates_hi) {  // dS_out of the chunk (hi + lo)
      store_staged<DK, BV, NT, false>(smem + Lt::oShi, dstates_hi + ch * DK * DV + j0, DV);
      store_staged<DK, BV, NT, false>(smem + Lt::oSlo, dstates_lo + ch * DK * DV + j0, DV);
    }

    // (a) dv_new = Aqk^T do + kg dS   (Aqk^T is upper triangular: row block I sees blocks kk >= I)
    {
      float acc[2][4];
      zero(acc[0]);
      zero(acc[1]);
      for (int kk = I; kk < C / 16; ++kk) {
        uint32_t a[4], bo[4];
        ldsm_x4_trans(a, base + Lt::oAQK + toff<C / 8>(16 * kk + (lane & 7) + ((lane >> 4) << 3), 2 * I + ((lane >> 3) & 1)));
        ldsm_x4_trans(bo, s_do + toff<BV / 8>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), nb + (lane >> 4)));
        mma_bf16(acc[0], a, bo[0], bo[1]);
        mma_bf16(acc[1], a, bo[2], bo[3]);
      }
      rows_times_state<DK, BV>(acc, base + Lt::oKG, s_shi, s_slo, I, nb, lane);
      for_acc_pairs(acc, I, nb, lane, [&](int r, int col, float x0, float x1) {
        uint32_t hi, lo;
        split_pair(-x0, -x1, hi, lo);
        *reinterpret_cast<uint32_t*>(smem + Lt::oVhi + eoff<BV>(r, col)) = hi;
        *reinterpret_cast<uint32_t*>(smem + Lt::oVlo + eoff<BV>(r, col)) = lo;
      });
    }
    if (STG) cp_async_wait<0>();  // (qg, w, gl) of chunk c
    __syncthreads();              // STG: Aqk and kg free (do of chunk c stays: the next one goes to the other do tile)
    if (STG) {                    // the next chunk's (Aqk, kg, do) while (b) runs
      if (c - 1 >= c0) load_a(c - 1, b ^ 1);
      cp_async_commit();
    }
    if (ndvn) store_staged<C, BV, NT, false>(smem + Lt::oVhi, ndvn + ch * C * DV + j0, DV);  // -dv_new (bf16)

    // (b) dS <- Diag(gl) dS + qg^T do + w^T (-dv_new)
    {
      frag_scale_rows(ds, reinterpret_cast<const float*>(gbase + Lt::oGL), fp);
#pragma unroll
      for (int kc = 0; kc < C / 16; ++kc) {
        uint32_t aq[4], aw[4];
        const uint32_t ao = toff<DK / 8>(16 * kc + (lane & 7) + ((lane >> 4) << 3), 2 * sm + ((lane >> 3) & 1));
        ldsm_x4_trans(aq, base + Lt::oQG + ao);
        ldsm_x4_trans(aw, base + Lt::oW + ao);
#pragma unroll
        for (int np = 0; np < SN / 2; ++np) {
          uint32_t bo[4], bh[4], bl[4];
          const uint32_t vo =
              toff<BV / 8>(16 * kc + (lane & 7) + (((lane >> 3) & 1) << 3), sn0 + 2 * np + (lane >> 4));
          ldsm_x4_trans(bo, s_do + vo);
          ldsm_x4_trans(bh, s_vhi + vo);
          ldsm_x4_trans(bl, s_vlo + vo);
          mma_bf16(ds[2 * np], aq, bo[0], bo[1]);
          mma_bf16(ds[2 * np + 1], aq, bo[2], bo[3]);
          mma_bf16(ds[2 * np], aw, bh[0], bh[1]);
          mma_bf16(ds[2 * np + 1], aw, bh[2], bh[3]);
          mma_bf16(ds[2 * np], aw, bl[0], bl[1]);
          mma_bf16(ds[2 * np + 1], aw, bl[2], bl[3]);
        }
      }
    }
    __syncthreads();
    if (STG) {  // the next chunk's (qg, w, gl): in flight during its step (a)
      if (c - 1 >= c0) load_b(c - 1, 0);
      cp_async_commit();
    }
    frag_stage<SN, BV>(ds, smem + Lt::oShi, smem + Lt::oSlo, fp);
  }
  cp_async_wait<0>();
  if (adj_out) frag_store<DV>(ds, adj_out, sbase, fp);
}

// ---------------------------------------------------------------- backward: products over dv

// Per chunk and value head (S = S_in, dS = dS_out of the chunk):
//   dqg = do S^T,  dkg = v_new dS^T,  dw = -dv_new S^T   [C x DK];   dgls[i] = sum_j S[i,j] dS[i,j]
//   dAqk = do v_new^T,  dT_v = dv_new v^T   (c <= r, zero above)
//   dv = T^T dv_new (dv[c] = beta_c sum_{r >= c} X[r,c] dv_new[r]), the finished value gradient.
// S and dS enter the products as hi + lo bf16 pairs (stored so by the state passes); do is exact,
// v_new and dv_new are rounded once (dv_new is stored negated: ndvn = -dv_new).
// Two blocks per chunk and value head (blockIdx.x = 2 chunk + part), 112 KB of shared memory each (DK = DV = 128),
// so that two blocks share an SM: part p takes rows [p DK/2, p DK/2 + DK/2) of S and dS, that is those columns of
// dqg, dkg, dw and those entries of dgls; then part 0 forms dAqk and dT_v (v staged where the S tiles were), part 1
// the value gradient dv (X staged there). (One block per chunk and head before, 209 KB: KDA forward + backward at
// B8xT4096 took 12.10 ms with it, 11.75 ms with this one, same H100 call, docs/benchmarks.md stop 19.)
template <int DK, int DV>
struct ProductsHalfLayout {
  static constexpr int kLdX = C + 1;
  static constexpr size_t kTile = size_t{C} * DV * 2;       // do, v_new, -dv_new; v
  static constexpr size_t kHalf = size_t{DK / 2} * DV * 2;  // half of S or dS, hi or lo
  static constexpr size_t oDO = 0, oVN = kTile, oDVN = 2 * kTile, oShi = 3 * kTile, oSlo = oShi + kHalf,
                          oDhi = oSlo + kHalf, oDlo = oDhi + kHalf;
  static constexpr size_t oTail = oShi;  // after the DK products: v (part 0) or X (part 1)
  static constexpr size_t kTailBytes = std::max({4 * kHalf, kTile, size_t{C} * kLdX * 4});
  static constexpr size_t oBeta = oTail + kTailBytes, bytes = oBeta + C * 4;
};

template <int DK, int DV>
__global__ void __launch_bounds__(kThreads, 2)
    products_half_kernel(KdaDims s, const int32_t* __restrict__ cu, const int32_t* __restrict__ chunk_off,
                         const __nv_bfloat16* __restrict__ states_hi, const __nv_bfloat16* __restrict__ states_lo,
                         const __nv_bfloat16* __restrict__ dstates_hi, const __nv_bfloat16* __restrict__ dstates_lo,
                         const __nv_bfloat16* __restrict__ vn, const __nv_bfloat16* __restrict__ ndvn,
                         const float* __restrict__ x, const float* __restrict__ beta,
                         const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ v,
                         float* __restrict__ dqg, float* __restrict__ dkg, float* __restrict__ dw,
                         float* __restrict__ dgls, float* __restrict__ daqk, float* __restrict__ dtv,
                         __nv_bfloat16* __restrict__ dv_out, int hv0, int hvg, int64_t c_base) {
  using Lt = ProductsHalfLayout<DK, DV>;
  constexpr int HK = DK / 2, kLdX = Lt::kLdX;
  extern __shared__ __align__(128) unsigned char smem[];
  const int part = static_cast<int>(blockIdx.x & 1);
  const int64_t c = c_base + (blockIdx.x >> 1);  // c_base: 0, or a window's first chunk
  const int hv = hv0 + static_cast<int>(blockIdx.y);
  if (c >= chunk_off[s.num_docs]) return;
  const kda_chunk::ChunkSpan sp = kda_chunk::locate_chunk(cu, chunk_off, s.num_docs, c);
  const int L = sp.len, HV = static_cast<int>(s.hv);
  // ch: the chunk and value head in the per-chunk buffers of every head (states, v_new, X); chg: in the head
  // group's products (dqg, dkg, dw, dgls, dAqk, dT_v), hvg heads per chunk.
  const int64_t ch = c * HV + hv, chg = c * hvg + blockIdx.y;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const uint32_t s0 = smem_addr(smem);
  float* bs = reinterpret_cast<float*>(smem + Lt::oBeta);

  const int64_t row_stride = static_cast<int64_t>(HV) * DV, srow = ch * DK * DV + int64_t{part} * HK * DV;
  copy_tile<C, DV>(s0 + Lt::oDO, dout + (sp.start * HV + hv) * DV, row_stride, L);
  copy_tile<C, DV>(s0 + Lt::oVN, vn + ch * C * DV, DV, C);
  copy_tile<C, DV>(s0 + Lt::oDVN, ndvn + ch * C * DV, DV, C);
  copy_tile<HK, DV>(s0 + Lt::oShi, states_hi + srow, DV, HK);
  copy_tile<HK, DV>(s0 + Lt::oSlo, states_lo + srow, DV, HK);
  copy_tile<HK, DV>(s0 + Lt::oDhi, dstates_hi + srow, DV, HK);
  copy_tile<HK, DV>(s0 + Lt::oDlo, dstates_lo + srow, DV, HK);
  cp_async_commit();
  if (tid < C) bs[tid] = tid < L ? beta[(sp.start + tid) * HV + hv] : 0.f;
  cp_async_wait<0>();
  __syncthreads();
  // dgls[i] = sum_j S[i,j] dS[i,j] for this part's rows, from the hi + lo tiles (warp = row).
  for (int i = warp; i < HK; i += kThreads / 32) {
    float acc = 0.f;
    for (int j = 2 * lane; j < DV; j += 64) {
      auto val = [&](size_t hi_off, size_t lo_off) {
        const float2 hv2 = unpack_bf16(*reinterpret_cast<const uint32_t*>(smem + hi_off + eoff<DV>(i, j)));
        const float2 lv2 = unpack_bf16(*reinterpret_cast<const uint32_t*>(smem + lo_off + eoff<DV>(i, j)));
        return make_float2(hv2.x + lv2.x, hv2.y + lv2.y);
      };
      const float2 sv = val(Lt::oShi, Lt::oSlo), dv2 = val(Lt::oDhi, Lt::oDlo);
      acc += sv.x * dv2.x + sv.y * dv2.y;
    }
    acc = warp_sum(acc);
    if (lane == 0) dgls[chg * DK + part * HK + i] = acc;
  }

  const int I = warp & 3, half = warp >> 2;
  const int ra = 16 * I + gq, rb = ra + 8;
  // out[r][part HK + i] = sum_j A[r][j] B[i][j] (B = this part's rows, hi + lo) for this warp's rows and a
  // quarter of the DK columns.
  auto dk_product = [&](size_t a_off, size_t b_hi, size_t b_lo, float* out) {
    constexpr int NT = HK / 16;  // 8-column tiles per warp
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) zero(acc[nt]);
#pragma unroll 2
    for (int ks = 0; ks < DV / 16; ++ks) {
      uint32_t a[4];
      ldsm_x4(a, s0 + a_off + toff<DV / 8>(16 * I + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        const uint32_t off =
            toff<DV / 8>(half * (HK / 2) + 16 * np + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1));
        uint32_t b[4];
        ldsm_x4(b, s0 + b_hi + off);
        mma_bf16(acc[2 * np], a, b[0], b[1]);
        mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
        ldsm_x4(b, s0 + b_lo + off);
        mma_bf16(acc[2 * np], a, b[0], b[1]);
        mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int col = part * HK + half * (HK / 2) + 8 * nt + 2 * tq;
      *reinterpret_cast<float2*>(out + (chg * C + ra) * DK + col) = make_float2(acc[nt][0], acc[nt][1]);
      *reinterpret_cast<float2*>(out + (chg * C + rb) * DK + col) = make_float2(acc[nt][2], acc[nt][3]);
    }
  };
  dk_product(Lt::oDO, Lt::oShi, Lt::oSlo, dqg);
  dk_product(Lt::oVN, Lt::oDhi, Lt::oDlo, dkg);
  dk_product(Lt::oDVN, Lt::oShi, Lt::oSlo, dw);  // dw = -dv_new S^T = ndvn S^T
  __syncthreads();                               // the S and dS tiles are dead

  if (part == 0) {
    // out[r][c] = sign sum_j A[r][j] B[c][j] for c <= r (zero above), columns c in [32 half, 32 half + 32).
    auto cc_product = [&](size_t a_off, size_t b_off, float sign, float* out) {
      float acc[4][4];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) zero(acc[nt]);
      if (32 * half <= 16 * I + 15) {
#pragma unroll
        for (int ks = 0; ks < DV / 16; ++ks) {
          uint32_t a[4];
          ldsm_x4(a, s0 + a_off + toff<DV / 8>(16 * I + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            uint32_t b[4];
            ldsm_x4(
                b, s0 + b_off +
                       toff<DV / 8>(32 * half + 16 * np + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1)));
            mma_bf16(acc[2 * np], a, b[0], b[1]);
            mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
          }
        }
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int col = 32 * half + 8 * nt + 2 * tq;
        *reinterpret_cast<float2*>(out + (chg * C + ra) * C + col) =
            make_float2(col <= ra ? sign * acc[nt][0] : 0.f, col + 1 <= ra ? sign * acc[nt][1] : 0.f);
        *reinterpret_cast<float2*>(out + (chg * C + rb) * C + col) =
            make_float2(col <= rb ? sign * acc[nt][2] : 0.f, col + 1 <= rb ? sign * acc[nt][3] : 0.f);
      }
    };
    copy_tile<C, DV>(s0 + Lt::oTail, v + (sp.start * HV + hv) * DV, row_stride, L);
    cp_async_commit();
    cc_product(Lt::oDO, Lt::oVN, 1.f, daqk);  // while v arrives
    cp_async_wait<0>();
    __syncthreads();
    cc_product(Lt::oDVN, Lt::oTail, -1.f, dtv);  // dT_v = dv_new v^T = -(ndvn v^T)
    return;
  }

  // Part 1: dv = T^T dv_new, rows c of block I, columns j in [DV/2 half, DV/2 half + DV/2); T^T[c][r] = X[r][c] beta_c.
  stage_matrix<kLdX>(s0 + Lt::oTail, x + ch * C * C);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const float* xs = reinterpret_cast<const float*>(smem + Lt::oTail);
  constexpr int NV = DV / 16;
  float acc[NV][4];
#pragma unroll
  for (int nt = 0; nt < NV; ++nt) zero(acc[nt]);
  for (int kk = I; kk < C / 16; ++kk) {
    uint32_t hi[4], lo[4];
    afrag_cols<kLdX>(xs, nullptr, ra, kk, bs[ra], bs[rb], hi, lo);
#pragma unroll
    for (int np = 0; np < NV / 2; ++np) {
      uint32_t b[4];
      ldsm_x4_trans(b, s0 + Lt::oDVN +
                           toff<DV / 8>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3),
                                        half * (DV / 16) + 2 * np + (lane >> 4)));
      mma_bf16(acc[2 * np], hi, b[0], b[1]);
      mma_bf16(acc[2 * np + 1], hi, b[2], b[3]);
      mma_bf16(acc[2 * np], lo, b[0], b[1]);
      mma_bf16(acc[2 * np + 1], lo, b[2], b[3]);
    }
  }
#pragma unroll
  for (int nt = 0; nt < NV; ++nt) {
    const int col = half * (DV / 2) + 8 * nt + 2 * tq;
    if (ra < L)  // dv = T^T dv_new = -(T^T ndvn)
      *reinterpret_cast<uint32_t*>(dv_out + ((sp.start + ra) * HV + hv) * DV + col) =
          pack_bf16(-acc[nt][0], -acc[nt][1]);
    if (rb < L)
      *reinterpret_cast<uint32_t*>(dv_out + ((sp.start + rb) * HV + hv) * DV + col) =
          pack_bf16(-acc[nt][2], -acc[nt][3]);
  }
}

// ---------------------------------------------------------------- backward: intra-chunk gradients

// Shared memory of the intra-chunk gradient: 105 KB (DK = 128), so two blocks share an SM and one block's
// loads and barriers overlap the other's products. (The previous version also staged dw, q, dAqk and Z: 190 KB,
// one block per SM; KDA forward + backward at B8xT4096 took 14.59 ms with it, 13.21 ms with this one, same H100
// call, docs/benchmarks.md stop 18.) dw is not staged (its fragments come from global memory, L2-resident: the
// dT product reads each row block once, dkG re-reads it); Z = dX X^T and dA reuse dT's tile (the products finish
// in registers behind a barrier before the tile is overwritten); X's tile takes q once dA is formed (dkG then
// reads X from global memory), and Ak's tile takes dAqk once dbeta has used Ak.
template <int DK>
struct IntraLayout {
  static constexpr int kLdM = C + 4;
  static constexpr size_t kMat = size_t{C} * kLdM * 4;
  static constexpr size_t oG = 0;                              // f32 [C][kLdG]: G, later dG
  static constexpr size_t oK = oG + size_t{C} * kLdG<DK> * 4;  // bf16 [C][kLdB] k
  static constexpr size_t oX = oK + size_t{C} * kLdB<DK> * 2;  // X, then bf16 [C][kLdB] q
  static constexpr size_t oT = oX + kMat;                      // dT, dX, Z, then dA
  static constexpr size_t oAk = oT + kMat;                     // Ak, then dAqk
  static constexpr size_t oBeta = oAk + kMat;                  // beta [C]
  static constexpr size_t oDbT = oBeta + C * 4;                // dbeta through T [C]
  static constexpr size_t oExtra = oDbT + C * 4;               // dG_last terms [5][DK]: e^{G_last} dgls, row blocks 0-3
  static constexpr size_t bytes = oExtra + 5 * DK * 4;
  static_assert(size_t{C} * kLdB<DK> * 2 <= kMat, "q's tile must fit X's");
};

// Intra-chunk gradients of one chunk and value head (grid: chunk x value head), the tensor-core
// version of kda_chunk::IntraGradProgram (same inputs and outputs; the formulas are there):
//   dT = dT_v + dw kG^T;  dbeta_c += sum_r dT X;  dX = dT Diag(beta);  dA = -(X^T dX X^T) (c < r);
//   dbeta_r += sum_c dA Ak;  P = Diag(beta) dA;  dkG = T^T dw;
//   row sums  s1 = sum_{c<r} P[r,c] k_c E_rc,  s2 = sum_{c<=r} dAqk[r,c] k_c E_rc   (reference G_{16I})
//   col sums  s3 = sum_{r'>r} P[r',r] k_r' E_r'r, s4 = sum_{r'>=r} dAqk[r',r] q_r' E_r'r (reference G_{16I+15})
//   dq = dqg e^G + s2;  dk = dkg e^{G_last - G} + dkG e^G + s1 + s3 + s4;
//   dG = dqg q e^G - dkg k e^{G_last - G} + dkG k e^G + k s1 + q s2 - k (s3 + s4);  dg = reverse cumsum of dG
//   (+ e^{G_last} dgls + sum_r' dkg k e^{G_last - G} on every row).
// Ak, the E-weighted sums, dkG and the 64 x 64 products of the inverse's adjoint (X^T dX X^T) run on tensor
// cores (the fp32 operands split hi + lo). Warp w: rows 16 (w % 4) .., channels [DK/2 (w / 4), DK/2 (w / 4) +
// DK/2) of the outputs, taken in two halves of DK/4 (step 6), so that the accumulators fit 128 registers.
// dq_out, dk_out (HV == H only): the finished bf16 dq, dk instead of dq_hv, dk_hv.
template <int DK>
__global__ void __launch_bounds__(kThreads, 2)
    intra_kernel(KdaDims s, const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                 const float* __restrict__ g, const float* __restrict__ beta, const int32_t* __restrict__ cu,
                 const int32_t* __restrict__ chunk_off, const float* __restrict__ x, const float* __restrict__ daqk,
                 const float* __restrict__ dtv, const float* __restrict__ dqg, const float* __restrict__ dkg,
                 const float* __restrict__ dw, const float* __restrict__ dgls, float* __restrict__ dq_hv,
                 float* __restrict__ dk_hv, __nv_bfloat16* __restrict__ dq_out, __nv_bfloat16* __restrict__ dk_out,
                 float* __restrict__ dg, float* __restrict__ dbeta, int hv0, int hvg, int64_t c_base) {
  using Lt = IntraLayout<DK>;
  constexpr int LDG = kLdG<DK>, LDB = kLdB<DK>, LDM = Lt::kLdM;
  constexpr int NH = DK / 32;  // 8-channel tiles per warp and half (each warp: DK / 2 channels in two halves)
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t c = c_base + blockIdx.x;  // c_base: 0, or a window's first chunk
  const int hv = hv0 + static_cast<int>(blockIdx.y);
  if (c >= chunk_off[s.num_docs]) return;
  const kda_chunk::ChunkSpan sp = kda_chunk::locate_chunk(cu, chunk_off, s.num_docs, c);
  const int L = sp.len, H = static_cast<int>(s.h), HV = static_cast<int>(s.hv);
  const int h = hv / (HV / H);
  // ch: X's chunk and value head (every head); chg: the head group's products (products_half_kernel).
  const int64_t ch = c * HV + hv, chg = c * hvg + blockIdx.y;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;

  float* gs = reinterpret_cast<float*>(smem + Lt::oG);
  __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(smem + Lt::oK);
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem + Lt::oX);  // after step 5
  float* xm = reinterpret_cast<float*>(smem + Lt::oX);
  float* tm = reinterpret_cast<float*>(smem + Lt::oT);
  float* ak = reinterpret_cast<float*>(smem + Lt::oAk);
  float* qa = reinterpret_cast<float*>(smem + Lt::oAk);  // after dbeta
  float* bs = reinterpret_cast<float*>(smem + Lt::oBeta);
  float* dbt = reinterpret_cast<float*>(smem + Lt::oDbT);
  float* extra = reinterpret_cast<float*>(smem + Lt::oExtra);
  const float* xc = x + ch * C * C;
  const float* dwc = dw + chg * C * DK;
  const float* dqgc = dqg + chg * C * DK;
  const float* dkgc = dkg + chg * C * DK;
  KDA_CLOCKS_BEGIN();

  // 1. Loads (k, g, X, dT_v asynchronously), G = cumsum(g).
  stage_head_rows<DK>(smem_addr(ks), k, sp.start, L, H, h);
  stage_g<DK>(smem_addr(gs), g, sp.start, L, HV, hv);
  stage_matrix<LDM>(smem_addr(xm), xc);
  stage_matrix<LDM>(smem_addr(tm), dtv + chg * C * C);
  cp_async_commit();
  if (tid < C) bs[tid] = tid < L ? beta[(sp.start + tid) * HV + hv] : 0.f;
  cp_async_wait<0>();
  __syncthreads();
  column_cumsum<LDG, DK>(gs, tid);
  __syncthreads();

  KDA_CLOCK(1);
  // 2. Ak (warps 0-3, row block I) and dT = dT_v + dw kG^T (warps 4-7, dw's fragments from global memory).
  {
    const int I = warp & 3, ra = 16 * I + gq, ntn = 2 * (I + 1);
    float acc[8][4];
    if (warp < 4) {
      const float span = decay_gram<DK>(ks, ks, gs, I, acc);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = ra + 8 * (e >> 1), col = 8 * nt + 2 * tq + (e & 1);
          ak[r * LDM + col] = nt < ntn && col < r ? acc[nt][e] : 0.f;
        }
      if (span > kSafeSpan) {
        __syncwarp();
        exact_diag_gram<DK>(ks, ks, gs, I, [&](int r, int cc, float v) {
          if (cc < r) ak[r * LDM + cc] = v;
        });
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) zero(acc[nt]);
#pragma unroll 2
      for (int kst = 0; kst < DK / 16; ++kst) {
        uint32_t ah[4], al[4];
        afrag_rows<DK>(dwc, ra, kst, 1.f, 1.f, ah, al);
        const int i0 = 16 * kst + 2 * tq, i1 = i0 + 8;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          if (nt < ntn) {
            const int cc = 8 * nt + gq;
            auto kg_pair = [&](int i) {  // k_c exp(G_c) at channels i, i + 1
              const float2 kv = unpack_bf16(*reinterpret_cast<const uint32_t*>(ks + cc * LDB + i));
              const float2 G = *reinterpret_cast<const float2*>(gs + cc * LDG + i);
              return pack_bf16(kv.x * __expf(G.x), kv.y * __expf(G.y));
            };
            const uint32_t b0 = kg_pair(i0), b1 = kg_pair(i1);
            mma_bf16(acc[nt], ah, b0, b1);
            mma_bf16(acc[nt], al, b0, b1);
          }
        }
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = ra + 8 * (e >> 1), col = 8 * nt + 2 * tq + (e & 1);
          tm[r * LDM + col] = nt < ntn && col <= r ? tm[r * LDM + col] + acc[nt][e] : 0.f;
        }
    }
  }
  __syncthreads();

  KDA_CLOCK(2);
  // 3. dbeta through T and dX = dT Diag(beta) (4 threads per column c); extra[i] starts as e^{G_last} dgls.
  {
    const int col = tid >> 2, part = tid & 3;
    float acc = 0.f;
    for (int r = col + part; r < C; r += 4) acc += tm[r * LDM + col] * xm[r * LDM + col];
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    if (part == 0) dbt[col] = acc;
    __syncwarp();
    for (int r = col + part; r < C; r += 4) tm[r * LDM + col] *= bs[col];
  }
  if (tid < DK) extra[tid] = __expf(gs[(C - 1) * LDG + tid]) * dgls[chg * DK + tid];
  __syncthreads();
  KDA_CLOCK(3);
  // 4. Z = dX X^T and 5. dA = -(X^T Z) strictly below the diagonal (dX[a][b] = 0 for b > a, X[c][b] = 0 for
  // b > c: blocks known zero are skipped), on tensor cores (both operands hi + lo), each result kept in
  // registers until every warp has read the tile it replaces.
  {
    const int I = warp & 3, nb = 4 * (warp >> 2), ra = 16 * I + gq;
    float acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) zero(acc[j]);
    for (int kk = 0; kk <= I; ++kk) {
      uint32_t ah[4], al[4];
      afrag_rows<LDM>(tm, ra, kk, 1.f, 1.f, ah, al);
      const int k0 = 16 * kk + 2 * tq;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (16 * kk > 8 * (nb + j) + 7) continue;
        const float* xr = xm + (8 * (nb + j) + gq) * LDM;
        mma_split3(acc[j], ah, al, xr[k0], xr[k0 + 1], xr[k0 + 8], xr[k0 + 9]);
      }
    }
    __syncthreads();  // every warp is done reading dX
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) tm[(ra + 8 * (e >> 1)) * LDM + 8 * (nb + j) + 2 * tq + (e & 1)] = acc[j][e];
    __syncthreads();
    KDA_CLOCK(4);
    const float* zm = tm;
#pragma unroll
    for (int j = 0; j < 4; ++j) zero(acc[j]);
    for (int kk = I; kk < C / 16; ++kk) {
      if (8 * nb > 16 * I + 15) break;
      uint32_t ah[4], al[4];
      afrag_cols<LDM>(xm, nullptr, ra, kk, 1.f, 1.f, ah, al);
      const int k0 = 16 * kk + 2 * tq;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (8 * (nb + j) > 16 * I + 15) continue;
        const float* zc = zm + 8 * (nb + j) + gq;
        mma_split3(acc[j], ah, al, zc[k0 * LDM], zc[(k0 + 1) * LDM], zc[(k0 + 8) * LDM], zc[(k0 + 9) * LDM]);
      }
    }
    __syncthreads();  // every warp is done reading Z and X
    // X's tile takes q (read from step 6 on); dkG reads X from global memory.
    stage_head_rows<DK>(smem_addr(qs), q, sp.start, L, H, h);
    cp_async_commit();
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = ra + 8 * (e >> 1), col = 8 * (nb + j) + 2 * tq + (e & 1);
        tm[r * LDM + col] = col < r ? -acc[j][e] : 0.f;
      }
  }
  __syncthreads();

  KDA_CLOCK(5);
  // 6. dbeta (thread = row), then Ak's tile takes dAqk.
  if (tid < C) {
    const float acc = dbt[tid] + dot_strided(tm + tid * LDM, 1, ak + tid * LDM, 1, 0, tid);
    if (tid < L) dbeta[(sp.start + tid) * HV + hv] = acc;
  }
  __syncthreads();
  stage_matrix<LDM>(smem_addr(qa), daqk + chg * C * C);
  cp_async_commit();
  const int I = warp & 3, half = warp >> 2;
  const int ra = 16 * I + gq, rb = ra + 8;
  const float* Rrow = gs + 16 * I * LDG;         // reference of the row sums
  const float* Rcol = gs + (16 * I + 15) * LDG;  // reference of the column sums
  float span = 0.f;
  for (int i = lane; i < DK; i += 32) span = fmaxf(span, Rrow[i] - Rcol[i]);
  const bool safe = warp_max(span) <= kSafeSpan;
  const float* Gl = gs + (C - 1) * LDG;
  auto row_of = [&](int e) { return ra + 8 * (e >> 1); };
  // A warp's accumulator pairs x (rows ra, rb; channels i, i + 1) of dq or dk: bf16 into out when given, else f32
  // into out_hv; rows past the chunk's end are not stored.
  auto store_rows = [&](__nv_bfloat16* out, float* out_hv, int i, const float(&x)[4]) {
#pragma unroll
    for (int half_r = 0; half_r < 2; ++half_r) {
      const int r = ra + 8 * half_r;
      const int64_t o = ((sp.start + r) * HV + hv) * DK + i;
      if (r < L && out)
        *reinterpret_cast<uint32_t*>(out + o) = pack_bf16(x[2 * half_r], x[2 * half_r + 1]);
      else if (r < L)
        *reinterpret_cast<float2*>(out_hv + o) = make_float2(x[2 * half_r], x[2 * half_r + 1]);
    }
  };
  // dkG = T^T dw per half (X and dw from global memory; the first half's product overlaps the q / dAqk
  // copies): A[m = c][k = r] = X[r][c] beta_c (blocks kk >= I), B = dw (hi + lo).
  float dkG[NH][4];
  auto dkg_product = [&](int col0) {
#pragma unroll
    for (int nt = 0; nt < NH; ++nt) zero(dkG[nt]);
    for (int kk = I; kk < C / 16; ++kk) {
      uint32_t hi[4], lo[4];
      afrag_cols<C>(xc, nullptr, ra, kk, bs[ra], bs[rb], hi, lo);
      const float* dwr = dwc + (16 * kk + 2 * tq) * DK + col0 + gq;
#pragma unroll
      for (int nt = 0; nt < NH; ++nt) {
        mma_split3(dkG[nt], hi, lo, dwr[8 * nt], dwr[DK + 8 * nt], dwr[8 * DK + 8 * nt], dwr[9 * DK + 8 * nt]);
      }
    }
  };
  dkg_product(half * (DK / 2));
  cp_async_wait<0>();
  __syncthreads();
  KDA_CLOCK(6);
  // Per half: dG of its channels goes into G's tile once every warp is done with the half (the other half's
  // channels of G are not read meanwhile).
  // (Not unrolled, and the epilogues below in two versions: instruction-cache misses were the kernel's first stall
  // reason, 35% of its samples at 20,000 instructions; at 14,144 the saving pair at B8xT4096 took 6.71 ms instead
  // of 7.00 with the halves unrolled and 7.82 before both changes, H200, docs/benchmarks.md stop 24.)
#pragma unroll 1
  for (int hh = 0; hh < 2; ++hh) {
    const int col0 = half * (DK / 2) + hh * (DK / 4);
    auto chan_of = [&](int nt, int e) { return col0 + 8 * nt + 2 * tq + (e & 1); };
    if (hh == 1) dkg_product(col0);
    float ok[NH][4], oG[NH][4];
#pragma unroll
    for (int nt = 0; nt < NH; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = row_of(e), i = chan_of(nt, e);
        const float eG = __expf(gs[r * LDG + i]), kr = __bfloat162float(ks[r * LDB + i]);
        ok[nt][e] = dkG[nt][e] * eG;
        oG[nt][e] = dkG[nt][e] * kr * eG;
      }
    // Row sums s1 (P) and s2 (dAqk) against k_c exp(R - G_c), R = G_{16 I}; then dq.
    {
      float s1[NH][4], s2[NH][4];
#pragma unroll
      for (int nt = 0; nt < NH; ++nt) {
        zero(s1[nt]);
        zero(s2[nt]);
      }
      const int kk_end = safe ? I : I - 1;
      for (int kk = 0; kk <= kk_end; ++kk) {
        uint32_t ph[4], pl[4], qh[4], ql[4];
        afrag_rows<LDM>(tm, ra, kk, bs[ra], bs[rb], ph, pl);
        afrag_rows<LDM>(qa, ra, kk, 1.f, 1.f, qh, ql);
        const int c0 = 16 * kk + 2 * tq;
#pragma unroll
        for (int nt = 0; nt < NH; ++nt) {
          const int i = col0 + 8 * nt + gq;
          const uint32_t b0 = decayed_col_pair<DK>(ks, gs, Rrow, c0, i, true);
          const uint32_t b1 = decayed_col_pair<DK>(ks, gs, Rrow, c0 + 8, i, true);
          mma_bf16(s1[nt], ph, b0, b1);
          mma_bf16(s1[nt], pl, b0, b1);
          mma_bf16(s2[nt], qh, b0, b1);
          mma_bf16(s2[nt], ql, b0, b1);
        }
      }
      // The epilogue in two versions, the exact diagonal block (a span over kSafeSpan: rare) in the second only,
      // so that the common one is compact code without that path inside each unrolled step.
      auto row_epilogue = [&](auto exact) {
#pragma unroll
        for (int nt = 0; nt < NH; ++nt) {
          float last[2] = {0.f, 0.f};  // sum over this warp's rows of dkg k e^{G_last - G}, channels +0, +1
          float oq[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = row_of(e), i = chan_of(nt, e);
            const float Gr = gs[r * LDG + i], sc = __expf(Gr - Rrow[i]);
            float v1 = s1[nt][e] * sc, v2 = s2[nt][e] * sc;
            if (decltype(exact)::value)  // the diagonal block exactly
              for (int cc = 16 * I; cc <= r; ++cc) {
                const float kc = __bfloat162float(ks[cc * LDB + i]) * expf(Gr - gs[cc * LDG + i]);
                v1 += bs[r] * tm[r * LDM + cc] * kc;
                v2 += qa[r * LDM + cc] * kc;
              }
            const float kr = __bfloat162float(ks[r * LDB + i]), qr = __bfloat162float(qs[r * LDB + i]);
            const float eG = __expf(Gr), eL = __expf(Gl[i] - Gr);
            const float aq = dqgc[r * DK + i], akg = dkgc[r * DK + i];
            oq[e] = aq * eG + v2;
            ok[nt][e] += akg * eL + v1;
            oG[nt][e] += aq * qr * eG - akg * kr * eL + kr * v1 + qr * v2;
            last[e & 1] += akg * kr * eL;
          }
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            float v = last[j];
            v += __shfl_xor_sync(0xffffffffu, v, 4);
            v += __shfl_xor_sync(0xffffffffu, v, 8);
            v += __shfl_xor_sync(0xffffffffu, v, 16);
            if (gq == 0) extra[(1 + I) * DK + col0 + 8 * nt + 2 * tq + j] = v;  // one writer: summed in step 7
          }
          store_rows(dq_out, dq_hv, col0 + 8 * nt + 2 * tq, oq);
        }
      };
      if (safe)
        row_epilogue(std::false_type{});
      else
        row_epilogue(std::true_type{});
    }
    // Column sums s3 (P^T against k) and s4 (dAqk^T against q), factors x_r' exp(G_r' - R'), R' = G_{16 I + 15};
    // then dk.
    {
      float s3[NH][4], s4[NH][4];
#pragma unroll
      for (int nt = 0; nt < NH; ++nt) {
        zero(s3[nt]);
        zero(s4[nt]);
      }
      for (int kk = safe ? I : I + 1; kk < C / 16; ++kk) {
        uint32_t ph[4], pl[4], qh[4], ql[4];
        afrag_cols<LDM>(tm, bs, ra, kk, 1.f, 1.f, ph, pl);
        afrag_cols<LDM>(qa, nullptr, ra, kk, 1.f, 1.f, qh, ql);
        const int c0 = 16 * kk + 2 * tq;
#pragma unroll
        for (int nt = 0; nt < NH; ++nt) {
          const int i = col0 + 8 * nt + gq;
          const uint32_t bk0 = decayed_col_pair<DK>(ks, gs, Rcol, c0, i, false);
          const uint32_t bk1 = decayed_col_pair<DK>(ks, gs, Rcol, c0 + 8, i, false);
          const uint32_t bq0 = decayed_col_pair<DK>(qs, gs, Rcol, c0, i, false);
          const uint32_t bq1 = decayed_col_pair<DK>(qs, gs, Rcol, c0 + 8, i, false);
          mma_bf16(s3[nt], ph, bk0, bk1);
          mma_bf16(s3[nt], pl, bk0, bk1);
          mma_bf16(s4[nt], qh, bq0, bq1);
          mma_bf16(s4[nt], ql, bq0, bq1);
        }
      }
      auto col_epilogue = [&](auto exact) {  // (two versions, as row_epilogue)
#pragma unroll
        for (int nt = 0; nt < NH; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = row_of(e), i = chan_of(nt, e);
            const float Gr = gs[r * LDG + i], sc = __expf(Rcol[i] - Gr);
            float v = (s3[nt][e] + s4[nt][e]) * sc;
            if (decltype(exact)::value)
              for (int r2 = r; r2 < 16 * I + 16; ++r2) {
                const float e2 = expf(gs[r2 * LDG + i] - Gr);
                v += (bs[r2] * tm[r2 * LDM + r] * __bfloat162float(ks[r2 * LDB + i]) +
                      qa[r2 * LDM + r] * __bfloat162float(qs[r2 * LDB + i])) *
                     e2;
              }
            const float kr = __bfloat162float(ks[r * LDB + i]);
            ok[nt][e] += v;
            oG[nt][e] -= kr * v;
          }
          store_rows(dk_out, dk_hv, col0 + 8 * nt + 2 * tq, ok[nt]);
        }
      };
      if (safe)
        col_epilogue(std::false_type{});
      else
        col_epilogue(std::true_type{});
    }
    __syncthreads();  // every warp is done reading G in this half's channels
#pragma unroll
    for (int nt = 0; nt < NH; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) gs[row_of(e) * LDG + chan_of(nt, e)] = oG[nt][e];
  }
  __syncthreads();
  KDA_CLOCK(7);
  // 7. dg = reverse cumulative sum of dG over the rows, plus the dG_last terms on every row.
  if (tid < DK) {
    float acc = extra[tid];  // + the row blocks' sums in a fixed order (deterministic, unlike an atomic add)
#pragma unroll
    for (int b = 1; b <= 4; ++b) acc += extra[b * DK + tid];
    for (int r1 = C; r1 > 0; r1 -= 16) {  // 16 rows read at a time: the additions then wait on one another only
      float col[16];
#pragma unroll
      for (int j = 0; j < 16; ++j) col[j] = gs[(r1 - 16 + j) * LDG + tid];
#pragma unroll
      for (int j = 15; j >= 0; --j) {
        const int r = r1 - 16 + j;
        acc += col[j];
        if (r < L) dg[((sp.start + r) * HV + hv) * DK + tid] = acc;
      }
    }
  }
  KDA_CLOCK(8);
  KDA_CLOCKS_PRINT("intra", 9);
}

struct FwdBuffers {
  __nv_bfloat16 *w, *qg, *kg, *aqk;
  float *u, *gl;
};

size_t align16(size_t b) { return (b + 15) / 16 * 16; }

// Carves the forward scratch; with base == nullptr only counts. Returns bytes.
// Hands out 16-byte aligned pieces of `base` in order (with base == nullptr only counts: used).
struct Carver {
  unsigned char* base;
  size_t used = 0;
  unsigned char* take(size_t bytes) {
    unsigned char* p = base ? base + used : nullptr;
    used += align16(bytes);
    return p;
  }
};

// with_u false: no u (f.u stays null): what the backward reads of the prep.
size_t carve(const KdaDims& s, unsigned char* base, FwdBuffers& f, bool with_u = true) {
  const size_t ch = static_cast<size_t>(kda_chunk::max_chunks(s)) * static_cast<size_t>(s.hv);
  const size_t dk = static_cast<size_t>(s.dk), dv = static_cast<size_t>(s.dv);
  Carver cv{base};
  auto take = [&](size_t bytes) { return cv.take(bytes); };
  f.w = reinterpret_cast<__nv_bfloat16*>(take(ch * C * dk * 2));
  f.u = with_u ? reinterpret_cast<float*>(take(ch * C * dv * 4)) : nullptr;
  f.qg = reinterpret_cast<__nv_bfloat16*>(take(ch * C * dk * 2));
  f.kg = reinterpret_cast<__nv_bfloat16*>(take(ch * C * dk * 2));
  f.aqk = reinterpret_cast<__nv_bfloat16*>(take(ch * C * C * 2));
  f.gl = reinterpret_cast<float*>(take(ch * dk * 4));
  return cv.used;
}

template <class K>
void set_smem(K kernel, size_t bytes) {
  HYD_CHECK(bytes <= 227 * 1024, "kda: ", bytes, " bytes of shared memory exceed the per-block limit");
  CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <int DK, int DV>
void prep_impl(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
               const int32_t* cu, const int32_t* chunk_off, const FwdBuffers& f, cudaStream_t st,
               float* x_out = nullptr, int64_t c_base = 0, int64_t grid_chunks = -1) {
  const int64_t mc = grid_chunks < 0 ? kda_chunk::max_chunks(s) : grid_chunks;
  if (mc > 0) {
    using PL = PrepLayout<DK, DV>;
    set_smem(prep_kernel<DK, DV>, PL::bytes);
    prep_kernel<DK, DV><<<dim3(static_cast<unsigned>(mc), static_cast<unsigned>(s.hv)), kThreads, PL::bytes, st>>>(
        s, as_nv(q), as_nv(k), as_nv(v), g, beta, cu, chunk_off, f.w, f.u, f.qg, f.kg, f.aqk, f.gl, x_out, c_base);
    CHECK_LAUNCH();
  }
}

// The state passes' grid (doc_tile): flat, column tiles fastest.
dim3 doc_grid(const KdaDims& s, int DV, int BV = kBV) {
  const int64_t blocks = s.num_docs * s.hv * (DV / BV);
  HYD_CHECK(blocks < (int64_t{1} << 31), "kda: ", s.num_docs, " documents x ", s.hv, " value heads exceed the grid");
  return dim3(static_cast<unsigned>(blocks));
}

// The state passes in two versions (STG: the template flag of state_kernel / reverse_kernel):
// - one operand buffer, refilled in two staggered groups, 90 KB of shared memory and 128 registers: two blocks per
//   SM. Chosen when the pass's blocks (documents x value heads x DV / kBV) fit the GPU at two per SM, where it is
//   faster: H200, bench_kda saving fwd+bwd (docs/benchmarks.md stop 25) B4xT4096 H16 (256 blocks) 3.00 -> 2.83 ms,
//   B2xT16384 (128) 7.30 -> 6.53 ms; distill step B8xT2048 (256) unchanged (85.9 / 85.7 ms);
// - two operand buffers (each chunk's operands loaded one chunk ahead), 157 KB: one block per SM. Chosen for more
//   blocks: at B8xT4096 H16 (512 blocks, two waves at two per SM) the one-buffer version took 7.47 ms against 6.55,
//   because the states it keeps for the backward pushed the chunk operands that the other column tiles' blocks
//   still had to read out of L2 (DRAM reads 2.0 GB against 0.96 GB per pass, L2 hit rate 64% against 80%;
//   storing the states evict-first did not help).
// HYD_KDA_PASS_STG=0 / 1 forces one version (for measuring).
bool passes_stg(int64_t blocks) {
  static const int forced = [] {
    const char* e = std::getenv("HYD_KDA_PASS_STG");
    return e != nullptr && (e[0] == '0' || e[0] == '1') ? e[0] - '0' : -1;
  }();
  if (forced >= 0) return forced == 1;
  return blocks <= 2 * int64_t{current_sm_count()};
}

// A windowed pass's shared memory, padded (HYD_KDA_WINDOW_PAD_KB, default 200 KB; 0: none) so that the
// chunk-parallel kernels running beside it do not share its SMs, where they slow its chunk steps down (H200,
// bench_kda B1xT32768 saving fwd+bwd, 8 windows: 7.67-7.73 ms unpadded, 7.56-7.60 ms padded to 120 KB (no products
// block fits beside it), 7.31 ms padded to 200 KB; docs/benchmarks.md stop 26).
size_t window_bytes(size_t bytes, const PassWindow& win) {
  if (win.carry == nullptr) return bytes;
  const char* e = std::getenv("HYD_KDA_WINDOW_PAD_KB");
  const size_t pad = (e != nullptr && e[0] != '\0' ? static_cast<size_t>(std::atoi(e)) : 200) * 1024;
  return std::max(bytes, pad);
}

// The state passes' width: 32 state columns per block and 8 warps (kBV), or 64 columns and 16 warps. At 64 each
// warp's share of a chunk step stays the same, a block's operand loads (w, qg, kg, Aqk, u of the chunk) serve twice
// the columns, and the grid halves; shared memory 198 / 177 KB (two-buffer state / reverse pass), 123 / 120 KB
// (one-buffer), one block per SM. It pays where the 32-column grid takes more than kPassWideWaves waves of the SMs
// and loses where the halved grid leaves SMs idle. H200, bench_kda saving fwd+bwd (docs/benchmarks.md stop 27):
// B3xT4096 H16 (192 blocks of 32 columns) 2.86 -> 2.47 ms, B4xT4096 (256) 2.85 -> 2.81, B6xT4096 (384) 4.50 -> 4.50,
// B8xT4096 (512) 6.58 -> 6.04; but B2xT16384 (128, one wave) 6.57 -> 7.36 ms and B1xT32768 (64) 7.32 -> 8.26 ms.
// HYD_KDA_PASS_BV=32 / 64 forces a width (read on every call).
constexpr int kPassWideWaves = 1;
int pass_bv(const KdaDims& s, int DV) {
  const char* e = std::getenv("HYD_KDA_PASS_BV");
  const int forced = e != nullptr ? std::atoi(e) : 0;
  if (DV % 64 != 0) return kBV;
  if (forced == 32 || forced == 64) return forced;
  return static_cast<int64_t>(doc_grid(s, DV).x) > kPassWideWaves * int64_t{current_sm_count()} ? 64 : kBV;
}

// The forward state pass over every document (o, final_state, states_hi / lo, vn optional; win: a window of chunks).
template <int DK, int DV>
void state_impl(const KdaDims& s, const int32_t* cu, const int32_t* chunk_off, const float* initial_state, bf16* o,
                float* final_state, const FwdBuffers& f, cudaStream_t st, __nv_bfloat16* states_hi = nullptr,
                __nv_bfloat16* states_lo = nullptr, __nv_bfloat16* vn = nullptr, const PassWindow& win = {}) {
  const int bv = pass_bv(s, DV);  // state columns per block; 8 warps per 32
  auto go = [&](auto kernel, const dim3 grid, size_t bytes) {
    bytes = window_bytes(bytes, win);
    set_smem(kernel, bytes);
    kernel<<<grid, 8 * bv, bytes, st>>>(s, cu, chunk_off, f.w, f.u, f.qg, f.kg, f.aqk, f.gl,
                                                           initial_state, as_nv(o), final_state, states_hi, states_lo,
                                                           vn, win);
  };
  const dim3 grid = doc_grid(s, DV, bv);
  const bool one = passes_stg(grid.x);
  if (bv == 64)
    one ? go(state_kernel<DK, DV, true, 64>, grid, StateLayout<DK, true, 64>::bytes)
        : go(state_kernel<DK, DV, false, 64>, grid, StateLayout<DK, false, 64>::bytes);
  else
    one ? go(state_kernel<DK, DV, true>, grid, StateLayout<DK, true>::bytes)
        : go(state_kernel<DK, DV, false>, grid, StateLayout<DK, false>::bytes);
  CHECK_LAUNCH();
}

template <int DK, int DV>
void forward_impl(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                  const int32_t* cu, const int32_t* chunk_off, const float* initial_state, bf16* o, float* final_state,
                  const FwdBuffers& f, cudaStream_t st) {
  prep_impl<DK, DV>(s, q, k, v, g, beta, cu, chunk_off, f, st);
  state_impl<DK, DV>(s, cu, chunk_off, initial_state, o, final_state, f, st);
}

// The recomputing backward's state pass runs on a second stream beside the reverse pass: both read only the prep
// (and the reverse pass dout), and they write different buffers; each is sequential over a document's chunks with
// documents x value heads x DV / kBV blocks, a quarter of an H100 or less when a batch holds few long documents
// (B = 1 at 16k tokens and 8 heads: 32 blocks each), where they would otherwise run one after the other.
// Only when a pass's blocks fill at most half of the SMs: H200, bench_kda (2026-11-28), recomputing fwd+bwd
// B1xT16384 H=16 (64 blocks) 5.95 -> 5.62 ms, B1xT32768 11.85 -> 11.59 ms, but B8xT4096 (512 blocks)
// 9.85 -> 10.10 ms. One stream and two events per device, created on first use and kept for the process; null
// with HYD_KDA_CONCURRENT=0 (one after the other, for measuring against) or when the pass has more blocks.
constexpr int kMaxWindows = 16;
struct SideStream {
  cudaStream_t stream = nullptr;  // the device's highest priority
  cudaEvent_t fork = nullptr, join = nullptr;
  cudaEvent_t win[kMaxWindows] = {};  // one per window of a pipelined pass (pass_windows)
  int sms = 0;
};
// The current device's side stream and events, created on first use and kept for the process.
// which = 1: a second one (LASP-2's windowed forward runs two passes beside the prep: forward_saving_lasp).
const SideStream& device_side(int which = 0) {
  constexpr int kMaxDevices = 64;
  static SideStream sides[2][kMaxDevices];
  static std::mutex mu;
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  HYD_CHECK(dev >= 0 && dev < kMaxDevices, "kda: device ", dev, " beyond ", kMaxDevices);
  std::lock_guard<std::mutex> lock(mu);
  SideStream& side = sides[which == 0 ? 0 : 1][dev];
  if (side.stream == nullptr) {
    int least = 0, greatest = 0;
    CHECK_CUDA(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    CHECK_CUDA(cudaStreamCreateWithPriority(&side.stream, cudaStreamNonBlocking, greatest));
    CHECK_CUDA(cudaEventCreateWithFlags(&side.fork, cudaEventDisableTiming));
    CHECK_CUDA(cudaEventCreateWithFlags(&side.join, cudaEventDisableTiming));
    for (cudaEvent_t& e : side.win) CHECK_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    side.sms = current_sm_count();
  }
  return side;
}
const SideStream* side_stream(int64_t pass_blocks) {
  static const bool on = [] {
    const char* e = std::getenv("HYD_KDA_CONCURRENT");
    return !(e != nullptr && e[0] == '0');
  }();
  if (!on) return nullptr;
  const SideStream& side = device_side();
  return 2 * pass_blocks <= side.sms ? &side : nullptr;
}

// Pipelined windows. A batch whose state passes fill at most half of the SMs (one document of 32k tokens at 16
// heads: 64 blocks of an H200's 132) leaves the rest of the GPU idle while a pass walks its chunks. Split into windows
// of consecutive chunks of the packed batch, the chunk-parallel kernels of one window run beside the sequential pass
// over another: the saving forward's prep of window w + 1 beside the state pass over window w, the saved
// backward's products of window w + 1 beside the reverse pass over window w. The passes run on the side stream
// (highest priority, so their blocks are placed first when SMs free up) and carry the state of a document cut by
// a window edge in f32 (PassWindow), as they do from chunk to chunk: the results equal the unwindowed ones bit for
// bit. Default: one window per 64 chunks, at most 16 (kMaxWindows), when the batch is one document and the passes
// fill at most half of the SMs.
// H200, bench_kda saving fwd+bwd (docs/benchmarks.md stop 26): B1xT32768 (64 blocks) 8.33 ms unwindowed, 7.87 / 7.72
// / 7.73 / 7.82 with 2 / 4 / 8 / 16 windows (unpadded); B1xT131072 33.38, 30.55 (8), 30.02 (16). With more blocks
// the GPU is busy anyway and windows cost time: B8xT4096 (512 blocks) 6.59 ms unwindowed, 6.66 / 6.79 / 7.37 with
// 2 / 4 / 8 windows. Several documents: the windows cut the packed chunk order, so a window holds the chunks of one
// document or a few, and the passes that ran the documents side by side run them one after the other (two documents
// of 8192 tokens, 8 heads, 4 windows: each window's pass walks half of one document with a quarter of the blocks;
// issue 9's distill step at B2xT8192, stop 28: 113.9 ms windowed, 109.4 ms not). HYD_KDA_WINDOWS=N forces N windows
// (1: none), read on every call. passes: how many state passes run beside the chunk-parallel kernels (2: LASP-2's
// zero-state and transition passes, forward_saving_lasp); all of them together must fill at most half of the SMs
// (each windowed pass block takes an SM of its own, window_bytes).
int pass_windows(const KdaDims& s, int DV, int passes = 1) {
  const int64_t chunks = kda_chunk::max_chunks(s);
  int64_t w = 1;
  const char* e = std::getenv("HYD_KDA_WINDOWS");
  if (e != nullptr && e[0] != '\0')
    w = std::atoi(e);
  else if (s.num_docs == 1 && 2 * passes * static_cast<int64_t>(doc_grid(s, DV).x) <= current_sm_count())
    w = chunks / 64;
  return static_cast<int>(std::clamp<int64_t>(w, 1, std::min<int64_t>(kMaxWindows, std::max<int64_t>(chunks, 1))));
}

// pass_windows' windows: chunks [w per, (w + 1) per) of the packed batch, and the carried states (stream-ordered
// scratch, as the initial / final states: documents x value heads x dk x dv f32).
struct Windows {
  int64_t per;
  StreamScratch carry;
  Windows(const KdaDims& s, int windows, int DK, int DV, cudaStream_t st)
      : per((kda_chunk::max_chunks(s) + windows - 1) / windows),
        carry(static_cast<size_t>(s.num_docs) * static_cast<size_t>(s.hv) * DK * DV, st) {}
  PassWindow pass(int w) const { return PassWindow{w * per, (w + 1) * per, carry.get()}; }
};

// The reverse state pass over a document's chunks (dout may be null: zero output gradients).
template <int DK, int DV>
void reverse_impl(const KdaDims& s, const int32_t* cu, const int32_t* chunk_off, const bf16* dout,
                  const float* dfinal_state, float* dinitial_state, __nv_bfloat16* dstates_hi,
                  __nv_bfloat16* dstates_lo, __nv_bfloat16* ndvn, const FwdBuffers& f, cudaStream_t st,
                  const PassWindow& win = {}) {
  const int bv = pass_bv(s, DV);  // state columns per block; 8 warps per 32
  auto go = [&](auto kernel, const dim3 grid, size_t bytes) {
    bytes = window_bytes(bytes, win);
    set_smem(kernel, bytes);
    kernel<<<grid, 8 * bv, bytes, st>>>(s, cu, chunk_off, f.w, f.qg, f.kg, f.aqk, f.gl, as_nv(dout),
                                                           dfinal_state, dstates_hi, dstates_lo, ndvn, dinitial_state,
                                                           win);
  };
  const dim3 grid = doc_grid(s, DV, bv);
  const bool one = passes_stg(grid.x);
  if (bv == 64)
    one ? go(reverse_kernel<DK, DV, true, 64>, grid, ReverseLayout<DK, true, 64>::bytes)
        : go(reverse_kernel<DK, DV, false, 64>, grid, ReverseLayout<DK, false, 64>::bytes);
  else
    one ? go(reverse_kernel<DK, DV, true>, grid, ReverseLayout<DK, true>::bytes)
        : go(reverse_kernel<DK, DV, false>, grid, ReverseLayout<DK, false>::bytes);
  CHECK_LAUNCH();
}

template <int DK, int DV>
void products_impl(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                   const int32_t* cu, const int32_t* chunk_off, const bf16* dout, bf16* dq, bf16* dk, bf16* dv,
                   float* dg, float* dbeta, const kda_chunk::Scratch& sc, const __nv_bfloat16* states_hi,
                   const __nv_bfloat16* states_lo, const __nv_bfloat16* vn, cudaStream_t st, int64_t c_base = 0,
                   int64_t grid_chunks = -1);

template <int DK, int DV>
void backward_impl(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                   const int32_t* cu, const int32_t* chunk_off, const float* initial_state, const bf16* dout,
                   const float* dfinal_state, bf16* dq, bf16* dk, bf16* dv, float* dg, float* dbeta,
                   float* dinitial_state, const kda_chunk::Scratch& sc, const FwdBuffers& f, cudaStream_t st,
                   bool recompute = true) {
  const int64_t mc = kda_chunk::max_chunks(s);
  const dim3 chunk_grid(static_cast<unsigned>(mc), static_cast<unsigned>(s.hv));
  const dim3 docs = doc_grid(s, DV);
  if (mc > 0 && recompute) {
    using PL = PrepLayout<DK, DV>;
    set_smem(prep_kernel<DK, DV>, PL::bytes);
    prep_kernel<DK, DV><<<chunk_grid, kThreads, PL::bytes, st>>>(
        s, as_nv(q), as_nv(k), as_nv(v), g, beta, cu, chunk_off, f.w, f.u, f.qg, f.kg, f.aqk, f.gl, sc.x, int64_t{0});
    CHECK_LAUNCH();
  }
  // S_in / dS_out of every chunk as hi + lo bf16 pairs in the f32-sized buffers of sc; v_new and
  // -dv_new as bf16 in the first half of theirs.
  const size_t state_elems = static_cast<size_t>(mc) * static_cast<size_t>(s.hv) * DK * DV;
  __nv_bfloat16* states_hi = reinterpret_cast<__nv_bfloat16*>(sc.states);
  __nv_bfloat16* dstates_hi = reinterpret_cast<__nv_bfloat16*>(sc.dstates);
  __nv_bfloat16* vn = reinterpret_cast<__nv_bfloat16*>(sc.vn);
  __nv_bfloat16* ndvn = reinterpret_cast<__nv_bfloat16*>(sc.dvn);
  const int windows = recompute ? 1 : pass_windows(s, DV);
  if (windows > 1) {  // the reverse pass over window w beside the products of window w + 1 (pass_windows)
    const SideStream& side = device_side();
    const Windows win(s, windows, DK, DV, st);
    CHECK_CUDA(cudaEventRecord(side.fork, st));  // after whatever wrote dout
    CHECK_CUDA(cudaStreamWaitEvent(side.stream, side.fork, 0));
    for (int w = windows - 1; w >= 0; --w) {
      reverse_impl<DK, DV>(s, cu, chunk_off, dout, dfinal_state, dinitial_state, dstates_hi, dstates_hi + state_elems,
                           ndvn, f, side.stream, win.pass(w));
      CHECK_CUDA(cudaEventRecord(side.win[w], side.stream));
      CHECK_CUDA(cudaStreamWaitEvent(st, side.win[w], 0));
      products_impl<DK, DV>(s, q, k, v, g, beta, cu, chunk_off, dout, dq, dk, dv, dg, dbeta, sc, states_hi,
                            states_hi + state_elems, vn, st, w * win.per, win.per);
    }
    return;  // st has waited for the last reverse window (w = 0)
  }
  // (Not when dinitial_state overwrites initial_state, which the state pass reads.)
  const bool aliased = dinitial_state != nullptr && static_cast<const void*>(dinitial_state) == initial_state;
  const SideStream* side = recompute && !aliased ? side_stream(docs.x) : nullptr;
  if (recompute) {
    cudaStream_t state_st = st;
    if (side != nullptr) {  // after the prep
      CHECK_CUDA(cudaEventRecord(side->fork, st));
      CHECK_CUDA(cudaStreamWaitEvent(side->stream, side->fork, 0));
      state_st = side->stream;
    }
    state_impl<DK, DV>(s, cu, chunk_off, initial_state, nullptr, nullptr, f, state_st, states_hi,
                       states_hi + state_elems, vn);
    if (side != nullptr) CHECK_CUDA(cudaEventRecord(side->join, side->stream));
  }
  reverse_impl<DK, DV>(s, cu, chunk_off, dout, dfinal_state, dinitial_state, dstates_hi, dstates_hi + state_elems, ndvn,
                       f, st);
  if (side != nullptr) CHECK_CUDA(cudaStreamWaitEvent(st, side->join, 0));  // the products read S_in and v_new
  products_impl<DK, DV>(s, q, k, v, g, beta, cu, chunk_off, dout, dq, dk, dv, dg, dbeta, sc, states_hi,
                        states_hi + state_elems, vn, st);
}

// The backward after its reverse pass: the per-chunk products and the intra-chunk gradients (parallel over chunks).
template <int DK, int DV>
void products_impl(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                   const int32_t* cu, const int32_t* chunk_off, const bf16* dout, bf16* dq, bf16* dk, bf16* dv,
                   float* dg, float* dbeta, const kda_chunk::Scratch& sc, const __nv_bfloat16* states_hi,
                   const __nv_bfloat16* states_lo, const __nv_bfloat16* vn, cudaStream_t st, int64_t c_base,
                   int64_t grid_chunks) {
  const int64_t all = kda_chunk::max_chunks(s), mc = grid_chunks < 0 ? all : grid_chunks;
  const dim3 chunk_grid(static_cast<unsigned>(mc), static_cast<unsigned>(s.hv));
  const size_t state_elems = static_cast<size_t>(all) * static_cast<size_t>(s.hv) * DK * DV;
  const __nv_bfloat16* dstates_hi = reinterpret_cast<const __nv_bfloat16*>(sc.dstates);
  const __nv_bfloat16* ndvn = reinterpret_cast<const __nv_bfloat16*>(sc.dvn);
  if (mc > 0) {
    using QL = ProductsHalfLayout<DK, DV>;
    using IL = IntraLayout<DK>;
    set_smem(products_half_kernel<DK, DV>, QL::bytes);
    set_smem(intra_kernel<DK>, IL::bytes);
    // One head group after the other (the products' buffers hold one group: kda_chunk::product_group_heads).
    const int hvg = static_cast<int>(kda_chunk::product_group_heads(s));
    for (int hv0 = 0; hv0 < s.hv; hv0 += hvg) {
      const unsigned heads = static_cast<unsigned>(std::min<int64_t>(hvg, s.hv - hv0));
      products_half_kernel<DK, DV><<<dim3(2 * chunk_grid.x, heads), kThreads, QL::bytes, st>>>(
          s, cu, chunk_off, states_hi, states_lo, dstates_hi, dstates_hi + state_elems, vn, ndvn, sc.x, beta,
          as_nv(dout), as_nv(v), sc.dqg, sc.dkg, sc.dw, sc.dgls, sc.daqk, sc.dtv, as_nv(dv), hv0, hvg, c_base);
      CHECK_LAUNCH();
      intra_kernel<DK><<<dim3(chunk_grid.x, heads), kThreads, IL::bytes, st>>>(
          s, as_nv(q), as_nv(k), g, beta, cu, chunk_off, sc.x, sc.daqk, sc.dtv, sc.dqg, sc.dkg, sc.dw, sc.dgls,
          sc.dq_hv, sc.dk_hv, as_nv(dq), as_nv(dk), dg, dbeta, hv0, hvg, c_base);
      CHECK_LAUNCH();
    }
  }
}

template <class F>
void with_dims(const KdaDims& s, F&& f) {
  if (s.dk == 128 && s.dv == 128)
    f.template operator()<128, 128>();
  else if (s.dk == 128)
    f.template operator()<128, 64>();
  else if (s.dv == 128)
    f.template operator()<64, 128>();
  else
    f.template operator()<64, 64>();
}

}  // namespace

size_t forward_scratch_bytes(const KdaDims& s) {
  FwdBuffers f{};
  return carve(s, nullptr, f);
}

void forward(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
             const int32_t* cu_seqlens, const int32_t* chunk_off, const float* initial_state, bf16* o,
             float* final_state, void* scratch, void* stream_ptr) {
  cudaStream_t stream = as_stream(stream_ptr);
  HYD_CHECK(supports(s), "kda_mma::forward: dk ", s.dk, " / dv ", s.dv, " not supported");
  HYD_CHECK(s.num_docs <= 0x7fffffffLL && s.hv <= 65535, "kda_mma::forward: grid too large");
  FwdBuffers f{};
  carve(s, static_cast<unsigned char*>(scratch), f);
  with_dims(s, [&]<int DK, int DV>() {
    forward_impl<DK, DV>(s, q, k, v, g, beta, cu_seqlens, chunk_off, initial_state, o, final_state, f, stream);
  });
}

void forward_prepare(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                     const int32_t* cu_seqlens, const int32_t* chunk_off, void* scratch, void* stream_ptr) {
  HYD_CHECK(supports(s), "kda_mma::forward_prepare: dk ", s.dk, " / dv ", s.dv, " not supported");
  HYD_CHECK(s.num_docs <= 0x7fffffffLL && s.hv <= 65535, "kda_mma::forward_prepare: grid too large");
  FwdBuffers f{};
  carve(s, static_cast<unsigned char*>(scratch), f);
  with_dims(s, [&]<int DK, int DV>() {
    prep_impl<DK, DV>(s, q, k, v, g, beta, cu_seqlens, chunk_off, f, as_stream(stream_ptr));
  });
}

void forward_state(const KdaDims& s, const int32_t* cu_seqlens, const int32_t* chunk_off, const float* initial_state,
                   bf16* o, float* final_state, const void* scratch, const float* zero_u, void* stream_ptr) {
  HYD_CHECK(supports(s), "kda_mma::forward_state: dk ", s.dk, " / dv ", s.dv, " not supported");
  HYD_CHECK(zero_u == nullptr || o == nullptr, "kda_mma::forward_state: a zero-value pass has no output");
  FwdBuffers f{};
  carve(s, static_cast<unsigned char*>(const_cast<void*>(scratch)), f);
  const cudaStream_t st = as_stream(stream_ptr);
  if (zero_u != nullptr) {  // values zero, dk columns: u = T v = 0
    f.u = const_cast<float*>(zero_u);
    KdaDims m = s;
    m.dv = s.dk;
    with_dims(m, [&]<int DK, int DV>() {
      state_impl<DK, DV>(m, cu_seqlens, chunk_off, initial_state, nullptr, final_state, f, st);
    });
    return;
  }
  with_dims(
      s, [&]<int DK, int DV>() { state_impl<DK, DV>(s, cu_seqlens, chunk_off, initial_state, o, final_state, f, st); });
}

void initial_adjoint(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                     const int32_t* cu_seqlens, const int32_t* chunk_off, const bf16* dout, float* dinitial_state,
                     void* scratch, void* stream_ptr) {
  HYD_CHECK(supports(s), "kda_mma::initial_adjoint: dk ", s.dk, " / dv ", s.dv, " not supported");
  HYD_CHECK(s.num_docs <= 0x7fffffffLL && s.hv <= 65535, "kda_mma::initial_adjoint: grid too large");
  FwdBuffers f{};
  carve(s, static_cast<unsigned char*>(scratch), f);
  const cudaStream_t st = as_stream(stream_ptr);
  with_dims(s, [&]<int DK, int DV>() {
    prep_impl<DK, DV>(s, q, k, v, g, beta, cu_seqlens, chunk_off, f, st);
    reverse_impl<DK, DV>(s, cu_seqlens, chunk_off, dout, nullptr, dinitial_state, nullptr, nullptr, nullptr, f, st);
  });
}

void backward_products(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                       const float* beta, const int32_t* cu_seqlens, const int32_t* chunk_off,
                       const float* initial_state, const bf16* dout, const float* dfinal_state, bf16* dq, bf16* dk,
                       bf16* dv, float* dg, float* dbeta, float* dinitial_state, const kda_chunk::Scratch& sc,
                       void* scratch, void* stream_ptr) {
  cudaStream_t stream = as_stream(stream_ptr);
  HYD_CHECK(supports(s), "kda_mma::backward_products: dk ", s.dk, " / dv ", s.dv, " not supported");
  HYD_CHECK(s.num_docs <= 0x7fffffffLL && s.hv <= 65535, "kda_mma::backward_products: grid too large");
  FwdBuffers f{};
  carve(s, static_cast<unsigned char*>(scratch), f);
  with_dims(s, [&]<int DK, int DV>() {
    // dq, dk straight from the intra-chunk kernel when there is no GQA group to sum over.
    bf16* dq_direct = s.hv == s.h ? dq : nullptr;
    bf16* dk_direct = s.hv == s.h ? dk : nullptr;
    backward_impl<DK, DV>(s, q, k, v, g, beta, cu_seqlens, chunk_off, initial_state, dout, dfinal_state, dq_direct,
                          dk_direct, dv, dg, dbeta, dinitial_state, sc, f, stream);
  });
}

// What the saving forward keeps for backward_saved, carved from one buffer: the chunk table, the prep (FwdBuffers)
// without u (only the forward's state pass reads it: the caller holds it, kernels/cuda/kda.cu), X (f32
// [ch][C][C]), every chunk's incoming state as hi + lo bf16 ([ch][dk][dv] each, hi then lo) and v_new (bf16
// [ch][C][dv]); the same layout as backward_products' own buffers for these.
struct SavedBuffers {
  int32_t* chunk_off = nullptr;
  FwdBuffers f{};
  float* x = nullptr;
  __nv_bfloat16* states = nullptr;
  __nv_bfloat16* vn = nullptr;
};

size_t carve_saved(const KdaDims& s, unsigned char* base, SavedBuffers& b) {
  const size_t ch = static_cast<size_t>(kda_chunk::max_chunks(s)) * static_cast<size_t>(s.hv);
  Carver cv{base};
  b.chunk_off = reinterpret_cast<int32_t*>(cv.take((static_cast<size_t>(s.num_docs) + 1) * 4));
  FwdBuffers counted{};
  unsigned char* prep = cv.take(carve(s, nullptr, counted, false));
  if (base) carve(s, prep, b.f, false);
  b.x = reinterpret_cast<float*>(cv.take(ch * C * C * 4));
  b.states = reinterpret_cast<__nv_bfloat16*>(cv.take(ch * static_cast<size_t>(s.dk * s.dv) * 4));
  b.vn = reinterpret_cast<__nv_bfloat16*>(cv.take(ch * C * static_cast<size_t>(s.dv) * 2));
  return cv.used;
}

size_t saved_bytes(const KdaDims& s) {
  SavedBuffers b;
  return carve_saved(s, nullptr, b);
}

int32_t* saved_chunk_table(const KdaDims& s, void* saved) {
  SavedBuffers b;
  carve_saved(s, static_cast<unsigned char*>(saved), b);
  return b.chunk_off;
}

namespace {

// Elements of a per-chunk buffer of dk x cols per chunk and value head (the kept states and their adjoints: cols = dv;
// the transitions P_c / R_c: cols = dk); hi + lo bf16 halves lie this many elements apart.
size_t chunk_elems(const KdaDims& s, int64_t cols) {
  return static_cast<size_t>(kda_chunk::max_chunks(s)) * static_cast<size_t>(s.hv) * static_cast<size_t>(s.dk) *
         static_cast<size_t>(cols);
}

// The correction kernel over every chunk (forward: rows = w, o given; backward: rows = kg, o, qg, aqk null), after
// the incoming states (adjoints) are split and flagged.
void correct_launch(const KdaDims& s, const int32_t* cu_seqlens, const int32_t* chunk_off, const float* initial,
                    const bf16* transitions, const __nv_bfloat16* rows, const __nv_bfloat16* qg,
                    const __nv_bfloat16* aqk, __nv_bfloat16* states_hi, __nv_bfloat16* vn, bf16* o, void* stream_ptr,
                    const char* op) {
  const int64_t mc = kda_chunk::max_chunks(s);
  if (mc == 0) return;
  HYD_CHECK(mc * s.hv < (int64_t{1} << 31) && s.num_docs * s.hv < (int64_t{1} << 31), op, ": grid too large");
  const cudaStream_t st = as_stream(stream_ptr);
  const __nv_bfloat16* p_hi = as_nv(transitions);
  const size_t state = static_cast<size_t>(s.num_docs * s.hv * s.dk * s.dv);
  // S_in's hi and lo halves, then the flags.
  StreamScratchOf<unsigned char> scratch(state * 4 + static_cast<size_t>(s.num_docs * s.hv) * 4 + 16, st);
  __nv_bfloat16* sin_hi = reinterpret_cast<__nv_bfloat16*>(scratch.get());
  int32_t* nonzero = reinterpret_cast<int32_t*>(sin_hi + 2 * state);
  with_dims(s, [&]<int DK, int DV>() {
    split_incoming_kernel<DK, DV><<<static_cast<unsigned>(s.num_docs * s.hv), kThreads, 0, st>>>(
        static_cast<int>(s.hv), initial, sin_hi, sin_hi + state, nonzero);
    CHECK_LAUNCH();
    using Lt = CorrectLayout<DK>;
    set_smem(correct_kernel<DK, DV>, Lt::bytes);
    correct_kernel<DK, DV><<<static_cast<unsigned>(mc * s.hv), kThreads, Lt::bytes, st>>>(
        s, cu_seqlens, chunk_off, sin_hi, sin_hi + state, nonzero, p_hi, p_hi + chunk_elems(s, s.dk), rows, qg, aqk,
        states_hi, states_hi + chunk_elems(s, s.dv), vn, as_nv(o));
    CHECK_LAUNCH();
  });
}

}  // namespace

size_t saving_u_bytes(const KdaDims& s) {
  return std::max<size_t>(static_cast<size_t>(kda_chunk::max_chunks(s)) * static_cast<size_t>(s.hv) * C *
                              static_cast<size_t>(s.dv) * sizeof(float),
                          16);
}

void forward_saving_prepare(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                            const float* beta, const int32_t* cu_seqlens, void* saved, float* u, void* stream_ptr) {
  HYD_CHECK(supports(s), "kda_mma::forward_saving_prepare: dk ", s.dk, " / dv ", s.dv, " not supported");
  HYD_CHECK(s.num_docs <= 0x7fffffffLL && s.hv <= 65535, "kda_mma::forward_saving_prepare: grid too large");
  SavedBuffers b;
  carve_saved(s, static_cast<unsigned char*>(saved), b);
  b.f.u = u;
  with_dims(s, [&]<int DK, int DV>() {
    prep_impl<DK, DV>(s, q, k, v, g, beta, cu_seqlens, b.chunk_off, b.f, as_stream(stream_ptr), b.x);
  });
}

int saving_windows(const KdaDims& s) {
  HYD_CHECK(supports(s), "kda_mma::saving_windows: dk ", s.dk, " / dv ", s.dv, " not supported");
  return pass_windows(s, static_cast<int>(s.dv));
}

void forward_saving(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                    const int32_t* cu_seqlens, const float* initial_state, bf16* o, float* final_state, void* saved,
                    float* u, void* stream_ptr) {
  HYD_CHECK(supports(s), "kda_mma::forward_saving: dk ", s.dk, " / dv ", s.dv, " not supported");
  HYD_CHECK(s.num_docs <= 0x7fffffffLL && s.hv <= 65535, "kda_mma::forward_saving: grid too large");
  SavedBuffers b;
  carve_saved(s, static_cast<unsigned char*>(saved), b);
  b.f.u = u;
  const cudaStream_t st = as_stream(stream_ptr);
  __nv_bfloat16* lo = b.states + chunk_elems(s, s.dv);
  with_dims(s, [&]<int DK, int DV>() {
    const int windows = pass_windows(s, DV);
    if (windows == 1) {
      prep_impl<DK, DV>(s, q, k, v, g, beta, cu_seqlens, b.chunk_off, b.f, st, b.x);
      state_impl<DK, DV>(s, cu_seqlens, b.chunk_off, initial_state, o, final_state, b.f, st, b.states, lo, b.vn);
      return;
    }
    // The prep of window w + 1 (on st) beside the state pass over window w (pass_windows).
    const SideStream& side = device_side();
    const Windows win(s, windows, DK, DV, st);
    for (int w = 0; w < windows; ++w) {
      prep_impl<DK, DV>(s, q, k, v, g, beta, cu_seqlens, b.chunk_off, b.f, st, b.x, w * win.per, win.per);
      CHECK_CUDA(cudaEventRecord(side.win[w], st));
      CHECK_CUDA(cudaStreamWaitEvent(side.stream, side.win[w], 0));
      state_impl<DK, DV>(s, cu_seqlens, b.chunk_off, initial_state, o, final_state, b.f, side.stream, b.states, lo,
                         b.vn, win.pass(w));
    }
    CHECK_CUDA(cudaEventRecord(side.join, side.stream));
    CHECK_CUDA(cudaStreamWaitEvent(st, side.join, 0));
  });
}

void forward_saving_pass(const KdaDims& s, const int32_t* cu_seqlens, const float* initial_state, bf16* o,
                         float* final_state, void* saved, const float* u, void* stream_ptr) {
  SavedBuffers b;
  carve_saved(s, static_cast<unsigned char*>(saved), b);
  b.f.u = const_cast<float*>(u);
  with_dims(s, [&]<int DK, int DV>() {
    state_impl<DK, DV>(s, cu_seqlens, b.chunk_off, initial_state, o, final_state, b.f, as_stream(stream_ptr), b.states,
                       b.states + chunk_elems(s, s.dv), b.vn);
  });
}

void forward_saving_transition(const KdaDims& s, const int32_t* cu_seqlens, const float* initial_state,
                               float* final_state, const void* saved, const float* zero_u, void* stream_ptr,
                               bf16* transitions) {
  SavedBuffers b;
  carve_saved(s, static_cast<unsigned char*>(const_cast<void*>(saved)), b);
  b.f.u = const_cast<float*>(zero_u);
  KdaDims m = s;  // values zero, dk columns: u = T v = 0
  m.dv = s.dk;
  __nv_bfloat16* p_hi = transitions ? as_nv(transitions) : nullptr;
  with_dims(m, [&]<int DK, int DV>() {
    state_impl<DK, DV>(m, cu_seqlens, b.chunk_off, initial_state, nullptr, final_state, b.f, as_stream(stream_ptr),
                       p_hi, p_hi ? p_hi + chunk_elems(s, s.dk) : nullptr);
  });
}

size_t transitions_bytes(const KdaDims& s) { return std::max<size_t>(chunk_elems(s, s.dk) * 4, 16); }
void forward_saving_lasp(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                         const float* beta, const int32_t* cu_seqlens, bf16* o, float* final_state, void* saved,
                         float* u, const float* zero_u, const float* eye, float* transition_final, bf16* transitions,
                         void* stream_ptr) {
  HYD_CHECK(supports(s), "kda_mma::forward_saving_lasp: dk ", s.dk, " / dv ", s.dv, " not supported");
  HYD_CHECK(s.num_docs <= 0x7fffffffLL && s.hv <= 65535, "kda_mma::forward_saving_lasp: grid too large");
  SavedBuffers b;
  carve_saved(s, static_cast<unsigned char*>(saved), b);
  b.f.u = u;
  FwdBuffers fm = b.f;  // the transition pass: zero values over dk columns (u = T v = 0)
  fm.u = const_cast<float*>(zero_u);
  KdaDims m = s;
  m.dv = s.dk;
  const cudaStream_t st = as_stream(stream_ptr);
  __nv_bfloat16* lo = b.states + chunk_elems(s, s.dv);
  __nv_bfloat16* p_hi = as_nv(transitions);
  __nv_bfloat16* p_lo = p_hi != nullptr ? p_hi + chunk_elems(s, s.dk) : nullptr;
  with_dims(s, [&]<int DK, int DV>() {
    const int windows = pass_windows(s, DV, 2);  // (two passes beside the prep)
    const SideStream& side = device_side(0);   // the zero-state pass
    const SideStream& side2 = device_side(1);  // the transition pass
    if (windows == 1) {                        // the prep, then both passes side by side
      prep_impl<DK, DV>(s, q, k, v, g, beta, cu_seqlens, b.chunk_off, b.f, st, b.x);
      CHECK_CUDA(cudaEventRecord(side2.fork, st));
      CHECK_CUDA(cudaStreamWaitEvent(side2.stream, side2.fork, 0));
      state_impl<DK, DK>(m, cu_seqlens, b.chunk_off, eye, nullptr, transition_final, fm, side2.stream, p_hi, p_lo);
      state_impl<DK, DV>(s, cu_seqlens, b.chunk_off, nullptr, o, final_state, b.f, st, b.states, lo, b.vn);
      CHECK_CUDA(cudaEventRecord(side2.join, side2.stream));
      CHECK_CUDA(cudaStreamWaitEvent(st, side2.join, 0));
      return;
    }
    // The prep of window w + 1 (on st) beside both passes over window w (pass_windows), each pass carrying its own
    // state across the window edges.
    const Windows win(s, windows, DK, DV, st), win_m(m, windows, DK, DK, st);
    for (int w = 0; w < windows; ++w) {
      prep_impl<DK, DV>(s, q, k, v, g, beta, cu_seqlens, b.chunk_off, b.f, st, b.x, w * win.per, win.per);
      CHECK_CUDA(cudaEventRecord(side.win[w], st));
      CHECK_CUDA(cudaStreamWaitEvent(side.stream, side.win[w], 0));
      CHECK_CUDA(cudaStreamWaitEvent(side2.stream, side.win[w], 0));
      state_impl<DK, DK>(m, cu_seqlens, b.chunk_off, eye, nullptr, transition_final, fm, side2.stream, p_hi, p_lo,
                         nullptr, win_m.pass(w));
      state_impl<DK, DV>(s, cu_seqlens, b.chunk_off, nullptr, o, final_state, b.f, side.stream, b.states, lo, b.vn,
                         win.pass(w));
    }
    CHECK_CUDA(cudaEventRecord(side.join, side.stream));
    CHECK_CUDA(cudaStreamWaitEvent(st, side.join, 0));
    CHECK_CUDA(cudaEventRecord(side2.join, side2.stream));
    CHECK_CUDA(cudaStreamWaitEvent(st, side2.join, 0));
  });
}

void forward_saving_correct(const KdaDims& s, const int32_t* cu_seqlens, const float* initial_state,
                            const bf16* transitions, bf16* o, void* saved, void* stream_ptr) {
  SavedBuffers b;
  carve_saved(s, static_cast<unsigned char*>(saved), b);
  correct_launch(s, cu_seqlens, b.chunk_off, initial_state, transitions, b.f.w, b.f.qg, b.f.aqk, b.states, b.vn, o,
                 stream_ptr, "kda_mma::forward_saving_correct");
}

void backward_saved(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                    const int32_t* cu_seqlens, const bf16* dout, const float* dfinal_state, bf16* dq, bf16* dk,
                    bf16* dv, float* dg, float* dbeta, float* dinitial_state, kda_chunk::Scratch& sc, const void* saved,
                    void* stream_ptr) {
  cudaStream_t stream = as_stream(stream_ptr);
  HYD_CHECK(supports(s), "kda_mma::backward_saved: dk ", s.dk, " / dv ", s.dv, " not supported");
  SavedBuffers b;
  carve_saved(s, static_cast<unsigned char*>(const_cast<void*>(saved)), b);
  sc.x = b.x;
  sc.states = reinterpret_cast<float*>(b.states);
  sc.vn = reinterpret_cast<float*>(b.vn);
  with_dims(s, [&]<int DK, int DV>() {
    bf16* dq_direct = s.hv == s.h ? dq : nullptr;
    bf16* dk_direct = s.hv == s.h ? dk : nullptr;
    backward_impl<DK, DV>(s, q, k, v, g, beta, cu_seqlens, b.chunk_off, nullptr, dout, dfinal_state, dq_direct,
                          dk_direct, dv, dg, dbeta, dinitial_state, sc, b.f, stream, false);
  });
}

void backward_saved_reverse(const KdaDims& s, const int32_t* cu_seqlens, const bf16* dout, const float* dfinal_state,
                            float* dinitial_state, kda_chunk::Scratch& sc, const void* saved, void* stream_ptr) {
  SavedBuffers b;
  carve_saved(s, static_cast<unsigned char*>(const_cast<void*>(saved)), b);
  __nv_bfloat16* dstates_hi = reinterpret_cast<__nv_bfloat16*>(sc.dstates);
  with_dims(s, [&]<int DK, int DV>() {
    reverse_impl<DK, DV>(s, cu_seqlens, b.chunk_off, dout, dfinal_state, dinitial_state, dstates_hi,
                         dstates_hi + chunk_elems(s, s.dv), reinterpret_cast<__nv_bfloat16*>(sc.dvn), b.f,
                         as_stream(stream_ptr));
  });
}

void backward_saved_transition(const KdaDims& s, const int32_t* cu_seqlens, const float* final_adjoint,
                               const void* saved, bf16* transitions, void* stream_ptr) {
  SavedBuffers b;
  carve_saved(s, static_cast<unsigned char*>(const_cast<void*>(saved)), b);
  KdaDims m = s;  // zero output gradients, dk columns
  m.dv = s.dk;
  __nv_bfloat16* r_hi = as_nv(transitions);
  with_dims(m, [&]<int DK, int DV>() {
    reverse_impl<DK, DV>(m, cu_seqlens, b.chunk_off, nullptr, final_adjoint, nullptr, r_hi, r_hi + chunk_elems(s, s.dk),
                         nullptr, b.f, as_stream(stream_ptr));
  });
}

void backward_saved_correct(const KdaDims& s, const int32_t* cu_seqlens, const float* dfinal_state,
                            const bf16* transitions, kda_chunk::Scratch& sc, const void* saved, void* stream_ptr) {
  SavedBuffers b;
  carve_saved(s, static_cast<unsigned char*>(const_cast<void*>(saved)), b);
  correct_launch(s, cu_seqlens, b.chunk_off, dfinal_state, transitions, b.f.kg, nullptr, nullptr,
                 reinterpret_cast<__nv_bfloat16*>(sc.dstates), reinterpret_cast<__nv_bfloat16*>(sc.dvn), nullptr,
                 stream_ptr, "kda_mma::backward_saved_correct");
}

void backward_saved_finish(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                           const float* beta, const int32_t* cu_seqlens, const bf16* dout, bf16* dq, bf16* dk, bf16* dv,
                           float* dg, float* dbeta, kda_chunk::Scratch& sc, const void* saved, void* stream_ptr) {
  SavedBuffers b;
  carve_saved(s, static_cast<unsigned char*>(const_cast<void*>(saved)), b);
  sc.x = b.x;
  with_dims(s, [&]<int DK, int DV>() {
    products_impl<DK, DV>(s, q, k, v, g, beta, cu_seqlens, b.chunk_off, dout, s.hv == s.h ? dq : nullptr,
                          s.hv == s.h ? dk : nullptr, dv, dg, dbeta, sc, b.states, b.states + chunk_elems(s, s.dv),
                          b.vn, as_stream(stream_ptr));
  });
}

}  // namespace hyd::kernels::cuda::kda_mma

// CUDA causal depthwise short convolution with SiLU (see kernels/short_conv.h for the math): bf16
// x, w, y, dy, dx; f32 dw; f32 math.
// Layout: blocks of 32 channels (threadIdx.x, coalesced along a token's row; 64 when the channel count is
// even and k <= 4, two adjacent channels per thread with paired 4-byte accesses) x 8 token runs
// (threadIdx.y). A thread walks a run of consecutive tokens of one channel with the last KMAX inputs
// in registers (a sliding window), so each x is loaded once per run. KMAX (4 or 16) is the compile-
// time window; a kernel size k < KMAX pads the taps with zero weights on the left.
// Taps are right-aligned: wr[i] = w[c, k-1-lag] with lag = KMAX-1-i (zero for lag >= k), and
// win[i] holds x at token t - lag, so u[t] = sum_i wr[i] win[i].
// The window is zeroed at every document start (cu_seqlens), so no tap reads another document, or,
// with a halo, loaded with the document's halo rows (only there: later tokens never read the halo).
// Backward: one pass per run computes du[s] for s in [t0, t1 + KMAX - 1) of the run's last document
// (recomputing u from the window), adds w * du into KMAX pending dx accumulators (token s - lag), and
// writes a token's dx once no later du can reach it. dw partial sums (du * window) are reduced over
// the block's 8 runs in shared memory and added to dw with one f32 atomicAdd per (block, c, tap).
// dhalo: the pending dx accumulators of the K-1 tokens before a document's start hold dhalo once
// complete; the run holding the document's first token writes them (dhalo is zeroed first, for the
// empty documents no run visits).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/l2norm.h"
#include "kernels/short_conv.h"

namespace hyd::kernels::cuda {

namespace {

using namespace cuda_detail;

constexpr int kChannels = 32;  // threadIdx.x
constexpr int kRuns = 8;       // threadIdx.y
constexpr int kTileRun = 16;   // tokens per run of the tiled kernels

// The document holding token t: cu[doc] <= t < cu[doc + 1] (empty documents are skipped).
__device__ __forceinline__ void find_document(const int32_t* cu, int64_t num_docs, int64_t t, int64_t& doc,
                                              int64_t& begin, int64_t& end) {
  int64_t lo = 0, hi = num_docs;  // invariant: cu[lo] <= t < cu[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (cu[mid] <= t)
      lo = mid;
    else
      hi = mid;
  }
  doc = lo;
  begin = cu[lo];
  end = cu[lo + 1];
}

// Moves to the document holding t >= end.
__device__ __forceinline__ void advance_document(const int32_t* cu, int64_t t, int64_t& doc, int64_t& begin,
                                                 int64_t& end) {
  while (t >= end) {
    ++doc;
    begin = end;
    end = cu[doc + 1];
  }
}

template <int KMAX>
__device__ __forceinline__ void load_taps(const __nv_bfloat16* w, int64_t c, int k, float (&wr)[KMAX]) {
#pragma unroll
  for (int i = 0; i < KMAX; ++i) {
    const int lag = KMAX - 1 - i;
    wr[i] = lag < k ? to_f(w[c * k + (k - 1 - lag)]) : 0.f;
  }
}

// Window before token t0 of document `doc` starting at `begin`: win[i] = xx[t0 - KMAX + i] for the
// k-1 tokens preceding t0 (x inside the document, halo[doc, s - begin + k - 1] before it, zero without
// a halo; zero beyond k-1 tokens); the first shift moves x[t0] into win[KMAX-1].
// x_at(s): x of token s in channel c (called for tokens s >= begin only).
template <int KMAX, class XAt>
__device__ __forceinline__ void load_window(XAt x_at, const __nv_bfloat16* halo, int64_t t0, int64_t doc, int64_t begin,
                                            int64_t c, int64_t channels, int k, float (&win)[KMAX]) {
#pragma unroll
  for (int i = 0; i < KMAX; ++i) {
    const int64_t s = t0 - KMAX + i;
    float v = 0.f;
    if (t0 - s <= k - 1) {
      if (s >= begin)
        v = x_at(s);
      else if (halo != nullptr)
        v = to_f(halo[(doc * (k - 1) + (s - begin + k - 1)) * channels + c]);
    }
    win[i] = v;
  }
}

// Window at the start of document `doc` (token `begin`): its halo rows, or zeros.
template <int KMAX>
__device__ __forceinline__ void start_window(const __nv_bfloat16* halo, int64_t doc, int64_t begin, int64_t c,
                                             int64_t channels, int k, float (&win)[KMAX]) {
  if (halo == nullptr) {
#pragma unroll
    for (int i = 0; i < KMAX; ++i) win[i] = 0.f;
  } else {
    load_window<KMAX>([](int64_t) { return 0.f; }, halo, begin, doc, begin, c, channels, k, win);
  }
}

template <int KMAX>
__device__ __forceinline__ void push(float (&win)[KMAX], float v) {
#pragma unroll
  for (int i = 0; i + 1 < KMAX; ++i) win[i] = win[i + 1];
  win[KMAX - 1] = v;
}

template <int KMAX>
__device__ __forceinline__ float dot_taps(const float (&wr)[KMAX], const float (&win)[KMAX]) {
  float u = 0.f;
#pragma unroll
  for (int i = 0; i < KMAX; ++i) u = fmaf(wr[i], win[i], u);
  return u;
}

// CPT consecutive channels of one token row (CPT = 2: one 4-byte access; the channel count is even).
template <int CPT>
__device__ __forceinline__ void load_ch(const __nv_bfloat16* p, float (&v)[CPT]) {
  if constexpr (CPT == 2) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    v[0] = f.x;
    v[1] = f.y;
  } else {
    v[0] = to_f(*p);
  }
}
template <int CPT>
__device__ __forceinline__ void store_ch(__nv_bfloat16* p, const float (&v)[CPT]) {
  if constexpr (CPT == 2) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v[0], v[1]);
  } else {
    *p = to_bf(v[0]);
  }
}

// Tiled kernels (TILED: KMAX = 4, CPT = 2, run_len = kTileRun, the channel count a multiple of 8, the rows
// 16-byte aligned): the block first copies the rows its runs read, from KMAX - 1 rows before its first token on,
// into shared memory (cp.async, 16 bytes each, all issued at once), and the runs read them there. Without the tile
// every token of a run waited for its own 4-byte loads: latency-bound (the backward ~0.8 TB/s at B8xT2048 x 1024).
// Copies rows [row0, row0 + ROWS) of src (those in [0, n)), channels [cb, cb + COLS) (those below `channels`), into
// tile[row - row0][channel - cb]; the caller waits (cp_async_wait) and synchronises.
template <int ROWS, int COLS>
__device__ __forceinline__ void stage_rows(__nv_bfloat16 (*tile)[COLS], const __nv_bfloat16* src, int64_t row0,
                                           int64_t n, int64_t channels, int64_t cb) {
  constexpr int kVecs = COLS / 8;  // 16-byte vectors per row
  const int nthreads = static_cast<int>(blockDim.x * blockDim.y);
  for (int i = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x); i < ROWS * kVecs; i += nthreads) {
    const int r = i / kVecs, v = i % kVecs;
    const int64_t s = row0 + r, cc = cb + v * 8;
    const bool valid = s >= 0 && s < n && cc < channels;
    ptx::cp_async16(ptx::smem_addr(&tile[r][v * 8]), valid ? src + s * channels + cc : src, valid);
  }
}

// The fast runs' window before token t0 (inside its document): win[j][i] = x[t0 - KMAX + i] for i >= 1 (win[j][0]
// is shifted out by the first push).
template <int KMAX, int CPT, class XRow>
__device__ __forceinline__ void prefill_window(XRow x_row, int64_t t0, float (&win)[CPT][KMAX]) {
#pragma unroll
  for (int i = 1; i < KMAX; ++i) {
    float v[CPT];
    load_ch<CPT>(x_row(t0 - KMAX + i), v);
#pragma unroll
    for (int j = 0; j < CPT; ++j) win[j][i] = v[j];
  }
}

// The same outputs as forward_run for a run inside one document (no bookkeeping; the token loop unrolled, so the
// window shifts are register renames): x of tokens t0 - KMAX + 1 .. t0 + RUN - 1, the same sums in the same order.
template <int KMAX, int CPT, int RUN, class XRow, class Store>
__device__ __forceinline__ void forward_run_fast(XRow x_row, Store store, const float (&wr)[CPT][KMAX], int64_t t0) {
  float win[CPT][KMAX];
  prefill_window<KMAX, CPT>(x_row, t0, win);
#pragma unroll
  for (int o = 0; o < RUN; ++o) {
    float xv[CPT], out[CPT];
    load_ch<CPT>(x_row(t0 + o), xv);
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      push<KMAX>(win[j], xv[j]);
      const float u = dot_taps<KMAX>(wr[j], win[j]);
      out[j] = u / (1.f + __expf(-u));
    }
    store(t0 + o, out);
  }
}

// One run of the forward: tokens [t0, t1) of channels c .. c + CPT - 1 (t0 < t1). x_row(s) points at token s's
// CPT channels (a tile or global memory); store(t, out) takes token t's outputs.
// RUN > 0: a run of exactly RUN tokens whose window lies in one document (x rows t0 - KMAX + 1 .. t1 - 1) takes
// forward_run_fast.
template <int KMAX, int CPT, int RUN = 0, class XRow, class Store>
__device__ __forceinline__ void forward_run(XRow x_row, Store store, const __nv_bfloat16* __restrict__ w,
                                            const int32_t* __restrict__ cu, int64_t num_docs,
                                            const __nv_bfloat16* __restrict__ halo, int64_t c, int64_t channels, int k,
                                            int64_t t0, int64_t t1) {
  float wr[CPT][KMAX], win[CPT][KMAX];
  int64_t doc, begin, end;
  find_document(cu, num_docs, t0, doc, begin, end);
#pragma unroll
  for (int j = 0; j < CPT; ++j) load_taps<KMAX>(w, c + j, k, wr[j]);
  if constexpr (RUN > 0) {
    if (t1 - t0 == RUN && t0 - (KMAX - 1) >= begin && t1 <= end) {
      forward_run_fast<KMAX, CPT, RUN>(x_row, store, wr, t0);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    load_window<KMAX>([&](int64_t s) { return to_f(x_row(s)[j]); }, halo, t0, doc, begin, c + j, channels, k, win[j]);
  }
  for (int64_t t = t0; t < t1; ++t) {
    if (t >= end) {  // a document starts at t: nothing before it is visible but its halo
      advance_document(cu, t, doc, begin, end);
#pragma unroll
      for (int j = 0; j < CPT; ++j) start_window<KMAX>(halo, doc, begin, c + j, channels, k, win[j]);
    }
    float xv[CPT], out[CPT];
    load_ch<CPT>(x_row(t), xv);
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      push<KMAX>(win[j], xv[j]);
      const float u = dot_taps<KMAX>(wr[j], win[j]);
      out[j] = u / (1.f + __expf(-u));
    }
    store(t, out);
  }
}

// The same dx and dw terms as backward_run for a run inside one document: du of tokens t0 .. t0 + RUN + KMAX - 2
// (zero from n on, where dy reads zero) kept in registers (the loops unrolled), then
//   dx[t0 + o] = sum_lag wr[KMAX - 1 - lag] du[t0 + o + lag]
// accumulated in increasing lag, the order of backward_run's pending slots; accw as there.
template <int KMAX, int CPT, int RUN, class XRow, class DyRow>
__device__ __forceinline__ void backward_run_fast(XRow x_row, DyRow dy_row, const float (&wr)[CPT][KMAX],
                                                  __nv_bfloat16* __restrict__ dx, int64_t c, int64_t channels,
                                                  int64_t t0, float (&accw)[CPT][KMAX]) {
  constexpr int kDu = RUN + KMAX - 1;
  float win[CPT][KMAX], du[CPT][kDu];
  prefill_window<KMAX, CPT>(x_row, t0, win);
#pragma unroll
  for (int o = 0; o < kDu; ++o) {
    float xv[CPT], gv[CPT];
    load_ch<CPT>(x_row(t0 + o), xv);
    load_ch<CPT>(dy_row(t0 + o), gv);
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      push<KMAX>(win[j], xv[j]);
      const float u = dot_taps<KMAX>(wr[j], win[j]);
      const float sg = 1.f / (1.f + __expf(-u));
      du[j][o] = gv[j] * sg * (1.f + u * (1.f - sg));
      if (o < RUN) {
#pragma unroll
        for (int i = 0; i < KMAX; ++i) accw[j][i] = fmaf(du[j][o], win[j][i], accw[j][i]);
      }
    }
  }
#pragma unroll
  for (int o = 0; o < RUN; ++o) {
    float v[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      float a = 0.f;
#pragma unroll
      for (int lag = 0; lag < KMAX; ++lag) a = fmaf(wr[j][KMAX - 1 - lag], du[j][o + lag], a);
      v[j] = a;
    }
    store_ch<CPT>(dx + (t0 + o) * channels + c, v);
  }
}

// One run of the backward: dx of tokens [t0, t1) (and the dhalo rows of documents starting there) of channels
// c .. c + CPT - 1 (t0 < t1); the run's dw terms are added to accw. x_row(s) / dy_row(s) point at token s's CPT
// channels of x / dy.
// RUN > 0: a run of exactly RUN tokens whose x window and dy rows (t0 - KMAX + 1 .. t1 + KMAX - 2, those below n)
// lie in one document takes backward_run_fast; the rows from n on must then read as zero (the tiles).
template <int KMAX, int CPT, int RUN = 0, class XRow, class DyRow>
__device__ __forceinline__ void backward_run(XRow x_row, DyRow dy_row, const __nv_bfloat16* __restrict__ w,
                                             const int32_t* __restrict__ cu, int64_t num_docs,
                                             const __nv_bfloat16* __restrict__ halo, __nv_bfloat16* __restrict__ dx,
                                             __nv_bfloat16* __restrict__ dhalo, int64_t n, int64_t c, int64_t channels,
                                             int k, int64_t t0, int64_t t1, float (&accw)[CPT][KMAX]) {
  float wr[CPT][KMAX], win[CPT][KMAX], acc[CPT][KMAX];  // acc[j][i]: pending dx of token s - KMAX + i
  int64_t doc, begin, end;
  find_document(cu, num_docs, t0, doc, begin, end);
#pragma unroll
  for (int j = 0; j < CPT; ++j) load_taps<KMAX>(w, c + j, k, wr[j]);
  if constexpr (RUN > 0) {
    if (t1 - t0 == RUN && t0 - (KMAX - 1) >= begin && std::min<int64_t>(n, t1 + KMAX - 1) <= end) {
      backward_run_fast<KMAX, CPT, RUN>(x_row, dy_row, wr, dx, c, channels, t0, accw);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    load_window<KMAX>([&](int64_t s) { return to_f(x_row(s)[j]); }, halo, t0, doc, begin, c + j, channels, k, win[j]);
#pragma unroll
    for (int i = 0; i < KMAX; ++i) acc[j][i] = 0.f;
  }
  // Writes pending slot i (token tok = s - KMAX + i) if the token is this run's and in the current
  // document, or a finished dhalo row if it is one of the k-1 before a document that starts in this run.
  auto emit = [&](int i, int64_t tok) {
    float v[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) v[j] = acc[j][i];
    if (tok >= begin) {
      if (tok >= t0 && tok < t1) store_ch<CPT>(dx + tok * channels + c, v);
    } else if (dhalo != nullptr && begin >= t0 && tok >= begin - (k - 1)) {
      store_ch<CPT>(dhalo + (doc * (k - 1) + (tok - begin + k - 1)) * channels + c, v);
    }
  };
  const int64_t s_stop = std::min<int64_t>(n, t1 + KMAX - 1);
  int64_t s = t0;
  bool flushed = false;
  for (; s < s_stop; ++s) {
    if (s >= end) {  // the document ended: its pending tokens are complete
#pragma unroll
      for (int i = 0; i < KMAX; ++i) emit(i, s - KMAX + i);
      if (s >= t1) {
        flushed = true;
        break;
      }
      advance_document(cu, s, doc, begin, end);
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        start_window<KMAX>(halo, doc, begin, c + j, channels, k, win[j]);
#pragma unroll
        for (int i = 0; i < KMAX; ++i) acc[j][i] = 0.f;
      }
    }
    emit(0, s - KMAX);  // no du at or after s reaches token s - KMAX
    float xv[CPT], gv[CPT];
    load_ch<CPT>(x_row(s), xv);
    load_ch<CPT>(dy_row(s), gv);
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      push<KMAX>(acc[j], 0.f);
      push<KMAX>(win[j], xv[j]);
      const float u = dot_taps<KMAX>(wr[j], win[j]);
      const float sg = 1.f / (1.f + __expf(-u));
      const float du = gv[j] * sg * (1.f + u * (1.f - sg));
#pragma unroll
      for (int i = 0; i < KMAX; ++i) acc[j][i] = fmaf(wr[j][i], du, acc[j][i]);
      if (s < t1) {
#pragma unroll
        for (int i = 0; i < KMAX; ++i) accw[j][i] = fmaf(du, win[j][i], accw[j][i]);
      }
    }
  }
  if (!flushed) {
#pragma unroll
    for (int i = 0; i < KMAX; ++i) emit(i, s - KMAX + i);
  }
}

// The block's dw: the accw of its RUNS runs (threadIdx.y) summed per (channel, tap) in red (RUNS x KMAX x
// (COLS + 1) floats; thread x holds local columns CPT x .. CPT x + CPT - 1), then one f32 atomicAdd per
// (channel, tap) into dw. c: the thread's first channel.
template <int KMAX, int CPT, int RUNS, int COLS>
__device__ __forceinline__ void add_dw(float (*red)[KMAX][COLS + 1], const float (&accw)[CPT][KMAX],
                                       float* __restrict__ dw, int64_t c, int64_t channels, int k) {
#pragma unroll
  for (int j = 0; j < CPT; ++j)
#pragma unroll
    for (int i = 0; i < KMAX; ++i) red[threadIdx.y][i][threadIdx.x * CPT + j] = accw[j][i];
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
#pragma unroll
    for (int j = 0; j < CPT; ++j)
#pragma unroll
      for (int i = 0; i < KMAX; ++i) {
        const int lag = KMAX - 1 - i;
        if (lag >= k) continue;
        float sum = 0.f;
#pragma unroll
        for (int r = 0; r < RUNS; ++r) sum += red[r][i][threadIdx.x * CPT + j];
        atomicAdd(dw + (c + j) * k + (k - 1 - lag), sum);
      }
  }
}

// A thread handles CPT adjacent channels (c, c + 1 when CPT = 2) of its run: the same tokens and
// document bookkeeping, one paired load / store per token row.
template <int KMAX, int CPT, bool TILED = false>
__global__ void short_conv_forward_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                          const int32_t* __restrict__ cu, int64_t num_docs,
                                          const __nv_bfloat16* __restrict__ halo, __nv_bfloat16* __restrict__ y,
                                          int64_t n, int64_t channels, int k, int64_t run_len) {
  static_assert(!TILED || (KMAX == 4 && CPT == 2), "the tiled forward is the paired k <= 4 kernel");
  constexpr int kCols = kChannels * CPT;
  constexpr int kRows = TILED ? kRuns * kTileRun + KMAX - 1 : 1;
  __shared__ __align__(16) __nv_bfloat16 tile[kRows][TILED ? kCols : 8];  // [token - row0][channel - cb]
  const int64_t c = (int64_t(blockIdx.x) * kChannels + threadIdx.x) * CPT;
  const int64_t t0 = (int64_t(blockIdx.y) * kRuns + threadIdx.y) * run_len;
  const int64_t row0 = int64_t(blockIdx.y) * kRuns * run_len - (KMAX - 1);  // the tile's first token (TILED)
  if constexpr (TILED) {
    stage_rows<kRows, kCols>(tile, x, row0, n, channels, int64_t(blockIdx.x) * kCols);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();
  }
  auto x_row = [&](int64_t s) -> const __nv_bfloat16* {
    if constexpr (TILED)
      return &tile[s - row0][threadIdx.x * CPT];
    else
      return x + s * channels + c;
  };
  if (c >= channels || t0 >= n) return;
  forward_run<KMAX, CPT, TILED ? kTileRun : 0>(
      x_row, [&](int64_t t, const float(&out)[CPT]) { store_ch<CPT>(y + t * channels + c, out); }, w, cu, num_docs,
      halo, c, channels, k, t0, std::min(n, t0 + run_len));
}

// TILED: x and dy rows staged (stage_rows), to KMAX - 1 rows after the block's last token.
template <int KMAX, int CPT, bool TILED = false>
__global__ void short_conv_backward_kernel(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ x,
                                           const __nv_bfloat16* __restrict__ w, const int32_t* __restrict__ cu,
                                           int64_t num_docs, const __nv_bfloat16* __restrict__ halo,
                                           __nv_bfloat16* __restrict__ dx, float* __restrict__ dw,
                                           __nv_bfloat16* __restrict__ dhalo, int64_t n, int64_t channels, int k,
                                           int64_t run_len) {
  static_assert(!TILED || (KMAX == 4 && CPT == 2), "the tiled backward is the paired k <= 4 kernel");
  constexpr int kCols = kChannels * CPT;
  constexpr int kRows = TILED ? kRuns * kTileRun + 2 * (KMAX - 1) : 1;
  __shared__ float red[kRuns][KMAX][kCols + 1];
  __shared__ __align__(16) __nv_bfloat16 tile[2][kRows][TILED ? kCols : 8];  // [x, dy][token - row0][channel - cb]
  const int64_t c = (int64_t(blockIdx.x) * kChannels + threadIdx.x) * CPT;
  const int64_t t0 = (int64_t(blockIdx.y) * kRuns + threadIdx.y) * run_len;
  const int64_t row0 = int64_t(blockIdx.y) * kRuns * run_len - (KMAX - 1);  // the tile's first token (TILED)
  if constexpr (TILED) {
    const int64_t cb = int64_t(blockIdx.x) * kCols;
    stage_rows<kRows, kCols>(tile[0], x, row0, n, channels, cb);
    stage_rows<kRows, kCols>(tile[1], dy, row0, n, channels, cb);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();
  }
  // Row s of x / dy at this thread's channels: the tile or global memory.
  auto x_row = [&](int64_t s) -> const __nv_bfloat16* {
    if constexpr (TILED)
      return &tile[0][s - row0][threadIdx.x * CPT];
    else
      return x + s * channels + c;
  };
  auto dy_row = [&](int64_t s) -> const __nv_bfloat16* {
    if constexpr (TILED)
      return &tile[1][s - row0][threadIdx.x * CPT];
    else
      return dy + s * channels + c;
  };
  float accw[CPT][KMAX];  // dw partial sums, right-aligned like wr
#pragma unroll
  for (int j = 0; j < CPT; ++j)
#pragma unroll
    for (int i = 0; i < KMAX; ++i) accw[j][i] = 0.f;
  if (c < channels && t0 < n)
    backward_run<KMAX, CPT, TILED ? kTileRun : 0>(x_row, dy_row, w, cu, num_docs, halo, dx, dhalo, n, c, channels, k,
                                                  t0, std::min(n, t0 + run_len), accw);
  add_dw<KMAX, CPT, kRuns, kCols>(red, accw, dw, c, channels, k);
}

// ---------------------------------------------------------------- convolution + l2 norm (the q / k path)
//
// Forward only. One head (D = 64 or 128 channels) per block column: D / 2 threads per token row (two channels each,
// CPT 2) x RUNS = 512 / D runs of kTileRun tokens, 256 threads, TOK = RUNS kTileRun tokens per block, K <= 4 (KMAX
// 4). x rows staged as in the tiled kernel; every run writes its conv outputs (bf16, as the unfused conv stores
// them) into a [TOK][D] tile; then D / 8 lanes per row normalise the tile's rows exactly as
// l2norm_forward_rows_kernel does (same row sums, same roundings), so y and rstd equal the two-kernel results
// (H200, B8xT2048, 1024 channels: 36 us against 29 + 18 us). The backward stays two kernels: a fused one (the
// l2norm backward of the staged rows, then the tiled conv backward) took 92-104 us against 32 + 54 us.
template <int D>
struct NormTile {
  static_assert(D == 64 || D == 128, "the fused conv + l2 norm forward takes heads of 64 or 128 channels");
  static constexpr int kTx = D / 2, kRunsPer = 256 / kTx, kTok = kRunsPer * kTileRun;
  static constexpr int kLpr = D / 8;               // lanes per row of the norm
  static constexpr int kRowsPerPass = 256 / kLpr;  // rows normalised at once by the block
};

template <int D>
__global__ void __launch_bounds__(256)
    conv_l2norm_forward_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                               const int32_t* __restrict__ cu, int64_t num_docs, const __nv_bfloat16* __restrict__ halo,
                               __nv_bfloat16* __restrict__ y, float* __restrict__ rstd, int64_t n, int64_t channels,
                               int k, float scale, float eps) {
  using S = NormTile<D>;
  constexpr int KMAX = 4, kRows = S::kTok + KMAX - 1;
  __shared__ __align__(16) __nv_bfloat16 xt[kRows][D];
  __shared__ __align__(16) __nv_bfloat16 ot[S::kTok][D];
  const int64_t head = blockIdx.x, cb = head * D, heads = channels / D;
  const int64_t tb = int64_t(blockIdx.y) * S::kTok, row0 = tb - (KMAX - 1);
  stage_rows<kRows, D>(xt, x, row0, n, channels, cb);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();
  const int cl = threadIdx.x * 2;  // the thread's first channel within the head
  const int64_t t0 = tb + int64_t(threadIdx.y) * kTileRun;
  if (t0 < n)
    forward_run<KMAX, 2, kTileRun>([&](int64_t s) -> const __nv_bfloat16* { return &xt[s - row0][cl]; },
                                   [&](int64_t t, const float(&out)[2]) { store_ch<2>(&ot[t - tb][cl], out); }, w, cu,
                                   num_docs, halo, cb + cl, channels, k, t0, std::min(n, t0 + kTileRun));
  __syncthreads();
  const int tid = threadIdx.y * S::kTx + threadIdx.x, seg = tid / S::kLpr, sl = tid % S::kLpr;
#pragma unroll
  for (int r = seg; r < S::kTok; r += S::kRowsPerPass) {  // every lane takes part in the shuffles
    const int64_t t = tb + r;
    const Bf16Pack<8> v = load_pack<8>(&ot[r][8 * sl]);
    float ss = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) ss += to_f(v.v[e]) * to_f(v.v[e]);
    const float s = rsqrtf(row_sum<S::kLpr>(ss) + eps);
    if (t >= n) continue;
    if (sl == 0) rstd[t * heads + head] = s;
    const float m = scale * s;
    Bf16Pack<8> o;
#pragma unroll
    for (int e = 0; e < 8; ++e) o.v[e] = to_bf(to_f(v.v[e]) * m);
    *reinterpret_cast<Bf16Pack<8>*>(y + t * channels + cb + 8 * sl) = o;
  }
}

struct ConvLaunch {
  dim3 grid;
  int64_t run_len;
};

// Two channels per thread when the channel count is even, k <= 4 and every row pointer is 4-byte aligned.
bool paired(int64_t channels, int64_t kernel, std::initializer_list<const void*> ptrs) {
  if (channels % 2 != 0 || kernel > 4) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 4 != 0) return false;
  return true;
}
// Runs of at least min_run tokens; the token dimension split into at most `max_chunks` blocks; blocks of
// kChannels x cpt channels.
ConvLaunch conv_launch(int64_t n, int64_t channels, int cpt, int64_t min_run, int64_t max_chunks) {
  const int64_t col_blocks = (channels + kChannels * cpt - 1) / (kChannels * cpt);
  const int64_t chunks = std::clamp<int64_t>((n + kRuns * min_run - 1) / (kRuns * min_run), 1, max_chunks);
  const int64_t run_len = (n + chunks * kRuns - 1) / (chunks * kRuns);
  const int64_t used_chunks = (n + run_len * kRuns - 1) / (run_len * kRuns);
  return {dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(std::max<int64_t>(used_chunks, 1))), run_len};
}
// The tiled kernels' launch (runs of kTileRun tokens, blocks of kChannels x 2 channels), when they apply: paired
// channels (cpt 2), a multiple of 8, the staged rows 16-byte aligned, at most 65535 token blocks; else nullopt.
std::optional<ConvLaunch> tiled_launch(int64_t n, int64_t channels, int cpt,
                                       std::initializer_list<const void*> staged) {
  const int64_t tile_chunks = (n + kRuns * kTileRun - 1) / (kRuns * kTileRun);
  if (cpt != 2 || channels % 8 != 0 || tile_chunks > 65535) return std::nullopt;
  for (const void* p : staged)
    if (!aligned16(p)) return std::nullopt;
  const int64_t col_blocks = (channels + kChannels * 2 - 1) / (kChannels * 2);
  return ConvLaunch{dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(tile_chunks)), kTileRun};
}

}  // namespace

void short_conv_forward(const bf16* x, const bf16* w, const int32_t* cu_seqlens, int64_t num_docs, bf16* y, int64_t n,
                        int64_t channels, int64_t kernel, const bf16* halo, void* stream) {
  if (n == 0 || channels == 0) return;
  HYD_CHECK(kernel >= 1 && kernel <= kShortConvMaxKernel, "short_conv_forward: kernel size ", kernel, " outside [1, ",
            kShortConvMaxKernel, "]");
  HYD_CHECK(num_docs >= 1, "short_conv_forward: ", n, " tokens but no documents");
  const int cpt = paired(channels, kernel, {x, y, halo}) ? 2 : 1;
  const ConvLaunch l = conv_launch(n, channels, cpt, 16, 65535);
  const std::optional<ConvLaunch> tiled = tiled_launch(n, channels, cpt, {x});
  const dim3 block(kChannels, kRuns);
  if (kernel == 1) halo = nullptr;  // no halo rows
  auto run = [&](auto kern, const ConvLaunch& launch) {
    kern<<<launch.grid, block, 0, as_stream(stream)>>>(as_nv(x), as_nv(w), cu_seqlens, num_docs, as_nv(halo), as_nv(y),
                                                       n, channels, static_cast<int>(kernel), launch.run_len);
  };
  if (tiled)
    run(short_conv_forward_kernel<4, 2, true>, *tiled);
  else if (cpt == 2)
    run(short_conv_forward_kernel<4, 2>, l);
  else if (kernel <= 4)
    run(short_conv_forward_kernel<4, 1>, l);
  else
    run(short_conv_forward_kernel<16, 1>, l);
  CHECK_LAUNCH();
}

void short_conv_backward(const bf16* dy, const bf16* x, const bf16* w, const int32_t* cu_seqlens, int64_t num_docs,
                         bf16* dx, float* dw, int64_t n, int64_t channels, int64_t kernel, const bf16* halo,
                         bf16* dhalo, void* stream) {
  HYD_CHECK(kernel >= 1 && kernel <= kShortConvMaxKernel, "short_conv_backward: kernel size ", kernel, " outside [1, ",
            kShortConvMaxKernel, "]");
  HYD_CHECK(dhalo == nullptr || halo != nullptr || kernel == 1,
            "short_conv_backward: argument 'dhalo' given without a halo");
  if (kernel == 1) halo = dhalo = nullptr;  // no halo rows
  // Rows of empty documents are never visited by a run: zero them all first (before the n == 0 exit).
  const size_t dhalo_bytes = static_cast<size_t>(num_docs * (kernel - 1) * channels) * sizeof(bf16);
  if (dhalo != nullptr && dhalo_bytes > 0) CHECK_CUDA(cudaMemsetAsync(dhalo, 0, dhalo_bytes, as_stream(stream)));
  if (n == 0 || channels == 0) return;
  HYD_CHECK(num_docs >= 1, "short_conv_backward: ", n, " tokens but no documents");
  // About 2048 blocks in all: enough to fill the GPU, few enough that the dw atomics stay cheap.
  const int cpt = paired(channels, kernel, {dy, x, halo, dx, dhalo}) ? 2 : 1;
  const int64_t col_blocks = (channels + kChannels * cpt - 1) / (kChannels * cpt);
  const ConvLaunch l =
      conv_launch(n, channels, cpt, 16, std::clamp<int64_t>((2048 + col_blocks - 1) / col_blocks, 1, 65535));
  const dim3 block(kChannels, kRuns);
  auto run = [&](auto kern, const ConvLaunch& launch) {
    kern<<<launch.grid, block, 0, as_stream(stream)>>>(as_nv(dy), as_nv(x), as_nv(w), cu_seqlens, num_docs, as_nv(halo),
                                                       as_nv(dx), dw, as_nv(dhalo), n, channels,
                                                       static_cast<int>(kernel), launch.run_len);
  };
  if (const std::optional<ConvLaunch> tiled = tiled_launch(n, channels, cpt, {x, dy}))
    run(short_conv_backward_kernel<4, 2, true>, *tiled);
  else if (cpt == 2)
    run(short_conv_backward_kernel<4, 2>, l);
  else if (kernel <= 4)
    run(short_conv_backward_kernel<4, 1>, l);
  else
    run(short_conv_backward_kernel<16, 1>, l);
  CHECK_LAUNCH();
}

namespace {

// The fused forward applies: heads of 64 or 128 channels, K <= 4, rows 16-byte aligned (16-byte accesses), halo
// rows 4-byte aligned (paired accesses), at most 65535 token blocks; HYD_CONV_NORM_FUSED=0 turns it off (A/B).
bool fused_norm(int64_t n, int64_t channels, int64_t kernel, int64_t head_dim, std::initializer_list<const void*> rows,
                std::initializer_list<const void*> halos) {
  static const bool off = [] {
    const char* e = std::getenv("HYD_CONV_NORM_FUSED");
    return e != nullptr && std::string(e) == "0";
  }();
  if (off || kernel > 4 || (head_dim != 64 && head_dim != 128) || channels % head_dim != 0) return false;
  if ((n + NormTile<64>::kTok - 1) / NormTile<64>::kTok > 65535 || channels / head_dim > 65535) return false;
  for (const void* p : rows)
    if (!aligned16(p)) return false;
  for (const void* p : halos)
    if (reinterpret_cast<uintptr_t>(p) % 4 != 0) return false;
  return true;
}

template <class F>
void with_head_dim(int64_t head_dim, F&& f) {
  if (head_dim == 64)
    f(std::integral_constant<int, 64>{});
  else
    f(std::integral_constant<int, 128>{});
}

}  // namespace

void short_conv_l2norm_forward(const bf16* x, const bf16* w, const int32_t* cu_seqlens, int64_t num_docs, bf16* y,
                               float* rstd, int64_t n, int64_t channels, int64_t kernel, int64_t head_dim, float scale,
                               float eps, const bf16* halo, void* stream) {
  if (n == 0 || channels == 0) return;
  if (kernel == 1) halo = nullptr;  // no halo rows
  if (!fused_norm(n, channels, kernel, head_dim, {x, y}, {halo})) {
    short_conv_forward(x, w, cu_seqlens, num_docs, y, n, channels, kernel, halo, stream);
    l2norm_forward(y, y, rstd, n * (channels / head_dim), head_dim, scale, eps, stream);
    return;
  }
  HYD_CHECK(num_docs >= 1, "short_conv_l2norm_forward: ", n, " tokens but no documents");
  with_head_dim(head_dim, [&](auto d) {
    constexpr int D = decltype(d)::value;
    using S = NormTile<D>;
    const dim3 grid(static_cast<unsigned>(channels / D), static_cast<unsigned>((n + S::kTok - 1) / S::kTok));
    conv_l2norm_forward_kernel<D><<<grid, dim3(S::kTx, S::kRunsPer), 0, as_stream(stream)>>>(
        as_nv(x), as_nv(w), cu_seqlens, num_docs, as_nv(halo), as_nv(y), rstd, n, channels, static_cast<int>(kernel),
        scale, eps);
  });
  CHECK_LAUNCH();
}

void short_conv_l2norm_backward(bf16* dy, const bf16* y, const float* rstd, int64_t head_dim, float scale,
                                const bf16* x, const bf16* w, const int32_t* cu_seqlens, int64_t num_docs, bf16* dx,
                                float* dw, int64_t n, int64_t channels, int64_t kernel, const bf16* halo, bf16* dhalo,
                                void* stream) {
  if (n > 0 && channels > 0) l2norm_backward(dy, y, rstd, dy, n * (channels / head_dim), head_dim, scale, stream);
  short_conv_backward(dy, x, w, cu_seqlens, num_docs, dx, dw, n, channels, kernel, halo, dhalo, stream);
}

}  // namespace hyd::kernels::cuda

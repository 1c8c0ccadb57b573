// The chunked KDA algorithm (chunk C = 64) as block programs: the math and the backward derivation
// are at the top of kernels/cuda/kda.cu. Each program is the body of one CUDA thread block of
// kThreads threads, written as a sequence of phases; a phase is a parallel-for over its outputs
// (`for (idx = t; idx < work; idx += kThreads)`) whose threads never read what another thread of
// the same phase writes, and consecutive phases are separated by a block barrier. The same code
// therefore runs
//   - on the GPU (DeviceExec: every thread runs the program, phase = call + __syncthreads()), and
//   - serially on the host (HostExec: phase = loop over the thread ids), which is how the CPU-side
//     emulation test checks the indexing of every kernel against the reference without a GPU.
// Programs only branch or return on block-uniform values. Shared memory is one dynamic byte
// buffer carved by the program; its size is the program's smem_bytes().
//
// Pipelines (host orchestration shared by the CUDA entry points and the emulation test):
//   forward:    chunk table -> chunk prep -> state pass (outputs o, final state)
//   transition: chunk table -> chunk prep -> state pass (B: zero start) + state pass (M: u = 0, start I)
//   backward:   chunk table -> chunk prep -> state pass (keeps S_in, v_new per chunk)
//               -> reverse state pass (dS_out, dv_new per chunk, dinitial_state)
//               -> state-gradient products (dq^g, dk^g, dw, dAqk, dT_v, dv) -> intra-chunk gradients
//               (dq, dk, dg, dbeta per value head) -> group reduction of dq, dk over GQA heads.
// Indexing: token t, q/k head h, value head hv, channel i < dk, column j < dv:
//   q, k [(t H + h) dk + i]; v, o, do [(t HV + hv) dv + j]; g [(t HV + hv) dk + i]; beta [t HV + hv];
//   states [((d HV + hv) dk + i) ncols + j]; per-chunk scratch at ch = chunk * HV + hv.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "kernels/kda.h"
#include "trainer/core/dtype.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#define HYD_HD __host__ __device__ __forceinline__
#else
#define HYD_HD inline
#endif

namespace hyd::kernels::kda_chunk {

constexpr int kChunk = 64;             // C
constexpr int kThreads = 256;          // threads of every block
constexpr int kTile = 32;              // state columns per block of the state passes; dk rows per state-gradient block
constexpr int kLdM = kChunk + 1;       // row stride of 64 x 64 matrices in shared memory (odd: no bank conflicts)
constexpr int kMat = kChunk * kChunk;  // a 64 x 64 matrix in global scratch (unpadded)

struct BlockIdx {
  int64_t x, y, z;
};
struct Grid {
  int64_t x, y, z;
};

HYD_HD float load_bf16(const bf16* p) {
#ifdef __CUDA_ARCH__
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p));
#else
  return bf16_to_float(*p);
#endif
}
HYD_HD void store_bf16(bf16* p, float x) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(x);
#else
  *p = float_to_bf16(x);
#endif
}
HYD_HD int64_t chunks_of(int64_t len) { return (len + kChunk - 1) / kChunk; }
HYD_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Upper bound of sum over documents of ceil(len / C) (<= floor((N + (C-1) D) / C)); the chunk
// kernels launch this many blocks in x and those past the true count (chunk_off[D]) return.
inline int64_t max_chunks(const KdaDims& s) { return (s.n + (kChunk - 1) * s.num_docs) / kChunk; }

// One chunk of one document: tokens [start, start + len), len in [1, C].
struct ChunkSpan {
  int64_t doc, start;
  int len;
};
// chunk_off[d] = first chunk of document d (chunk_off[D] = chunk count); requires c < chunk_off[D].
// Binary search for the document with chunk_off[d] <= c < chunk_off[d + 1] (empty documents own no chunk).
HYD_HD ChunkSpan locate_chunk(const int32_t* cu, const int32_t* chunk_off, int64_t num_docs, int64_t c) {
  int64_t lo = 0, hi = num_docs;  // invariant: chunk_off[lo] <= c < chunk_off[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (chunk_off[mid] <= c)
      lo = mid;
    else
      hi = mid;
  }
  const int64_t start = cu[lo] + (c - chunk_off[lo]) * kChunk;
  return {lo, start, static_cast<int>(min64(kChunk, cu[lo + 1] - start))};
}

// ---------------------------------------------------------------- executors

#if defined(__CUDACC__)
struct DeviceExec {
  template <class F>
  __device__ __forceinline__ void phase(F&& f) {
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
};
#endif
// Serial phases; `reverse` runs the threads last to first, so that a test running both orders sees
// any thread that reads what another thread of the same phase writes.
struct HostExec {
  bool reverse = false;
  template <class F>
  void phase(F&& f) {
    for (int n = 0; n < kThreads; ++n) f(reverse ? kThreads - 1 - n : n);
  }
};

// ---------------------------------------------------------------- scratch

// backward_mma: only the buffers the tensor-core backward (kernels/cuda/kda_mma.cu) shares with the
// version-1 intra-chunk gradient and group reduction programs (its own bf16 operands live elsewhere).
// backward_mma_saved: backward_mma without x, states and vn (kda_mma::backward_saved reads them from what
// kda_mma::forward_saving kept).
enum class Pass { forward, transition, backward, backward_mma, backward_mma_saved };

// Global scratch of one call, carved from one buffer (f32 unless noted); nullptr = not used by the pass.
struct Scratch {
  int32_t* chunk_off = nullptr;  // i32 [D + 1]
  float* w = nullptr;            // [ch][C][dk]   T (exp(G) * k)
  float* u = nullptr;            // [ch][C][dv]   T v
  float* qg = nullptr;           // [ch][C][dk]   q * exp(G)
  float* kg = nullptr;           // [ch][C][dk]   k * exp(G_last - G)
  float* gl = nullptr;           // [ch][dk]      exp(G_last)
  float* aqk = nullptr;          // [ch][C][C]    Aqk (c <= r, zero above)
  float* x = nullptr;            // [ch][C][C]    X = (I + A)^-1, T = X Diag(beta)
  float* states = nullptr;       // [ch][dk][dv]  S entering the chunk
  float* vn = nullptr;           // [ch][C][dv]   v_new
  float* dstates = nullptr;      // [ch][dk][dv]  dS_out (adjoint of the outgoing state)
  float* dvn = nullptr;          // [ch][C][dv]   adjoint of v_new
  float* dqg = nullptr;          // [ch][C][dk]   do S^T
  float* dkg = nullptr;          // [ch][C][dk]   v_new dS_out^T
  float* dw = nullptr;           // [ch][C][dk]   -dv_new S^T
  float* dgls = nullptr;         // [ch][dk]      sum_j S[i,j] dS_out[i,j]
  float* daqk = nullptr;         // [ch][C][C]    do v_new^T (c <= r)
  float* dtv = nullptr;          // [ch][C][C]    dv_new v^T (c <= r)
  float* dq_hv = nullptr;        // [N][HV][dk]   dq per value head, before the GQA sum
  float* dk_hv = nullptr;        // [N][HV][dk]   dk per value head
};

// Value heads per group of the tensor-core backward's products (products_half_kernel, then intra_kernel, one group
// after the other): their buffers dqg, dkg, dw, dgls, dAqk, dT_v (128.5 KB per chunk and head at dk = dv = 128) are
// sized for one group, so two groups halve them (0.5 GiB at B8xT4096 H16). HYD_KDA_HEAD_GROUPS=1: one group.
inline int64_t product_group_heads(const KdaDims& s) {
  static const int groups = [] {
    const char* e = std::getenv("HYD_KDA_HEAD_GROUPS");
    const int g = e != nullptr ? std::atoi(e) : 2;
    return g >= 1 ? g : 2;
  }();
  return std::max<int64_t>(1, (s.hv + groups - 1) / groups);
}

// Carves `base` (16-byte aligned) into the buffers `pass` needs; with base == nullptr only counts.
// Returns the number of floats used.
inline size_t carve_scratch(float* base, const KdaDims& s, Pass pass, Scratch& sc) {
  size_t used = 0;
  auto take = [&](size_t floats) {
    float* p = base ? base + used : nullptr;
    used += (floats + 3) / 4 * 4;  // keep 16-byte alignment
    return p;
  };
  const size_t mc = static_cast<size_t>(max_chunks(s)), hv = static_cast<size_t>(s.hv);
  const size_t dk = static_cast<size_t>(s.dk), dv = static_cast<size_t>(s.dv), ch = mc * hv;
  sc = Scratch{};
  sc.chunk_off = reinterpret_cast<int32_t*>(take(static_cast<size_t>(s.num_docs) + 1));
  if (pass == Pass::backward_mma || pass == Pass::backward_mma_saved) {
    // The tensor-core kernels keep v_new and -dv_new as bf16 (half of a float each), S_in and dS_out as hi + lo
    // bf16 pairs (a float's size).
    if (pass == Pass::backward_mma) {
      sc.x = take(ch * kMat);
      sc.states = take(ch * dk * dv);
      sc.vn = take(ch * kChunk * dv / 2);
    }
    sc.dstates = take(ch * dk * dv);
    sc.dvn = take(ch * kChunk * dv / 2);
    const size_t chg = mc * static_cast<size_t>(product_group_heads(s));  // one head group's products
    sc.dqg = take(chg * kChunk * dk);
    sc.dkg = take(chg * kChunk * dk);
    sc.dw = take(chg * kChunk * dk);
    sc.dgls = take(chg * dk);
    sc.daqk = take(chg * kMat);
    sc.dtv = take(chg * kMat);
    if (s.hv != s.h) {  // per value head dq, dk only where a GQA group is summed
      sc.dq_hv = take(static_cast<size_t>(s.n) * hv * dk);
      sc.dk_hv = take(static_cast<size_t>(s.n) * hv * dk);
    }
    return used;
  }
  sc.w = take(ch * kChunk * dk);
  sc.u = take(ch * kChunk * dv);
  sc.kg = take(ch * kChunk * dk);
  sc.gl = take(ch * dk);
  if (pass == Pass::transition) return used;
  sc.qg = take(ch * kChunk * dk);
  sc.aqk = take(ch * kMat);
  if (pass == Pass::forward) return used;
  sc.x = take(ch * kMat);
  sc.states = take(ch * dk * dv);
  sc.vn = take(ch * kChunk * dv);
  sc.dstates = take(ch * dk * dv);
  sc.dvn = take(ch * kChunk * dv);
  sc.dqg = take(ch * kChunk * dk);
  sc.dkg = take(ch * kChunk * dk);
  sc.dw = take(ch * kChunk * dk);
  sc.dgls = take(ch * dk);
  sc.daqk = take(ch * kMat);
  sc.dtv = take(ch * kMat);
  sc.dq_hv = take(static_cast<size_t>(s.n) * hv * dk);
  sc.dk_hv = take(static_cast<size_t>(s.n) * hv * dk);
  return used;
}

// ---------------------------------------------------------------- programs

// chunk_off[d] = sum over d' < d of ceil(len_d' / C). Grid (1, 1, 1). Each thread owns a contiguous
// range of documents; thread 0 scans the per-thread totals.
struct ChunkTableProgram {
  const int32_t* cu = nullptr;
  int64_t num_docs = 0;
  int32_t* chunk_off = nullptr;

  static size_t smem_bytes() { return (kThreads + 1) * sizeof(int64_t); }

  template <class Exec>
  HYD_HD void operator()(Exec& ex, char* smem, BlockIdx) const {
    int64_t* part = reinterpret_cast<int64_t*>(smem);
    const int64_t per = (num_docs + kThreads - 1) / kThreads;
    ex.phase([&](int t) {
      int64_t sum = 0;
      for (int64_t d = t * per; d < min64((t + 1) * per, num_docs); ++d) sum += chunks_of(cu[d + 1] - cu[d]);
      part[t] = sum;
    });
    ex.phase([&](int t) {
      if (t != 0) return;
      int64_t acc = 0;
      for (int i = 0; i < kThreads; ++i) {
        const int64_t v = part[i];
        part[i] = acc;
        acc += v;
      }
      part[kThreads] = acc;
    });
    ex.phase([&](int t) {
      int64_t acc = part[t];
      for (int64_t d = t * per; d < min64((t + 1) * per, num_docs); ++d) {
        chunk_off[d] = static_cast<int32_t>(acc);
        acc += chunks_of(cu[d + 1] - cu[d]);
      }
      if (t == 0) chunk_off[num_docs] = static_cast<int32_t>(part[kThreads]);
    });
  }
};

// Thread t's share of loading one chunk's rows of k, q (if q != nullptr; else zeros) and g into
// f32 staging [C][ld] (rows past the chunk's end are zero), and of beta into bs [C]. Called inside
// a phase by the chunk programs.
template <int DK>
HYD_HD void load_chunk_rows(int t, const KdaDims& s, const ChunkSpan& sp, int hv, const bf16* q, const bf16* k,
                            const float* g, const float* beta, int ld, float* ks, float* qs, float* gs, float* bs) {
  const int H = static_cast<int>(s.h), HV = static_cast<int>(s.hv), h = hv / (HV / H);
  for (int idx = t; idx < kChunk * DK; idx += kThreads) {
    const int r = idx / DK, i = idx % DK;
    const bool in = r < sp.len;
    const int64_t tok = sp.start + r;
    ks[r * ld + i] = in ? load_bf16(k + (tok * H + h) * DK + i) : 0.f;
    qs[r * ld + i] = in && q ? load_bf16(q + (tok * H + h) * DK + i) : 0.f;
    gs[r * ld + i] = in ? g[(tok * HV + hv) * DK + i] : 0.f;
  }
  if (t < kChunk) bs[t] = t < sp.len ? beta[(sp.start + t) * HV + hv] : 0.f;
}

// The phase G = cumulative sum of g over the chunk's rows, per channel (thread = channel).
template <int DK, class Exec>
HYD_HD void cumsum_rows_phase(Exec& ex, int ld, float* gs) {
  ex.phase([&](int t) {
    if (t >= DK) return;
    float acc = 0.f;
    for (int r = 0; r < kChunk; ++r) {
      acc += gs[r * ld + t];
      gs[r * ld + t] = acc;
    }
  });
}

// Intra-chunk quantities, independent of the state. Grid (max_chunks, HV). Rows r >= len are padded
// with k = q = v = g = beta = 0, which makes their rows of A, X - I, w, u, kg, qg and Aqk zero and
// keeps G constant past the end (so G_63 = G_last).
//   G = cumsum(g);  A[r,c] = beta_r sum_i k_r k_c exp(G_r - G_c) (c < r);  X = (I + A)^-1;
//   w = X Diag(beta) (exp(G) * k);  u = X Diag(beta) v;  Aqk (c <= r);  qg, kg, gl.
// q == nullptr (transition): no Aqk, no qg. x == nullptr: X is not kept.
// TODO(perf): bf16 tensor-core products (mma.sync / wgmma) for A, Aqk, w, u; a blocked 16 x 16
// inverse instead of the 63-step row substitution; bf16 storage of w, u, qg, kg.
template <int DK>
struct ChunkPrepProgram {
  KdaDims s;
  const bf16* q = nullptr;  // nullptr: no Aqk, no qg (transition)
  const bf16* k = nullptr;
  const bf16* v = nullptr;
  const float* g = nullptr;
  const float* beta = nullptr;
  const int32_t* cu = nullptr;
  const int32_t* chunk_off = nullptr;
  float* w = nullptr;
  float* u = nullptr;
  float* qg = nullptr;
  float* kg = nullptr;
  float* gl = nullptr;
  float* aqk = nullptr;
  float* x = nullptr;  // nullptr: X not kept

  static constexpr int kLdK = DK + 1;
  static size_t smem_bytes() { return sizeof(float) * (3 * kChunk * kLdK + 2 * kChunk * kLdM + kChunk); }

  template <class Exec>
  HYD_HD void operator()(Exec& ex, char* smem, BlockIdx b) const {
    const int64_t c = b.x;
    const int hv = static_cast<int>(b.y);
    if (c >= chunk_off[s.num_docs]) return;
    const ChunkSpan sp = locate_chunk(cu, chunk_off, s.num_docs, c);
    const int L = sp.len, HV = static_cast<int>(s.hv), dv = static_cast<int>(s.dv);
    const int64_t ch = c * HV + hv;
    float* ks = reinterpret_cast<float*>(smem);  // [C][kLdK] k, later beta * k * exp(G)
    float* gs = ks + kChunk * kLdK;              // [C][kLdK] g, then G
    float* qs = gs + kChunk * kLdK;              // [C][kLdK] q
    float* am = qs + kChunk * kLdK;              // [C][kLdM] A
    float* xm = am + kChunk * kLdM;              // [C][kLdM] X
    float* bs = xm + kChunk * kLdM;              // [C] beta

    ex.phase([&](int t) { load_chunk_rows<DK>(t, s, sp, hv, q, k, g, beta, kLdK, ks, qs, gs, bs); });
    cumsum_rows_phase<DK>(ex, kLdK, gs);
    // A (strictly lower, times beta_r), Aqk (lower with diagonal), X = I to start the substitution.
    ex.phase([&](int t) {
      for (int idx = t; idx < kMat; idx += kThreads) {
        const int r = idx / kChunk, cc = idx % kChunk;
        float ak = 0.f, aq = 0.f;
        if (cc <= r) {
          for (int i = 0; i < DK; ++i) {
            const float kc = ks[cc * kLdK + i] * expf(gs[r * kLdK + i] - gs[cc * kLdK + i]);
            ak += ks[r * kLdK + i] * kc;
            aq += qs[r * kLdK + i] * kc;
          }
        }
        am[r * kLdM + cc] = cc < r ? bs[r] * ak : 0.f;
        xm[r * kLdM + cc] = r == cc ? 1.f : 0.f;
        if (q) aqk[ch * kMat + idx] = aq;
      }
    });
    // Forward substitution, row by row: X[r,c] = -sum_{c <= m < r} A[r,m] X[m,c] for c < r.
    for (int r = 1; r < kChunk; ++r) {
      ex.phase([&](int t) {
        if (t >= r) return;
        float acc = 0.f;
        for (int m = t; m < r; ++m) acc += am[r * kLdM + m] * xm[m * kLdM + t];
        xm[r * kLdM + t] = -acc;
      });
    }
    // qg, kg, gl from (q, k, G); then k <- beta * k * exp(G) in place (each element has one owner).
    ex.phase([&](int t) {
      for (int idx = t; idx < kChunk * DK; idx += kThreads) {
        const int r = idx / DK, i = idx % DK;
        const float G = gs[r * kLdK + i], Gl = gs[(kChunk - 1) * kLdK + i];
        const float kr = ks[r * kLdK + i];
        if (q) qg[ch * kChunk * DK + idx] = qs[r * kLdK + i] * expf(G);
        kg[ch * kChunk * DK + idx] = kr * expf(Gl - G);
        ks[r * kLdK + i] = bs[r] * kr * expf(G);
      }
      if (t < DK) gl[ch * DK + t] = expf(gs[(kChunk - 1) * kLdK + t]);
    });
    ex.phase([&](int t) {
      for (int idx = t; idx < kChunk * DK; idx += kThreads) {
        const int r = idx / DK, i = idx % DK;
        float acc = 0.f;
        for (int cc = 0; cc <= r; ++cc) acc += xm[r * kLdM + cc] * ks[cc * kLdK + i];
        w[ch * kChunk * DK + idx] = acc;
      }
      for (int idx = t; idx < kChunk * dv; idx += kThreads) {
        const int r = idx / dv, j = idx % dv;
        float acc = 0.f;
        const int last = r < L ? r : L - 1;
        for (int cc = 0; cc <= last; ++cc)
          acc += xm[r * kLdM + cc] * bs[cc] * load_bf16(v + ((sp.start + cc) * HV + hv) * dv + j);
        u[ch * kChunk * dv + idx] = acc;
      }
      if (x)
        for (int idx = t; idx < kMat; idx += kThreads) x[ch * kMat + idx] = xm[(idx / kChunk) * kLdM + idx % kChunk];
    });
  }
};

enum class StateInit { zero, given, identity };

// Sequential pass over the chunks of one document for one value head and a tile of kTile state
// columns. Grid (D, HV, ncols / kTile). Per chunk, with S the incoming state tile:
//   v_new = u - w S;  o = qg S + Aqk v_new;  S <- Diag(gl) S + kg^T v_new.
// u == nullptr means u = 0 (the homogeneous pass that yields M, with ncols = dk and S_0 = I).
// Optional outputs: o (bf16, ncols = dv), states (S entering each chunk), vn (v_new), final_state.
// TODO(perf): keep S in registers and run the three products on tensor cores (bf16 w/qg/kg
// operands, fp32 S split hi/lo or tf32); overlap the next chunk's loads (cp.async / TMA).
template <int DK>
struct StatePassProgram {
  KdaDims s;
  int64_t ncols = 0;
  const int32_t* cu = nullptr;
  const int32_t* chunk_off = nullptr;
  const float* w = nullptr;
  const float* u = nullptr;  // nullptr: u = 0
  const float* qg = nullptr;
  const float* aqk = nullptr;
  const float* kg = nullptr;
  const float* gl = nullptr;
  StateInit init = StateInit::zero;
  const float* initial = nullptr;  // [D][HV][DK][ncols] when init == given
  bf16* o = nullptr;
  float* states = nullptr;
  float* vn = nullptr;
  float* final_state = nullptr;

  static size_t smem_bytes() { return sizeof(float) * (DK * kTile + kChunk * kTile); }

  template <class Exec>
  HYD_HD void operator()(Exec& ex, char* smem, BlockIdx b) const {
    const int64_t d = b.x;
    const int hv = static_cast<int>(b.y), HV = static_cast<int>(s.hv);
    const int64_t col0 = b.z * kTile, nc = ncols;
    float* st = reinterpret_cast<float*>(smem);  // [DK][kTile] state tile
    float* vs = st + DK * kTile;                 // [C][kTile] v_new tile
    const int64_t sbase = (d * HV + hv) * DK * nc + col0;

    ex.phase([&](int t) {
      for (int idx = t; idx < DK * kTile; idx += kThreads) {
        const int i = idx / kTile, j = idx % kTile;
        st[idx] = init == StateInit::given      ? initial[sbase + i * nc + j]
                  : init == StateInit::identity ? (i == col0 + j ? 1.f : 0.f)
                                                : 0.f;
      }
    });
    const int64_t c0 = chunk_off[d], c1 = chunk_off[d + 1];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t start = cu[d] + (c - c0) * kChunk;
      const int L = static_cast<int>(min64(kChunk, cu[d + 1] - start));
      const int64_t ch = c * HV + hv;
      const float* wc = w + ch * kChunk * DK;
      const float* kgc = kg + ch * kChunk * DK;
      const float* glc = gl + ch * DK;
      ex.phase([&](int t) {
        if (states)
          for (int idx = t; idx < DK * kTile; idx += kThreads)
            states[ch * DK * nc + (idx / kTile) * nc + col0 + idx % kTile] = st[idx];
        for (int idx = t; idx < kChunk * kTile; idx += kThreads) {
          const int r = idx / kTile, j = idx % kTile;
          float acc = u ? u[(ch * kChunk + r) * nc + col0 + j] : 0.f;
          for (int i = 0; i < DK; ++i) acc -= wc[r * DK + i] * st[i * kTile + j];
          vs[idx] = acc;
          if (vn) vn[(ch * kChunk + r) * nc + col0 + j] = acc;
        }
      });
      if (o) {
        const float* qgc = qg + ch * kChunk * DK;
        const float* aqc = aqk + ch * kMat;
        ex.phase([&](int t) {
          for (int idx = t; idx < kChunk * kTile; idx += kThreads) {
            const int r = idx / kTile, j = idx % kTile;
            if (r >= L) continue;
            float acc = 0.f;
            for (int i = 0; i < DK; ++i) acc += qgc[r * DK + i] * st[i * kTile + j];
            for (int cc = 0; cc <= r; ++cc) acc += aqc[r * kChunk + cc] * vs[cc * kTile + j];
            store_bf16(o + ((start + r) * HV + hv) * nc + col0 + j, acc);
          }
        });
      }
      ex.phase([&](int t) {
        for (int idx = t; idx < DK * kTile; idx += kThreads) {
          const int i = idx / kTile, j = idx % kTile;
          float acc = glc[i] * st[idx];
          for (int r = 0; r < L; ++r) acc += kgc[r * DK + i] * vs[r * kTile + j];
          st[idx] = acc;
        }
      });
    }
    if (final_state) {
      ex.phase([&](int t) {
        for (int idx = t; idx < DK * kTile; idx += kThreads)
          final_state[sbase + (idx / kTile) * nc + idx % kTile] = st[idx];
      });
    }
  }
};

// Reverse pass over the chunks of one document (value head hv, kTile columns of dv). Grid (D, HV,
// dv / kTile). dS starts at dfinal_state (or 0); per chunk, last to first, with dS = dS_out:
//   dv_new = Aqk^T do + kg dS;   dS <- Diag(gl) dS + qg^T do - w^T dv_new   (= dS_in)
// Keeps dS_out (dstates) and dv_new (dvn) of every chunk; dinitial_state = dS at the end.
// TODO(perf): same as the forward pass (registers + tensor cores, prefetch).
template <int DK>
struct StateBackwardProgram {
  KdaDims s;
  const int32_t* cu = nullptr;
  const int32_t* chunk_off = nullptr;
  const float* aqk = nullptr;
  const float* kg = nullptr;
  const float* qg = nullptr;
  const float* w = nullptr;
  const float* gl = nullptr;
  const bf16* dout = nullptr;
  const float* dfinal = nullptr;  // nullptr: dS_out of the last chunk = 0
  float* dstates = nullptr;
  float* dvn = nullptr;
  float* dinit = nullptr;  // nullptr: not wanted

  static size_t smem_bytes() { return sizeof(float) * (DK * kTile + kChunk * kTile); }

  template <class Exec>
  HYD_HD void operator()(Exec& ex, char* smem, BlockIdx b) const {
    const int64_t d = b.x;
    const int hv = static_cast<int>(b.y), HV = static_cast<int>(s.hv);
    const int64_t col0 = b.z * kTile, dv = s.dv;
    float* ds = reinterpret_cast<float*>(smem);  // [DK][kTile]
    float* dvs = ds + DK * kTile;                // [C][kTile]
    const int64_t sbase = (d * HV + hv) * DK * dv + col0;

    ex.phase([&](int t) {
      for (int idx = t; idx < DK * kTile; idx += kThreads)
        ds[idx] = dfinal ? dfinal[sbase + (idx / kTile) * dv + idx % kTile] : 0.f;
    });
    const int64_t c0 = chunk_off[d], c1 = chunk_off[d + 1];
    for (int64_t c = c1 - 1; c >= c0; --c) {
      const int64_t start = cu[d] + (c - c0) * kChunk;
      const int L = static_cast<int>(min64(kChunk, cu[d + 1] - start));
      const int64_t ch = c * HV + hv;
      const float* aqc = aqk + ch * kMat;
      const float* kgc = kg + ch * kChunk * DK;
      const float* qgc = qg + ch * kChunk * DK;
      const float* wc = w + ch * kChunk * DK;
      const float* glc = gl + ch * DK;
      const bf16* doc = dout + start * HV * dv + hv * dv + col0;  // row r at doc[r * HV * dv + j]
      ex.phase([&](int t) {
        for (int idx = t; idx < DK * kTile; idx += kThreads)
          dstates[ch * DK * dv + (idx / kTile) * dv + col0 + idx % kTile] = ds[idx];
        for (int idx = t; idx < kChunk * kTile; idx += kThreads) {
          const int r = idx / kTile, j = idx % kTile;
          float acc = 0.f;
          for (int r2 = r; r2 < L; ++r2) acc += aqc[r2 * kChunk + r] * load_bf16(doc + r2 * HV * dv + j);
          for (int i = 0; i < DK; ++i) acc += kgc[r * DK + i] * ds[i * kTile + j];
          dvs[idx] = acc;
          dvn[(ch * kChunk + r) * dv + col0 + j] = acc;
        }
      });
      ex.phase([&](int t) {
        for (int idx = t; idx < DK * kTile; idx += kThreads) {
          const int i = idx / kTile, j = idx % kTile;
          float acc = glc[i] * ds[idx];
          for (int r = 0; r < L; ++r)
            acc += qgc[r * DK + i] * load_bf16(doc + r * HV * dv + j) - wc[r * DK + i] * dvs[r * kTile + j];
          ds[idx] = acc;
        }
      });
    }
    if (dinit) {
      ex.phase([&](int t) {
        for (int idx = t; idx < DK * kTile; idx += kThreads) dinit[sbase + (idx / kTile) * dv + idx % kTile] = ds[idx];
      });
    }
  }
};

// Products of each chunk over the dv dimension. Grid (max_chunks, HV, DK / kTile + 1).
// Blocks z < DK / kTile, rows i of their dk tile (S = S_in, dS = dS_out of the chunk):
//   dqg = do S^T,  dkg = v_new dS^T,  dw = -dv_new S^T   [C x dk tile];   dgls[i] = sum_j S[i,j] dS[i,j]
// Block z = DK / kTile: dAqk = do v_new^T (c <= r), dT_v = dv_new v^T (c <= r), and the finished
//   dv = T^T dv_new, i.e. dv[c] = beta_c sum_{r >= c} X[r,c] dv_new[r]   (v enters only through u).
// TODO(perf): tensor cores; fold into the reverse pass once the state tile covers all of dv.
template <int DK>
struct StateGradProgram {
  KdaDims s;
  const int32_t* cu = nullptr;
  const int32_t* chunk_off = nullptr;
  const float* states = nullptr;
  const float* dstates = nullptr;
  const float* vn = nullptr;
  const float* dvn = nullptr;
  const float* x = nullptr;
  const float* beta = nullptr;
  const bf16* dout = nullptr;
  const bf16* v = nullptr;
  float* dqg = nullptr;
  float* dkg = nullptr;
  float* dw = nullptr;
  float* dgls = nullptr;
  float* daqk = nullptr;
  float* dtv = nullptr;
  bf16* dv_out = nullptr;

  static size_t smem_bytes(int64_t dv) { return sizeof(float) * (4 * kChunk * (dv + 1) + kChunk * kLdM + kChunk); }

  template <class Exec>
  HYD_HD void operator()(Exec& ex, char* smem, BlockIdx b) const {
    const int64_t c = b.x;
    const int hv = static_cast<int>(b.y), HV = static_cast<int>(s.hv);
    if (c >= chunk_off[s.num_docs]) return;
    const ChunkSpan sp = locate_chunk(cu, chunk_off, s.num_docs, c);
    const int L = sp.len, dv = static_cast<int>(s.dv), ldv = dv + 1;
    const int64_t ch = c * HV + hv;
    const bool tile_block = b.z < DK / kTile;
    const int i0 = static_cast<int>(b.z) * kTile;
    float* dos = reinterpret_cast<float*>(smem);  // [C][ldv] do
    float* vns = dos + kChunk * ldv;              // [C][ldv] v_new
    float* dvns = vns + kChunk * ldv;             // [C][ldv] dv_new
    float* st = dvns + kChunk * ldv;              // tile block: [kTile][ldv] S rows i0.., then dS rows
    float* dst = st + kTile * ldv;
    float* vs = st;  // dAqk block: [C][ldv] v, [C][kLdM] X, [C] beta
    float* xs = vs + kChunk * ldv;
    float* bs = xs + kChunk * kLdM;

    ex.phase([&](int t) {
      for (int idx = t; idx < kChunk * dv; idx += kThreads) {
        const int r = idx / dv, j = idx % dv;
        const int64_t row = (sp.start + r) * HV + hv;
        dos[r * ldv + j] = r < L ? load_bf16(dout + row * dv + j) : 0.f;
        vns[r * ldv + j] = vn[ch * kChunk * dv + idx];
        dvns[r * ldv + j] = dvn[ch * kChunk * dv + idx];
        if (!tile_block) vs[r * ldv + j] = r < L ? load_bf16(v + row * dv + j) : 0.f;
      }
      if (tile_block) {
        for (int idx = t; idx < kTile * dv; idx += kThreads) {
          const int ii = idx / dv, j = idx % dv;
          st[ii * ldv + j] = states[(ch * DK + i0 + ii) * dv + j];
          dst[ii * ldv + j] = dstates[(ch * DK + i0 + ii) * dv + j];
        }
      } else {
        for (int idx = t; idx < kMat; idx += kThreads) xs[(idx / kChunk) * kLdM + idx % kChunk] = x[ch * kMat + idx];
        if (t < kChunk) bs[t] = t < L ? beta[(sp.start + t) * HV + hv] : 0.f;
      }
    });
    if (tile_block) {
      ex.phase([&](int t) {
        for (int idx = t; idx < kChunk * kTile; idx += kThreads) {
          const int r = idx / kTile, ii = idx % kTile;
          float a_q = 0.f, a_k = 0.f, a_w = 0.f;
          for (int j = 0; j < dv; ++j) {
            const float sv = st[ii * ldv + j];
            a_q += dos[r * ldv + j] * sv;
            a_w += dvns[r * ldv + j] * sv;
            a_k += vns[r * ldv + j] * dst[ii * ldv + j];
          }
          const int64_t o = (ch * kChunk + r) * DK + i0 + ii;
          dqg[o] = a_q;
          dkg[o] = a_k;
          dw[o] = -a_w;
        }
        if (t < kTile) {
          float acc = 0.f;
          for (int j = 0; j < dv; ++j) acc += st[t * ldv + j] * dst[t * ldv + j];
          dgls[ch * DK + i0 + t] = acc;
        }
      });
    } else {
      ex.phase([&](int t) {
        for (int idx = t; idx < kMat; idx += kThreads) {
          const int r = idx / kChunk, cc = idx % kChunk;
          float a = 0.f, bt = 0.f;
          if (cc <= r) {
            for (int j = 0; j < dv; ++j) {
              a += dos[r * ldv + j] * vns[cc * ldv + j];
              bt += dvns[r * ldv + j] * vs[cc * ldv + j];
            }
          }
          daqk[ch * kMat + idx] = a;
          dtv[ch * kMat + idx] = bt;
        }
        for (int idx = t; idx < kChunk * dv; idx += kThreads) {
          const int cc = idx / dv, j = idx % dv;
          if (cc >= L) continue;
          float acc = 0.f;
          for (int r = cc; r < L; ++r) acc += xs[r * kLdM + cc] * dvns[r * ldv + j];
          store_bf16(dv_out + ((sp.start + cc) * HV + hv) * dv + j, bs[cc] * acc);
        }
      });
    }
  }
};

// Intra-chunk gradients of one chunk and value head. Grid (max_chunks, HV). With T = X Diag(beta),
// kG = k * exp(G), E_rc[i] = exp(G_r[i] - G_c[i]) and the products of StateGradProgram:
//   dT = dT_v + dw kG^T (c <= r);  dbeta_c += sum_r dT[r,c] X[r,c];  dX = dT Diag(beta)
//   dA = -(X^T dX X^T) restricted to c < r;  dbeta_r += sum_c dA[r,c] Ak[r,c];  P = Diag(beta) dA
//   dkG = T^T dw, and per element (r, i), r < len (sums over c <= r or r' >= r of the chunk):
//   dq = dqg exp(G_r) + sum_c dAqk[r,c] k_c E_rc
//   dk = dkg exp(G_last - G_r) + dkG exp(G_r) + sum_{c<r} P[r,c] k_c E_rc + sum_{r'>r} P[r',r] k_r' E_r'r
//        + sum_{r'>=r} dAqk[r',r] q_r' E_r'r
//   dG = dqg q exp(G_r) - dkg k exp(G_last - G_r) + dkG k exp(G_r) + k sum_{c<r} P k_c E + q sum_c dAqk k_c E
//        - k sum_{r'>r} P k_r' E - k sum_{r'>=r} dAqk q_r' E
//        (+ at r = len-1: exp(G_last) dgls + sum_r' dkg k_r' exp(G_last - G_r'))
//   dg = reverse cumulative sum of dG over the chunk's rows.
// dq, dk go to per-value-head scratch (summed over the GQA group later), dg and dbeta are final.
// TODO(perf): tensor cores for the 64 x 64 x 64 products and for the E-weighted sums (split the
// exponent at a reference row as the forward does), fewer exp evaluations.
template <int DK>
struct IntraGradProgram {
  KdaDims s;
  const bf16* q = nullptr;
  const bf16* k = nullptr;
  const float* g = nullptr;
  const float* beta = nullptr;
  const int32_t* cu = nullptr;
  const int32_t* chunk_off = nullptr;
  const float* x = nullptr;
  const float* daqk = nullptr;
  const float* dtv = nullptr;
  const float* dqg = nullptr;
  const float* dkg = nullptr;
  const float* dw = nullptr;
  const float* dgls = nullptr;
  float* dq_hv = nullptr;
  float* dk_hv = nullptr;
  float* dg = nullptr;
  float* dbeta = nullptr;

  static constexpr int kLdK = DK + 1;
  static size_t smem_bytes() { return sizeof(float) * (3 * kChunk * kLdK + 4 * kChunk * kLdM + 2 * kChunk); }

  template <class Exec>
  HYD_HD void operator()(Exec& ex, char* smem, BlockIdx b) const {
    const int64_t c = b.x;
    const int hv = static_cast<int>(b.y);
    if (c >= chunk_off[s.num_docs]) return;
    const ChunkSpan sp = locate_chunk(cu, chunk_off, s.num_docs, c);
    const int L = sp.len, HV = static_cast<int>(s.hv);
    const int64_t ch = c * HV + hv;
    float* ks = reinterpret_cast<float*>(smem);  // [C][kLdK]
    float* qs = ks + kChunk * kLdK;              // [C][kLdK]
    float* gs = qs + kChunk * kLdK;              // [C][kLdK] G
    float* xs = gs + kChunk * kLdK;              // [C][kLdM] X
    float* m2 = xs + kChunk * kLdM;              // dAqk
    float* m3 = m2 + kChunk * kLdM;              // dT_v -> dT -> dA -> P
    float* m4 = m3 + kChunk * kLdM;              // Y = dX X^T -> Ak
    float* bs = m4 + kChunk * kLdM;              // beta
    float* dbt = bs + kChunk;                    // dbeta through T
    const float* dwc = dw + ch * kChunk * DK;
    const float* dqgc = dqg + ch * kChunk * DK;
    const float* dkgc = dkg + ch * kChunk * DK;

    ex.phase([&](int t) {
      load_chunk_rows<DK>(t, s, sp, hv, q, k, g, beta, kLdK, ks, qs, gs, bs);
      for (int idx = t; idx < kMat; idx += kThreads) {
        const int o = (idx / kChunk) * kLdM + idx % kChunk;
        xs[o] = x[ch * kMat + idx];
        m2[o] = daqk[ch * kMat + idx];
        m3[o] = dtv[ch * kMat + idx];
      }
    });
    cumsum_rows_phase<DK>(ex, kLdK, gs);
    // dT = dT_v + dw kG^T on and below the diagonal (T is lower triangular).
    ex.phase([&](int t) {
      for (int idx = t; idx < kMat; idx += kThreads) {
        const int r = idx / kChunk, cc = idx % kChunk;
        float acc = 0.f;
        if (cc <= r) {
          acc = m3[r * kLdM + cc];
          for (int i = 0; i < DK; ++i) acc += dwc[r * DK + i] * ks[cc * kLdK + i] * expf(gs[cc * kLdK + i]);
        }
        m3[r * kLdM + cc] = acc;
      }
    });
    // dbeta through T (column sums), and Y = dX X^T with dX = dT Diag(beta).
    ex.phase([&](int t) {
      if (t < kChunk) {
        float acc = 0.f;
        for (int r = t; r < kChunk; ++r) acc += m3[r * kLdM + t] * xs[r * kLdM + t];
        dbt[t] = acc;
      }
      for (int idx = t; idx < kMat; idx += kThreads) {
        const int a = idx / kChunk, cc = idx % kChunk;
        const int last = a < cc ? a : cc;
        float acc = 0.f;
        for (int bb = 0; bb <= last; ++bb) acc += m3[a * kLdM + bb] * bs[bb] * xs[cc * kLdM + bb];
        m4[a * kLdM + cc] = acc;
      }
    });
    // dA = -(X^T Y) strictly below the diagonal.
    ex.phase([&](int t) {
      for (int idx = t; idx < kMat; idx += kThreads) {
        const int r = idx / kChunk, cc = idx % kChunk;
        float acc = 0.f;
        if (cc < r)
          for (int a = r; a < kChunk; ++a) acc += xs[a * kLdM + r] * m4[a * kLdM + cc];
        m3[r * kLdM + cc] = -acc;
      }
    });
    // Ak[r,c] = sum_i k_r k_c E_rc (A without beta_r), c < r.
    ex.phase([&](int t) {
      for (int idx = t; idx < kMat; idx += kThreads) {
        const int r = idx / kChunk, cc = idx % kChunk;
        float acc = 0.f;
        if (cc < r)
          for (int i = 0; i < DK; ++i)
            acc += ks[r * kLdK + i] * ks[cc * kLdK + i] * expf(gs[r * kLdK + i] - gs[cc * kLdK + i]);
        m4[r * kLdM + cc] = acc;
      }
    });
    // dbeta (through T and through A); P = Diag(beta) dA in place (thread r owns row r).
    ex.phase([&](int t) {
      if (t >= kChunk) return;
      const int r = t;
      float acc = 0.f;
      for (int cc = 0; cc < r; ++cc) {
        const float da = m3[r * kLdM + cc];
        acc += da * m4[r * kLdM + cc];
        m3[r * kLdM + cc] = da * bs[r];
      }
      if (r < L) dbeta[(sp.start + r) * HV + hv] = dbt[r] + acc;
    });
    ex.phase([&](int t) {
      for (int idx = t; idx < kChunk * DK; idx += kThreads) {
        const int r = idx / DK, i = idx % DK;
        if (r >= L) continue;
        const float Gr = gs[r * kLdK + i], kr = ks[r * kLdK + i], qr = qs[r * kLdK + i];
        const float Gl = gs[(kChunk - 1) * kLdK + i];
        float sq = 0.f, sp_ = 0.f;  // row sums over c <= r
        for (int cc = 0; cc <= r; ++cc) {
          const float kc = ks[cc * kLdK + i] * expf(Gr - gs[cc * kLdK + i]);
          sq += m2[r * kLdM + cc] * kc;
          sp_ += m3[r * kLdM + cc] * kc;  // P[r][r] = 0
        }
        float sk = 0.f, sa = 0.f, dkG = 0.f;  // column sums over r' >= r
        for (int r2 = r; r2 < L; ++r2) {
          const float e = expf(gs[r2 * kLdK + i] - Gr);
          sk += m3[r2 * kLdM + r] * ks[r2 * kLdK + i] * e;  // P[r][r] = 0
          sa += m2[r2 * kLdM + r] * qs[r2 * kLdK + i] * e;
          dkG += xs[r2 * kLdM + r] * dwc[r2 * DK + i];
        }
        dkG *= bs[r];
        const float a_qg = dqgc[r * DK + i], a_kg = dkgc[r * DK + i];
        const float eG = expf(Gr), eL = expf(Gl - Gr);
        const float dqv = a_qg * eG + sq;
        const float dkv = a_kg * eL + dkG * eG + sp_ + sk + sa;
        float dG = a_qg * qr * eG - a_kg * kr * eL + dkG * kr * eG + kr * (sp_ - sk - sa) + qr * sq;
        if (r == L - 1) {
          float extra = expf(Gl) * dgls[ch * DK + i];
          for (int r2 = 0; r2 < L; ++r2) extra += dkgc[r2 * DK + i] * ks[r2 * kLdK + i] * expf(Gl - gs[r2 * kLdK + i]);
          dG += extra;
        }
        const int64_t o = ((sp.start + r) * HV + hv) * DK + i;
        dq_hv[o] = dqv;
        dk_hv[o] = dkv;
        dg[o] = dG;
      }
    });
    // dg = reverse cumulative sum of dG within the chunk (the block's own global writes above are
    // visible after the barrier).
    ex.phase([&](int t) {
      if (t >= DK) return;
      float acc = 0.f;
      for (int r = L - 1; r >= 0; --r) {
        float* p = dg + ((sp.start + r) * HV + hv) * DK + t;
        acc += *p;
        *p = acc;
      }
    });
  }
};

// dq[t,h] = sum over the value heads hv of group h of dq_hv[t,hv] (and dk), rounded to bf16 once.
// Grid (ceil(N H dk / kThreads), 1, 1).
struct GroupReduceProgram {
  KdaDims s;
  const float* dq_hv = nullptr;
  const float* dk_hv = nullptr;
  bf16* dq = nullptr;
  bf16* dk = nullptr;

  static size_t smem_bytes() { return 0; }

  template <class Exec>
  HYD_HD void operator()(Exec& ex, char*, BlockIdx b) const {
    const int64_t total = s.n * s.h * s.dk, group = s.hv / s.h;
    ex.phase([&](int t) {
      const int64_t e = b.x * kThreads + t;
      if (e >= total) return;
      const int64_t i = e % s.dk, th = e / s.dk;  // th = token * H + h
      const int64_t tok = th / s.h, h = th % s.h;
      float aq = 0.f, ak = 0.f;
      for (int64_t m = 0; m < group; ++m) {
        const int64_t src = (tok * s.hv + h * group + m) * s.dk + i;
        aq += dq_hv[src];
        ak += dk_hv[src];
      }
      store_bf16(dq + e, aq);
      store_bf16(dk + e, ak);
    });
  }
};

// ---------------------------------------------------------------- pipelines

// Calls f.template operator()<DK>() for the supported key dims.
template <class F>
void with_dk(int64_t dk, F&& f) {
  if (dk == 32)
    f.template operator()<32>();
  else if (dk == 64)
    f.template operator()<64>();
  else
    f.template operator()<128>();
}

// Launcher: launch(Grid, smem_bytes, program) runs the program on every block of the grid, in
// stream order. Scratch must come from carve_scratch(base, s, pass, sc) with the same pass.
template <class Launcher>
void launch_chunk_table(Launcher& L, const KdaDims& s, const int32_t* cu, const Scratch& sc) {
  L.launch(Grid{1, 1, 1}, ChunkTableProgram::smem_bytes(),
           ChunkTableProgram{.cu = cu, .num_docs = s.num_docs, .chunk_off = sc.chunk_off});
}

template <int DK, class Launcher>
void launch_prep(Launcher& L, const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                 const float* beta, const int32_t* cu, const Scratch& sc) {
  const int64_t mc = max_chunks(s);
  if (mc == 0) return;
  const ChunkPrepProgram<DK> p{.s = s,
                               .q = q,
                               .k = k,
                               .v = v,
                               .g = g,
                               .beta = beta,
                               .cu = cu,
                               .chunk_off = sc.chunk_off,
                               .w = sc.w,
                               .u = sc.u,
                               .qg = sc.qg,
                               .kg = sc.kg,
                               .gl = sc.gl,
                               .aqk = sc.aqk,
                               .x = sc.x};
  L.launch(Grid{mc, s.hv, 1}, ChunkPrepProgram<DK>::smem_bytes(), p);
}

template <class Launcher>
void run_forward(Launcher& L, const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                 const float* beta, const int32_t* cu, const float* initial_state, bf16* o, float* final_state,
                 const Scratch& sc) {
  launch_chunk_table(L, s, cu, sc);
  with_dk(s.dk, [&]<int DK>() {
    launch_prep<DK>(L, s, q, k, v, g, beta, cu, sc);
    const StatePassProgram<DK> p{.s = s,
                                 .ncols = s.dv,
                                 .cu = cu,
                                 .chunk_off = sc.chunk_off,
                                 .w = sc.w,
                                 .u = sc.u,
                                 .qg = sc.qg,
                                 .aqk = sc.aqk,
                                 .kg = sc.kg,
                                 .gl = sc.gl,
                                 .init = initial_state ? StateInit::given : StateInit::zero,
                                 .initial = initial_state,
                                 .o = o,
                                 .final_state = final_state};
    L.launch(Grid{s.num_docs, s.hv, s.dv / kTile}, StatePassProgram<DK>::smem_bytes(), p);
  });
}

template <class Launcher>
void run_transition(Launcher& L, const KdaDims& s, const bf16* k, const bf16* v, const float* g, const float* beta,
                    const int32_t* cu, float* M, float* B, const Scratch& sc) {
  launch_chunk_table(L, s, cu, sc);
  with_dk(s.dk, [&]<int DK>() {
    launch_prep<DK>(L, s, nullptr, k, v, g, beta, cu, sc);
    // B: the state pass from S = 0.
    const StatePassProgram<DK> pb{.s = s,
                                  .ncols = s.dv,
                                  .cu = cu,
                                  .chunk_off = sc.chunk_off,
                                  .w = sc.w,
                                  .u = sc.u,
                                  .kg = sc.kg,
                                  .gl = sc.gl,
                                  .init = StateInit::zero,
                                  .final_state = B};
    L.launch(Grid{s.num_docs, s.hv, s.dv / kTile}, StatePassProgram<DK>::smem_bytes(), pb);
    // M: the homogeneous pass (u = 0) from S = I over dk columns.
    const StatePassProgram<DK> pm{.s = s,
                                  .ncols = s.dk,
                                  .cu = cu,
                                  .chunk_off = sc.chunk_off,
                                  .w = sc.w,
                                  .u = nullptr,
                                  .kg = sc.kg,
                                  .gl = sc.gl,
                                  .init = StateInit::identity,
                                  .final_state = M};
    L.launch(Grid{s.num_docs, s.hv, s.dk / kTile}, StatePassProgram<DK>::smem_bytes(), pm);
  });
}

// dq, dk = the sums of sc.dq_hv, sc.dk_hv over each GQA group, in bf16.
template <class Launcher>
void launch_group_reduce(Launcher& L, const KdaDims& s, bf16* dq, bf16* dk, const Scratch& sc) {
  const int64_t elems = s.n * s.h * s.dk;
  if (elems > 0)
    L.launch(Grid{(elems + kThreads - 1) / kThreads, 1, 1}, GroupReduceProgram::smem_bytes(),
             GroupReduceProgram{.s = s, .dq_hv = sc.dq_hv, .dk_hv = sc.dk_hv, .dq = dq, .dk = dk});
}

// The last two steps of the backward, given sc.x, daqk, dtv, dqg, dkg, dw, dgls: intra-chunk
// gradients (dq, dk per value head, dg, dbeta) and the sum of dq, dk over each GQA group.
template <class Launcher>
void launch_intra_and_reduce(Launcher& L, const KdaDims& s, const bf16* q, const bf16* k, const float* g,
                             const float* beta, const int32_t* cu, bf16* dq, bf16* dk, float* dg, float* dbeta,
                             const Scratch& sc) {
  const int64_t mc = max_chunks(s);
  if (mc > 0)
    with_dk(s.dk, [&]<int DK>() {
      const IntraGradProgram<DK> ig{.s = s,
                                    .q = q,
                                    .k = k,
                                    .g = g,
                                    .beta = beta,
                                    .cu = cu,
                                    .chunk_off = sc.chunk_off,
                                    .x = sc.x,
                                    .daqk = sc.daqk,
                                    .dtv = sc.dtv,
                                    .dqg = sc.dqg,
                                    .dkg = sc.dkg,
                                    .dw = sc.dw,
                                    .dgls = sc.dgls,
                                    .dq_hv = sc.dq_hv,
                                    .dk_hv = sc.dk_hv,
                                    .dg = dg,
                                    .dbeta = dbeta};
      L.launch(Grid{mc, s.hv, 1}, IntraGradProgram<DK>::smem_bytes(), ig);
    });
  launch_group_reduce(L, s, dq, dk, sc);
}

template <class Launcher>
void run_backward(Launcher& L, const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                  const float* beta, const int32_t* cu, const float* initial_state, const bf16* dout,
                  const float* dfinal_state, bf16* dq, bf16* dk, bf16* dv, float* dg, float* dbeta,
                  float* dinitial_state, const Scratch& sc) {
  launch_chunk_table(L, s, cu, sc);
  const int64_t mc = max_chunks(s);
  with_dk(s.dk, [&]<int DK>() {
    launch_prep<DK>(L, s, q, k, v, g, beta, cu, sc);
    // The forward state pass again, keeping S_in and v_new of every chunk instead of o.
    const StatePassProgram<DK> fwd{.s = s,
                                   .ncols = s.dv,
                                   .cu = cu,
                                   .chunk_off = sc.chunk_off,
                                   .w = sc.w,
                                   .u = sc.u,
                                   .kg = sc.kg,
                                   .gl = sc.gl,
                                   .init = initial_state ? StateInit::given : StateInit::zero,
                                   .initial = initial_state,
                                   .states = sc.states,
                                   .vn = sc.vn};
    L.launch(Grid{s.num_docs, s.hv, s.dv / kTile}, StatePassProgram<DK>::smem_bytes(), fwd);
    const StateBackwardProgram<DK> rev{.s = s,
                                       .cu = cu,
                                       .chunk_off = sc.chunk_off,
                                       .aqk = sc.aqk,
                                       .kg = sc.kg,
                                       .qg = sc.qg,
                                       .w = sc.w,
                                       .gl = sc.gl,
                                       .dout = dout,
                                       .dfinal = dfinal_state,
                                       .dstates = sc.dstates,
                                       .dvn = sc.dvn,
                                       .dinit = dinitial_state};
    L.launch(Grid{s.num_docs, s.hv, s.dv / kTile}, StateBackwardProgram<DK>::smem_bytes(), rev);
    if (mc > 0) {
      const StateGradProgram<DK> sg{.s = s,
                                    .cu = cu,
                                    .chunk_off = sc.chunk_off,
                                    .states = sc.states,
                                    .dstates = sc.dstates,
                                    .vn = sc.vn,
                                    .dvn = sc.dvn,
                                    .x = sc.x,
                                    .beta = beta,
                                    .dout = dout,
                                    .v = v,
                                    .dqg = sc.dqg,
                                    .dkg = sc.dkg,
                                    .dw = sc.dw,
                                    .dgls = sc.dgls,
                                    .daqk = sc.daqk,
                                    .dtv = sc.dtv,
                                    .dv_out = dv};
      L.launch(Grid{mc, s.hv, DK / kTile + 1}, StateGradProgram<DK>::smem_bytes(s.dv), sg);
    }
  });
  launch_intra_and_reduce(L, s, q, k, g, beta, cu, dq, dk, dg, dbeta, sc);
}

// Runs programs serially on the host (tests). Shared memory is filled with NaN before every block
// so that a read of an unwritten element shows up in the results; a guard zone past smem_bytes
// must be untouched afterwards (overflow_blocks counts the blocks that wrote into it).
struct HostLauncher {
  static constexpr size_t kGuardFloats = 4096;
  bool reverse_threads = false;
  int64_t overflow_blocks = 0;

  template <class P>
  void launch(Grid g, size_t smem_bytes, const P& p) {
    const size_t used = (smem_bytes + sizeof(float) - 1) / sizeof(float);
    std::vector<float> smem(used + kGuardFloats);
    HostExec ex{reverse_threads};
    for (int64_t z = 0; z < g.z; ++z)
      for (int64_t y = 0; y < g.y; ++y)
        for (int64_t xb = 0; xb < g.x; ++xb) {
          std::fill(smem.begin(), smem.end(), std::nanf(""));
          p(ex, reinterpret_cast<char*>(smem.data()), BlockIdx{xb, y, z});
          for (size_t i = used; i < smem.size(); ++i)
            if (!std::isnan(smem[i])) {
              ++overflow_blocks;
              break;
            }
        }
  }
};

}  // namespace hyd::kernels::kda_chunk

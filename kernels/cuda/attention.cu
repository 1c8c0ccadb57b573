// CUDA causal GQA attention with document masking and query offset (see kernels/attention.h for the
// math and the mask: query i of a document with len_q queries and len_k keys sees its keys
// [0, i + 1 + len_k - len_q), none when that is <= 0). The simple, correct version: one thread block of kWarps warps
// per (token, head) row; the warps split the row's keys (forward, dq) or queries (dk, dv) round-robin, each lane holds
// head dimensions lane, lane + 32, ... (d <= 32 * NC) in registers, and a dot product is one warp reduction. Softmax
// statistics and all accumulation in fp32; inputs and outputs bf16, lse fp32.
//
// Forward, per (i, h): online softmax over the visible keys per warp (running max m, sum l,
// unnormalised o), then the warps' partial states are merged in shared memory. A row that sees no
// key writes o = 0, lse = -inf.
// Backward: kernel 1, per (i, h): D_i = <do_i, o_i> (kept in a scratch buffer) and
//   dq_i = scale sum_j P_ij (<do_i, v_j> - D_i) k_j,  P_ij = exp(scale <q_i, k_j> - lse_i);
// kernel 2, per (key j, kv head g): loops over the queries that see key j (local query index
// >= j + len_q - len_k, up to the document's end) and the query heads of group g, accumulating dv_j += P_ij do_i and
// dk_j += scale dS_ij q_i. Every output row has exactly one owner, so no atomics are needed.
#include <cmath>

#include "kernels/attention.h"
#include "kernels/cuda/common.cuh"

namespace hyd::kernels::cuda {

using namespace cuda_detail;

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// The document holding row i of the boundary array cu: cu[doc] <= i < cu[doc + 1]. cu is
// non-decreasing with cu[0] = 0 and cu[num_docs] = n > i; empty documents are never returned (the
// binary search ends on the unique doc with cu[doc] <= i < cu[doc + 1]).
__device__ __forceinline__ int64_t find_document(const int32_t* cu, int64_t num_docs, int64_t i) {
  int64_t lo = 0, hi = num_docs;  // invariant: cu[lo] <= i < cu[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (cu[mid] <= i)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// Document `doc`'s rows: queries [q_begin, q_begin + len_q), keys [k_begin, k_begin + len_k).
struct DocumentRows {
  int64_t q_begin, len_q, k_begin, len_k;
};
__device__ __forceinline__ DocumentRows document_rows(const int32_t* cu_q, const int32_t* cu_k, int64_t doc) {
  return {cu_q[doc], cu_q[doc + 1] - cu_q[doc], cu_k[doc], cu_k[doc + 1] - cu_k[doc]};
}

template <int NC>
__device__ __forceinline__ void load_row(const __nv_bfloat16* row, int d, int lane, float (&r)[NC]) {
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int dim = lane + 32 * c;
    r[c] = dim < d ? to_f(row[dim]) : 0.f;
  }
}

template <int NC>
__device__ __forceinline__ float dot_row(const float (&r)[NC], const __nv_bfloat16* row, int d, int lane) {
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int dim = lane + 32 * c;
    if (dim < d) s += r[c] * to_f(row[dim]);
  }
  return warp_sum(s);
}

template <int NC>
__device__ __forceinline__ void axpy_row(float (&acc)[NC], float a, const __nv_bfloat16* row, int d, int lane) {
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int dim = lane + 32 * c;
    if (dim < d) acc[c] += a * to_f(row[dim]);
  }
}

// Sums the per-warp register rows acc into out (bf16, times `mult`), using `shared` [kWarps][32 NC].
template <int NC>
__device__ __forceinline__ void store_warp_sum(const float (&acc)[NC], float* shared, float mult, __nv_bfloat16* out,
                                               int d) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < NC; ++c) shared[warp * 32 * NC + lane + 32 * c] = acc[c];
  __syncthreads();
  for (int dim = threadIdx.x; dim < d; dim += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += shared[w * 32 * NC + dim];
    out[dim] = to_bf(mult * s);
  }
}

template <int NC>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                             const int32_t* cu_q, const int32_t* cu_k, int64_t num_docs, __nv_bfloat16* o, float* lse,
                             int hq, int hkv, int d, float scale) {
  __shared__ float sm_max[kWarps], sm_sum[kWarps];
  __shared__ float sm_acc[kWarps * 32 * NC];
  const int64_t i = blockIdx.x;
  const int h = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kh = h / (hq / hkv);
  const DocumentRows doc = document_rows(cu_q, cu_k, find_document(cu_q, num_docs, i));
  // Visible keys: rows [k_begin, k_end); none (k_end <= k_begin) for a fully masked row.
  const int64_t k_end = doc.k_begin + (i - doc.q_begin) + 1 + doc.len_k - doc.len_q;

  float qr[NC];
  load_row<NC>(q + (i * hq + h) * d, d, lane, qr);
#pragma unroll
  for (int c = 0; c < NC; ++c) qr[c] *= scale;

  float m = -INFINITY, l = 0.f, acc[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) acc[c] = 0.f;
  for (int64_t j = doc.k_begin + warp; j < k_end; j += kWarps) {
    const int64_t row = (j * hkv + kh) * d;
    const float s = dot_row<NC>(qr, k + row, d, lane);
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new), p = expf(s - m_new);
    l = l * corr + p;
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[c] *= corr;
    axpy_row<NC>(acc, p, v + row, d, lane);
    m = m_new;
  }

  // Merge the warps' states: M = max m_w, L = sum l_w e^(m_w - M), o = sum acc_w e^(m_w - M) / L.
  // A warp that saw no key has m = -inf and contributes 0 when another warp saw one (M finite).
  if (lane == 0) {
    sm_max[warp] = m;
    sm_sum[warp] = l;
  }
  __syncthreads();
  float big = -INFINITY;
  for (int w = 0; w < kWarps; ++w) big = fmaxf(big, sm_max[w]);
  if (big == -INFINITY) {  // no visible key (block-uniform: every thread read the same sm_max)
    __nv_bfloat16* out = o + (i * hq + h) * d;
    for (int dim = threadIdx.x; dim < d; dim += blockDim.x) out[dim] = to_bf(0.f);
    if (threadIdx.x == 0) lse[i * hq + h] = -INFINITY;
    return;
  }
  const float my_weight = expf(m - big);
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += sm_sum[w] * expf(sm_max[w] - big);
#pragma unroll
  for (int c = 0; c < NC; ++c) acc[c] *= my_weight;
  store_warp_sum<NC>(acc, sm_acc, 1.f / total, o + (i * hq + h) * d, d);
  if (threadIdx.x == 0) lse[i * hq + h] = big + logf(total);
}

template <int NC>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dq_kernel(const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                 const __nv_bfloat16* v, const __nv_bfloat16* o, const float* lse, const int32_t* cu_q,
                                 const int32_t* cu_k, int64_t num_docs, __nv_bfloat16* dq, float* delta, int hq,
                                 int hkv, int d, float scale) {
  __shared__ float sm_acc[kWarps * 32 * NC];
  const int64_t i = blockIdx.x;
  const int h = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kh = h / (hq / hkv);
  const DocumentRows doc = document_rows(cu_q, cu_k, find_document(cu_q, num_docs, i));
  // Visible keys [k_begin, k_end), as in the forward; a fully masked row (lse = -inf) has no
  // iteration, so its dq is 0 and lse is never read.
  const int64_t k_end = doc.k_begin + (i - doc.q_begin) + 1 + doc.len_k - doc.len_q;

  const int64_t qrow = (i * hq + h) * d;
  float qr[NC], dor[NC], acc[NC];
  load_row<NC>(q + qrow, d, lane, qr);
  load_row<NC>(dout + qrow, d, lane, dor);
  const float di = dot_row<NC>(dor, o + qrow, d, lane);  // D_i, computed by every warp
  if (threadIdx.x == 0) delta[i * hq + h] = di;
  const float lse_i = lse[i * hq + h];
#pragma unroll
  for (int c = 0; c < NC; ++c) acc[c] = 0.f;
  for (int64_t j = doc.k_begin + warp; j < k_end; j += kWarps) {
    const int64_t row = (j * hkv + kh) * d;
    const float p = expf(scale * dot_row<NC>(qr, k + row, d, lane) - lse_i);
    const float ds = p * (dot_row<NC>(dor, v + row, d, lane) - di);
    axpy_row<NC>(acc, ds, k + row, d, lane);
  }
  store_warp_sum<NC>(acc, sm_acc, scale, dq + qrow, d);
}

template <int NC>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dkdv_kernel(const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                   const __nv_bfloat16* v, const float* lse, const float* delta, const int32_t* cu_q,
                                   const int32_t* cu_k, int64_t num_docs, __nv_bfloat16* dk, __nv_bfloat16* dv, int hq,
                                   int hkv, int d, float scale) {
  __shared__ float sm_acc[kWarps * 32 * NC];
  const int64_t j = blockIdx.x;
  const int g = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = hq / hkv;
  const DocumentRows doc = document_rows(cu_q, cu_k, find_document(cu_k, num_docs, j));
  // Queries that see key j: local index iq >= (j - k_begin) + len_q - len_k, up to len_q (none
  // when the document has no queries: dk = dv = 0 is still written).
  const int64_t iq_first = max(int64_t(0), (j - doc.k_begin) + doc.len_q - doc.len_k);
  const int64_t i_first = doc.q_begin + iq_first;

  const int64_t krow = (j * hkv + g) * d;
  float kr[NC], vr[NC], dk_acc[NC], dv_acc[NC];
  load_row<NC>(k + krow, d, lane, kr);
  load_row<NC>(v + krow, d, lane, vr);
#pragma unroll
  for (int c = 0; c < NC; ++c) dk_acc[c] = dv_acc[c] = 0.f;
  // (query, head) pairs: consecutive pairs are the heads of one query, adjacent in memory.
  const int64_t pairs = max(int64_t(0), doc.len_q - iq_first) * group;
  for (int64_t pidx = warp; pidx < pairs; pidx += kWarps) {
    const int64_t i = i_first + pidx / group;
    const int h = g * group + static_cast<int>(pidx % group);
    const int64_t qrow = (i * hq + h) * d;
    const float p = expf(scale * dot_row<NC>(kr, q + qrow, d, lane) - lse[i * hq + h]);
    const float ds = p * (dot_row<NC>(vr, dout + qrow, d, lane) - delta[i * hq + h]);
    axpy_row<NC>(dv_acc, p, dout + qrow, d, lane);
    axpy_row<NC>(dk_acc, ds, q + qrow, d, lane);
  }
  store_warp_sum<NC>(dv_acc, sm_acc, 1.f, dv + krow, d);
  __syncthreads();  // sm_acc is reused
  store_warp_sum<NC>(dk_acc, sm_acc, scale, dk + krow, d);
}

// Runs f.template operator()<NC>() with the smallest register row that holds d.
template <class F>
void with_row_chunks(int64_t d, F&& f) {
  HYD_CHECK(d > 0 && d <= 256, "attention: head dim ", d, " outside the supported range (1..256)");
  if (d <= 64)
    f.template operator()<2>();
  else if (d <= 128)
    f.template operator()<4>();
  else
    f.template operator()<8>();
}

}  // namespace

void attention_forward(const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_seqlens_q,
                       const int32_t* cu_seqlens_k, int64_t num_docs, bf16* o, float* lse, int64_t n_q, int64_t n_k,
                       int64_t hq, int64_t hkv, int64_t d, float scale, void* stream) {
  (void)n_k;  // the kernels find key rows through cu_seqlens_k
  if (n_q == 0 || hq == 0) return;
  HYD_CHECK(hkv > 0 && hq % hkv == 0 && hq <= 65535, "attention_forward: bad head counts ", hq, "/", hkv);
  HYD_CHECK(n_q <= 0x7fffffff, "attention_forward: ", n_q, " query rows exceed the grid");
  const dim3 grid(static_cast<unsigned>(n_q), static_cast<unsigned>(hq));
  with_row_chunks(d, [&]<int NC>() {
    attention_forward_kernel<NC><<<grid, kThreads, 0, as_stream(stream)>>>(
        as_nv(q), as_nv(k), as_nv(v), cu_seqlens_q, cu_seqlens_k, num_docs, as_nv(o), lse, static_cast<int>(hq),
        static_cast<int>(hkv), static_cast<int>(d), scale);
    CHECK_LAUNCH();
  });
}

void attention_backward(const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const bf16* o, const float* lse,
                        const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, int64_t num_docs, bf16* dq, bf16* dk,
                        bf16* dv, int64_t n_q, int64_t n_k, int64_t hq, int64_t hkv, int64_t d, float scale,
                        void* stream) {
  cudaStream_t s = as_stream(stream);
  if (n_q == 0 || hq == 0) {  // no query sees any key: dk = dv = 0
    const size_t bytes = static_cast<size_t>(n_k * hkv * d) * sizeof(bf16);
    if (bytes > 0) {
      CHECK_CUDA(cudaMemsetAsync(dk, 0, bytes, s));
      CHECK_CUDA(cudaMemsetAsync(dv, 0, bytes, s));
    }
    return;
  }
  HYD_CHECK(hkv > 0 && hq % hkv == 0 && hq <= 65535, "attention_backward: bad head counts ", hq, "/", hkv);
  HYD_CHECK(d > 0 && d <= 256, "attention_backward: head dim ", d, " outside the supported range (1..256)");
  HYD_CHECK(n_q <= 0x7fffffff && n_k <= 0x7fffffff, "attention_backward: ", n_q, "/", n_k, " rows exceed the grid");
  // D = <do, o> per (query row, query head): written by the dq kernel, read by the dk/dv kernel.
  // Stream-ordered scratch, so the op needs no workspace argument.
  float* delta = nullptr;
  CHECK_CUDA(cudaMallocAsync(reinterpret_cast<void**>(&delta), static_cast<size_t>(n_q * hq) * sizeof(float), s));
  with_row_chunks(d, [&]<int NC>() {
    attention_backward_dq_kernel<NC><<<dim3(static_cast<unsigned>(n_q), static_cast<unsigned>(hq)), kThreads, 0, s>>>(
        as_nv(dout), as_nv(q), as_nv(k), as_nv(v), as_nv(o), lse, cu_seqlens_q, cu_seqlens_k, num_docs, as_nv(dq),
        delta, static_cast<int>(hq), static_cast<int>(hkv), static_cast<int>(d), scale);
    CHECK_LAUNCH();
    if (n_k > 0) {
      attention_backward_dkdv_kernel<NC>
          <<<dim3(static_cast<unsigned>(n_k), static_cast<unsigned>(hkv)), kThreads, 0, s>>>(
              as_nv(dout), as_nv(q), as_nv(k), as_nv(v), lse, delta, cu_seqlens_q, cu_seqlens_k, num_docs, as_nv(dk),
              as_nv(dv), static_cast<int>(hq), static_cast<int>(hkv), static_cast<int>(d), scale);
      CHECK_LAUNCH();
    }
  });
  CHECK_CUDA(cudaFreeAsync(delta, s));
}

}  // namespace hyd::kernels::cuda

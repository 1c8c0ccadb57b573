// CUDA KDA gates (see kernels/kda_gates.h): bf16 f, b, df, db; f32 A_log, dt_bias, g, beta and all
// gate gradients; f32 math.
//   g = -exp(A_log[h]) softplus(f + dt_bias),  beta = sigmoid(b)
//   df = dg a expm1(g / a),  ddt_bias[c] += sum_t df,  dA_log[h] += sum dg g,  db = dbeta beta (1 - beta)
// Forward: grid-stride elementwise kernels. Backward of g: a column kernel over the C = HV * dk
// channels, 32 columns x 16 row lanes per block, tokens split into chunks over gridDim.y; each thread
// writes df for its elements and sums df (ddt_bias) and dg * g (dA_log) for its column. The block's
// column sums go to ddt_bias with an f32 atomicAdd per column (a plain add with one chunk), and to
// dA_log with one atomicAdd per block when its 32 columns share a head, else one per column.
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/kda_gates.h"

namespace hyd::kernels::cuda {

namespace {

using namespace cuda_detail;

// log(1 + exp(z)) without overflow or cancellation.
__device__ __forceinline__ float softplusf(float z) { return z > 0.f ? z + log1pf(expf(-z)) : log1pf(expf(z)); }

__global__ void kda_gate_forward_kernel(const __nv_bfloat16* __restrict__ f, const float* __restrict__ A_log,
                                        const float* __restrict__ dt_bias, float* __restrict__ g, int64_t total,
                                        int64_t channels, int64_t dk) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % channels;
    const float a = expf(A_log[c / dk]);
    g[e] = -a * softplusf(to_f(f[e]) + dt_bias[c]);
  }
}

// Eight consecutive elements per thread (when the channel count and dk are multiples of 8, f, dt_bias and g 16-byte
// aligned): one 16-byte load of f, two of dt_bias, two 16-byte stores of g, and one 64-bit channel / head index per
// eight elements (the per-element kernel's 64-bit modulo and division made it ~3x slower than its bytes; ncu at
// B8xT2048, 8 heads of 128: 88 us for ~96 MB). The same arithmetic per element, so the same bits.
__global__ void kda_gate_forward8_kernel(const __nv_bfloat16* __restrict__ f, const float* __restrict__ A_log,
                                         const float* __restrict__ dt_bias, float* __restrict__ g, int64_t total8,
                                         int64_t channels, int64_t dk) {
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < total8; v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = v * 8, c = e % channels;
    const float a = expf(A_log[c / dk]);
    const uint4 fv = *reinterpret_cast<const uint4*>(f + e);
    const float4 b0 = *reinterpret_cast<const float4*>(dt_bias + c),
                 b1 = *reinterpret_cast<const float4*>(dt_bias + c + 4);
    const __nv_bfloat16* fh = reinterpret_cast<const __nv_bfloat16*>(&fv);
    const float bias[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
    float out[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = -a * softplusf(to_f(fh[j]) + bias[j]);
    *reinterpret_cast<float4*>(g + e) = make_float4(out[0], out[1], out[2], out[3]);
    *reinterpret_cast<float4*>(g + e + 4) = make_float4(out[4], out[5], out[6], out[7]);
  }
}

__global__ void beta_forward_kernel(const __nv_bfloat16* __restrict__ b, float* __restrict__ beta, int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x)
    beta[e] = 1.f / (1.f + expf(-to_f(b[e])));
}

__global__ void beta_backward_kernel(const float* __restrict__ dbeta, const float* __restrict__ beta,
                                     __nv_bfloat16* __restrict__ db, int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const float bt = beta[e];
    db[e] = to_bf(dbeta[e] * bt * (1.f - bt));
  }
}

constexpr int kCols = 32;      // threadIdx.x: one channel each
constexpr int kRowLanes = 16;  // threadIdx.y: tokens t, t + 16, ... within the block's chunk

__global__ void kda_gate_backward_kernel(const float* __restrict__ dg, const float* __restrict__ g,
                                         const float* __restrict__ A_log, __nv_bfloat16* __restrict__ df,
                                         float* __restrict__ dA_log, float* __restrict__ ddt_bias, int64_t n,
                                         int64_t channels, int64_t dk, int64_t rows_per_chunk) {
  __shared__ float part_dt[kRowLanes][kCols + 1];
  __shared__ float part_a[kRowLanes][kCols + 1];
  const int64_t col = int64_t(blockIdx.x) * kCols + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = std::min(n, r0 + rows_per_chunk);
  float acc_dt = 0.f, acc_a = 0.f;
  if (col < channels) {
    const float a = expf(A_log[col / dk]), inv_a = 1.f / a;
#pragma unroll 4
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) {
      const int64_t e = r * channels + col;
      const float gv = g[e], dgv = dg[e];
      const float d = dgv * a * expm1f(gv * inv_a);
      df[e] = to_bf(d);
      acc_dt += d;
      acc_a += dgv * gv;
    }
  }
  part_dt[threadIdx.y][threadIdx.x] = acc_dt;
  part_a[threadIdx.y][threadIdx.x] = acc_a;
  __syncthreads();
  if (threadIdx.y != 0) return;
  float sdt = 0.f, sa = 0.f;
#pragma unroll
  for (int k = 0; k < kRowLanes; ++k) {
    sdt += part_dt[k][threadIdx.x];
    sa += part_a[k][threadIdx.x];
  }
  if (col < channels) {
    if (gridDim.y == 1) {
      ddt_bias[col] += sdt;
    } else {
      atomicAdd(ddt_bias + col, sdt);
    }
  }
  // dA_log: the block's first and last valid columns tell whether all 32 share one head.
  const int64_t first = int64_t(blockIdx.x) * kCols;
  const int64_t last = std::min(channels, first + kCols) - 1;
  if (first / dk == last / dk) {
    sa = warp_sum(sa);  // columns beyond `channels` contributed 0
    if (threadIdx.x == 0) atomicAdd(dA_log + first / dk, sa);
  } else if (col < channels) {
    atomicAdd(dA_log + col / dk, sa);
  }
}

}  // namespace

void kda_gates_forward(const bf16* f, const float* A_log, const float* dt_bias, const bf16* b, float* g, float* beta,
                       int64_t n, int64_t hv, int64_t dk, void* stream) {
  if (n == 0 || hv == 0) return;
  HYD_CHECK(dk > 0, "kda_gates_forward: dk must be positive");
  const int threads = 256;
  const int64_t total = n * hv * dk;
  if (dk % 8 == 0 && aligned16(f) && aligned16(dt_bias) && aligned16(g))
    kda_gate_forward8_kernel<<<grid_for(total / 8, threads), threads, 0, as_stream(stream)>>>(
        as_nv(f), A_log, dt_bias, g, total / 8, hv * dk, dk);
  else
    kda_gate_forward_kernel<<<grid_for(total, threads), threads, 0, as_stream(stream)>>>(as_nv(f), A_log, dt_bias, g,
                                                                                         total, hv * dk, dk);
  CHECK_LAUNCH();
  beta_forward_kernel<<<grid_for(n * hv, threads), threads, 0, as_stream(stream)>>>(as_nv(b), beta, n * hv);
  CHECK_LAUNCH();
}

void kda_gates_backward(const float* dg, const float* dbeta, const float* g, const float* beta, const float* A_log,
                        bf16* df, float* dA_log, float* ddt_bias, bf16* db, int64_t n, int64_t hv, int64_t dk,
                        void* stream) {
  if (n == 0 || hv == 0) return;
  HYD_CHECK(dk > 0, "kda_gates_backward: dk must be positive");
  const int64_t channels = hv * dk;
  const int64_t col_blocks = (channels + kCols - 1) / kCols;
  // Aim for ~1024 blocks in all, each chunk at least 256 tokens.
  const int64_t max_chunks = std::max<int64_t>(1, (n + 255) / 256);
  const int64_t chunks =
      std::clamp<int64_t>((1024 + col_blocks - 1) / col_blocks, 1, std::min<int64_t>(max_chunks, 65535));
  const int64_t rows_per_chunk = (n + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((n + rows_per_chunk - 1) / rows_per_chunk));
  kda_gate_backward_kernel<<<grid, dim3(kCols, kRowLanes), 0, as_stream(stream)>>>(
      dg, g, A_log, as_nv(df), dA_log, ddt_bias, n, channels, dk, rows_per_chunk);
  CHECK_LAUNCH();
  const int threads = 256;
  beta_backward_kernel<<<grid_for(n * hv, threads), threads, 0, as_stream(stream)>>>(dbeta, beta, as_nv(db), n * hv);
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

// CUDA fused distillation loss (see kernels/distill_loss.h): one block per token row, bf16 logits
// in, fp32 math and statistics, dlogits written over the student row in bf16.
//
// Pass 1 (reads s and t): per-thread online statistics over a strided slice of the row, rescaled
// whenever the running maximum grows:
//   Ms = max s, Zs = sum exp((s - Ms)/tau), Zs1 = sum exp(s - Ms)  (the latter only with a label),
//   Mt = max t, Zt = sum exp((t - Mt)/tau), and both argmaxes (first index on ties);
// merged across the block. Then log p_s = (s - Ms)/tau - log Zs, log p_t = (t - Mt)/tau - log Zt,
// log q = (s - Ms) - log Zs1 and c = lse_t - lse_s = (Mt - Ms)/tau + log Zt - log Zs.
// Pass 2 (reads s and t, writes s): KL summed in its generalised form, whose terms are all >= 0:
//   KL / tau^2 = sum_v [ p_t d - p_t + p_s ],   d = log p_t - log p_s = (t - s)/tau - c
// (sum p_s = sum p_t = 1, so the extra terms add 0). For |d| < 1/2 the term is p_t (d + expm1(-d)),
// which keeps its relative precision when the distributions nearly agree (an error in the row
// constant c enters only to second order); p_t == 0 gives p_s (0 log 0 = 0). The same pass writes
//   ds = grad_scale (w_kl tau (p_s - p_t) + w_ce (q - onehot(label)))
// element by element: each element is read and then written by the same thread, and the label's
// logit is read before pass 1's barriers, so no thread reads an overwritten value.
// Rows of any length (V up to 2^31 - 1, e.g. 151936): 8-wide bf16 loads when the row allows.
// The element-wise exponentials use the hardware exp2 (__expf, relative error ~1e-6 for the arguments
// here, all <= 0 after the max shift); expm1f of the small-d branch stays exact.
//
// Rows of at most 32768 logits (V % 8 == 0; issue 9's 32000 among them) take distill_loss_regs_kernel instead:
// the row of both models stays in registers (up to 8 packs of 8 per thread and model, 512 threads), read from
// memory once and written once. Three sweeps over the registers: the maxima (plain max, no rescaling), the sums of
// exponentials (one exp2 per logit and model), then the KL terms and the gradient, where the small-d term
// p_t (d + expm1(-d)) = p_t d^2 (1/2 - d/6 + d^2/24 - ...) is a degree-6 polynomial (relative truncation error
// < 4e-8 for |d| < 1/2) instead of expm1f. (H200, issue 9's chunk of 2912 rows x 32000: 441 us for the kernel
// above, which re-reads the row and rescales its running sums.) Rows of 4 or 8 packs per thread take its split
// version: 2 packs per thread and model in registers, the rest in shared memory, two blocks (rows) per SM, so that
// one row's loads overlap the other's arithmetic (one block per SM computes, then waits for its next row).
// HYD_DISTILL_SPLIT=0 keeps the whole row in registers, one block per SM; the results are bit-identical.
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/distill_loss.h"

namespace hyd::kernels::cuda {

using namespace cuda_detail;

namespace {

constexpr int kThreads = 512;
constexpr int kNoIndex = INT_MAX;  // argmax of an empty slice: loses every tie-break
using ptx::kLog2e;

// Online (max, argmax, sum of exp) of one logit row, seen by one thread in increasing index order.
struct OnlineSoftmax {
  float m = -INFINITY;
  float z = 0.f;   // sum exp((x - m) * inv_tau)
  float z1 = 0.f;  // sum exp(x - m), when with_z1
  int arg = kNoIndex;

  __device__ __forceinline__ void add(float x, int idx, float inv_tau, bool with_z1) {
    if (x > m) {  // the new maximum: rescale what was summed so far (exp(-inf) = 0 on the first one)
      z = z * __expf((m - x) * inv_tau) + 1.f;
      if (with_z1) z1 = z1 * __expf(m - x) + 1.f;
      m = x;
      arg = idx;
    } else if (x > -INFINITY) {  // -inf adds 0 (and would give NaN as -inf - -inf); NaN is caught in pass 2
      z += __expf((x - m) * inv_tau);
      if (with_z1) z1 += __expf(x - m);
    }
  }
};

// Block-wide argmax: the largest value, the smallest index among equal values. Every thread gets the
// result. Contains __syncthreads: call from all threads.
__device__ __forceinline__ int block_argmax(float v, int idx, float* sv, int* si) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  auto warp_reduce = [](float& val, int& id) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, val, o);
      const int oi = __shfl_xor_sync(0xffffffffu, id, o);
      if (ov > val || (ov == val && oi < id)) {
        val = ov;
        id = oi;
      }
    }
  };
  warp_reduce(v, idx);
  __syncthreads();
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = idx;
  }
  __syncthreads();
  v = lane < nwarps ? sv[lane] : -INFINITY;
  idx = lane < nwarps ? si[lane] : kNoIndex;
  warp_reduce(v, idx);
  return idx;
}

// A masked row (mask[row] == 0): kl = ce = top1 = 0 and, with write_grad, a zero gradient row (npacks packs of
// VEC). Returns whether the row was masked; the same for the whole block.
template <int VEC>
__device__ __forceinline__ bool masked_row(int64_t row, const uint8_t* mask, float* kl, float* ce, uint8_t* top1,
                                           __nv_bfloat16* s, int64_t npacks, bool write_grad) {
  if (!mask || mask[row] != 0) return false;
  if (threadIdx.x == 0) {
    kl[row] = 0.f;
    ce[row] = 0.f;
    if (top1) top1[row] = 0;
  }
  if (write_grad) {
    Pack<__nv_bfloat16, VEC> zero;
#pragma unroll
    for (int j = 0; j < VEC; ++j) zero.v[j] = to_bf(0.f);
    for (int64_t p = threadIdx.x; p < npacks; p += blockDim.x) reinterpret_cast<Pack<__nv_bfloat16, VEC>*>(s)[p] = zero;
  }
  return true;
}

template <int VEC>
__global__ void __launch_bounds__(kThreads)
    distill_loss_kernel(__nv_bfloat16* student, const __nv_bfloat16* teacher, const int32_t* labels,
                        const uint8_t* mask, float* kl, float* ce, uint8_t* top1, int64_t vocab,
                        DistillLossOptions opt) {
  __shared__ float red[32];
  __shared__ float arg_v[32];
  __shared__ int arg_i[32];
  const int64_t row = blockIdx.x;
  __nv_bfloat16* s = student + row * vocab;
  const __nv_bfloat16* t = teacher + row * vocab;
  using P = Pack<__nv_bfloat16, VEC>;
  P* s_packs = reinterpret_cast<P*>(s);
  const P* t_packs = reinterpret_cast<const P*>(t);
  const int64_t npacks = vocab / VEC;

  // Everything that decides the control flow below is the same for the whole block.
  if (masked_row<VEC>(row, mask, kl, ce, top1, s, npacks, opt.write_grad)) return;
  const int32_t label = labels ? labels[row] : -1;
  const bool has_label = label >= 0 && label < vocab;
  const float tau = opt.temperature, inv_tau = 1.f / tau;
  const float s_label = has_label ? to_f(s[label]) : 0.f;  // read before any thread overwrites the row

  // ---- pass 1: statistics
  OnlineSoftmax st_s, st_t;
  for (int64_t p = threadIdx.x; p < npacks; p += blockDim.x) {
    const P sp = s_packs[p], tp = t_packs[p];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int idx = static_cast<int>(p * VEC + j);
      st_s.add(to_f(sp.v[j]), idx, inv_tau, has_label);
      st_t.add(to_f(tp.v[j]), idx, inv_tau, false);
    }
  }
  const float ms = block_max(st_s.m, red);
  const float zs = block_sum(st_s.m > -INFINITY ? st_s.z * expf((st_s.m - ms) * inv_tau) : 0.f, red);
  const float zs1 = has_label ? block_sum(st_s.m > -INFINITY ? st_s.z1 * expf(st_s.m - ms) : 0.f, red) : 1.f;
  const float mt = block_max(st_t.m, red);
  const float zt = block_sum(st_t.m > -INFINITY ? st_t.z * expf((st_t.m - mt) * inv_tau) : 0.f, red);
  if (top1) {
    const int arg_s = block_argmax(st_s.m, st_s.arg, arg_v, arg_i);
    const int arg_t = block_argmax(st_t.m, st_t.arg, arg_v, arg_i);
    if (threadIdx.x == 0) top1[row] = arg_s == arg_t ? 1 : 0;
  }
  const float log_zs = logf(zs), log_zs1 = logf(zs1), log_zt = logf(zt);
  const float c = (mt - ms) * inv_tau + (log_zt - log_zs);

  // ---- pass 2: KL terms and (optionally) the gradient, element by element
  const bool write_grad = opt.write_grad;
  const bool grad_ce = has_label && opt.w_ce != 0.f;
  const bool tau_is_one = tau == 1.f;
  const float g_kl = opt.grad_scale * opt.w_kl * tau, g_ce = opt.grad_scale * opt.w_ce;
  float kl_acc = 0.f;
  for (int64_t p = threadIdx.x; p < npacks; p += blockDim.x) {
    P sp = s_packs[p];
    const P tp = t_packs[p];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xs = to_f(sp.v[j]), xt = to_f(tp.v[j]);
      const float ps = __expf((xs - ms) * inv_tau - log_zs);
      const float pt = __expf((xt - mt) * inv_tau - log_zt);
      float term;
      if (pt == 0.f) {
        term = ps;
      } else {
        const float d = (xt - xs) * inv_tau - c;
        term = fabsf(d) < 0.5f ? pt * (d + expm1f(-d)) : pt * d + (ps - pt);
      }
      kl_acc += term;
      if (write_grad) {
        float g = g_kl * (ps - pt);
        if (grad_ce) {
          const float q = tau_is_one ? ps : __expf((xs - ms) - log_zs1);
          const int idx = static_cast<int>(p * VEC + j);
          g += g_ce * (q - (idx == label ? 1.f : 0.f));
        }
        sp.v[j] = to_bf(g);
      }
    }
    if (write_grad) s_packs[p] = sp;
  }
  const float kl_sum = block_sum(kl_acc, red) * tau * tau;
  if (threadIdx.x == 0) {
    kl[row] = kl_sum < 0.f ? 0.f : kl_sum;  // KL >= 0 against rounding; NaN passes through
    ce[row] = has_label ? (ms - s_label) + log_zs1 : (label >= vocab ? NAN : 0.f);
  }
}

constexpr int kRegThreads = 512;
constexpr int kRegMaxPacks = 8;  // packs of 8 per thread and model: rows up to 512 * 8 * 8 = 32768 logits

// Block-wide max / sum of two values at once (one pair of barriers). Every thread gets both results.
template <bool MAX>
__device__ __forceinline__ float2 block_reduce2(float a, float b, float2* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  auto op = [](float x, float y) { return MAX ? fmaxf(x, y) : x + y; };
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a = op(a, __shfl_xor_sync(0xffffffffu, a, o));
    b = op(b, __shfl_xor_sync(0xffffffffu, b, o));
  }
  __syncthreads();  // the previous reduction's readers are done with `shared`
  if (lane == 0) shared[warp] = make_float2(a, b);
  __syncthreads();
  const float id = MAX ? -INFINITY : 0.f;
  float2 v = lane < nwarps ? shared[lane] : make_float2(id, id);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x = op(v.x, __shfl_xor_sync(0xffffffffu, v.x, o));
    v.y = op(v.y, __shfl_xor_sync(0xffffffffu, v.y, o));
  }
  return v;
}

// p_t (d + expm1(-d)) for |d| < 1/2: p_t d^2 sum_{k>=2} (-d)^(k-2) / k!, to the d^6 term.
__device__ __forceinline__ float kl_small_d(float pt, float d) {
  float poly = 1.f / 40320.f;
  poly = fmaf(poly, -d, 1.f / 5040.f);
  poly = fmaf(poly, -d, 1.f / 720.f);
  poly = fmaf(poly, -d, 1.f / 120.f);
  poly = fmaf(poly, -d, 1.f / 24.f);
  poly = fmaf(poly, -d, 1.f / 6.f);
  poly = fmaf(poly, -d, 0.5f);
  return pt * (d * d) * poly;
}

// Element e (0..7) of a pack held as 4 words of bf16 pairs, as f32. asm volatile: each sweep converts again instead
// of the compiler keeping all 128 f32 values of the two rows live from the first sweep on (which spilled).
__device__ __forceinline__ float word_lo(uint32_t w) {
  uint32_t r;
  asm volatile("shl.b32 %0, %1, 16;" : "=r"(r) : "r"(w));
  return __uint_as_float(r);
}
__device__ __forceinline__ float word_hi(uint32_t w) {
  uint32_t r;
  asm volatile("and.b32 %0, %1, 0xffff0000;" : "=r"(r) : "r"(w));
  return __uint_as_float(r);
}
__device__ __forceinline__ float elem(const uint4& p, int e) {
  const uint32_t w = e < 2 ? p.x : e < 4 ? p.y : e < 6 ? p.z : p.w;
  return (e & 1) ? word_hi(w) : word_lo(w);
}

// The register-resident kernel (see the top of the file): PACKS packs of 8 per thread and model, 512 threads;
// TOP1: top1 is given (the argmaxes cost registers, which the other instances keep for the row).
// RP < PACKS: the split version, two blocks per SM. Packs 0..RP-1 of a thread stay in registers, packs RP..PACKS-1 in
// dynamic shared memory ((PACKS - RP) x 512 packs per model, copied in by cp.async; every thread reads back only the
// slots it copied, so no barrier orders them), read back in each sweep. A block then needs 64 registers per thread and
// (PACKS - RP) x 16 KB, and two blocks share an SM: one computes while the other waits for its row. The packs, their
// order and every operation are the same as with RP == PACKS, so the results are bit-identical.
template <int PACKS, int RP, bool TOP1>
__global__ void __launch_bounds__(kRegThreads, RP < PACKS ? 2 : 1)
    distill_loss_regs_kernel(__nv_bfloat16* student, const __nv_bfloat16* teacher, const int32_t* labels,
                             const uint8_t* mask, float* kl, float* ce, uint8_t* top1, int64_t vocab,
                             DistillLossOptions opt) {
  static_assert(RP >= 1 && RP <= PACKS, "registers hold 1..PACKS packs");
  constexpr int kSmemPacks = PACKS - RP;
  __shared__ float2 red[32];
  __shared__ float arg_v[32];
  __shared__ int arg_i[32];
  extern __shared__ uint4 split_smem[];  // [kSmemPacks][512] student packs, then the same for the teacher
  const int64_t row = blockIdx.x;
  uint4* s_packs = reinterpret_cast<uint4*>(student + row * vocab);
  const uint4* t_packs = reinterpret_cast<const uint4*>(teacher + row * vocab);
  const int npacks = static_cast<int>(vocab / 8);

  if (masked_row<8>(row, mask, kl, ce, top1, student + row * vocab, npacks, opt.write_grad)) return;
  const int32_t label = labels ? labels[row] : -1;
  const bool has_label = label >= 0 && label < vocab;
  const float tau = opt.temperature, inv_tau = 1.f / tau;
  const float s_label = has_label ? to_f(student[row * vocab + label]) : 0.f;  // before any write

  auto valid = [&](int i) { return threadIdx.x + i * kRegThreads < npacks; };
  auto slot = [&](int i) { return (i - RP) * kRegThreads + static_cast<int>(threadIdx.x); };  // i >= RP
  if constexpr (kSmemPacks > 0) {  // the shared-memory packs first: the copies run while the registers load
#pragma unroll
    for (int i = RP; i < PACKS; ++i) {
      if (!valid(i)) continue;
      const int p = threadIdx.x + i * kRegThreads;
      ptx::cp_async16(ptx::smem_addr(&split_smem[slot(i)]), &s_packs[p], true);
      ptx::cp_async16(ptx::smem_addr(&split_smem[kSmemPacks * kRegThreads + slot(i)]), &t_packs[p], true);
    }
    ptx::cp_async_commit();
  }
  uint4 sp[RP], tp[RP];
#pragma unroll
  for (int i = 0; i < RP; ++i) {
    const int p = threadIdx.x + i * kRegThreads;
    sp[i] = tp[i] = make_uint4(0, 0, 0, 0);
    if (p < npacks) {
      sp[i] = s_packs[p];
      tp[i] = t_packs[p];
    }
  }
  if constexpr (kSmemPacks > 0) ptx::cp_async_wait<0>();
  // Pack i of this thread, student and teacher (i is a compile-time index in the unrolled sweeps).
  auto s_of = [&](int i) { return i < RP ? sp[i < RP ? i : 0] : split_smem[slot(i)]; };
  auto t_of = [&](int i) { return i < RP ? tp[i < RP ? i : 0] : split_smem[kSmemPacks * kRegThreads + slot(i)]; };

  // ---- maxima (and, for top1, the first index of each)
  float ms_t = -INFINITY, mt_t = -INFINITY;
  int as = kNoIndex, at = kNoIndex;
#pragma unroll
  for (int i = 0; i < PACKS; ++i) {
    if (!valid(i)) continue;
    const uint4 si = s_of(i), ti = t_of(i);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float xs = elem(si, j), xt = elem(ti, j);
      if constexpr (TOP1) {  // this thread sees its indices in increasing order: strict > keeps the first
        const int idx = (threadIdx.x + i * kRegThreads) * 8 + j;
        if (xs > ms_t) as = idx;
        if (xt > mt_t) at = idx;
      }
      ms_t = fmaxf(ms_t, xs);
      mt_t = fmaxf(mt_t, xt);
    }
  }
  if constexpr (TOP1) {
    const int arg_s = block_argmax(ms_t, as, arg_v, arg_i);
    const int arg_t = block_argmax(mt_t, at, arg_v, arg_i);
    if (threadIdx.x == 0) top1[row] = arg_s == arg_t ? 1 : 0;
  }
  const float2 m2 = block_reduce2<true>(ms_t, mt_t, red);
  const float ms = m2.x, mt = m2.y;

  // ---- sums of exponentials, in base 2: exp((x - m) / tau) = exp2((x - m) k), k = log2(e) / tau. (x - m is exact
  // for bf16 logits; x k - m k would cancel the rounding error of m k into the result at large logits.)
  const float k = inv_tau * kLog2e;
  const float ms0 = ms == -INFINITY ? 0.f : ms, mt0 = mt == -INFINITY ? 0.f : mt;
  const bool need_z1 = has_label && tau != 1.f;  // CE's softmax at temperature 1
  float zs = 0.f, zt = 0.f, zs1 = 0.f;
#pragma unroll
  for (int i = 0; i < PACKS; ++i) {
    if (!valid(i)) continue;
    const uint4 si = s_of(i), ti = t_of(i);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float xs = elem(si, j), xt = elem(ti, j);
      zs += ptx::exp2_approx((xs - ms0) * k);
      zt += ptx::exp2_approx((xt - mt0) * k);
      if (need_z1) zs1 += ptx::exp2_approx((xs - ms0) * kLog2e);
    }
  }
  const float2 z2 = block_reduce2<false>(zs, zt, red);
  const float zs_all = z2.x, zt_all = z2.y;
  const float zs1_all = need_z1 ? block_reduce2<false>(zs1, 0.f, red).x : zs_all;
  const float log_zs = logf(zs_all), log_zt = logf(zt_all), log_zs1 = logf(zs1_all);
  const float c = (mt - ms) * inv_tau + (log_zt - log_zs);
  // p = exp2((x - m) k - log2 z)
  const float bs = log_zs * kLog2e, bt = log_zt * kLog2e, bs1 = log_zs1 * kLog2e;

  // ---- KL terms and the gradient
  const bool write_grad = opt.write_grad;
  const bool grad_ce = has_label && opt.w_ce != 0.f;
  const float g_kl = opt.grad_scale * opt.w_kl * tau, g_ce = opt.grad_scale * opt.w_ce;
  float kl_acc = 0.f;
#pragma unroll
  for (int i = 0; i < PACKS; ++i) {
    if (!valid(i)) continue;
    const uint4 si = s_of(i), ti = t_of(i);
    float g[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float xs = elem(si, j), xt = elem(ti, j);
      const float ps = ptx::exp2_approx(fmaf(xs - ms0, k, -bs)), pt = ptx::exp2_approx(fmaf(xt - mt0, k, -bt));
      float term;
      if (pt == 0.f) {
        term = ps;
      } else {
        const float d = (xt - xs) * inv_tau - c;
        term = fabsf(d) < 0.5f ? kl_small_d(pt, d) : pt * d + (ps - pt);
      }
      kl_acc += term;
      g[j] = g_kl * (ps - pt);
      if (grad_ce) {
        const float q = need_z1 ? ptx::exp2_approx(fmaf(xs - ms0, kLog2e, -bs1)) : ps;
        const int idx = (threadIdx.x + i * kRegThreads) * 8 + j;
        g[j] += g_ce * (q - (idx == label ? 1.f : 0.f));
      }
    }
    if (write_grad)
      s_packs[threadIdx.x + i * kRegThreads] = make_uint4(ptx::pack_bf16(g[0], g[1]), ptx::pack_bf16(g[2], g[3]),
                                                          ptx::pack_bf16(g[4], g[5]), ptx::pack_bf16(g[6], g[7]));
  }
  const float kl_sum = block_reduce2<false>(kl_acc, 0.f, red).x * tau * tau;
  if (threadIdx.x == 0) {
    kl[row] = kl_sum < 0.f ? 0.f : kl_sum;  // KL >= 0 against rounding; NaN passes through
    ce[row] = has_label ? (ms - s_label) + log_zs1 : (label >= vocab ? NAN : 0.f);
  }
}

constexpr int kSplitRegPacks = 2;  // the split version's packs per thread and model in registers

// Dynamic shared memory of the split version: (PACKS - RP) x 512 packs of 16 bytes, for both models.
constexpr int split_smem_bytes(int packs, int reg_packs) { return (packs - reg_packs) * kRegThreads * 16 * 2; }

bool split_enabled() {
  const char* e = std::getenv("HYD_DISTILL_SPLIT");
  return e == nullptr || std::string(e) != "0";
}

// Lets `kernel` take `bytes` of dynamic shared memory (above the default 48 KB) with the largest shared-memory
// carve-out, so that two of its blocks fit on an SM.
void allow_split_smem(const void* kernel, int bytes) {
  CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  CHECK_CUDA(
      cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
}

}  // namespace

void distill_loss(bf16* student, const bf16* teacher, const int32_t* labels, const uint8_t* mask, float* kl, float* ce,
                  uint8_t* top1, int64_t n, int64_t vocab, const DistillLossOptions& opt, void* stream) {
  if (n == 0) return;
  HYD_CHECK(n <= INT32_MAX, "distill_loss: ", n, " rows exceed the grid limit");
  HYD_CHECK(vocab >= 1 && vocab <= INT32_MAX, "distill_loss: vocabulary of ", vocab, " outside [1, 2^31)");
  const dim3 grid(static_cast<unsigned>(n));
  const int64_t reg_packs = (vocab / 8 + kRegThreads - 1) / kRegThreads;  // packs per thread and model
  if (vocab % 8 == 0 && aligned16(student) && aligned16(teacher) && reg_packs <= kRegMaxPacks) {
    // Rows of 4 or 8 packs per thread and model take the split version (two blocks per SM) unless
    // HYD_DISTILL_SPLIT=0.
    auto go = [&](auto packs) {
      constexpr int PACKS = decltype(packs)::value;
      constexpr int RP = PACKS >= 4 ? kSplitRegPacks : PACKS;
      const bool split = RP < PACKS && split_enabled();
      auto kernel = split ? (top1 != nullptr ? distill_loss_regs_kernel<PACKS, RP, true>
                                             : distill_loss_regs_kernel<PACKS, RP, false>)
                          : (top1 != nullptr ? distill_loss_regs_kernel<PACKS, PACKS, true>
                                             : distill_loss_regs_kernel<PACKS, PACKS, false>);
      const int smem = split ? split_smem_bytes(PACKS, RP) : 0;
      if (split) allow_split_smem(reinterpret_cast<const void*>(kernel), smem);
      kernel<<<grid, kRegThreads, smem, as_stream(stream)>>>(as_nv(student), as_nv(teacher), labels, mask, kl, ce, top1,
                                                             vocab, opt);
    };
    if (reg_packs <= 1)
      go(std::integral_constant<int, 1>{});
    else if (reg_packs <= 2)
      go(std::integral_constant<int, 2>{});
    else if (reg_packs <= 4)
      go(std::integral_constant<int, 4>{});
    else
      go(std::integral_constant<int, 8>{});
  } else if (vocab % 8 == 0 && aligned16(student) && aligned16(teacher)) {
    distill_loss_kernel<8><<<grid, kThreads, 0, as_stream(stream)>>>(as_nv(student), as_nv(teacher), labels, mask, kl,
                                                                     ce, top1, vocab, opt);
  } else {
    distill_loss_kernel<1><<<grid, kThreads, 0, as_stream(stream)>>>(as_nv(student), as_nv(teacher), labels, mask, kl,
                                                                     ce, top1, vocab, opt);
  }
  CHECK_LAUNCH();
}

}  // namespace hyd::kernels::cuda

// Mixture-of-Experts ops (issue 7): the router's top-k and the stable expert-major permutation of the
// (token, slot) pairs, the row gathers around the experts, the grouped expert GEMMs, and the backward of
// the combine and the router. The layer (trainer/layer_moe.h) writes the whole math; per op here:
//   route:    scores[t, :] = softmax(logits[t, :]) | sigmoid(logits[t, :])   (in place, over the E experts)
//             sel = scores + bias (bias only steers the choice); e_1..e_k = top-k of sel, descending, ties to
//             the lower expert index; w_j = scores[e_j] (/ sum_i scores[e_i] if norm_topk_prob) * route_scale
//             counts[e] = #pairs with expert e; offsets = exclusive prefix sum; order: permuted row ->
//             pair index t k + j, the pairs of one expert in token order (a stable counting sort: the
//             result is a function of the expert ids only); position = order^-1.
//   permute:           xp[p] = x[order[p] / k]
//   unpermute:         pairs[q] = xp[position[q]]
//   combine:           out[t] (= | +=) sum_j w_tj yp[position[t k + j]]
//   permute_backward:  dx[t] (= | +=) sum_j dxp[position[t k + j]]          (the adjoint of permute)
//   combine_backward:  d_yp[position[q]] = w_q dout[q / k];  d_weight[q] = dout[q / k] . yp[position[q]]
//   router_backward:   ds[t, e] = aux_scale aux_frac[e] + sum_j [e_j = e] dw_tj-term (below), then
//                      d_logits = softmax'^T ds | sigmoid' ds. With w_j = rs s_j / Z (Z = sum_i s_{e_i},
//                      Z = 1 without norm_topk_prob): dL/ds_{e_i} += rs / Z (dw_i - sum_j dw_j s_{e_j} / Z).
//   aux_stats:         aux_frac[e] = counts[e] / (N k);  aux_prob[e] = mean_t scores[t, e]
//   grouped linear:    for every expert e with rows R_e = [offsets[e], offsets[e+1]):
//                      y[R_e] = x[R_e] w_e^T;  dx[R_e] = dy[R_e] w_e;  dw_e += dy[R_e]^T x[R_e]
//                      (w [E, n, k] stacked; an expert without rows writes nothing and leaves dw_e as is).
//                      CUDA runs these products one of three ways (MoeGemm, below): cuBLAS over the experts
//                      with rows, from their row counts on the host (grouped: cublasGemmGroupedBatchedEx;
//                      loop: one cublasGemmEx per expert and product), or the WMMA kernels of moe_gemm.cuh
//                      that read the device offsets (no host counts).
// Every gather is a row gather (each output row has one writer, fixed summation order), so all outputs,
// gradients included, are deterministic: no float atomics.
// dtypes: CPU: every floating tensor f32 or f64 (one dtype per call). CUDA: rows (x, xp, yp, out, dx, ...)
// bf16 with f32 math; logits, scores, combine weights, their gradients and the aux statistics f32;
// grouped-GEMM weights bf16 and weight gradients f32 (the master gradients). Indices i32 on both.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd {

// Who goes where: the router's decisions for N tokens, and the stable expert-major order of the N k
// (token, slot) pairs (pair index t k + j). i32 tensors except `weight`, on the device of the layer.
struct MoeRouting {
  int64_t tokens = 0, top_k = 0, num_experts = 0;
  Tensor expert;    // i32 [N, k]: slot j's expert (slots in descending selection order)
  Tensor weight;    // [N, k] (the scores' dtype: f32 on CUDA): combine weight w_j
  Tensor counts;    // i32 [E]: pairs assigned to each expert (the load; sums to N k)
  Tensor offsets;   // i32 [E + 1]: exclusive prefix sum of counts; expert e owns permuted rows [off_e, off_e+1)
  Tensor order;     // i32 [N k]: permuted row p -> pair index t k + j (pairs of one expert in token order)
  Tensor position;  // i32 [N k]: pair index -> permuted row (the inverse of order)

  template <class Alloc>
  static MoeRouting alloc(Alloc& arena, int64_t n, int64_t k, int64_t e, DType score_dtype) {
    MoeRouting r;
    r.tokens = n;
    r.top_k = k;
    r.num_experts = e;
    r.expert = arena.alloc({n, k}, DType::i32);
    r.weight = arena.alloc({n, k}, score_dtype);
    r.counts = arena.alloc({e}, DType::i32);
    r.offsets = arena.alloc({e + 1}, DType::i32);
    r.order = arena.alloc({n * k}, DType::i32);
    r.position = arena.alloc({n * k}, DType::i32);
    return r;
  }
  // The load per expert, as host integers (on CUDA: a synchronising device-to-host copy).
  std::vector<int64_t> counts_host() const;
};

// The router's scores, weights, ... dtype for activations of dtype `act`: the router runs in f32 when the
// activations are bf16, else in the activations' dtype (f32 | f64 on the CPU).
inline DType moe_score_dtype(DType act) { return act == DType::bf16 ? DType::f32 : act; }

namespace kernels {

// How the CUDA grouped expert GEMMs run (the CPU ignores it). The cuBLAS ones skip every expert without
// rows (its dW_e stays untouched, bit for bit) and need the per-expert row counts on the host.
//   grouped: one cublasGemmGroupedBatchedEx per product (bf16 in, f32 accumulation), one group per expert
//            with rows; its pointer arrays are written on the device by a small kernel (no synchronisation).
//            cuBLAS documents bf16 -> bf16 but not bf16 -> f32 for it: the weight gradient, accumulated into
//            f32, is tried grouped once and falls back to the loop when cuBLAS refuses (moe_grouped_dw_path).
//            A product whose operands are not 16-byte aligned (a row length not a multiple of 8) takes the
//            loop too: the grouped kernels cannot check the alignment of pointers that live on the device.
//   loop:    one cublasGemmEx per expert with rows and product (kernels/cuda/matmul.cu's gemm).
//   wmma:    the hand-written WMMA kernels (kernels/cuda/moe_gemm.cuh): read the device offsets, no host
//            counts and no synchronisation; the slowest.
//   automatic: per call from the host counts: the loop when the mean expert with rows does at least
//            moe_loop_min_macs() multiply-adds in its forward (each cublasGemmEx is then a large GEMM that
//            fills the GPU), else the grouped call (many small GEMMs: no per-expert host loop). The default.
//            Measured on one H100 (docs/benchmarks.md, stop 18): with D = 2048, grouped won at 256 rows per
//            expert of F = 1408 and at 512 of F = 768, the loop at 512 of F = 1408 and at 1024 of F = 768.
enum class MoeGemm { grouped, loop, wmma, automatic };
// HYD_MOE_GEMM = auto | grouped | loop | wmma; unset or empty: auto. Anything else throws a hyd::Error naming
// the variable. MOE_GEMMS="grouped loop" bash bench/moe/run.sh times the explicit ones.
MoeGemm moe_gemm_from_env();
const char* moe_gemm_name(MoeGemm g);
// The forward multiply-adds of the mean expert with rows (mean rows x MoeGemmPlan::expert_macs_per_row,
// 3 F D for a SwiGLU expert) from which MoeGemm::automatic takes the per-expert loop: HYD_MOE_LOOP_MIN_MACS
// when set (a positive integer, else a hyd::Error naming it), else kMoeLoopMinMacs = 3 x 2^30, between the
// measured crossovers above (3 F D rows = 2.2e9 grouped and 2.4e9 grouped, 4.4e9 and 4.8e9 loop).
inline constexpr int64_t kMoeLoopMinMacs = int64_t{3} << 30;
int64_t moe_loop_min_macs();
// Whether a cuBLAS implementation runs a product of these per-expert row counts (E entries) as one grouped
// call (grouped; automatic below the threshold) or as the per-expert loop (loop; automatic at or above it);
// macs_per_row: one row's forward multiply-adds in an expert (3 F D for SwiGLU), the same for every GEMM of a
// layer so that its GEMMs choose alike.
bool moe_gemm_uses_grouped(MoeGemm impl, std::span<const int32_t> counts, int64_t macs_per_row);
// How the grouped implementation computed weight gradients so far in this process: "grouped" (cuBLAS took
// the f32 output), "loop" (it refused: the per-expert loop), or "untried".
const char* moe_grouped_dw_path();

// A grouped GEMM call's implementation and, for the cuBLAS ones, every expert's row count on the host
// (counts[e] = offsets[e + 1] - offsets[e], E entries; they must describe the same offsets: the CUDA
// dispatcher checks their sum against the rows, the CPU one checks each against the offsets).
struct MoeGemmPlan {
  MoeGemm impl = MoeGemm::wmma;
  std::span<const int32_t> host_counts;
  // MoeGemm::automatic's measure (moe_gemm_uses_grouped): one row's forward multiply-adds in an expert; 0: the
  // n x k of the call itself.
  int64_t expert_macs_per_row = 0;
};

// Page-locked host memory receiving a MoE layer's per-expert row counts (MoeRouting::counts): the one
// device-to-host copy of a layer forward that runs the cuBLAS GEMMs. start() queues the copy on the
// context's stream behind the router and records an event; wait() blocks on that event (the one host
// synchronisation; work queued after start(), e.g. the permutation, keeps the GPU busy meanwhile) and
// returns the counts (a second start() before wait() supersedes the first). Not thread-safe: one layer
// forward at a time per object.
class MoeHostCounts {
 public:
  MoeHostCounts() = default;
  ~MoeHostCounts();
  MoeHostCounts(const MoeHostCounts&) = delete;
  MoeHostCounts& operator=(const MoeHostCounts&) = delete;
  void start(const ExecContext& ctx, const Tensor& counts);  // counts: i32 [E]
  void wait(std::vector<int32_t>& out);

 private:
  int32_t* pinned_ = nullptr;  // cudaMallocHost'ed (plain copy for CPU tensors)
  int64_t capacity_ = 0, size_ = 0;
  void* event_ = nullptr;  // cudaEvent_t, recorded after the copy
  bool pending_ = false, device_copy_ = false;
  std::vector<int32_t> host_;  // CPU tensors: copied at start()
};

struct MoeRouterOptions {
  bool sigmoid = false;         // score function: sigmoid (else softmax)
  bool norm_topk_prob = false;  // renormalise the k chosen scores to sum 1 (before route_scale)
  float route_scale = 1.0f;     // multiplies the combine weights
};

// Limits of the CUDA router (one thread per token keeps its k choices in registers).
constexpr int64_t kMoeMaxTopK = 32;

// scores [N, E]: the router logits on entry, the scores on return. bias [E] (same dtype) or empty.
// Fills every tensor of r (allocated for N, k, E).
void moe_route(const ExecContext& ctx, const MoeRouterOptions& opt, const Tensor& scores, const Tensor& bias,
               const MoeRouting& r);
// x [N, D] -> xp [N k, D].
void moe_permute(const ExecContext& ctx, const MoeRouting& r, const Tensor& x, const Tensor& xp);
// xp [N k, D] -> pairs [N k, D].
void moe_unpermute(const ExecContext& ctx, const MoeRouting& r, const Tensor& xp, const Tensor& pairs);
// yp [N k, D] -> out [N, D], weighted by r.weight.
void moe_combine(const ExecContext& ctx, const MoeRouting& r, const Tensor& yp, const Tensor& out, bool accumulate);
// dxp [N k, D] -> dx [N, D].
void moe_permute_backward(const ExecContext& ctx, const MoeRouting& r, const Tensor& dxp, const Tensor& dx,
                          bool accumulate);
// dout [N, D], yp [N k, D] -> d_yp [N k, D], d_weight [N, k] (the scores' dtype). Both overwritten.
void moe_combine_backward(const ExecContext& ctx, const MoeRouting& r, const Tensor& dout, const Tensor& yp,
                          const Tensor& d_yp, const Tensor& d_weight);
// scores [N, E], d_weight [N, k], aux_frac [E] -> d_logits [N, E] (overwritten), all the scores' dtype.
// aux_scale = d_aux coef E / N (0 without the load-balancing loss).
void moe_router_backward(const ExecContext& ctx, const MoeRouterOptions& opt, const Tensor& scores, const MoeRouting& r,
                         const Tensor& d_weight, const Tensor& aux_frac, double aux_scale, const Tensor& d_logits);
// aux_frac [E] and aux_prob [E] (the scores' dtype; aux_prob may be empty).
void moe_aux_stats(const ExecContext& ctx, const MoeRouting& r, const Tensor& scores, const Tensor& aux_frac,
                   const Tensor& aux_prob);
// offsets i32 [E + 1] (r.offsets); x [R, k], w [E, n, k], y [R, n] with R = offsets[E] = rows of x.
// plan: the CUDA implementation (default: the WMMA kernels) and, for the cuBLAS ones, the host counts.
void moe_grouped_linear_forward(const ExecContext& ctx, const Tensor& offsets, const Tensor& x, const Tensor& w,
                                const Tensor& y, const MoeGemmPlan& plan = {});
// dy [R, n], x [R, k], w [E, n, k]; dx [R, k] overwritten (empty: not computed); dw [E, n, k] accumulated
// into (f32 on CUDA, empty: not computed).
void moe_grouped_linear_backward(const ExecContext& ctx, const Tensor& offsets, const Tensor& dy, const Tensor& x,
                                 const Tensor& w, const Tensor& dx, const Tensor& dw, const MoeGemmPlan& plan = {});

namespace cpu {
// The CPU reference (the meaning of every op). Index arrays as in MoeRouting; sizes N, k, E, D.
template <class T>
void moe_route(const MoeRouterOptions& opt, T* scores, const T* bias, int64_t n, int64_t e, int64_t k, int32_t* expert,
               T* weight, int32_t* counts, int32_t* offsets, int32_t* order, int32_t* position);
template <class T>
void moe_permute(const int32_t* order, const T* x, T* xp, int64_t n, int64_t k, int64_t d);
template <class T>
void moe_unpermute(const int32_t* position, const T* xp, T* pairs, int64_t n, int64_t k, int64_t d);
// out[t] (= | +=) sum_j w_tj rows[position[t k + j]] (w = 1 when weight is null).
template <class T>
void moe_gather_sum(const int32_t* position, const T* weight, const T* rows, T* out, int64_t n, int64_t k, int64_t d,
                    bool accumulate);
template <class T>
void moe_combine_backward(const int32_t* order, const T* weight, const T* dout, const T* yp, T* d_yp, T* d_weight,
                          int64_t n, int64_t k, int64_t d);
template <class T>
void moe_router_backward(const MoeRouterOptions& opt, const T* scores, const int32_t* expert, const T* d_weight,
                         const T* aux_frac, T aux_scale, T* d_logits, int64_t n, int64_t e, int64_t k);
template <class T>
void moe_aux_stats(const int32_t* counts, const T* scores, T* aux_frac, T* aux_prob, int64_t n, int64_t e, int64_t k);
template <class T>
void moe_grouped_linear_forward(const int32_t* offsets, const T* x, const T* w, T* y, int64_t e, int64_t n, int64_t k);
template <class T>
void moe_grouped_linear_backward(const int32_t* offsets, const T* dy, const T* x, const T* w, T* dx, T* dw, int64_t e,
                                 int64_t n, int64_t k);
}  // namespace cpu

namespace cuda {
void moe_route(const MoeRouterOptions& opt, float* scores, const float* bias, int64_t n, int64_t e, int64_t k,
               int32_t* expert, float* weight, int32_t* counts, int32_t* offsets, int32_t* order, int32_t* position,
               void* stream);
void moe_permute(const int32_t* order, const bf16* x, bf16* xp, int64_t n, int64_t k, int64_t d, void* stream);
void moe_unpermute(const int32_t* position, const bf16* xp, bf16* pairs, int64_t n, int64_t k, int64_t d, void* stream);
void moe_gather_sum(const int32_t* position, const float* weight, const bf16* rows, bf16* out, int64_t n, int64_t k,
                    int64_t d, bool accumulate, void* stream);
void moe_combine_backward(const int32_t* order, const float* weight, const bf16* dout, const bf16* yp, bf16* d_yp,
                          float* d_weight, int64_t n, int64_t k, int64_t d, void* stream);
void moe_router_backward(const MoeRouterOptions& opt, const float* scores, const int32_t* expert, const float* d_weight,
                         const float* aux_frac, float aux_scale, float* d_logits, int64_t n, int64_t e, int64_t k,
                         void* stream);
void moe_aux_stats(const int32_t* counts, const float* scores, float* aux_frac, float* aux_prob, int64_t n, int64_t e,
                   int64_t k, void* stream);
// rows = offsets[E] (host-known upper bound of the rows: the grid is sized by it, the kernels read the
// device offsets; no host synchronisation).
void moe_grouped_linear_forward(const int32_t* offsets, const bf16* x, const bf16* w, bf16* y, int64_t rows, int64_t e,
                                int64_t n, int64_t k, void* stream);
void moe_grouped_linear_backward(const int32_t* offsets, const bf16* dy, const bf16* x, const bf16* w, bf16* dx,
                                 float* dw, int64_t rows, int64_t e, int64_t n, int64_t k, void* stream);
// The cuBLAS implementations (kernels/cuda/moe_cublas.cu): counts = the E host row counts; grouped selects
// cublasGemmGroupedBatchedEx (else one cublasGemmEx per expert with rows). cublas: the context's handle.
void moe_grouped_linear_forward_cublas(void* cublas, void* stream, bool grouped, const int32_t* counts, const bf16* x,
                                       const bf16* w, bf16* y, int64_t e, int64_t n, int64_t k);
void moe_grouped_linear_backward_cublas(void* cublas, void* stream, bool grouped, const int32_t* counts, const bf16* dy,
                                        const bf16* x, const bf16* w, bf16* dx, float* dw, int64_t e, int64_t n,
                                        int64_t k);
const char* moe_grouped_dw_path();
}  // namespace cuda

}  // namespace kernels
}  // namespace hyd

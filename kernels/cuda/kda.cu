// CUDA KDA core (kernels/kda.h): the chunkwise form of ../shared/KDA.md with C = 64, first version
// (correctness first: fp32 CUDA-core arithmetic everywhere, bf16 only as the storage of q, k, v, o,
// do, dq, dk, dv). The kernels are the block programs of kernels/cuda/kda_chunk.cuh, run here with
// one generic __global__ per program; the same programs run serially on the host in the emulation
// test (tests/gpu/test_gpu_kda.cpp).
//
// ---- Forward (KDA.md notation; one document, one value head, chunk rows r, c in [0, L), L <= C;
// rows past L are zero-padded, so G stays constant there and G_last = G_{C-1}):
//   G_r = sum_{r' <= r} g_r'                    (per channel i)
//   A[r,c] = beta_r sum_i k_r[i] k_c[i] exp(G_r[i] - G_c[i])          c < r
//   X = (I + A)^-1 (forward substitution),  T = X Diag(beta)
//   w = T (exp(G) * k),  u = T v,  Aqk[r,c] = sum_i q_r[i] k_c[i] exp(G_r[i] - G_c[i])   c <= r
//   qg = q * exp(G),  kg = k * exp(G_last - G),  gl = exp(G_last)
//   per chunk with incoming S:  v_new = u - w S;  o = qg S + Aqk v_new;  S' = Diag(gl) S + kg^T v_new
// Kernel 1 (per chunk, value head) computes the state-free quantities into global scratch; kernel 2
// (per document, value head, 32-column tile of the state) runs the state pass over the chunks.
// Transition: B = the state pass from S = 0; M = the same pass with u = 0 from S = I (dk columns),
// since S' = (Diag(gl) - kg^T w) S + kg^T u.
//
// ---- Backward: the chunked adjoint (write X̄ = dL/dX). The forward state pass is re-run keeping
// S_in and v_new of every chunk; then, with S̄ = S̄_out of a chunk (dfinal_state for the last):
//   v_new feeds o and S':     v̄_new = Aqk^T ō + kg S̄
//   S feeds o, v_new, S':     S̄_in = Diag(gl) S̄ + qg^T ō - w^T v̄_new          (reverse pass, kernel 3)
//   products over d_v (kernel 4):
//     q̄g = ō S^T,  k̄g = v_new S̄^T,  w̄ = -v̄_new S^T,  ḡl[i] = exp(G_last[i]) sum_j S[i,j] S̄[i,j]
//     Āqk = ō v_new^T (c <= r),  ū = v̄_new,  v̄ = T^T ū  (v enters only through u)
//   through T and the UT transform (kernel 5):
//     T̄ = ū v^T + w̄ kG^T (kG = exp(G) * k; only c <= r matters),  k̄G = T^T w̄
//     T = X Diag(beta):   β̄_c += sum_r T̄[r,c] X[r,c],  X̄ = T̄ Diag(beta)
//     X = (I + A)^-1:     Ā = -X^T X̄ X^T, kept strictly below the diagonal (A's free entries);
//                         the upper part of X̄ cannot reach it because X^T is upper triangular
//     A = Diag(beta) Ak:  β̄_r += sum_c Ā[r,c] Ak[r,c],  P = Diag(beta) Ā
//   and per element (r, i), E_rc = exp(G_r[i] - G_c[i]):
//     q̄_r += q̄g_r exp(G_r) + sum_{c<=r} Āqk[r,c] k_c E_rc
//     k̄_r += k̄g_r exp(G_last - G_r) + k̄G_r exp(G_r) + sum_{c<r} P[r,c] k_c E_rc
//            + sum_{r'>r} P[r',r] k_r' E_r'r + sum_{r'>=r} Āqk[r',r] q_r' E_r'r
//     Ḡ_r  = q̄g q exp(G_r) - k̄g k exp(G_last - G_r) + k̄G k exp(G_r) + k_r sum_{c<r} P k_c E
//            + q_r sum_{c<=r} Āqk k_c E - k_r sum_{r'>r} P k_r' E - k_r sum_{r'>=r} Āqk q_r' E
//     Ḡ_last += ḡl + sum_r' k̄g_r' kg_r'   (added to row L-1)
//     ḡ_r = sum_{r' >= r} Ḡ_r'   (G is a cumulative sum: reverse cumulative sum within the chunk)
// dq and dk are summed over the value heads of each q/k head's group at the end (kernel 6).
// The derivation was checked against finite differences of the recurrence in float64 (numpy) and the
// programs against the CPU reference through the host emulation.
//
// Scratch: one cudaMallocAsync'd buffer per call (stream-ordered, freed after the last kernel),
// sized from (max chunks, HV, dk, dv) by kda_chunk::carve_scratch; in the backward about
// 480 KB per (chunk, value head) at dk = dv = 128 plus 8 N HV dk bytes.
// TODO(perf), in the order they should pay: tensor-core (mma/wgmma, bf16 operands) products in all
// kernels; state pass with the state in registers and all of dv per block (fewer w/kg reads);
// fused backward (reverse pass + kernel 4 + kernel 5 per chunk) without the dS_out / v̄_new
// round trips; bf16 scratch for w, u, qg, kg; a blocked inverse instead of 63 barrier steps.
#include <cstdlib>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/kda_chunk.cuh"
#include "kernels/cuda/kda_mma.h"
#include "kernels/kda.h"

namespace hyd::kernels::cuda {

using namespace cuda_detail;

namespace {

using kda_chunk::BlockIdx;
using kda_chunk::Grid;
using kda_chunk::kThreads;

template <class P>
__global__ void __launch_bounds__(kThreads) kda_block_kernel(const P p) {
  extern __shared__ float4 kda_smem[];
  kda_chunk::DeviceExec ex;
  p(ex, reinterpret_cast<char*>(kda_smem), BlockIdx{blockIdx.x, blockIdx.y, blockIdx.z});
}

constexpr size_t kMaxSmem = 227 * 1024;  // H100 opt-in limit per block

struct DeviceLauncher {
  cudaStream_t stream;
  template <class P>
  void launch(Grid g, size_t smem_bytes, const P& p) {
    if (g.x == 0 || g.y == 0 || g.z == 0) return;
    HYD_CHECK(g.x <= 0x7fffffffLL && g.y <= 65535 && g.z <= 65535, "kda: grid (", g.x, ", ", g.y, ", ", g.z,
              ") exceeds the CUDA limits");
    HYD_CHECK(smem_bytes <= kMaxSmem, "kda: ", smem_bytes, " bytes of shared memory exceed the per-block limit");
    if (smem_bytes > 48 * 1024)
      CHECK_CUDA(cudaFuncSetAttribute(kda_block_kernel<P>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem_bytes)));
    const dim3 grid(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
    kda_block_kernel<P><<<grid, kThreads, smem_bytes, stream>>>(p);
    CHECK_LAUNCH();
  }
};

// The tensor-core forward's scratch and, in front of it, the per-document chunk table (launched here), in one
// stream-ordered allocation.
class MmaForwardScratch {
 public:
  MmaForwardScratch(const KdaDims& s, const int32_t* cu_seqlens, cudaStream_t st)
      : table_floats_((static_cast<size_t>(s.num_docs) + 1 + 3) / 4 * 4),
        buf_(table_floats_ + (kda_mma::forward_scratch_bytes(s) + 3) / 4, st) {
    kda_chunk::Scratch sc;
    sc.chunk_off = chunk_off();
    DeviceLauncher launcher{st};
    kda_chunk::launch_chunk_table(launcher, s, cu_seqlens, sc);
  }
  int32_t* chunk_off() const { return reinterpret_cast<int32_t*>(buf_.get()); }
  float* scratch() const { return buf_.get() + table_floats_; }

 private:
  size_t table_floats_;
  StreamScratch buf_;
};

// HYD_KDA_V1=1 selects the version-1 kernels everywhere (for comparisons and benchmarks).
bool kda_force_v1() {
  static const bool v1 = [] {
    const char* e = std::getenv("HYD_KDA_V1");
    return e != nullptr && e[0] == '1';
  }();
  return v1;
}

void check_dims(const KdaDims& s, const char* op) {
  HYD_CHECK(s.h > 0 && s.hv > 0 && s.hv % s.h == 0 && s.hv <= 65535, op, ": value heads ", s.hv,
            " must be a positive multiple of the ", s.h, " q/k heads (and at most 65535)");
  HYD_CHECK(s.dk == 32 || s.dk == 64 || s.dk == 128, op, ": the CUDA kernels support dk 32, 64 or 128, got ", s.dk);
  HYD_CHECK(s.dv % kda_chunk::kTile == 0 && s.dv >= 32 && s.dv <= 128, op,
            ": the CUDA kernels support dv 32, 64, 96 or 128, got ", s.dv);
  HYD_CHECK(s.n >= 0 && s.num_docs >= 0 && s.n + (kda_chunk::kChunk - 1) * s.num_docs < (int64_t(1) << 31), op, ": ",
            s.n, " tokens in ", s.num_docs, " documents exceed the 32-bit chunk index");
}

}  // namespace

void kda_forward(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                 const int32_t* cu_seqlens, const float* initial_state, bf16* o, float* final_state, void* stream) {
  check_dims(s, "kda_forward");
  if (s.num_docs == 0) return;
  cudaStream_t st = as_stream(stream);
  if (kda_mma::supports(s) && !kda_force_v1()) {
    const MmaForwardScratch buf(s, cu_seqlens, st);
    kda_mma::forward(s, q, k, v, g, beta, cu_seqlens, buf.chunk_off(), initial_state, o, final_state, buf.scratch(),
                     st);
    return;
  }
  kda_chunk::Scratch sc;
  StreamScratch buf(kda_chunk::carve_scratch(nullptr, s, kda_chunk::Pass::forward, sc), st);
  kda_chunk::carve_scratch(buf.get(), s, kda_chunk::Pass::forward, sc);
  DeviceLauncher launcher{st};
  kda_chunk::run_forward(launcher, s, q, k, v, g, beta, cu_seqlens, initial_state, o, final_state, sc);
}

void kda_backward(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                  const int32_t* cu_seqlens, const float* initial_state, const bf16* dout, const float* dfinal_state,
                  bf16* dq, bf16* dk, bf16* dv, float* dg, float* dbeta, float* dinitial_state, void* stream) {
  check_dims(s, "kda_backward");
  if (s.num_docs == 0) return;
  cudaStream_t st = as_stream(stream);
  if (kda_mma::supports(s) && !kda_force_v1()) {
    kda_chunk::Scratch sc;
    const size_t floats = kda_chunk::carve_scratch(nullptr, s, kda_chunk::Pass::backward_mma, sc);
    StreamScratch buf(floats + (kda_mma::forward_scratch_bytes(s) + 3) / 4, st);
    kda_chunk::carve_scratch(buf.get(), s, kda_chunk::Pass::backward_mma, sc);
    DeviceLauncher launcher{st};
    kda_chunk::launch_chunk_table(launcher, s, cu_seqlens, sc);
    kda_mma::backward_products(s, q, k, v, g, beta, cu_seqlens, sc.chunk_off, initial_state, dout, dfinal_state, dq,
                               dk, dv, dg, dbeta, dinitial_state, sc, buf.get() + floats, st);
    if (s.hv != s.h) kda_chunk::launch_group_reduce(launcher, s, dq, dk, sc);
    return;
  }
  kda_chunk::Scratch sc;
  StreamScratch buf(kda_chunk::carve_scratch(nullptr, s, kda_chunk::Pass::backward, sc), st);
  kda_chunk::carve_scratch(buf.get(), s, kda_chunk::Pass::backward, sc);
  DeviceLauncher launcher{st};
  kda_chunk::run_backward(launcher, s, q, k, v, g, beta, cu_seqlens, initial_state, dout, dfinal_state, dq, dk, dv, dg,
                          dbeta, dinitial_state, sc);
}

// Split forward workspace: the chunk table, the prep scratch, then (zero_values) the zero u of the M pass.
namespace {
struct SplitLayout {
  size_t table = 0, prep = 0, zero_u = 0, bytes = 0;
};
SplitLayout split_layout(const KdaDims& s, bool zero_values) {
  SplitLayout l;
  l.table = 0;
  l.prep = (static_cast<size_t>(s.num_docs + 1) * 4 + 15) / 16 * 16;
  l.zero_u = l.prep + (kda_mma::forward_scratch_bytes(s) + 15) / 16 * 16;
  const size_t zu = zero_values ? static_cast<size_t>(kda_chunk::max_chunks(s)) * static_cast<size_t>(s.hv) *
                                      kda_chunk::kChunk * static_cast<size_t>(s.dk) * 4
                                : 0;
  l.bytes = l.zero_u + zu;
  return l;
}
}  // namespace

bool kda_split_supported(const KdaDims& s) { return kda_mma::supports(s) && !kda_force_v1(); }

void kda_backward_initial_adjoint(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                                  const float* beta, const int32_t* cu_seqlens, const bf16* dout, float* dinitial_state,
                                  void* stream) {
  check_dims(s, "kda_backward_initial_adjoint");
  HYD_CHECK(kda_split_supported(s), "kda_backward_initial_adjoint: not available for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  cudaStream_t st = as_stream(stream);
  const MmaForwardScratch buf(s, cu_seqlens, st);
  kda_mma::initial_adjoint(s, q, k, v, g, beta, cu_seqlens, buf.chunk_off(), dout, dinitial_state, buf.scratch(), st);
}

size_t kda_saved_bytes(const KdaDims& s) { return kda_mma::saved_bytes(s); }

int kda_saving_windows(const KdaDims& s) { return kda_mma::saving_windows(s); }

namespace {
// The chunk table of cu_seqlens into `saved` (kda_mma::saved_chunk_table), before the saving forward's prep.
void launch_saved_chunk_table(const KdaDims& s, const int32_t* cu_seqlens, void* saved, cudaStream_t st) {
  kda_chunk::Scratch sc;
  sc.chunk_off = kda_mma::saved_chunk_table(s, saved);
  DeviceLauncher launcher{st};
  kda_chunk::launch_chunk_table(launcher, s, cu_seqlens, sc);
}
}  // namespace

void kda_forward_saving(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                        const float* beta, const int32_t* cu_seqlens, const float* initial_state, bf16* o,
                        float* final_state, void* saved, void* stream) {
  check_dims(s, "kda_forward_saving");
  HYD_CHECK(kda_split_supported(s), "kda_forward_saving: not available for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  // u (read by the state pass only) in stream-ordered scratch, freed behind it.
  cudaStream_t st = as_stream(stream);
  StreamScratch u((kda_mma::saving_u_bytes(s) + 3) / 4, st);
  launch_saved_chunk_table(s, cu_seqlens, saved, st);
  kda_mma::forward_saving(s, q, k, v, g, beta, cu_seqlens, initial_state, o, final_state, saved, u.get(), st);
}

size_t kda_saving_u_bytes(const KdaDims& s) { return kda_mma::saving_u_bytes(s); }

void kda_forward_saving_prepare(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                                const float* beta, const int32_t* cu_seqlens, void* saved, float* u, void* stream) {
  check_dims(s, "kda_forward_saving_prepare");
  HYD_CHECK(kda_split_supported(s), "kda_forward_saving_prepare: not available for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  cudaStream_t st = as_stream(stream);
  launch_saved_chunk_table(s, cu_seqlens, saved, st);
  kda_mma::forward_saving_prepare(s, q, k, v, g, beta, cu_seqlens, saved, u, st);
}

void kda_forward_saving_pass(const KdaDims& s, const int32_t* cu_seqlens, const float* initial_state, bf16* o,
                             float* final_state, void* saved, const float* u, void* stream) {
  check_dims(s, "kda_forward_saving_pass");
  HYD_CHECK(kda_split_supported(s), "kda_forward_saving_pass: not available for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  kda_mma::forward_saving_pass(s, cu_seqlens, initial_state, o, final_state, saved, u, as_stream(stream));
}

namespace {
// The transition pass's u (zero values: u = T v = 0), f32 [max_chunks x hv x 64 x dk] zeros in stream-ordered scratch.
struct TransitionZeroU {
  static size_t floats(const KdaDims& s) {
    return std::max<size_t>(
        static_cast<size_t>(kda_chunk::max_chunks(s)) * static_cast<size_t>(s.hv) * kda_chunk::kChunk * s.dk, 4);
  }
  StreamScratch buf;
  TransitionZeroU(const KdaDims& s, cudaStream_t st) : buf(floats(s), st) {
    CHECK_CUDA(cudaMemsetAsync(buf.get(), 0, floats(s) * sizeof(float), st));
  }
};
}  // namespace

void kda_forward_saving_transition(const KdaDims& s, const int32_t* cu_seqlens, const float* initial_state,
                                   float* final_state, const void* saved, void* stream, bf16* transitions) {
  check_dims(s, "kda_forward_saving_transition");
  HYD_CHECK(kda_split_supported(s), "kda_forward_saving_transition: not available for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  const cudaStream_t st = as_stream(stream);
  const TransitionZeroU zero_u(s, st);
  kda_mma::forward_saving_transition(s, cu_seqlens, initial_state, final_state, saved, zero_u.buf.get(), st,
                                     transitions);
}

size_t kda_transitions_bytes(const KdaDims& s) { return kda_mma::transitions_bytes(s); }

void kda_forward_saving_lasp(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                             const float* beta, const int32_t* cu_seqlens, bf16* o, float* final_state, void* saved,
                             float* u, const float* eye, float* transition_final, bf16* transitions, void* stream) {
  check_dims(s, "kda_forward_saving_lasp");
  HYD_CHECK(kda_split_supported(s), "kda_forward_saving_lasp: not available for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  const cudaStream_t st = as_stream(stream);
  const TransitionZeroU zero_u(s, st);
  launch_saved_chunk_table(s, cu_seqlens, saved, st);
  kda_mma::forward_saving_lasp(s, q, k, v, g, beta, cu_seqlens, o, final_state, saved, u, zero_u.buf.get(), eye,
                               transition_final, transitions, st);
}

void kda_forward_saving_correct(const KdaDims& s, const int32_t* cu_seqlens, const float* initial_state,
                                const bf16* transitions, bf16* o, void* saved, void* stream) {
  check_dims(s, "kda_forward_saving_correct");
  HYD_CHECK(kda_split_supported(s), "kda_forward_saving_correct: not available for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  kda_mma::forward_saving_correct(s, cu_seqlens, initial_state, transitions, o, saved, as_stream(stream));
}

void kda_backward_saved(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                        const float* beta, const int32_t* cu_seqlens, const bf16* dout, const float* dfinal_state,
                        bf16* dq, bf16* dk, bf16* dv, float* dg, float* dbeta, float* dinitial_state, const void* saved,
                        void* stream) {
  check_dims(s, "kda_backward_saved");
  HYD_CHECK(kda_split_supported(s), "kda_backward_saved: not available for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  cudaStream_t st = as_stream(stream);
  kda_chunk::Scratch sc;
  StreamScratch buf(kda_chunk::carve_scratch(nullptr, s, kda_chunk::Pass::backward_mma_saved, sc), st);
  kda_chunk::carve_scratch(buf.get(), s, kda_chunk::Pass::backward_mma_saved, sc);
  sc.chunk_off = kda_mma::saved_chunk_table(s, const_cast<void*>(saved));  // the forward's
  kda_mma::backward_saved(s, q, k, v, g, beta, cu_seqlens, dout, dfinal_state, dq, dk, dv, dg, dbeta, dinitial_state,
                          sc, saved, st);
  if (s.hv != s.h) {
    DeviceLauncher launcher{st};
    kda_chunk::launch_group_reduce(launcher, s, dq, dk, sc);
  }
}

size_t kda_backward_workspace_bytes(const KdaDims& s) {
  kda_chunk::Scratch sc;
  return std::max<size_t>(kda_chunk::carve_scratch(nullptr, s, kda_chunk::Pass::backward_mma_saved, sc) * sizeof(float),
                          16);
}

namespace {
// The saved backward's scratch in the caller's workspace, with the forward's chunk table.
kda_chunk::Scratch saved_backward_scratch(const KdaDims& s, const void* saved, float* workspace) {
  kda_chunk::Scratch sc;
  kda_chunk::carve_scratch(workspace, s, kda_chunk::Pass::backward_mma_saved, sc);
  sc.chunk_off = kda_mma::saved_chunk_table(s, const_cast<void*>(saved));
  return sc;
}
}  // namespace

void kda_backward_saved_reverse(const KdaDims& s, const int32_t* cu_seqlens, const bf16* dout,
                                const float* dfinal_state, float* dinitial_state, const void* saved, float* workspace,
                                void* stream) {
  check_dims(s, "kda_backward_saved_reverse");
  HYD_CHECK(kda_split_supported(s), "kda_backward_saved_reverse: not available for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  kda_chunk::Scratch sc = saved_backward_scratch(s, saved, workspace);
  kda_mma::backward_saved_reverse(s, cu_seqlens, dout, dfinal_state, dinitial_state, sc, saved, as_stream(stream));
}

void kda_backward_saved_transition(const KdaDims& s, const int32_t* cu_seqlens, const float* final_adjoint,
                                   const void* saved, bf16* transitions, void* stream) {
  check_dims(s, "kda_backward_saved_transition");
  HYD_CHECK(kda_split_supported(s), "kda_backward_saved_transition: not available for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  kda_mma::backward_saved_transition(s, cu_seqlens, final_adjoint, saved, transitions, as_stream(stream));
}

void kda_backward_saved_correct(const KdaDims& s, const int32_t* cu_seqlens, const float* dfinal_state,
                                const bf16* transitions, const void* saved, float* workspace, void* stream) {
  check_dims(s, "kda_backward_saved_correct");
  HYD_CHECK(kda_split_supported(s), "kda_backward_saved_correct: not available for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  kda_chunk::Scratch sc = saved_backward_scratch(s, saved, workspace);
  kda_mma::backward_saved_correct(s, cu_seqlens, dfinal_state, transitions, sc, saved, as_stream(stream));
}

void kda_backward_saved_finish(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                               const float* beta, const int32_t* cu_seqlens, const bf16* dout, bf16* dq, bf16* dk,
                               bf16* dv, float* dg, float* dbeta, const void* saved, float* workspace, void* stream) {
  check_dims(s, "kda_backward_saved_finish");
  HYD_CHECK(kda_split_supported(s), "kda_backward_saved_finish: not available for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  cudaStream_t st = as_stream(stream);
  kda_chunk::Scratch sc = saved_backward_scratch(s, saved, workspace);
  kda_mma::backward_saved_finish(s, q, k, v, g, beta, cu_seqlens, dout, dq, dk, dv, dg, dbeta, sc, saved, st);
  if (s.hv != s.h) {
    DeviceLauncher launcher{st};
    kda_chunk::launch_group_reduce(launcher, s, dq, dk, sc);
  }
}

size_t kda_forward_workspace_bytes(const KdaDims& s, bool zero_values) { return split_layout(s, zero_values).bytes; }

void kda_forward_prepare(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                         const float* beta, const int32_t* cu_seqlens, void* ws, bool zero_values, void* stream) {
  check_dims(s, "kda_forward_prepare");
  HYD_CHECK(kda_split_supported(s), "kda_forward_prepare: no split forward for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  cudaStream_t st = as_stream(stream);
  const SplitLayout l = split_layout(s, zero_values);
  unsigned char* base = static_cast<unsigned char*>(ws);
  kda_chunk::Scratch sc;
  sc.chunk_off = reinterpret_cast<int32_t*>(base + l.table);
  DeviceLauncher launcher{st};
  kda_chunk::launch_chunk_table(launcher, s, cu_seqlens, sc);
  kda_mma::forward_prepare(s, q, k, v, g, beta, cu_seqlens, sc.chunk_off, base + l.prep, st);
  if (zero_values && l.bytes > l.zero_u) CHECK_CUDA(cudaMemsetAsync(base + l.zero_u, 0, l.bytes - l.zero_u, st));
}

void kda_forward_pass(const KdaDims& s, const int32_t* cu_seqlens, const void* ws, const float* initial_state, bf16* o,
                      float* final_state, bool zero_values, void* stream) {
  check_dims(s, "kda_forward_pass");
  HYD_CHECK(kda_split_supported(s), "kda_forward_pass: no split forward for dk ", s.dk, " / dv ", s.dv);
  if (s.num_docs == 0) return;
  const SplitLayout l = split_layout(s, zero_values);
  const unsigned char* base = static_cast<const unsigned char*>(ws);
  kda_mma::forward_state(s, cu_seqlens, reinterpret_cast<const int32_t*>(base + l.table), initial_state, o, final_state,
                         base + l.prep, zero_values ? reinterpret_cast<const float*>(base + l.zero_u) : nullptr,
                         stream);
}

void kda_transition(const KdaDims& s, const bf16* k, const bf16* v, const float* g, const float* beta,
                    const int32_t* cu_seqlens, float* M, float* B, void* stream) {
  check_dims(s, "kda_transition");
  if (s.num_docs == 0) return;
  cudaStream_t st = as_stream(stream);
  kda_chunk::Scratch sc;
  StreamScratch buf(kda_chunk::carve_scratch(nullptr, s, kda_chunk::Pass::transition, sc), st);
  kda_chunk::carve_scratch(buf.get(), s, kda_chunk::Pass::transition, sc);
  DeviceLauncher launcher{st};
  kda_chunk::run_transition(launcher, s, k, v, g, beta, cu_seqlens, M, B, sc);
}

}  // namespace hyd::kernels::cuda

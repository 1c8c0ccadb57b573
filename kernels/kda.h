// Kimi Delta Attention core: the gated delta-rule recurrence (../shared/KDA.md is the contract).
//
// Per document, value head hv (q/k head h = hv / (HV / H)), token t, with alpha_t = exp(g_t):
//   S' = Diag(alpha_t) S_{t-1}
//   S_t = S' + beta_t k_t (v_t - S'^T k_t)^T
//   o_t = S_t^T q_t
// S_0 = initial_state of the document (zeros when not given). q is used as given: the layer has
// already L2-normalised q and k and scaled q by d_k^-1/2.
// Chunked form (chunk C = 64, KDA.md "Chunkwise form") computes the same function; the transition
// of a span is the affine map S_out = M S_in + B (KDA.md "Chunk transition").
//
// Shapes (N = packed tokens, D = documents from cu_seqlens i32 [D+1]):
//   q, k [N, H, dk]; v [N, HV, dv]; g [N, HV, dk] (log-decay, <= 0); beta [N, HV]
//   initial_state, final_state, dinitial_state, dfinal_state [D, HV, dk, dv] (f32; may be empty)
//   o, do [N, HV, dv]; M [D, HV, dk, dk]; B [D, HV, dk, dv]
// dtypes: CPU f32 throughout. CUDA: q, k, v, o, do and dq, dk, dv bf16; g, beta, dg, dbeta, states,
// M, B f32 (state arithmetic is always f32).
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void kda_forward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                 const Tensor& beta, const Tensor& cu_seqlens, const Tensor& initial_state, const Tensor& o,
                 const Tensor& final_state);
// dfinal_state / dinitial_state may be empty. All other gradients are overwritten (not accumulated).
void kda_backward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                  const Tensor& beta, const Tensor& cu_seqlens, const Tensor& initial_state, const Tensor& dout,
                  const Tensor& dfinal_state, const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dg,
                  const Tensor& dbeta, const Tensor& dinitial_state);
// Affine transition (M, B) of every document span.
void kda_transition(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta,
                    const Tensor& cu_seqlens, const Tensor& M, const Tensor& B);

// The forward split in two for LASP-2 (sequence parallelism), where one set of inputs needs several passes
// from different initial states: kda_forward_prepare does the work that does not depend on the state once
// (the chunks' intra-chunk products, kept in `workspace`), then each kda_forward_pass is kda_forward of those
// inputs from its own initial_state (o may be empty: the final state alone). Available on CUDA with the
// tensor-core kernels (dk, dv in {64, 128}; kda_split_forward_supported), else the caller runs kda_forward.
// workspace: f32 on the inputs' device, at least kda_forward_workspace_floats(...) elements; a pass reads
// what the last prepare on that workspace wrote (same stream). zero_values: a pass as if v were zero with dk
// value columns (the transition M of KDA.md from an identity initial state): initial_state and
// final_state [D, HV, dk, dk], o empty; the workspace must be sized and prepared with zero_values.
bool kda_split_forward_supported(const Tensor& k, const Tensor& v);
// LASP-2's backward counterpart, same availability: dinitial_state [D, HV, dk, dv] of kda_backward with a zero
// dfinal_state (which depends on neither the initial state nor the other gradients), computed without the
// rest of the backward (the prep and the reverse state pass only). Inputs as kda_backward's.
void kda_backward_initial_adjoint(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& g, const Tensor& beta, const Tensor& cu_seqlens, const Tensor& dout,
                                  const Tensor& dinitial_state);
int64_t kda_forward_workspace_floats(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens, bool zero_values);
void kda_forward_prepare(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                         const Tensor& beta, const Tensor& cu_seqlens, const Tensor& workspace, bool zero_values);
void kda_forward_pass(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                      const Tensor& workspace, const Tensor& initial_state, const Tensor& o, const Tensor& final_state,
                      bool zero_values);

// A forward that keeps what the backward would recompute, and that backward (CUDA with the tensor-core
// kernels only: kda_split_forward_supported): the prep of every chunk, X, every chunk's incoming state and
// v_new go into `saved` (f32, at least kda_saved_floats(k, v, cu_seqlens) elements on the inputs' device,
// ~152 KB per 64-token chunk and value head at dk = dv = 128); kda_backward_saved of the same inputs,
// cu_seqlens and saved (nothing written to it in between) then skips the prep and the state pass that
// kda_backward runs first. Results equal kda_forward's / kda_backward's bit for bit; the initial state is the
// forward's (kept in the saved states).
int64_t kda_saved_floats(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens);
void kda_forward_saving(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                        const Tensor& beta, const Tensor& cu_seqlens, const Tensor& initial_state, const Tensor& o,
                        const Tensor& final_state, const Tensor& saved);
void kda_backward_saved(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                        const Tensor& beta, const Tensor& cu_seqlens, const Tensor& dout, const Tensor& dfinal_state,
                        const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dg, const Tensor& dbeta,
                        const Tensor& dinitial_state, const Tensor& saved);
// How many windows kda_forward_saving / kda_backward_saved pipeline these inputs over on the current device: a batch
// whose state passes fill at most half of the SMs (few long documents) runs the chunk-parallel kernels of one window
// of chunks beside the sequential pass over another (kernels/cuda/kda_mma.cu pass_windows; HYD_KDA_WINDOWS=N forces
// N); 1: none (also without CUDA). Same results either way.
int kda_saving_windows(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens);
// kda_forward_saving in two steps (the same kernels, so the same bits): the state-independent prep into `saved`
// and `u` (f32, at least kda_saving_u_floats elements, kept by the caller until the pass), then the state pass from
// initial_state; anything may run between them that writes neither saved nor u (LASP-2: a rank preps while it
// waits for its incoming state).
int64_t kda_saving_u_floats(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens);
void kda_forward_saving_prepare(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& g, const Tensor& beta, const Tensor& cu_seqlens, const Tensor& saved,
                                const Tensor& u);
void kda_forward_saving_pass(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                             const Tensor& initial_state, const Tensor& o, const Tensor& final_state,
                             const Tensor& saved, const Tensor& u);
// After kda_forward_saving_prepare: LASP-2's transition pass over the same prep (zero values, dk columns, from
// initial_state [D, HV, dk, dk], usually identities) into final_state [D, HV, dk, dk]; saved is only read, so the
// pass may run on another stream beside kda_forward_saving_pass. (kda_forward_saving_pass's o may be empty:
// the B pass, the final state alone.)
// transitions (optional; f32 on k's device, at least kda_transitions_floats elements): every chunk's incoming state
// of the pass, P_c, kept for kda_forward_saving_correct (as hi + lo bf16 pairs; dk x dk per chunk and value head).
int64_t kda_transitions_floats(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens);
void kda_forward_saving_transition(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                   const Tensor& initial_state, const Tensor& final_state, const Tensor& saved,
                                   const Tensor& transitions = Tensor{});
// kda_forward_saving_prepare, kda_forward_saving_transition from `eye` (into transition_final and transitions) and
// kda_forward_saving_pass from a zero state (o, final_state optional) in one call: LASP-2's forward before the
// exchange on a rank with an incoming state. Where kda_saving_windows > 1 (few long documents) and the two passes
// together fill at most half of the SMs, the prep of one window of chunks runs beside both passes over the one
// before, as kda_forward_saving pipelines its prep and pass; else the two passes run side by side after the prep.
// The same results bit for bit as the three calls.
void kda_forward_saving_lasp(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                             const Tensor& beta, const Tensor& cu_seqlens, const Tensor& o, const Tensor& final_state,
                             const Tensor& saved, const Tensor& u, const Tensor& eye, const Tensor& transition_final,
                             const Tensor& transitions);
// LASP-2's parallel correction (docs/parallel.md): after kda_forward_saving_pass from a zero state (o and the
// kept work) and kda_forward_saving_transition from identity initial states keeping `transitions`, makes o and
// the kept work those of kda_forward_saving_pass from initial_state [D, HV, dk, dv], to rounding (o and v_new are
// rounded to bf16 once more), with one kernel over all chunks at once instead of a sequential pass. Documents
// whose initial state is zero are not touched.
void kda_forward_saving_correct(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                const Tensor& initial_state, const Tensor& transitions, const Tensor& o,
                                const Tensor& saved);
// kda_backward_saved in steps, for LASP-2's parallel correction, the work between them in `workspace` (f32 on k's
// device, kda_backward_workspace_floats elements, kept by the caller): kda_backward_saved_reverse (the reverse state
// pass from dfinal_state, optional; dinitial_state optional), then kda_backward_saved_finish (the per-chunk products:
// dq, dk, dv, dg, dbeta); the two are kda_backward_saved bit for bit. Between them, the mirror of the forward's
// correction: kda_backward_saved_transition (the reverse pass from final_adjoint [D, HV, dk, dk], usually
// identities, with zero output gradients, keeping every chunk's adjoint R_c in transitions; it reads only `saved`, so
// it may run on another stream beside the reverse pass), and after a reverse pass without dfinal_state,
// kda_backward_saved_correct makes its work that of one from dfinal_state [D, HV, dk, dv] (to rounding; documents
// whose dfinal_state is zero are not touched).
int64_t kda_backward_workspace_floats(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens);
void kda_backward_saved_reverse(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                const Tensor& dout, const Tensor& dfinal_state, const Tensor& dinitial_state,
                                const Tensor& saved, const Tensor& workspace);
void kda_backward_saved_transition(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                   const Tensor& final_adjoint, const Tensor& saved, const Tensor& transitions);
void kda_backward_saved_correct(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                const Tensor& dfinal_state, const Tensor& transitions, const Tensor& saved,
                                const Tensor& workspace);
void kda_backward_saved_finish(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& g, const Tensor& beta, const Tensor& cu_seqlens, const Tensor& dout,
                               const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dg,
                               const Tensor& dbeta, const Tensor& saved, const Tensor& workspace);

// Sizes shared by the raw entry points.
struct KdaDims {
  int64_t n = 0;         // packed tokens
  int64_t num_docs = 0;  // documents (cu_seqlens has num_docs + 1 entries)
  int64_t h = 0;         // q/k heads
  int64_t hv = 0;        // value heads (multiple of h)
  int64_t dk = 0;
  int64_t dv = 0;
};

namespace cpu {
// The definition: token by token. initial_state / final_state may be null.
template <class T>
void kda_recurrent_forward(const KdaDims& s, const T* q, const T* k, const T* v, const T* g, const T* beta,
                           const int32_t* cu_seqlens, const T* initial_state, T* o, T* final_state);
// The chunked form of KDA.md with chunk size `chunk` (64 in production; any size >= 1 must agree).
template <class T>
void kda_chunk_forward(const KdaDims& s, const T* q, const T* k, const T* v, const T* g, const T* beta,
                       const int32_t* cu_seqlens, const T* initial_state, T* o, T* final_state, int64_t chunk);
// Exact backward of the recurrence (reverse-time state adjoint). dfinal_state, dinitial_state,
// initial_state may be null.
template <class T>
void kda_recurrent_backward(const KdaDims& s, const T* q, const T* k, const T* v, const T* g, const T* beta,
                            const int32_t* cu_seqlens, const T* initial_state, const T* dout, const T* dfinal_state,
                            T* dq, T* dk, T* dv, T* dg, T* dbeta, T* dinitial_state);
template <class T>
void kda_transition(const KdaDims& s, const T* k, const T* v, const T* g, const T* beta, const int32_t* cu_seqlens,
                    T* M, T* B);
}  // namespace cpu

namespace cuda {
void kda_forward(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                 const int32_t* cu_seqlens, const float* initial_state, bf16* o, float* final_state, void* stream);
void kda_backward(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                  const int32_t* cu_seqlens, const float* initial_state, const bf16* dout, const float* dfinal_state,
                  bf16* dq, bf16* dk, bf16* dv, float* dg, float* dbeta, float* dinitial_state, void* stream);
void kda_transition(const KdaDims& s, const bf16* k, const bf16* v, const float* g, const float* beta,
                    const int32_t* cu_seqlens, float* M, float* B, void* stream);
// The split forward (kernels::kda_forward_prepare / kda_forward_pass above); ws: workspace_bytes(s, zero_values).
bool kda_split_supported(const KdaDims& s);
int kda_saving_windows(const KdaDims& s);
void kda_backward_initial_adjoint(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                                  const float* beta, const int32_t* cu_seqlens, const bf16* dout, float* dinitial_state,
                                  void* stream);
size_t kda_forward_workspace_bytes(const KdaDims& s, bool zero_values);
void kda_forward_prepare(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                         const float* beta, const int32_t* cu_seqlens, void* ws, bool zero_values, void* stream);
void kda_forward_pass(const KdaDims& s, const int32_t* cu_seqlens, const void* ws, const float* initial_state, bf16* o,
                      float* final_state, bool zero_values, void* stream);
// The saving forward and the backward from what it kept (kernels::kda_forward_saving / kda_backward_saved).
size_t kda_saved_bytes(const KdaDims& s);
void kda_forward_saving(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                        const float* beta, const int32_t* cu_seqlens, const float* initial_state, bf16* o,
                        float* final_state, void* saved, void* stream);
void kda_backward_saved(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                        const float* beta, const int32_t* cu_seqlens, const bf16* dout, const float* dfinal_state,
                        bf16* dq, bf16* dk, bf16* dv, float* dg, float* dbeta, float* dinitial_state, const void* saved,
                        void* stream);
size_t kda_saving_u_bytes(const KdaDims& s);
void kda_forward_saving_prepare(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                                const float* beta, const int32_t* cu_seqlens, void* saved, float* u, void* stream);
void kda_forward_saving_pass(const KdaDims& s, const int32_t* cu_seqlens, const float* initial_state, bf16* o,
                             float* final_state, void* saved, const float* u, void* stream);
void kda_forward_saving_transition(const KdaDims& s, const int32_t* cu_seqlens, const float* initial_state,
                                   float* final_state, const void* saved, void* stream, bf16* transitions = nullptr);
size_t kda_transitions_bytes(const KdaDims& s);
void kda_forward_saving_lasp(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                             const float* beta, const int32_t* cu_seqlens, bf16* o, float* final_state, void* saved,
                             float* u, const float* eye, float* transition_final, bf16* transitions, void* stream);
void kda_forward_saving_correct(const KdaDims& s, const int32_t* cu_seqlens, const float* initial_state,
                                const bf16* transitions, bf16* o, void* saved, void* stream);
size_t kda_backward_workspace_bytes(const KdaDims& s);
void kda_backward_saved_reverse(const KdaDims& s, const int32_t* cu_seqlens, const bf16* dout,
                                const float* dfinal_state, float* dinitial_state, const void* saved, float* workspace,
                                void* stream);
void kda_backward_saved_transition(const KdaDims& s, const int32_t* cu_seqlens, const float* final_adjoint,
                                   const void* saved, bf16* transitions, void* stream);
void kda_backward_saved_correct(const KdaDims& s, const int32_t* cu_seqlens, const float* dfinal_state,
                                const bf16* transitions, const void* saved, float* workspace, void* stream);
void kda_backward_saved_finish(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                               const float* beta, const int32_t* cu_seqlens, const bf16* dout, bf16* dq, bf16* dk,
                               bf16* dv, float* dg, float* dbeta, const void* saved, float* workspace, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

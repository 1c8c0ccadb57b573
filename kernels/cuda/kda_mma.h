// Tensor-core KDA kernels (version 2 of the CUDA KDA core; kernels/cuda/kda_mma.cu). Internal to
// kernels/cuda/kda.cu, which falls back to the version-1 block programs (kernels/cuda/kda_chunk.cuh)
// where these do not apply.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/kda.h"

namespace hyd::kernels::kda_chunk {
struct Scratch;
}

namespace hyd::kernels::cuda::kda_mma {

// dk and dv in {64, 128} (inline: tests of CPU-only builds ask too).
inline bool supports(const KdaDims& s) { return (s.dk == 64 || s.dk == 128) && (s.dv == 64 || s.dv == 128); }

// Bytes of scratch the forward needs (16-byte aligned pieces), beside the chunk table.
size_t forward_scratch_bytes(const KdaDims& s);

// Forward: o and final_state (may be null) of kernels/kda.h. chunk_off is the chunk table of
// cu_seqlens (kda_chunk::ChunkTableProgram), already computed on `stream`.
void forward(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
             const int32_t* cu_seqlens, const int32_t* chunk_off, const float* initial_state, bf16* o,
             float* final_state, void* scratch, void* stream);

// The forward in two steps (LASP-2's passes over one set of inputs): forward_prepare runs the state-
// independent prep kernel into `scratch` (forward_scratch_bytes(s)); forward_state then runs the state
// pass over it from `initial_state` (o may be null: the state alone). zero_u (null, or f32 zeros of
// max_chunks(s) x hv x 64 x dk): the pass with zero values and dv := dk (the transition M from an identity
// initial state; initial_state and final_state [D, HV, dk, dk], o null).
void forward_prepare(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                     const int32_t* cu_seqlens, const int32_t* chunk_off, void* scratch, void* stream);
void forward_state(const KdaDims& s, const int32_t* cu_seqlens, const int32_t* chunk_off, const float* initial_state,
                   bf16* o, float* final_state, const void* scratch, const float* zero_u, void* stream);
// dinitial_state of the backward with a zero dfinal_state (LASP-2's L: it depends on neither the initial
// state nor anything but the prep and dout): the prep into `scratch`, then the reverse state pass alone.
void initial_adjoint(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                     const int32_t* cu_seqlens, const int32_t* chunk_off, const bf16* dout, float* dinitial_state,
                     void* scratch, void* stream);
// The backward up to the GQA reduction: prep (keeping X in sc.x), the state pass keeping S_in and
// v_new of every chunk, the reverse state pass (dS_out, dv_new, dinitial_state), the products over
// dv (sc.dqg, dkg, dw, dgls, daqk, dtv and the finished dv) and the intra-chunk gradients (the
// finished dg, dbeta; dq, dk finished when HV == H, else per value head in sc.dq_hv, sc.dk_hv for
// the caller's group reduction). sc holds the buffers of kda_chunk::Pass::backward_mma; `scratch`
// holds forward_scratch_bytes(s) bytes.
void backward_products(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                       const float* beta, const int32_t* cu_seqlens, const int32_t* chunk_off,
                       const float* initial_state, const bf16* dout, const float* dfinal_state, bf16* dq, bf16* dk,
                       bf16* dv, float* dg, float* dbeta, float* dinitial_state, const kda_chunk::Scratch& sc,
                       void* scratch, void* stream);

// The forward that keeps what backward_products would recompute (the prep with X, every chunk's incoming state and
// v_new) in `saved` (saved_bytes(s) bytes, 16-byte aligned, with the chunk table of cu_seqlens at saved_chunk_table:
// the caller computes it, kernels/cuda/kda.cu), and the backward that reads them instead: the prep and the forward
// state pass of backward_products are skipped (the initial state is in the kept states). The results are those of
// forward / backward_products bit for bit. sc: the buffers of kda_chunk::Pass::backward_mma_saved (backward_saved
// points its x, states and vn into `saved`).
size_t saved_bytes(const KdaDims& s);
int32_t* saved_chunk_table(const KdaDims& s, void* saved);
// The saving forward in two steps: the prep into `saved` with u (the prep's T v, f32 [max_chunks x hv x 64 x dv],
// saving_u_bytes) in `u`, then, from any stream position after it, the state pass from `initial_state` keeping
// every chunk's incoming state and v_new (LASP-2: a rank preps while it waits for its incoming state). The chunk
// table in `saved` must be computed before the prep.
size_t saving_u_bytes(const KdaDims& s);
void forward_saving_prepare(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                            const float* beta, const int32_t* cu_seqlens, void* saved, float* u, void* stream);
void forward_saving_pass(const KdaDims& s, const int32_t* cu_seqlens, const float* initial_state, bf16* o,
                         float* final_state, void* saved, const float* u, void* stream);
// Both steps in one call (the chunk table computed before it). When the state pass fills at most half of the SMs
// (few long documents), in windows of chunks: the prep of one window beside the state pass over the one before (as
// backward_saved's reverse pass and products; kda_mma.cu pass_windows). The same results bit for bit.
int saving_windows(const KdaDims& s);  // forward_saving's / backward_saved's windows (1: none)
void forward_saving(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                    const int32_t* cu_seqlens, const float* initial_state, bf16* o, float* final_state, void* saved,
                    float* u, void* stream);
// After forward_saving_prepare: the pass with zero values over dk columns (LASP-2's M from an identity
// initial_state, [D, HV, dk, dk] as final_state) over the prep in `saved`; zero_u: f32 zeros of
// max_chunks(s) x hv x 64 x dk. Nothing in `saved` is written.
// transitions (optional, transitions_bytes(s)): every chunk's incoming state of this pass, P_c [max_chunks x hv,
// dk, dk] as hi then lo bf16 halves.
void forward_saving_transition(const KdaDims& s, const int32_t* cu_seqlens, const float* initial_state,
                               float* final_state, const void* saved, const float* zero_u, void* stream,
                               bf16* transitions = nullptr);
size_t transitions_bytes(const KdaDims& s);
// LASP-2's forward before the exchange on a rank with an incoming state, in one call: forward_saving_prepare,
// forward_saving_transition from `eye` (transition_final, transitions) and forward_saving_pass from a zero state (o,
// final_state). With pipelined windows (saving_windows > 1) the prep of window w + 1 runs beside both passes over
// window w (the zero-state pass on the side stream, the transition pass on a second one); otherwise the passes run
// side by side after the prep. The same kernels over the same chunks: the same bits as the three calls.
void forward_saving_lasp(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                         const float* beta, const int32_t* cu_seqlens, bf16* o, float* final_state, void* saved,
                         float* u, const float* zero_u, const float* eye, float* transition_final, bf16* transitions,
                         void* stream);
// LASP-2's parallel correction: after forward_saving_pass from a zero state and forward_saving_transition from
// identities keeping `transitions`, turns the kept states, v_new and o into those of a pass from initial_state
// (to rounding) with one parallel kernel: S_c += P_c S_in, v_new_c -= w_c P_c S_in, o_c += (qg_c - Aqk_c w_c) P_c
// S_in. Documents whose initial state is zero are left as they are.
void forward_saving_correct(const KdaDims& s, const int32_t* cu_seqlens, const float* initial_state,
                            const bf16* transitions, bf16* o, void* saved, void* stream);
// backward_saved in steps (the same kernels: reverse + finish = backward_saved bit for bit), sc as there and kept
// between them (its dstates and dvn carry the reverse pass's work). LASP-2's parallel correction between them:
// backward_saved_transition, the reverse pass from final_adjoint [D, HV, dk, dk] (identities) with zero output
// gradients over dk columns, keeps every chunk's adjoint R_c in transitions (transitions_bytes; may run beside
// the reverse pass: it reads only `saved`); backward_saved_correct adds what a final-state adjoint dfinal_state
// contributes to a reverse pass that had none: dS_out_c += R_c dfinal, -dv_new_c -= kg_c R_c dfinal (documents
// whose dfinal_state is zero untouched).
void backward_saved_reverse(const KdaDims& s, const int32_t* cu_seqlens, const bf16* dout, const float* dfinal_state,
                            float* dinitial_state, kda_chunk::Scratch& sc, const void* saved, void* stream);
void backward_saved_transition(const KdaDims& s, const int32_t* cu_seqlens, const float* final_adjoint,
                               const void* saved, bf16* transitions, void* stream);
void backward_saved_correct(const KdaDims& s, const int32_t* cu_seqlens, const float* dfinal_state,
                            const bf16* transitions, kda_chunk::Scratch& sc, const void* saved, void* stream);
void backward_saved_finish(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g,
                           const float* beta, const int32_t* cu_seqlens, const bf16* dout, bf16* dq, bf16* dk, bf16* dv,
                           float* dg, float* dbeta, kda_chunk::Scratch& sc, const void* saved, void* stream);
void backward_saved(const KdaDims& s, const bf16* q, const bf16* k, const bf16* v, const float* g, const float* beta,
                    const int32_t* cu_seqlens, const bf16* dout, const float* dfinal_state, bf16* dq, bf16* dk,
                    bf16* dv, float* dg, float* dbeta, float* dinitial_state, kda_chunk::Scratch& sc, const void* saved,
                    void* stream);

}  // namespace hyd::kernels::cuda::kda_mma

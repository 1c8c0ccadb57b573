// The sequence-parallel algorithms of PARALLEL.md on top of parallel/sequence_parallel.h:
//   * slice_batch_for_sp: this rank's part of a micro-batch and its SpLayout;
//   * LASP-2 for the KDA core: local affine transitions (M, B), one all-gather, prefix composition of the
//     incoming state, the local pass with the true state; backward: the local state adjoint with zero
//     outgoing adjoint, one all-gather, suffix composition, the local backward with the true adjoint;
//   * the short convolution's halo: the last K-1 rows of the previous rank's slice (forward) and the
//     halo gradient returned to it (backward);
//   * LASP-2H for softmax attention: all-gather of K and V, attention with the key ranges of SpLayout,
//     reduce-scatter of dK and dV.
// Notation: rank r of an SP group of size P, rows b = 0..B-1, local documents of the rank's packed slice.
// Composition per (row, head), with M_p = 0 when rank p's row contains a document start (the chain is
// cut) and M_p, B_p = 0 when its last document does not go on into rank p + 1:
//   S_in(0) = 0,  S_in(p + 1) = M_p S_in(p) + B_p
//   dS_out(P - 1) = 0,  dS_out(p - 1) = M_p^T dS_out(p) + L_p,  L_p = dS_in(p) computed with dS_out(p) = 0.
// Each call is collective over the SP group. `owner` keys the buffers a forward leaves for its backward
// (the layer object's address).
#pragma once

#include <cstdint>
#include <string>

#include "data/dataset.h"
#include "parallel/sequence_parallel.h"
#include "trainer/batch_upload.h"
#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd {

// Rank `rank`'s part of `global` (rows sequences of seq_len tokens, HostBatch layout: pieces never cross a
// sequence boundary): tokens [rank * slice, (rank + 1) * slice) of every row, documents cut at the slice
// ends; positions and targets as in the global batch (the last token's target may be a token of the next
// slice). seq_len must be a multiple of size. Fills `layout`.
HostBatch slice_batch_for_sp(const HostBatch& global, int64_t rows, int64_t seq_len, int rank, int size,
                             SpLayout& layout);

// `hb` (rows sequences of seq_len tokens) as this rank sees it, uploaded: with `sp` (size > 1) hb is replaced
// by this rank's slice (slice_batch_for_sp), sp's layout set and the batch carries sp; without it (or with
// one rank) hb is uploaded as it is.
Batch upload_sp_batch(ExecContext& ctx, BatchUploader& uploader, SequenceParallel* sp, int64_t rows, int64_t seq_len,
                      HostBatch& hb);

// KDA core over this rank's slice (shapes and dtypes as kernels/kda.h, cu_seqlens = the local documents).
// saved (optional, with the split forward only: kernels::kda_split_forward_supported): the true pass is
// kernels::kda_forward_saving into it (kda_saved_floats elements), and lasp_kda_backward then runs
// kda_backward_saved from it instead of recomputing the forward's work.
void lasp_kda_forward(const ExecContext& ctx, const SequenceParallel& sp, const void* owner, const Tensor& q,
                      const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta, const Tensor& cu_seqlens,
                      const Tensor& o, const Tensor& saved = Tensor{});
// After lasp_kda_forward of the same owner, inputs and saved (untouched in between); gradients are overwritten.
void lasp_kda_backward(const ExecContext& ctx, const SequenceParallel& sp, const void* owner, const Tensor& q,
                       const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta, const Tensor& cu_seqlens,
                       const Tensor& dout, const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dg,
                       const Tensor& dbeta, const Tensor& saved = Tensor{});

// halo [D, K-1, C] for kernels::short_conv_*: rows before each local document's first token, taken from the
// previous rank's x [N, C] where the document continues, zero elsewhere. num_docs = D.
void lasp_conv_halo(const ExecContext& ctx, const SequenceParallel& sp, const Tensor& x, int64_t kernel,
                    const Tensor& halo);
// Backward: dhalo [D, K-1, C] (this rank's halo gradient) goes to the previous rank; the next rank's is
// added to the last K-1 rows of dx [N, C] where this rank's last document continues there.
void lasp_conv_return_dhalo(const ExecContext& ctx, const SequenceParallel& sp, const Tensor& dhalo, const Tensor& dx);

// LASP-2H attention of this rank's queries q [N, Hq, d] (o, lse as kernels/attention.h) over every rank's
// keys and values k, v [N, Hkv, d] (all-gathered), with the key ranges of SpLayout.
void lasp_attention_forward(const ExecContext& ctx, const SequenceParallel& sp, const void* owner, const Tensor& q,
                            const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse, float scale);
// Backward (after lasp_attention_forward of the same owner, whose gathered K and V it reuses: memory of the
// whole sequence's K and V per attention layer, as PARALLEL.md says): the attention backward over the
// gathered keys, dK and dV reduce-scattered to their owners. dq, dk, dv [N, ...] are overwritten.
void lasp_attention_backward(const ExecContext& ctx, const SequenceParallel& sp, const void* owner, const Tensor& dout,
                             const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                             const Tensor& dq, const Tensor& dk, const Tensor& dv, float scale);

// Phase timing for benchmarks (HYD_SP_PROFILE=1 in the environment; otherwise free): lasp_profile_start
// synchronises the context and starts a phase; lasp_profile_mark synchronises and charges the time since
// the last start / mark to `phase`. lasp_profile_report: "phase=ms ..." totals since the last reset.
bool lasp_profile_on();
void lasp_profile_start(const ExecContext& ctx);
void lasp_profile_mark(const ExecContext& ctx, const char* phase);
std::string lasp_profile_report(double divide_by = 1.0);
void lasp_profile_reset();

}  // namespace hyd

#include "trainer/lasp.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/elementwise.h"
#include "kernels/kda.h"
#include "kernels/kda_compose.h"
#include "parallel/comm.h"
#include "trainer/core/arena.h"

#ifdef HYD_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace hyd {

namespace {

// Buffer slots of SequenceParallel::buffer. Per-layer state (owner = the layer): kept between forward
// and backward. Temporaries use owner = &kTemp.
enum Slot : int {
  kTransM = 0,  // local M of every document (forward; temporary)
  kTransB,      // local B of every document (forward; temporary)
  kGathered,    // all ranks' (M, B) per row: what the backward composes with
  kRowState,    // the true incoming state per row (kept for the backward: rows x HV x dk x dv, not per document)
  kInitState,   // the incoming state per local document, expanded from kRowState (temporary)
  kDState,      // dS_in / dS_out per local document (backward)
  kMine,        // this rank's contribution to an all-gather
  kSin,         // the composed state / adjoint per row
  kWork,        // the composition's scratch
  kOScratch,    // outputs of the transition passes (not used)
  kOScratch2,
  kIdentity,     // identity incoming states of the forward's transition passes (M / P)
  kIdentityBwd,  // identity outgoing adjoints of the backward's R pass
  kZeroV,        // zero values of the M pass
  kAllL,         // all ranks' L per row (backward)
  kKAll,
  kVAll,  // LASP-2H gathered keys / values (layout [size][rows][slice])
  kKRows,
  kVRows,  // the same in row order [rows][seq_len] (rows > 1 only)
  kHaloTails,
  kHaloAll,
  kDKAll,
  kDVAll,    // LASP-2H key / value gradients over the gathered keys
  kSplitWs,  // the split forward's workspace (CUDA: the prepared chunks, shared by the B, M and true passes)
  kWorkQ,    // balanced LASP-2H, kept per layer: the two half-slices' queries, outputs and lse, [2][rows][slice / 2]
  kWorkO,
  kWorkLse,
  kWorkD,  // the two half-slices' output gradients / dQ (temporary)
  kWorkDQ,
  kDKAll2,  // the second half-slice's dK / dV before they are added
  kDVAll2,
  kSavingU,  // the saving forward's u between its prep (before the exchange) and its state pass (after)
  kTransP,   // the parallel correction: every chunk's incoming transition P_c / adjoint R_c (temporary)
  kBwdWs,    // the parallel correction: the saved backward's work between its reverse pass and its products
};
const int kTemp = 0;

// dst = src on ctx's stream (device to device) or by memcpy (host); mixed devices synchronise.
void copy_on(const ExecContext& ctx, const Tensor& dst, const Tensor& src) {
  HYD_CHECK(dst.nbytes() == src.nbytes() && dst.dtype == src.dtype, "lasp: copy of ", src.nbytes(), " bytes into ",
            dst.nbytes());
  if (src.nbytes() == 0) return;
  if (dst.device.is_cpu() && src.device.is_cpu()) {
    std::memcpy(dst.data, src.data, src.nbytes());
    return;
  }
#ifdef HYD_WITH_CUDA
  if (dst.device.is_cuda() && src.device.is_cuda()) {
    CHECK_CUDA(cudaMemcpyAsync(dst.data, src.data, src.nbytes(), cudaMemcpyDeviceToDevice,
                               static_cast<cudaStream_t>(ctx.stream())));
    return;
  }
#endif
  ctx.synchronize();
  copy_tensor(dst.view({dst.numel()}), src.view({src.numel()}));
}

// Rows [r0, r0 + n) of a tensor viewed as [rows, row_elems].
Tensor rows_of(const Tensor& t, int64_t row_elems, int64_t r0, int64_t n) {
  return t.view({t.numel() / row_elems, row_elems}).slice0(r0, r0 + n);
}

struct Dims {
  int64_t docs, hv, dk, dv;
};

Dims kda_dims(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens) {
  return {cu_seqlens.numel() - 1, v.size(1), k.size(2), v.size(2)};
}

}  // namespace

// ------------------------------------------------------------------------------------------ slicing

namespace {

// LASP-2H boundaries for the queries of tokens [from, from + len) of every row, packed row after row (row b's at
// b * len), over the keys in the sequence layout [rows][seq_len]: each document piece among the queries attends
// keys from its document's start (maybe before `from`) to the piece's end; keys no query sees form key-only
// documents, so both arrays cover all their tokens. cu: the global batch's document boundaries.
void attention_docs(const std::vector<int32_t>& cu, int64_t num_docs, int64_t rows, int64_t seq_len, int64_t from,
                    int64_t len, std::vector<int32_t>& cu_q, std::vector<int32_t>& cu_k, int64_t& max_q,
                    int64_t& max_k) {
  cu_q.assign(1, 0);
  cu_k.assign(1, 0);
  max_q = max_k = 0;
  auto add = [&](int64_t q_end, int64_t k_end) {
    max_q = std::max<int64_t>(max_q, q_end - cu_q.back());
    max_k = std::max<int64_t>(max_k, k_end - cu_k.back());
    cu_q.push_back(static_cast<int32_t>(q_end));
    cu_k.push_back(static_cast<int32_t>(k_end));
  };
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t lo = b * seq_len + from, hi = lo + len, q0 = b * len;
    auto it = std::upper_bound(cu.begin(), cu.end(), static_cast<int32_t>(lo));
    HYD_CHECK(it != cu.begin() && it != cu.end(), "slice_batch_for_sp: cu_seqlens do not cover token ", lo);
    for (int64_t d = (it - cu.begin()) - 1; d < num_docs && cu[d] < hi; ++d) {
      const int64_t st = cu[d], e = cu[d + 1];
      const int64_t a = std::max(st, lo), z = std::min(e, hi);
      if (z <= a) continue;
      if (st > cu_k.back()) add(cu_q.back(), st);
      add(q0 + (z - lo), z);
    }
  }
  if (cu_k.back() < rows * seq_len) add(cu_q.back(), rows * seq_len);
}

// HYD_SP_CORRECT=0: LASP-2's KDA forward re-runs the state pass after the exchange instead of correcting the
// zero-state pass (for measuring against).
bool correction_from_env() {
  static const bool on = [] {
    const char* e = std::getenv("HYD_SP_CORRECT");
    return !(e != nullptr && e[0] == '0');
  }();
  return on;
}

// HYD_SP_WINDOWS=0: LASP-2's forward on a rank with an incoming state in steps even where the saving forward
// pipelines windows (lasp_kda_forward); read on every call.
bool sp_windows_from_env() {
  const char* e = std::getenv("HYD_SP_WINDOWS");
  return !(e != nullptr && e[0] == '0');
}

// Balanced LASP-2H: the half-slice (of 2 size) that `rank` works on as its j-th (SpLayout::balanced).
int64_t balanced_chunk(int rank, int size, int j) { return j == 0 ? rank : 2 * size - 1 - rank; }

bool balance_from_env() {
  const char* e = std::getenv("HYD_SP_ATTN_BALANCE");
  return e == nullptr || std::string(e) != "0";
}

}  // namespace

HostBatch slice_batch_for_sp(const HostBatch& global, int64_t rows, int64_t seq_len, int rank, int size,
                             SpLayout& layout) {
  HYD_CHECK(size >= 1 && rank >= 0 && rank < size, "slice_batch_for_sp: rank ", rank, " of ", size);
  HYD_CHECK(rows >= 1 && seq_len >= 1 && seq_len % size == 0, "slice_batch_for_sp: seq_len ", seq_len,
            " is not a multiple of the SP size ", size);
  HYD_CHECK(static_cast<int64_t>(global.tokens.size()) == rows * seq_len &&
                global.targets.size() == global.tokens.size() && global.positions.size() == global.tokens.size(),
            "slice_batch_for_sp: batch of ", global.tokens.size(), " tokens, expected ", rows, " x ", seq_len);
  const std::vector<int32_t>& cu = global.cu_seqlens;
  const int64_t ts = seq_len / size;
  layout = SpLayout{};
  layout.rank = rank;
  layout.size = size;
  layout.rows = rows;
  layout.seq_len = seq_len;
  layout.slice = ts;

  HostBatch out;
  out.cu_seqlens.push_back(0);
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t lo = b * seq_len + rank * ts, hi = lo + ts;
    const int64_t local0 = b * ts;  // this row's first token in the local batch
    for (int64_t t = lo; t < hi; ++t) {
      out.tokens.push_back(global.tokens[t]);
      out.targets.push_back(global.targets[t]);
      out.positions.push_back(global.positions[t]);
      if (global.targets[t] >= 0) ++out.num_targets;
    }
    // The global document holding token lo, then every document until hi.
    auto it = std::upper_bound(cu.begin(), cu.end(), static_cast<int32_t>(lo));
    HYD_CHECK(it != cu.begin() && it != cu.end(), "slice_batch_for_sp: cu_seqlens do not cover token ", lo);
    int64_t d = (it - cu.begin()) - 1;
    bool first = true;
    int32_t last = -1;
    for (; d < global.num_docs && cu[d] < hi; ++d) {
      const int64_t st = cu[d], e = cu[d + 1];
      const int64_t a = std::max(st, lo), z = std::min(e, hi);
      if (z <= a) continue;  // empty, or ends before the slice
      last = static_cast<int32_t>(out.cu_seqlens.size() - 1);
      out.cu_seqlens.push_back(static_cast<int32_t>(local0 + (z - lo)));
      if (first) {
        layout.first_doc.push_back(last);
        layout.lead.push_back(static_cast<int32_t>(a - st));
        first = false;
      }
      if (z == hi) layout.cont_out.push_back(e > hi ? 1 : 0);
    }
    layout.last_doc.push_back(last);
    HYD_CHECK(layout.cont_out.size() == static_cast<size_t>(b + 1), "slice_batch_for_sp: row ", b,
              " is not covered by documents");
  }
  out.num_docs = static_cast<int64_t>(out.cu_seqlens.size()) - 1;
  // LASP-2H over this rank's slice (keys in the gathered [rows, seq_len] layout, whose row b starts at
  // b * seq_len: the same index as the global batch).
  attention_docs(cu, global.num_docs, rows, seq_len, rank * ts, ts, layout.cu_q, layout.cu_k, layout.max_len_q,
                 layout.max_len_k);
  // Balanced: this rank computes the attention of half-slices `rank` and 2 size - 1 - rank (SpLayout).
  layout.balanced = size > 1 && ts % 2 == 0 && balance_from_env();
  if (layout.balanced) {
    const int64_t half = ts / 2;
    for (int j = 0; j < 2; ++j) {
      SpLayout::Work& w = layout.work[j];
      w.chunk = balanced_chunk(rank, size, j);
      attention_docs(cu, global.num_docs, rows, seq_len, w.chunk * half, half, w.cu_q, w.cu_k, w.max_len_q,
                     w.max_len_k);
    }
  }
  return out;
}

Batch upload_sp_batch(ExecContext& ctx, BatchUploader& uploader, SequenceParallel* sp, int64_t rows, int64_t seq_len,
                      HostBatch& hb) {
  const bool sliced = sp != nullptr && sp->size() > 1;
  if (sliced) {
    SpLayout layout;
    hb = slice_batch_for_sp(hb, rows, seq_len, sp->rank(), sp->size(), layout);
    sp->set_layout(std::move(layout));
  }
  Batch b = uploader.upload(ctx, hb);
  if (sliced) b.sp = sp;
  return b;
}

// ------------------------------------------------------------------------------------------ KDA core

namespace {

// `height` blocks of `width` elements: block i from src + i * src_pitch to dst + i * dst_pitch (f32 elements),
// on ctx's stream (CUDA) or by memcpy.
void copy_blocks(const ExecContext& ctx, float* dst, int64_t dst_pitch, const float* src, int64_t src_pitch,
                 int64_t width, int64_t height) {
  if (ctx.device().is_cpu()) {
    for (int64_t i = 0; i < height; ++i) std::memcpy(dst + i * dst_pitch, src + i * src_pitch, width * sizeof(float));
    return;
  }
#ifdef HYD_WITH_CUDA
  CHECK_CUDA(cudaMemcpy2DAsync(dst, dst_pitch * sizeof(float), src, src_pitch * sizeof(float), width * sizeof(float),
                               height, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(ctx.stream())));
#endif
}

}  // namespace

namespace {

// The incoming state of every local document (zero but for each row's first document when it continues)
// from the per-row states `rows_state` [rows * HV, dk, dv], in a temporary buffer.
Tensor expand_row_states(const ExecContext& ctx, const SequenceParallel& sp, const Tensor& rows_state, int64_t docs,
                         int64_t hv, int64_t dk, int64_t dv) {
  const SpLayout& L = sp.layout();
  const int64_t mb = dk * dv;
  const Tensor init = sp.buffer(&kTemp, kInitState, {docs, hv, dk, dv}, DType::f32);
  kernels::fill(ctx, init, 0.0f);
  for (int64_t b = 0; b < L.rows; ++b)
    if (L.lead[b] > 0)
      copy_blocks(ctx, init.ptr<float>() + L.first_doc[b] * hv * mb, 0, rows_state.ptr<float>() + b * hv * mb, 0,
                  hv * mb, 1);
  return init;
}

// Identity states [docs, HV, dk, dk] at the local documents `at`, zero elsewhere, in the buffer of `slot`: the
// initial states (adjoints) of LASP-2's transition passes. They depend only on the layout, so they are written (from
// the host, after ctx has finished its queued work: an earlier pass may still read the buffer) only when the
// buffer does not already hold them: a layer no longer synchronises its stream for them once per forward and once
// per backward.
Tensor identities_at(const ExecContext& ctx, const SequenceParallel& sp, int slot, const Dims& s,
                     const std::vector<int64_t>& at) {
  const Tensor eye = sp.buffer(&kTemp, slot, {s.docs, s.hv, s.dk, s.dk}, DType::f32);
  std::vector<int64_t> key = {s.docs, s.hv, s.dk};
  key.insert(key.end(), at.begin(), at.end());
  std::vector<int64_t>& held = sp.buffer_key(&kTemp, slot);
  if (held == key) return eye;
  std::vector<float> host(static_cast<size_t>(eye.numel()), 0.0f);
  for (int64_t d : at)
    for (int64_t h = 0; h < s.hv; ++h)
      for (int64_t i = 0; i < s.dk; ++i) host[static_cast<size_t>(((d * s.hv + h) * s.dk + i) * s.dk + i)] = 1.0f;
  ctx.synchronize();
  copy_tensor(eye.view({eye.numel()}), Tensor(host.data(), DType::f32, Device::cpu(), {eye.numel()}));
  held = std::move(key);
  return eye;
}

}  // namespace

void lasp_kda_forward(const ExecContext& ctx, const SequenceParallel& sp, const void* owner, const Tensor& q,
                      const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta, const Tensor& cu_seqlens,
                      const Tensor& o, const Tensor& saved) {
  const SpLayout& L = sp.layout();
  const Dims s = kda_dims(k, v, cu_seqlens);
  const int64_t mm = s.dk * s.dk, mb = s.dk * s.dv, per = mm + mb, P = sp.size();
  // (M, B) of each row's last document, from two passes of the forward (the recurrence is linear in the
  // state and the values): B = the final state from a zero state with the true values; M = the final state
  // from the identity with zero values (dv = dk), computed only when some row's slice is one continuing
  // document. (The chunked tensor-core forward does both at full speed; kernels::kda_transition's
  // version-1 kernels would serialise over tokens.)
  // Passes a rank does not need are skipped: without a continuing first document (rank 0) the B pass is the
  // true pass; without a document going on into the next rank (the last rank) there is no B pass.
  // On CUDA with the tensor-core kernels the state-independent work (the chunks' prep) runs once and the
  // passes are state passes over it (kda_forward_prepare / kda_forward_pass): the B pass of a rank with a
  // continuing first document writes no outputs, and a rank that waits for the others' transitions has
  // already done its prep when they arrive (it is queued before the all-gather).
  lasp_profile_start(ctx);
  auto through = [&](int64_t b) { return L.cont_out[b] && L.first_doc[b] == L.last_doc[b] && L.lead[b] > 0; };
  bool any_through = false, any_lead = false, any_cont = false;
  for (int64_t b = 0; b < L.rows; ++b) {
    any_through = any_through || through(b);
    any_lead = any_lead || L.lead[b] > 0;
    any_cont = any_cont || L.cont_out[b] != 0;
  }
  const bool split = kernels::kda_split_forward_supported(k, v);
  HYD_CHECK(saved.empty() || split, "lasp_kda_forward: 'saved' given, but the split forward is not available here");
  // With `saved` (the layer keeps its work for the backward): a rank without an incoming state runs the saving
  // forward whole as its B pass (it is its true pass); a rank with one runs the saving forward's prep before the
  // exchange (into `saved` and saving_u), its B and M passes over that prep, and after the exchange only the
  // saving state pass: one prep per layer, and the last rank (no B / M pass) preps while the others run theirs
  // instead of idling in the exchange (2 x H200, K x 12, T/GPU 16384: ~16.7 ms per step). Without `saved`, the
  // split workspace `ws` holds the prep for every pass.
  const bool keep = !saved.empty();
  const bool keep_prep = keep && any_lead;
  // The parallel correction (docs/parallel.md; HYD_SP_CORRECT=0 turns it off): a rank with an incoming state runs,
  // before the exchange, the zero-state saving pass (its outputs, kept work and B) and beside it the transition
  // pass from identities at the continuing documents keeping every chunk's P_c (and M); after the exchange one
  // kernel over all chunks adds what the incoming state contributes (kda_forward_saving_correct) instead of a
  // sequential pass that waits for the previous ranks.
  const bool correct = keep_prep && correction_from_env();
  // With the correction, where the saving forward pipelines windows (one long document in the slice), the prep, the
  // zero-state pass and the transition pass are one call (kernels::kda_forward_saving_lasp): the prep of one window
  // beside both passes over the one before, instead of the whole prep and then the passes (HYD_SP_WINDOWS=0: the
  // steps below, for measuring).
  const bool windowed = correct && sp_windows_from_env() && kernels::kda_saving_windows(k, v, cu_seqlens) > 1;
  Tensor ws, saving_u;
  if (split && !keep) {
    ws =
        sp.buffer(&kTemp, kSplitWs, {kernels::kda_forward_workspace_floats(k, v, cu_seqlens, any_through)}, DType::f32);
    kernels::kda_forward_prepare(ctx, q, k, v, g, beta, cu_seqlens, ws, any_through);
  }
  if (keep_prep) {
    saving_u = sp.buffer(&kTemp, kSavingU, {kernels::kda_saving_u_floats(k, v, cu_seqlens)}, DType::f32);
    if (!windowed) kernels::kda_forward_saving_prepare(ctx, q, k, v, g, beta, cu_seqlens, saved, saving_u);
  }
  // The M pass from identities with zero values, over whichever prep this rank has (with the correction: every
  // chunk's incoming transition kept in trans).
  Tensor trans;
  auto m_pass = [&](const ExecContext& on, const Tensor& eye, const Tensor& M) {
    if (keep_prep)
      kernels::kda_forward_saving_transition(on, k, v, cu_seqlens, eye, M, saved, trans);
    else
      kernels::kda_forward_pass(on, k, v, cu_seqlens, ws, eye, Tensor{}, M, true);
  };
  // The identity initial states of the M pass first (when they must be written, their host copy synchronises ctx;
  // the prep is queued). With the correction at every row's continuing first document (M of every document, P_c of
  // every chunk), else at the documents that are a whole slice (first == last).
  Tensor M, eye;
  if (correct || any_through) {
    std::vector<int64_t> at;
    for (int64_t b = 0; b < L.rows; ++b)
      if (correct ? L.lead[b] > 0 : through(b)) at.push_back(L.first_doc[b]);
    M = sp.buffer(&kTemp, kTransM, {s.docs, s.hv, s.dk, s.dk}, DType::f32);
    eye = identities_at(ctx, sp, kIdentity, s, at);
  }
  if (correct) trans = sp.buffer(&kTemp, kTransP, {kernels::kda_transitions_floats(k, v, cu_seqlens)}, DType::f32);
  // With the split forward, the M pass runs on the side stream beside the B pass: each is a state pass over the
  // same prepared workspace (read only), sequential over the chunks with documents x value heads x 4 blocks, far
  // from filling the GPU when a rank holds few long documents (sequence parallelism's usual case).
  const ExecContext* side = windowed                           ? nullptr
                            : correct                          ? sp.side_context(true)
                            : any_through && any_cont && split ? sp.side_context()
                                                               : nullptr;
  if (side != nullptr) {
    side->wait_for(ctx);  // the prep and the identity states are queued before
    m_pass(*side, eye, M);
  }
  const Tensor B = sp.buffer(&kTemp, kTransB, {s.docs, s.hv, s.dk, s.dv}, DType::f32);
  if (windowed) {
    kernels::kda_forward_saving_lasp(ctx, q, k, v, g, beta, cu_seqlens, o, any_cont ? B : Tensor{}, saved, saving_u,
                                     eye, M, trans);
  } else if (correct) {  // the zero-state pass: outputs and kept work to be corrected, B
    kernels::kda_forward_saving_pass(ctx, k, v, cu_seqlens, Tensor{}, o, any_cont ? B : Tensor{}, saved, saving_u);
  } else if (any_cont) {
    if (keep && !any_lead)  // the B pass is the true pass
      kernels::kda_forward_saving(ctx, q, k, v, g, beta, cu_seqlens, Tensor{}, o, B, saved);
    else if (keep_prep)  // the final state alone (the states it keeps are rewritten by the true pass)
      kernels::kda_forward_saving_pass(ctx, k, v, cu_seqlens, Tensor{}, Tensor{}, B, saved, saving_u);
    else if (split)
      kernels::kda_forward_pass(ctx, k, v, cu_seqlens, ws, Tensor{}, any_lead ? Tensor{} : o, B, false);
    else
      kernels::kda_forward(ctx, q, k, v, g, beta, cu_seqlens, Tensor{},
                           any_lead ? sp.buffer(&kTemp, kOScratch, {o.shape[0], s.hv, s.dv}, o.dtype) : o, B);
  }
  lasp_profile_mark(ctx, "kda.fwd.B_pass");
  if (side != nullptr) {
    ctx.wait_for(*side);
  } else if (correct) {
    if (!windowed) m_pass(ctx, eye, M);  // (the windowed call ran it)
  } else if (any_through) {
    if (split) {
      m_pass(ctx, eye, M);
    } else {
      const Tensor zero_v = sp.buffer(&kTemp, kZeroV, {o.shape[0], s.hv, s.dk}, v.dtype);
      kernels::fill(ctx, zero_v, 0.0f);
      kernels::kda_forward(ctx, q, k, zero_v, g, beta, cu_seqlens, eye,
                           sp.buffer(&kTemp, kOScratch2, {o.shape[0], s.hv, s.dk}, o.dtype), M);
    }
  }

  lasp_profile_mark(ctx, "kda.fwd.M_pass");
  // This rank's (M_r, B_r) per row and head: M only when the row's slice is one continuing document,
  // both zero when the last document stops at the slice end.
  const Tensor mine = sp.buffer(&kTemp, kMine, {L.rows * s.hv * per}, DType::f32);
  kernels::fill(ctx, mine, 0.0f);
  float* m_out = mine.ptr<float>();
  for (int64_t b = 0; b < L.rows; ++b) {
    if (!L.cont_out[b]) continue;
    float* dst = m_out + b * s.hv * per;
    if (through(b)) copy_blocks(ctx, dst, per, M.ptr<float>() + L.last_doc[b] * s.hv * mm, mm, mm, s.hv);
    copy_blocks(ctx, dst + mm, per, B.ptr<float>() + L.last_doc[b] * s.hv * mb, mb, mb, s.hv);
  }
  const Tensor all = sp.buffer(owner, kGathered, {P, L.rows * s.hv, s.dk, s.dk + s.dv}, DType::f32);
  sp.all_gather(ctx, mine, all, SpTraffic::kda_state);

  // S_in(r) = M_{r-1}(... (M_0 0 + B_0) ...) + B_{r-1}, for each row's first document when it continues.
  const Tensor S = sp.buffer(owner, kRowState, {L.rows * s.hv, s.dk, s.dv}, DType::f32);
  const Tensor work = sp.buffer(&kTemp, kWork, {L.rows * s.hv, s.dk, s.dv}, DType::f32);
  lasp_profile_mark(ctx, "kda.fwd.exchange");
  kernels::kda_compose_prefix(ctx, all, sp.rank(), S, work);
  lasp_profile_mark(ctx, "kda.fwd.compose");
  if (any_lead || !any_cont) {
    const Tensor init = any_lead ? expand_row_states(ctx, sp, S, s.docs, s.hv, s.dk, s.dv) : Tensor{};
    if (correct)
      kernels::kda_forward_saving_correct(ctx, k, v, cu_seqlens, init, trans, o, saved);
    else if (keep_prep)
      kernels::kda_forward_saving_pass(ctx, k, v, cu_seqlens, init, o, Tensor{}, saved, saving_u);
    else if (keep)
      kernels::kda_forward_saving(ctx, q, k, v, g, beta, cu_seqlens, init, o, Tensor{}, saved);
    else if (split)
      kernels::kda_forward_pass(ctx, k, v, cu_seqlens, ws, init, o, Tensor{}, false);
    else
      kernels::kda_forward(ctx, q, k, v, g, beta, cu_seqlens, init, o, Tensor{});
  }
  lasp_profile_mark(ctx, "kda.fwd.true_pass");
}

void lasp_kda_backward(const ExecContext& ctx, const SequenceParallel& sp, const void* owner, const Tensor& q,
                       const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta, const Tensor& cu_seqlens,
                       const Tensor& dout, const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dg,
                       const Tensor& dbeta, const Tensor& saved) {
  const SpLayout& L = sp.layout();
  const Dims s = kda_dims(k, v, cu_seqlens);
  const int64_t mb = s.dk * s.dv, P = sp.size();
  bool any_lead = false, any_cont = false;
  for (int64_t b = 0; b < L.rows; ++b) {
    any_lead = any_lead || L.lead[b] > 0;
    any_cont = any_cont || L.cont_out[b] != 0;
  }
  const Tensor init =  // (the saved backward has the incoming state in its kept states)
      any_lead && saved.empty()
          ? expand_row_states(ctx, sp, sp.buffer(owner, kRowState, {L.rows * s.hv, s.dk, s.dv}, DType::f32), s.docs,
                              s.hv, s.dk, s.dv)
          : Tensor{};
  const Tensor dstate = sp.buffer(&kTemp, kDState, {s.docs, s.hv, s.dk, s.dv}, DType::f32);

  // L_r: the incoming-state adjoint with a zero outgoing adjoint (it does not depend on the state); only a
  // rank with a continuing first document needs it. Without the correction below, on CUDA with the tensor-core
  // kernels it is the reverse state pass alone (kda_backward_initial_adjoint: a fraction of a backward), so the
  // exchange does not wait for any rank's whole backward and every rank runs its one true backward after it.
  // Otherwise, without a document going on into the next rank, this pass is already the true backward.
  const bool split = kernels::kda_split_forward_supported(k, v);
  lasp_profile_start(ctx);
  // The parallel correction (the forward's mirror; HYD_SP_CORRECT=0 turns it off): every rank runs its reverse pass
  // before the exchange with a zero outgoing adjoint (its L when it has a continuing first document) and, with a
  // document going on into the next rank, beside it the reverse pass from identities at those documents' ends
  // keeping every chunk's adjoint R_c; after the exchange one kernel adds what the true outgoing adjoint
  // contributes, and only the per-chunk products remain (no rank re-runs a reverse pass after the exchange).
  const bool correct = !saved.empty() && split && correction_from_env();
  Tensor ws, trans;
  const ExecContext* side = nullptr;
  if (correct) {
    ws = sp.buffer(&kTemp, kBwdWs, {kernels::kda_backward_workspace_floats(k, v, cu_seqlens)}, DType::f32);
    if (any_cont) {
      trans = sp.buffer(&kTemp, kTransP, {kernels::kda_transitions_floats(k, v, cu_seqlens)}, DType::f32);
      std::vector<int64_t> at;  // identities at the ends of the documents going on into the next rank
      for (int64_t b = 0; b < L.rows; ++b)
        if (L.cont_out[b]) at.push_back(L.last_doc[b]);
      const Tensor eye = identities_at(ctx, sp, kIdentityBwd, s, at);
      side = sp.side_context(true);
      if (side != nullptr) side->wait_for(ctx);
      kernels::kda_backward_saved_transition(side != nullptr ? *side : ctx, k, v, cu_seqlens, eye, saved, trans);
    }
    kernels::kda_backward_saved_reverse(ctx, k, v, cu_seqlens, dout, Tensor{}, any_lead ? dstate : Tensor{}, saved, ws);
  } else if (any_lead && split)
    kernels::kda_backward_initial_adjoint(ctx, q, k, v, g, beta, cu_seqlens, dout, dstate);
  else if (any_lead)
    kernels::kda_backward(ctx, q, k, v, g, beta, cu_seqlens, init, dout, Tensor{}, dq, dk, dv, dg, dbeta, dstate);
  lasp_profile_mark(ctx, "kda.bwd.zero_adjoint_pass");
  const Tensor mine = sp.buffer(&kTemp, kMine, {L.rows * s.hv * mb}, DType::f32);
  kernels::fill(ctx, mine, 0.0f);
  for (int64_t b = 0; b < L.rows; ++b)
    if (L.lead[b] > 0)
      copy_blocks(ctx, mine.ptr<float>() + b * s.hv * mb, 0, dstate.ptr<float>() + L.first_doc[b] * s.hv * mb, 0,
                  s.hv * mb, 1);
  const Tensor all_l = sp.buffer(&kTemp, kAllL, {P, L.rows * s.hv, s.dk, s.dv}, DType::f32);
  sp.all_gather(ctx, mine, all_l, SpTraffic::kda_state);

  // dS_out(r): G <- M_p^T G + L_p for p = P-1 .. r+1, with the forward's gathered M.
  const Tensor all = sp.buffer(owner, kGathered, {P, L.rows * s.hv, s.dk, s.dk + s.dv}, DType::f32);
  const Tensor G = sp.buffer(&kTemp, kSin, {L.rows * s.hv, s.dk, s.dv}, DType::f32);
  const Tensor work = sp.buffer(&kTemp, kWork, {L.rows * s.hv, s.dk, s.dv}, DType::f32);
  lasp_profile_mark(ctx, "kda.bwd.exchange");
  kernels::kda_compose_suffix(ctx, all, all_l, sp.rank(), G, work);
  kernels::fill(ctx, dstate, 0.0f);
  for (int64_t b = 0; b < L.rows; ++b)
    if (L.cont_out[b])
      copy_blocks(ctx, dstate.ptr<float>() + L.last_doc[b] * s.hv * mb, 0, G.ptr<float>() + b * s.hv * mb, 0, s.hv * mb,
                  1);
  lasp_profile_mark(ctx, "kda.bwd.compose");
  if (correct) {
    if (any_cont) {
      if (side != nullptr) ctx.wait_for(*side);
      kernels::kda_backward_saved_correct(ctx, k, v, cu_seqlens, dstate, trans, saved, ws);
    }
    kernels::kda_backward_saved_finish(ctx, q, k, v, g, beta, cu_seqlens, dout, dq, dk, dv, dg, dbeta, saved, ws);
  } else if (!saved.empty())  // the forward's true pass kept its work (and its initial state)
    kernels::kda_backward_saved(ctx, q, k, v, g, beta, cu_seqlens, dout, any_cont ? dstate : Tensor{}, dq, dk, dv, dg,
                                dbeta, Tensor{}, saved);
  else if (any_cont || !any_lead || split)
    kernels::kda_backward(ctx, q, k, v, g, beta, cu_seqlens, init, dout, any_cont ? dstate : Tensor{}, dq, dk, dv, dg,
                          dbeta, Tensor{});
  lasp_profile_mark(ctx, "kda.bwd.true_pass");
}

// ------------------------------------------------------------------------------------------ conv halo

void lasp_conv_halo(const ExecContext& ctx, const SequenceParallel& sp, const Tensor& x, int64_t kernel,
                    const Tensor& halo) {
  const SpLayout& L = sp.layout();
  const int64_t h = kernel - 1, c = x.size(-1);
  HYD_CHECK(h >= 1 && h <= L.slice, "lasp_conv_halo: kernel ", kernel, " with slices of ", L.slice, " tokens");
  const Tensor tails = sp.buffer(&kTemp, kHaloTails, {L.rows * h, c}, x.dtype);
  for (int64_t b = 0; b < L.rows; ++b)
    copy_on(ctx, rows_of(tails, c, b * h, h), rows_of(x, c, b * L.slice + L.slice - h, h));
  const Tensor all = sp.buffer(&kTemp, kHaloAll, {sp.size() * L.rows * h, c}, x.dtype);
  sp.all_gather(ctx, tails, all, SpTraffic::conv_halo);
  kernels::fill(ctx, halo, 0.0f);
  for (int64_t b = 0; b < L.rows; ++b) {
    if (L.lead[b] == 0) continue;
    const int64_t valid = std::min<int64_t>(L.lead[b], h);
    copy_on(ctx, rows_of(halo, c, L.first_doc[b] * h + h - valid, valid),
            rows_of(all, c, (static_cast<int64_t>(sp.rank() - 1) * L.rows + b) * h + h - valid, valid));
  }
}

void lasp_conv_return_dhalo(const ExecContext& ctx, const SequenceParallel& sp, const Tensor& dhalo, const Tensor& dx) {
  const SpLayout& L = sp.layout();
  const int64_t c = dx.size(-1), h = dhalo.numel() / c / (dhalo.size(0));
  // This rank's halo gradient per row (rows before the document start, which the forward read as zero,
  // are dropped), then every rank's.
  const Tensor mine = sp.buffer(&kTemp, kHaloTails, {L.rows * h, c}, dx.dtype);
  kernels::fill(ctx, mine, 0.0f);
  for (int64_t b = 0; b < L.rows; ++b) {
    if (L.lead[b] == 0) continue;
    const int64_t valid = std::min<int64_t>(L.lead[b], h);
    copy_on(ctx, rows_of(mine, c, b * h + h - valid, valid), rows_of(dhalo, c, L.first_doc[b] * h + h - valid, valid));
  }
  const Tensor all = sp.buffer(&kTemp, kHaloAll, {sp.size() * L.rows * h, c}, dx.dtype);
  sp.all_gather(ctx, mine, all, SpTraffic::conv_halo);
  if (sp.rank() + 1 == sp.size()) return;
  for (int64_t b = 0; b < L.rows; ++b) {
    if (!L.cont_out[b]) continue;
    kernels::add_inplace(ctx, rows_of(dx, c, b * L.slice + L.slice - h, h),
                         rows_of(all, c, (static_cast<int64_t>(sp.rank() + 1) * L.rows + b) * h, h));
  }
}

// ------------------------------------------------------------------------------------------ LASP-2H

namespace {

// The gathered layout [size][rows][slice] (rank-major, as all-gather and reduce-scatter see it) to the
// sequence layout [rows][size][slice] = [rows][seq_len] (to_rows), or back. `row` elements per token.
void permute_slices(const ExecContext& ctx, const SpLayout& L, int size, int64_t row, const Tensor& src,
                    const Tensor& dst, bool to_rows) {
  for (int p = 0; p < size; ++p) {
    for (int64_t b = 0; b < L.rows; ++b) {
      const int64_t ranked = (p * L.rows + b) * L.slice, ordered = b * L.seq_len + p * L.slice;
      copy_on(ctx, rows_of(dst, row, to_rows ? ordered : ranked, L.slice),
              rows_of(src, row, to_rows ? ranked : ordered, L.slice));
    }
  }
}

void gather_kv(const ExecContext& ctx, const SequenceParallel& sp, const void* owner, const Tensor& k, const Tensor& v,
               Tensor& k_all, Tensor& v_all) {
  const SpLayout& L = sp.layout();
  const int64_t n = k.size(0), hkv = k.size(1), d = k.size(2), total = L.rows * L.seq_len;
  HYD_CHECK(n == L.rows * L.slice, "lasp_gather_kv: ", n, " tokens, the layout has ", L.rows, " x ", L.slice);
  const Tensor kg = sp.buffer(owner, kKAll, {total, hkv, d}, k.dtype);
  const Tensor vg = sp.buffer(owner, kVAll, {total, hkv, d}, v.dtype);
  sp.all_gather(ctx, k, kg, SpTraffic::attention_kv);
  sp.all_gather(ctx, v, vg, SpTraffic::attention_kv);
  if (L.rows == 1) {
    k_all = kg;
    v_all = vg;
    return;
  }
  k_all = sp.buffer(owner, kKRows, {total, hkv, d}, k.dtype);
  v_all = sp.buffer(owner, kVRows, {total, hkv, d}, v.dtype);
  permute_slices(ctx, L, sp.size(), hkv * d, kg, k_all, true);
  permute_slices(ctx, L, sp.size(), hkv * d, vg, v_all, true);
}

void scatter_dkv(const ExecContext& ctx, const SequenceParallel& sp, const void* owner, const Tensor& dk_all,
                 const Tensor& dv_all, const Tensor& dk, const Tensor& dv) {
  const SpLayout& L = sp.layout();
  const int64_t hkv = dk.size(1), d = dk.size(2), total = L.rows * L.seq_len;
  Tensor dks = dk_all, dvs = dv_all;
  if (L.rows > 1) {
    // Back to the rank-major layout (the gathered buffers are free again: reuse them).
    dks = sp.buffer(owner, kKAll, {total, hkv, d}, dk_all.dtype);
    dvs = sp.buffer(owner, kVAll, {total, hkv, d}, dv_all.dtype);
    permute_slices(ctx, L, sp.size(), hkv * d, dk_all, dks, false);
    permute_slices(ctx, L, sp.size(), hkv * d, dv_all, dvs, false);
  }
  sp.reduce_scatter(ctx, dks, dk, SpTraffic::attention_kv);
  sp.reduce_scatter(ctx, dvs, dv, SpTraffic::attention_kv);
}

// Balanced LASP-2H: the blocks that move half-slices between their owners' slices ([rows][slice] tokens, `row`
// elements each) and the ranks that work on them (packed [j][rows][slice / 2], j = the worker's half-slice). Owner
// side: this rank's tokens that go to (or come back from) each worker, in the worker's (j, row) order; worker side:
// the blocks of this rank's packed work, from (or to) their owners. Queries and output gradients travel from the
// owner side to the worker side, outputs, lse and dQ back (SequenceParallel::exchange, which matches the two lists).
void half_slice_blocks(const SpLayout& L, int64_t row, std::vector<CommBlock>& owner_side,
                       std::vector<CommBlock>& worker_side) {
  const int64_t half = L.slice / 2;
  owner_side.clear();
  worker_side.clear();
  for (int worker = 0; worker < L.size; ++worker)
    for (int j = 0; j < 2; ++j) {
      const int64_t c = balanced_chunk(worker, L.size, j);
      if (c / 2 != L.rank) continue;
      for (int64_t b = 0; b < L.rows; ++b)
        owner_side.push_back({worker, (b * L.slice + (c % 2) * half) * row, half * row});
    }
  for (int j = 0; j < 2; ++j) {
    const int owner = static_cast<int>(L.work[j].chunk / 2);
    for (int64_t b = 0; b < L.rows; ++b) worker_side.push_back({owner, ((j * L.rows + b) * half) * row, half * row});
  }
}

// Half-slice j of a packed [2][rows][slice / 2] work buffer.
Tensor work_half(const Tensor& both, int j) {
  const int64_t n = both.size(0) / 2;
  return both.slice0(j * n, (j + 1) * n);
}

}  // namespace

void lasp_attention_forward(const ExecContext& ctx, const SequenceParallel& sp, const void* owner, const Tensor& q,
                            const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse, float scale) {
  const SpLayout& L = sp.layout();
  Tensor k_all, v_all;
  lasp_profile_start(ctx);
  gather_kv(ctx, sp, owner, k, v, k_all, v_all);
  lasp_profile_mark(ctx, "attn.fwd.gather");
  if (!L.balanced) {
    kernels::attention_forward(ctx, q, k_all, v_all, sp.cu_q(), sp.cu_k(), L.max_len_q, L.max_len_k, o, lse, scale);
    lasp_profile_mark(ctx, "attn.fwd.attention");
    return;
  }
  // This rank's two half-slices of queries from their owners (kept with their outputs and lse for the
  // backward), their attention, and the outputs and lse back to the owners.
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2), half_n = L.rows * (L.slice / 2);
  std::vector<CommBlock> own, work;
  const Tensor qw = sp.buffer(owner, kWorkQ, {2 * half_n, hq, d}, q.dtype);
  const Tensor ow = sp.buffer(owner, kWorkO, {2 * half_n, hq, d}, o.dtype);
  const Tensor lw = sp.buffer(owner, kWorkLse, {2 * half_n, hq}, lse.dtype);
  HYD_CHECK(n == L.rows * L.slice, "lasp_attention_forward: ", n, " queries, the layout has ", L.rows, " x ", L.slice);
  half_slice_blocks(L, hq * d, own, work);
  sp.exchange(ctx, q, own, qw, work, SpTraffic::attention_kv);
  lasp_profile_mark(ctx, "attn.fwd.gather_q");
  for (int j = 0; j < 2; ++j)
    kernels::attention_forward(ctx, work_half(qw, j), k_all, v_all, sp.work_cu_q(j), sp.work_cu_k(j),
                               L.work[j].max_len_q, L.work[j].max_len_k, work_half(ow, j), work_half(lw, j), scale);
  lasp_profile_mark(ctx, "attn.fwd.attention");
  sp.exchange(ctx, ow, work, o, own, SpTraffic::attention_kv);
  half_slice_blocks(L, hq, own, work);
  sp.exchange(ctx, lw, work, lse, own, SpTraffic::attention_kv);
  lasp_profile_mark(ctx, "attn.fwd.return");
}

void lasp_attention_backward(const ExecContext& ctx, const SequenceParallel& sp, const void* owner, const Tensor& dout,
                             const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                             const Tensor& dq, const Tensor& dk, const Tensor& dv, float scale) {
  const SpLayout& L = sp.layout();
  // The forward's gathered keys and values (kept per layer: no second all-gather).
  const int64_t total = L.rows * L.seq_len;
  const int slot_k = L.rows == 1 ? kKAll : kKRows, slot_v = L.rows == 1 ? kVAll : kVRows;
  const Tensor k_all = sp.buffer(owner, slot_k, {total, k.size(1), k.size(2)}, k.dtype);
  const Tensor v_all = sp.buffer(owner, slot_v, {total, v.size(1), v.size(2)}, v.dtype);
  const Tensor dk_all = sp.buffer(owner, kDKAll, {total, k.size(1), k.size(2)}, k.dtype);
  const Tensor dv_all = sp.buffer(owner, kDVAll, {total, v.size(1), v.size(2)}, v.dtype);
  lasp_profile_start(ctx);
  if (!L.balanced) {
    kernels::attention_backward(ctx, dout, q, k_all, v_all, o, lse, sp.cu_q(), sp.cu_k(), L.max_len_q, L.max_len_k, dq,
                                dk_all, dv_all, scale);
  } else {
    // The output gradients of this rank's half-slices from their owners, their backward over the forward's kept
    // queries, outputs and lse (the second half-slice's dK / dV added to the first's), dQ back to the owners.
    const int64_t hq = q.size(1), d = q.size(2), half_n = L.rows * (L.slice / 2);
    std::vector<CommBlock> own, work;
    half_slice_blocks(L, hq * d, own, work);
    const Tensor qw = sp.buffer(owner, kWorkQ, {2 * half_n, hq, d}, q.dtype);
    const Tensor ow = sp.buffer(owner, kWorkO, {2 * half_n, hq, d}, o.dtype);
    const Tensor lw = sp.buffer(owner, kWorkLse, {2 * half_n, hq}, lse.dtype);
    const Tensor dow = sp.buffer(&kTemp, kWorkD, {2 * half_n, hq, d}, dout.dtype);
    const Tensor dqw = sp.buffer(&kTemp, kWorkDQ, {2 * half_n, hq, d}, dq.dtype);
    sp.exchange(ctx, dout, own, dow, work, SpTraffic::attention_kv);
    lasp_profile_mark(ctx, "attn.bwd.gather_do");
    for (int j = 0; j < 2; ++j) {
      const Tensor dkj = j == 0 ? dk_all : sp.buffer(&kTemp, kDKAll2, {total, k.size(1), k.size(2)}, k.dtype);
      const Tensor dvj = j == 0 ? dv_all : sp.buffer(&kTemp, kDVAll2, {total, v.size(1), v.size(2)}, v.dtype);
      kernels::attention_backward(ctx, work_half(dow, j), work_half(qw, j), k_all, v_all, work_half(ow, j),
                                  work_half(lw, j), sp.work_cu_q(j), sp.work_cu_k(j), L.work[j].max_len_q,
                                  L.work[j].max_len_k, work_half(dqw, j), dkj, dvj, scale);
      if (j == 1) {
        kernels::add_inplace(ctx, dk_all, dkj);
        kernels::add_inplace(ctx, dv_all, dvj);
      }
    }
    sp.exchange(ctx, dqw, work, dq, own, SpTraffic::attention_kv);
  }
  lasp_profile_mark(ctx, "attn.bwd.attention");
  scatter_dkv(ctx, sp, owner, dk_all, dv_all, dk, dv);
  lasp_profile_mark(ctx, "attn.bwd.scatter");
}

// ------------------------------------------------------------------------------------------ profile

namespace {

struct Profile {
  bool on = false;
  std::map<std::string, double> seconds;
  std::chrono::steady_clock::time_point last;
};

Profile& profile() {
  static Profile p = [] {
    Profile q;
    const char* e = std::getenv("HYD_SP_PROFILE");
    q.on = e != nullptr && std::string(e) == "1";
    return q;
  }();
  return p;
}

}  // namespace

bool lasp_profile_on() { return profile().on; }

void lasp_profile_start(const ExecContext& ctx) {
  Profile& p = profile();
  if (!p.on) return;
  ctx.synchronize();
  p.last = std::chrono::steady_clock::now();
}

void lasp_profile_mark(const ExecContext& ctx, const char* phase) {
  Profile& p = profile();
  if (!p.on) return;
  ctx.synchronize();
  const auto now = std::chrono::steady_clock::now();
  p.seconds[phase] += std::chrono::duration<double>(now - p.last).count();
  p.last = now;
}

std::string lasp_profile_report(double divide_by) {
  std::string out;
  char buf[96];
  for (const auto& [phase, sec] : profile().seconds) {
    std::snprintf(buf, sizeof buf, "%s%s=%.2f", out.empty() ? "" : " ", phase.c_str(), sec * 1e3 / divide_by);
    out += buf;
  }
  return out;
}

void lasp_profile_reset() { profile().seconds.clear(); }

}  // namespace hyd

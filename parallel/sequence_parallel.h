// Sequence parallelism (PARALLEL.md "LASP-2 for KDA layers", "LASP-2H for NoPE attention layers"): what one
// rank of an SP group holds of a micro-batch, and the tensor collectives the layers run over the group.
//
// Layout. A micro-batch is `rows` sequences of `seq_len` tokens. SP rank r holds tokens
// [r * slice, (r + 1) * slice) of every sequence (slice = seq_len / size), packed row after row, so its
// local batch has rows * slice tokens; documents are cut at the slice boundaries (a piece of a document
// that started on an earlier rank is a local document whose state / keys come from the earlier ranks).
// SpLayout records, per row, which local documents touch the slice's ends and how they continue; the
// per-layer algorithms are in trainer/lasp.h.
//
// Traffic. Every collective counts the bytes this rank contributes (its input), per kind (KDA state
// transitions and adjoints, convolution halos, attention K/V): the KDA kinds do not grow with T.
//
// Devices. Tensors live on the layers' device. On the CPU the collectives are MPI on the tensors' memory;
// on CUDA they are NCCL (parallel/nccl_comm.h, a communicator of the same group) ordered on the caller's
// stream (HYD_SP_STAGED=1 stages them through host memory and MPI instead, for debugging). Each collective
// waits for the device and the group before it and for the device after it (so Traffic::seconds is the
// exchange alone) -- with MPI, and with NCCL under HYD_SP_ASYNC=0 (to time the exchanges). By default NCCL
// collectives are only queued on the stream (every consumer is stream-ordered): no host synchronisation, so
// communication overlaps the compute queued around it, and Traffic::seconds stays 0 (measured on 2 x H100 at
// stop 18: hybrid SP2 step 183.2 -> 177.3 ms).
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd {

class Communicator;
class NcclCommunicator;
struct CommBlock;

struct SpLayout {
  int rank = 0, size = 1;
  int64_t rows = 0;     // B sequences
  int64_t seq_len = 0;  // T tokens per sequence (all ranks together)
  int64_t slice = 0;    // T / size tokens per sequence on each rank
  // Per row b (local document indices into the rank's cu_seqlens):
  std::vector<int32_t> first_doc, last_doc;
  // Tokens of the row's first local document that lie on earlier ranks (0: it starts in this slice).
  std::vector<int32_t> lead;
  // 1 when the row's last local document goes on into rank + 1's slice.
  std::vector<uint8_t> cont_out;
  // LASP-2H: query / key document boundaries over the gathered keys, laid out [rows, seq_len] row-major.
  // Local document d attends keys from its document's start (possibly on an earlier rank) to its own
  // end; keys no local query may see (later ranks' tokens, other rows' prefixes) form key-only
  // documents with no queries, so both arrays cover all their rows.
  std::vector<int32_t> cu_q, cu_k;
  int64_t max_len_q = 0, max_len_k = 0;
  // Balanced LASP-2H. With contiguous slices the causal attention of rank r costs 2 r + 1 units (the last
  // rank waits for the others). Instead every rank computes the queries of two half-slices, `rank` and
  // 2 size - 1 - rank (half-slice c of a row: its tokens [c slice / 2, (c + 1) slice / 2), attending about
  // c + 1/2 half-slices of keys, so each rank's pair costs the same); queries and outputs travel to and from
  // their owners (trainer/lasp.cpp). work[j]: that half-slice and its boundaries as cu_q / cu_k above, queries
  // packed [rows][slice / 2]. Used when the slice is even, size > 1 and HYD_SP_ATTN_BALANCE is not 0.
  bool balanced = false;
  struct Work {
    int64_t chunk = 0;
    std::vector<int32_t> cu_q, cu_k;
    int64_t max_len_q = 0, max_len_k = 0;
  };
  Work work[2];
};

enum class SpTraffic { kda_state = 0, conv_halo = 1, attention_kv = 2 };
constexpr int kSpTrafficKinds = 3;
const char* sp_traffic_name(SpTraffic kind);

class SequenceParallel {
 public:
  struct Traffic {
    int64_t calls = 0;
    int64_t bytes = 0;
    double seconds = 0;  // wall time in the collective after a barrier of the group (staging included)
  };

  // `group` is the SP group (its rank order is the slice order) and must outlive this object.
  SequenceParallel(const Communicator& group, Device device);
  ~SequenceParallel();
  SequenceParallel(const SequenceParallel&) = delete;
  SequenceParallel& operator=(const SequenceParallel&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  Device device() const { return device_; }
  const Communicator& group() const { return *group_; }  // the SP group (host collectives)

  // The current micro-batch's layout (from slice_batch_for_sp, trainer/lasp.h); uploads the LASP-2H
  // boundaries to the device. Must be the same rows / seq_len / size on every rank of the group.
  void set_layout(SpLayout layout);
  const SpLayout& layout() const { return layout_; }
  const Tensor& cu_q() const { return cu_q_; }  // i32 [layout().cu_q.size()] on the device
  const Tensor& cu_k() const { return cu_k_; }
  // The balanced work's boundaries (layout().balanced), j = 0, 1.
  const Tensor& work_cu_q(int j) const { return work_cu_[2 * j]; }
  const Tensor& work_cu_k(int j) const { return work_cu_[2 * j + 1]; }

  // A buffer owned by (owner, slot) that keeps its contents between calls (a layer's forward leaves
  // what its backward reads); reallocated, contents lost, when a call asks for more bytes than it has.
  Tensor buffer(const void* owner, int slot, std::initializer_list<int64_t> dims, DType dtype) const;
  // The caller's own record of what it last wrote into buffer(owner, slot) (e.g. the layout those contents
  // depend on): kept with the contents and cleared when buffer() reallocates them, so a caller can skip rewriting
  // what is already there (trainer/lasp.cpp: LASP-2's identity states, rewritten only when the layout changes).
  std::vector<int64_t>& buffer_key(const void* owner, int slot) const;

  // out [size * in.numel()] (any shape with that many elements): block r = rank r's in. Any dtype.
  void all_gather(const ExecContext& ctx, const Tensor& in, const Tensor& out, SpTraffic kind) const;
  // in [size * out.numel()]: out = sum over ranks of block rank() of their in. f32, f64, bf16 (bf16 summed
  // in f32).
  void reduce_scatter(const ExecContext& ctx, const Tensor& in, const Tensor& out, SpTraffic kind) const;
  // Point to point in one step: every block of `sends` (elements [offset, offset + count) of in, flat) goes to its
  // peer, every block of `recvs` (of out) is filled from its peer; the rest of out is left as it was. A peer may be
  // this rank. Blocks between one pair of ranks are matched in list order (rank a's i-th send to b is b's i-th
  // receive from a, with the same count). One NCCL group on CUDA, MPI_Isend / MPI_Irecv on the CPU. Any dtype
  // (in's = out's); the traffic counted is the bytes sent.
  void exchange(const ExecContext& ctx, const Tensor& in, const std::vector<CommBlock>& sends, const Tensor& out,
                const std::vector<CommBlock>& recvs, SpTraffic kind) const;

  // A second context (stream) on this group's GPU for work that may run beside the caller's, ordered with it by
  // ExecContext::wait_for (trainer/lasp.cpp: the KDA layers' transition pass beside the zero-state pass); created on
  // first use. Null on the CPU. HYD_SP_CONCURRENT=1 / 0 turns it on / off for every use; unset (or empty), a use gets
  // it when it asks by_default (the parallel correction's P pass does; the M pass of a rank whose slice is one
  // continuing document without the correction does not: SP >= 3 and no 4-GPU machine has run it yet,
  // gpu_parallel...np4_concurrent tests it).
  const ExecContext* side_context(bool by_default = false) const;

  Traffic traffic(SpTraffic kind) const { return traffic_[static_cast<int>(kind)]; }
  // Whether the collectives are only queued (NCCL without HYD_SP_ASYNC=0): Traffic::seconds then stays 0.
  bool queued() const { return async_; }
  void reset_traffic();

 private:
  void count(SpTraffic kind, int64_t bytes, double seconds) const;
  // Synchronises ctx, waits for the group, runs run(in', out') on device (NCCL) or host (MPI) views of in
  // and out (staged where the memory is on the other side; `partial`: run writes only part of out, so a
  // staged out starts as a copy of out), writes back, counts `bytes` (-1: in's) of traffic.
  void collective(const ExecContext& ctx, const Tensor& in, const Tensor& out, SpTraffic kind,
                  const std::function<void(const Tensor&, const Tensor&)>& run, bool partial = false,
                  int64_t bytes = -1) const;
  Tensor on_device(const Tensor& t, int slot) const;  // t itself on the device, else a copy in buffer(this, slot)
  const Communicator* group_;
  std::unique_ptr<NcclCommunicator> nccl_;  // CUDA only
  bool async_ = false;                      // NCCL unless HYD_SP_ASYNC=0
  Device device_;
  int rank_ = 0, size_ = 1;
  SpLayout layout_;
  Arena layout_arena_;
  Tensor cu_q_, cu_k_;
  Tensor work_cu_[4];
  mutable std::map<std::pair<const void*, int>, Arena> buffers_;
  mutable std::map<std::pair<const void*, int>, std::vector<int64_t>> buffer_keys_;
  mutable std::unique_ptr<ExecContext> side_;
  mutable Traffic traffic_[kSpTrafficKinds];
};

}  // namespace hyd

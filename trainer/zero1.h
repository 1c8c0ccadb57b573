// ZeRO-1 data parallelism (PARALLEL.md "Data parallel (ZeRO-1)"), for a model whose parameters and
// gradients are flat buffers (DenseModel, HybridModel): every rank of `group` holds the whole model and
// its own gradients; the optimizer state is sharded.
//
// The P elements of the flat buffers are cut into one contiguous shard per rank, S = ceil(P / R) elements
// (the last shard padded with zeros). A step:
//   1. reduce_gradients: the ranks' flat gradients are summed into this rank's shard (one reduce-scatter);
//   2. the optimizer (AdamW over shard_params(): the parts of the parameters inside this rank's shard,
//      with gradient views into the summed shard) updates the shard; its global-norm clipping takes the
//      sum of squares over all shards through all_reduce_sum;
//   3. gather_parameters: every rank's updated shard goes into every rank's flat parameters (one
//      all-gather), so all replicas hold the same weights again.
// On the CPU the collectives are MPI on host memory (f32 parameters, the masters themselves). On CUDA they
// are NCCL on the device, ordered on the caller's stream (bf16 working weights are gathered; each rank keeps
// f32 masters, m and v for its shard only, inside AdamW). The model's flat gradients are not modified.
// Memory: gradient staging of S R f32 + S f32, parameter staging of S (R + 1) elements of the parameters'
// dtype, on the model's device.
//
// Expert region (optional; PARALLEL.md "Expert parallelism": routed experts replicated over W / EP ranks and
// reduced over those only): flat elements [experts->offset, P) hold this rank's local experts, which
// differ between expert-parallel ranks and are replicated over experts->group (the ranks with the same EP
// index). That region is sharded, reduce-scattered and all-gathered over experts->group alone, the
// elements before it over `group` as above; each has its own S and staging. The gradient norm's
// all_reduce_sum stays over `group`: every element of every rank's model lies in exactly one rank's shard.
// rank(), size(), shard_numel() and shard_begin() describe the replicated region. Shard pieces are named
// "NAME[a:b]" in the elements of the whole tensor (ParamInfo::global_begin), so the expert region's pieces of
// different EP ranks never share a name (hydistill distill with parallel.ep > 1 builds such models).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/model.h"

namespace hyd {

class Communicator;
class NcclCommunicator;

class Zero1 {
 public:
  struct ExpertRegion {
    int64_t offset = 0;                   // first flat element of the expert region (a parameter boundary)
    const Communicator* group = nullptr;  // the expert-data-parallel group (must outlive this object)
  };
  // Collective over `group` (which must outlive this object). params: the model's parameter list (views
  // into flat_params / flat_grads, offsets in elements); flat_params f32 (CPU) or bf16 (CUDA), flat_grads
  // f32, on one device.
  Zero1(const Communicator& group, const std::vector<ParamInfo>& params, const Tensor& flat_params,
        const Tensor& flat_grads, const ExpertRegion* experts = nullptr);
  // The parts of `trained` (a subset of the model's parameters, e.g. one stage's) inside this rank's shard:
  // what an optimizer of only those parameters updates. Parameters outside the subset keep their values
  // (gather_parameters moves them unchanged).
  std::vector<ParamInfo> shard_params_of(const std::vector<ParamInfo>& trained) const;
  ~Zero1();
  Zero1(const Zero1&) = delete;
  Zero1& operator=(const Zero1&) = delete;

  // The replicated region's sharding (regions_[0]).
  int rank() const;
  int size() const;
  int64_t shard_numel() const;  // S
  int64_t shard_begin() const;  // rank * S
  // The parameters' parts inside this rank's shard (named "NAME[a:b]"), gradient views into the summed
  // shard: what the optimizer updates.
  const std::vector<ParamInfo>& shard_params() const { return shard_params_; }

  // The sum over the ranks of the flat gradients, block rank() of it, into the shard (ordered on ctx).
  void reduce_gradients(const ExecContext& ctx);
  // Every rank's shard of the flat parameters into the flat parameters of every rank (ordered on ctx).
  void gather_parameters(const ExecContext& ctx);
  // The sum over the ranks of x (host; the optimizer's sum of squares).
  double all_reduce_sum(double x) const;
  // Timing on: reduce_gradients and gather_parameters each run between two synchronisations of ctx and add
  // their wall time to seconds() (the exchange alone, for communication shares). Off by default (no extra
  // synchronisation).
  void set_timing(bool on) { timing_ = on; }
  double seconds() const { return seconds_; }

  size_t memory_bytes() const { return buffers_.capacity(); }

 private:
  struct Region;  // zero1.cpp: one sharded range of the flat buffers and its group
  const Communicator* group_;
  int64_t numel_ = 0;
  Tensor flat_params_, flat_grads_;
  Arena buffers_;
  std::vector<Region> regions_;  // [0]: the replicated region over group_; [1]: the expert region
  std::vector<ParamInfo> shard_params_;
  bool timing_ = false;
  double seconds_ = 0;
  template <class F>
  void timed(const ExecContext& ctx, F&& exchange);
};

}  // namespace hyd

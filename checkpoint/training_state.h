// A run's training state in a checkpoint's state file (checkpoint/checkpoint.h), and back.
//
// Tensors of rank-00000.safetensors (docs/formats.md):
//   param/NAME    every model parameter, in its working dtype (F32 on the CPU, BF16 on CUDA)
//   master/NAME   AdamW's f32 master of NAME, only where the masters are buffers of their own (CUDA;
//                 on the CPU the parameters are the masters)
//   adam_m/NAME   AdamW's first and second moments (F32) of every parameter the optimizer holds
//   adam_v/NAME
// plus the optimizer's counters in the manifest ({"steps_taken", "skipped_steps", "params"}).
// Restoring copies the stored bytes when the dtypes agree (bit for bit) and converts through f32
// otherwise (a CPU checkpoint resumed on CUDA, or the reverse). Every tensor must be present with
// its parameter's shape; errors name the file and the tensor.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "checkpoint/safetensors.h"
#include "trainer/model.h"
#include "trainer/optimizer.h"

namespace hyd {

// param/NAME of every parameter that is a whole tensor, param/NAME[a:b] of every piece of one (expert-sharded
// storage: ParamInfo::global_begin / global_shape), as `which` selects.
enum class ParamSelection { all, whole, pieces };
void add_parameters(SafetensorsWriter& w, const std::vector<ParamInfo>& params,
                    ParamSelection which = ParamSelection::all);
// The moments (and separate masters) of `opt`; optimizer_counters() goes into the manifest.
void add_optimizer_state(SafetensorsWriter& w, const AdamW& opt);
nlohmann::json optimizer_counters(const AdamW& opt);

// ZeRO-1 runs (trainer/zero1.h) write sharded checkpoints: rank r's state file holds the optimizer state of
// its shard under the shard parameters' names ("adam_m/NAME[a:b]", a and b in elements of NAME, as
// add_optimizer_state writes them), rank 0's also param/NAME of every parameter; the manifest's optimizer
// object is zero1_counters'. {"steps_taken", "skipped_steps", "params": the model's parameter count,
// "zero1": {"ranks": R, "shard_numel": S, "flat_numel": P, "expert_shards": EP}} (S and P of the replicated region
// and this rank's flat buffers, informative). Pieces of expert-sharded parameters are named in the elements of the
// whole tensor (Zero1 names them so).
nlohmann::json zero1_counters(const AdamW& opt, int64_t ranks, int64_t shard_numel, int64_t flat_numel,
                              int64_t model_params, int64_t expert_shards = 1);

// The tensors of every state file of a checkpoint, by name and element range: "KIND/NAME" holds all of NAME,
// "KIND/NAME[a:b]" elements a..b of it (row-major, in the whole tensor's elements), wherever they were
// written. A read assembles any range from the pieces that hold it, so a checkpoint written with any rank
// count, ZeRO-1 shard size or expert sharding restores into any other.
class CheckpointTensors {
 public:
  explicit CheckpointTensors(const Checkpoint& ck);  // opens the other ranks' files (headers only)
  bool contains(const std::string& kind, const std::string& name) const;
  // Values [begin, begin + n) of KIND/NAME, a tensor of `shape` (f32). Errors name the file and the tensor
  // (missing, another shape or size, a range no file holds).
  std::vector<float> read(const std::string& kind, const std::string& name, const std::vector<int64_t>& shape,
                          int64_t begin, int64_t n) const;

 private:
  struct Piece {
    int64_t begin = 0, end = 0;  // elements of the whole tensor
    size_t file = 0;
    std::string tensor;  // as stored
    bool whole = false;
  };
  const Checkpoint* ck_;
  std::vector<SafetensorsFile> others_;               // ranks 1.. (rank 0's is ck_->tensors)
  std::map<std::string, std::vector<Piece>> pieces_;  // "KIND/NAME" -> by increasing begin
  const SafetensorsFile& file(size_t r) const { return r == 0 ? ck_->tensors : others_[r - 1]; }
};

// Every parameter (or its piece) from param/NAME of whichever state files hold it.
void restore_parameters(const Checkpoint& ck, const std::vector<ParamInfo>& params);
// The masters come from master/NAME where the file has it, else from param/NAME; counters is the
// manifest's `optimizer` object (errors name `manifest_path`).
void restore_optimizer_state(const SafetensorsFile& f, const nlohmann::json& counters, const std::string& manifest_path,
                             AdamW& opt);
// Restores `opt`, whose parameters are whole parameters of model_params or pieces of them (ZeRO-1 shards
// "NAME[a:b]" of this run's rank count and expert sharding), from a checkpoint written with any rank count
// and expert sharding: sharded (manifest optimizer.zero1) or single-rank. The pieces are cut from the files
// that hold them (CheckpointTensors), so a run resumed on another number of ranks re-shards the state. The
// masters come from master/NAME... where the checkpoint has them (CUDA), else (CUDA runs) from param/NAME...;
// on the CPU the parameters are the masters (restore_parameters first). Errors name the file and the
// tensor, or the manifest and the field.
void restore_optimizer_resharded(const Checkpoint& ck, const std::vector<ParamInfo>& model_params, AdamW& opt);

}  // namespace hyd

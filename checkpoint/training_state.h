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

#include <nlohmann/json.hpp>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "checkpoint/safetensors.h"
#include "trainer/model.h"
#include "trainer/optimizer.h"

namespace hyd {

void add_parameters(SafetensorsWriter& w, const std::vector<ParamInfo>& params);
// The moments (and separate masters) of `opt`; optimizer_counters() goes into the manifest.
void add_optimizer_state(SafetensorsWriter& w, const AdamW& opt);
nlohmann::json optimizer_counters(const AdamW& opt);

// ZeRO-1 runs (trainer/zero1.h) write sharded checkpoints: rank r's state file holds the optimizer state of
// its shard under the shard parameters' names ("adam_m/NAME[a:b]", a and b in elements of NAME, as
// add_optimizer_state writes them), rank 0's also param/NAME of every parameter; the manifest's optimizer
// object is zero1_counters'. {"steps_taken", "skipped_steps", "params": the model's parameter count,
// "zero1": {"ranks": R, "shard_numel": S, "flat_numel": P}}.
nlohmann::json zero1_counters(const AdamW& opt, int64_t ranks, int64_t shard_numel, int64_t flat_numel,
                              int64_t model_params);

void restore_parameters(const SafetensorsFile& f, const std::vector<ParamInfo>& params);
// The masters come from master/NAME where the file has it, else from param/NAME; counters is the
// manifest's `optimizer` object (errors name `manifest_path`).
void restore_optimizer_state(const SafetensorsFile& f, const nlohmann::json& counters, const std::string& manifest_path,
                             AdamW& opt);
// Restores `opt`, whose parameters are any contiguous pieces of model_params in the flat layout (ZeRO-1
// shards "NAME[a:b]" of this run's rank count, or whole parameters), from a checkpoint written with any
// rank count: sharded (manifest optimizer.zero1) or single-rank. The pieces are cut from the files that
// hold them, so a run resumed on another number of ranks re-shards the state. The masters come from
// master/NAME... where the checkpoint has them (CUDA), else (CUDA runs) from param/NAME of rank 0's file;
// on the CPU the parameters are the masters (restore_parameters first). Errors name the file and the
// tensor, or the manifest and the field (a different flat layout: optimizer.zero1.flat_numel).
void restore_optimizer_resharded(const Checkpoint& ck, const std::vector<ParamInfo>& model_params, AdamW& opt);

}  // namespace hyd

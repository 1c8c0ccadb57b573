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

#include "checkpoint/safetensors.h"
#include "trainer/model.h"
#include "trainer/optimizer.h"

namespace hyd {

void add_parameters(SafetensorsWriter& w, const std::vector<ParamInfo>& params);
// The moments (and separate masters) of `opt`; optimizer_counters() goes into the manifest.
void add_optimizer_state(SafetensorsWriter& w, const AdamW& opt);
nlohmann::json optimizer_counters(const AdamW& opt);

void restore_parameters(const SafetensorsFile& f, const std::vector<ParamInfo>& params);
// The masters come from master/NAME where the file has it, else from param/NAME; counters is the
// manifest's `optimizer` object (errors name `manifest_path`).
void restore_optimizer_state(const SafetensorsFile& f, const nlohmann::json& counters, const std::string& manifest_path,
                             AdamW& opt);

}  // namespace hyd

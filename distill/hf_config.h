// Hugging Face config.json -> hyd::ModelConfig for the families the trainer implements (model_type llama,
// qwen2, qwen3; the MoE families qwen3_moe and dots1, whose expert keys are described in trainer/model_config.h).
//
// Both the transformers 4.x layout (top-level rope_theta, "rope_scaling": {"type"|"rope_type", ...}) and
// the 5.x layout ("rope_parameters": {"rope_type", "rope_theta", ...}, optionally nested by layer type)
// are read. Features the dense model does not implement are rejected rather than ignored: sliding-window
// layers, MLP or o_proj biases, partial rotary embeddings, RoPE types other than default / linear /
// llama3 / yarn, activations other than SiLU, quantized checkpoints, dots1's group-limited routing
// (n_group or topk_group other than 1) and scoring functions other than sigmoid. Every error names the file
// and the field.
#pragma once

#include <nlohmann/json_fwd.hpp>
#include <string>

#include "trainer/model_config.h"

namespace hyd {

// Parses and finalizes (ModelConfig::finalize) the config; `source` names the file in errors.
ModelConfig model_config_from_hf_json(const nlohmann::json& j, const std::string& source);
// Reads `path` (a config.json).
ModelConfig read_hf_config(const std::string& path);

}  // namespace hyd

// Teacher checkpoints in Hugging Face layout (config.json + model.safetensors, or shards listed by
// model.safetensors.index.json) for the dense families llama / qwen2 / qwen3 and for qwen3_moe and dots1.
//
// HF tensor names and how they land on DenseModel parameters (trainer/model.h):
//   model.embed_tokens.weight                              -> embed
//   model.layers.L.input_layernorm.weight                  -> layers.L.attn_norm
//   model.layers.L.self_attn.{q,k,v}_proj.weight           -> layers.L.wqkv      (rows q; k; v)
//   model.layers.L.self_attn.{q,k,v}_proj.bias             -> layers.L.bqkv      (qkv_bias: Qwen2)
//   model.layers.L.self_attn.{q,k}_norm.weight             -> layers.L.{q,k}_norm (qk_norm: Qwen3)
//   model.layers.L.self_attn.o_proj.weight                 -> layers.L.wo
//   model.layers.L.post_attention_layernorm.weight         -> layers.L.mlp_norm
//   model.layers.L.mlp.{gate,up}_proj.weight               -> layers.L.w_gate_up (rows gate; up)
//   model.layers.L.mlp.down_proj.weight                    -> layers.L.w_down
// qwen3_moe and dots1, sparse layers (ModelConfig::is_moe_layer; the others are dense as above):
//   model.layers.L.mlp.gate.weight [E, D]                  -> layers.L.mlp.gate.weight
//   model.layers.L.mlp.experts.e.{gate,up}_proj.weight     -> layers.L.mlp.gate_up [E, 2F, D] (expert e: gate; up)
//   model.layers.L.mlp.experts.e.down_proj.weight          -> layers.L.mlp.down [E, D, F]
// dots1 only (F_s = n_shared_experts * moe_intermediate_size: HF's one shared MLP):
//   model.layers.L.mlp.shared_experts.{gate,up}_proj.weight -> layers.L.mlp.shared_gate_up [1, 2F_s, D] (gate; up)
//   model.layers.L.mlp.shared_experts.down_proj.weight     -> layers.L.mlp.shared_down [1, D, F_s]
//   model.layers.L.mlp.gate.e_score_correction_bias [E]    -> layers.L.mlp.gate.e_score_correction_bias (a buffer
//                                                             in HF: its gradient here stays 0)
// (the per-expert layout transformers' save_pretrained writes; fused gate_up_proj tensors are refused).
//   model.norm.weight                                      -> final_norm
//   lm_head.weight (absent when tied)                      -> lm_head
// Stored dtypes F32, BF16, F16 (F64) are accepted and converted.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "trainer/hybrid_model.h"
#include "trainer/model.h"
#include "trainer/model_config.h"

namespace hyd {

struct TeacherInfo {
  ModelConfig config;
  int64_t num_parameters = 0;      // elements of the tensors the model uses (lm_head excluded when tied)
  std::vector<std::string> files;  // config.json, the index when sharded, then the safetensors files
  std::string summary;             // multi-line, printable (`hydistill inspect DIR`)
};

// One HF tensor the config implies.
struct HfTensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};
// Every tensor a checkpoint of this config must hold, in model order.
std::vector<HfTensorSpec> hf_dense_tensors(const ModelConfig& cfg);

// A DenseModel parameter and the HF tensors that make it, concatenated along dimension 0.
struct HfParamSource {
  std::string param;
  std::vector<std::string> hf_names;
};
std::vector<HfParamSource> hf_dense_param_sources(const ModelConfig& cfg);

// Validates DIR/config.json and every tensor's presence, shape and dtype against it, without reading
// tensor data. Errors (hyd::Error) name the file and the field or tensor: a missing or mis-shaped
// tensor, an unexpected one (rotary inv_freq buffers, and lm_head.weight when tied, are tolerated).
TeacherInfo inspect_teacher(const std::string& dir);

// inspect_teacher, then copies every tensor into `model` (built from a config with the same
// dimensions, e.g. inspect_teacher(dir).config) with DenseModel::set_param.
void load_teacher_weights(const std::string& dir, DenseModel& model);
// The same straight into an all-T HybridModel (the distillation teacher; no DenseModel in between). An
// expert-sharded one (HybridConfig::expert_shards > 1) reads only its experts' tensors.
void load_teacher_weights(const std::string& dir, HybridModel& model);

}  // namespace hyd

// `hydistill export`: a HybridModel as a Hugging Face style directory that
// AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) loads (docs/export.md is the schema).
//
//   OUT/config.json                 model_type hydistill_hybrid, auto_map, every field of the schema
//   OUT/model.safetensors           or, when the tensors exceed shard_bytes, model-0000k-of-0000n.safetensors
//                                   + model.safetensors.index.json ({"metadata": {"total_size"}, "weight_map"})
//   OUT/configuration_hydistill.py  copied from opt.python_dir (the source tree's checkpoint/python)
//   OUT/modeling_hydistill.py
//   OUT/<tokenizer files>           copied from opt.tokenizer_dir when given
//
// Tensor names: the dense parts as the teacher's HF names (distill/teacher.h's mapping: wqkv rows
// q; k; v -> q_proj / k_proj / v_proj, w_gate_up rows gate; up -> gate_proj / up_proj, ...); every mixer
// lives under `self_attn`, KDA mixers with FLA's KimiDeltaAttention names (conv weights [C, K] stored
// as [C, 1, K]). MoE FFN layers (students of qwen3_moe teachers) keep qwen3_moe's per-expert names: the
// router layers.L.mlp.gate.weight as model.layers.L.mlp.gate.weight, and expert e's slices of the stacked
// layers.L.mlp.gate_up [E, 2F, D] / mlp.down [E, D, F] as model.layers.L.mlp.experts.e.{gate,up,down}_proj.weight;
// config.json then carries Qwen3MoeConfig's expert keys. Matrices are written in opt.dtype; A_log and dt_bias
// are always F32.
//
// Nothing is lost: an existing non-empty OUT is refused (error naming it); the directory is built as
// OUT.tmp (a stale OUT.tmp from an interrupted export is removed first) and renamed to OUT at the end.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "trainer/hybrid_model.h"

namespace hyd {

struct ExportOptions {
  std::string out_dir;
  std::string dtype = "bfloat16";  // "bfloat16" | "float32": dtype of the stored matrices (torch_dtype)
  // Folder holding configuration_hydistill.py and modeling_hydistill.py: <source dir>/checkpoint/python
  // (the CLI passes it; tests use HYD_SOURCE_DIR). Required.
  std::string python_dir;
  // Teacher directory whose tokenizer files are copied (tokenizer.json, tokenizer_config.json,
  // special_tokens_map.json, vocab.json, merges.txt, tokenizer.model, vocab.txt, added_tokens.json,
  // whichever exist; at least one must). Empty: no tokenizer is written.
  std::string tokenizer_dir;
  uint64_t shard_bytes = 5000000000ull;  // tensors above this total are split into shards of at most this
                                         // size (a single larger tensor gets a shard of its own)
  int64_t pad_token_id = -1;             // the teacher's pad token; -1 writes null
  // An all-T model exported as the teacher family's own HF model (model_type llama / qwen2 / qwen3,
  // hf_dense_config_json, no modeling files): how `hydistill export` writes a `train` checkpoint.
  bool dense = false;
};

// One stored tensor: its HF name, shape, dtype, and where its values come from (rows
// [row_begin, row_begin + shape[0]) of the model parameter `param`, row-major, same element order).
struct ExportTensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  SafetensorsDType dtype = SafetensorsDType::BF16;
  std::string param;
  int64_t row_begin = 0;
  int64_t numel() const;
  uint64_t nbytes() const { return uint64_t(numel()) * safetensors_dtype_size(dtype); }
};

// Every tensor an export of `cfg` holds, in model order. dtype: "bfloat16" | "float32".
std::vector<ExportTensorSpec> hf_hybrid_tensors(const HybridConfig& cfg, const std::string& dtype);
// config.json of an export of `cfg` (docs/export.md).
nlohmann::json hf_hybrid_config_json(const HybridConfig& cfg, const std::string& dtype, int64_t pad_token_id = -1);
// config.json of a dense model in its family's transformers layout (LlamaConfig, Qwen2Config, Qwen3Config),
// which distill/hf_config.h reads back to the same ModelConfig. A family without the model's biases or
// norms (llama with qkv_bias, qwen2 without it, ...) is an error naming the field.
nlohmann::json hf_dense_config_json(const ModelConfig& mc, const std::string& dtype, int64_t pad_token_id = -1);

// Whether `dir` holds any of the tokenizer files an export copies.
bool has_tokenizer_files(const std::string& dir);

// Writes the export directory; errors are hyd::Error naming the file / folder and the field.
void export_hf(const HybridModel& model, const ExportOptions& opt);

}  // namespace hyd

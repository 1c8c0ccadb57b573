#include "checkpoint/export.h"

#include <charconv>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>

#include "distill/teacher.h"
#include "trainer/core/error.h"

namespace hyd {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kPythonFiles[] = {"configuration_hydistill.py", "modeling_hydistill.py"};
constexpr const char* kTokenizerFiles[] = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
    "vocab.txt",      "added_tokens.json"};

SafetensorsDType matrix_dtype(const std::string& dtype) {
  if (dtype == "bfloat16") return SafetensorsDType::BF16;
  if (dtype == "float32") return SafetensorsDType::F32;
  throw Error::at("export", "dtype", "'" + dtype + "' is not supported (bfloat16 or float32)");
}

// The shortest decimal that reads back as the same float: 1e-6f is written 1e-06, not 9.99999997e-07.
double float_as_decimal(float v) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v);
  *res.ptr = '\0';
  return std::strtod(buf, nullptr);
}

json token_id(int64_t id) { return id < 0 ? json(nullptr) : json(id); }

json rope_scaling_json(const ModelConfig& mc) {
  const kernels::RopeScaling& s = mc.rope_scaling;
  if (s.type == "default") return nullptr;
  json r = {{"rope_type", s.type}, {"factor", s.factor}};
  if (s.type == "linear") return r;
  const auto original = static_cast<int64_t>(s.original_max_position_embeddings);
  if (s.type == "llama3") {
    r["low_freq_factor"] = s.low_freq_factor;
    r["high_freq_factor"] = s.high_freq_factor;
    r["original_max_position_embeddings"] = original;
    return r;
  }
  if (s.type == "yarn") {
    r["original_max_position_embeddings"] = original;
    r["beta_fast"] = s.beta_fast;
    r["beta_slow"] = s.beta_slow;
    r["attention_factor"] = s.attention_factor;  // resolved when the teacher's config was read
    r["truncate"] = s.truncate;
    return r;
  }
  throw Error::at("export", "rope_scaling", "rope type '" + s.type + "' cannot be exported");
}

const char* mixer_type_name(MixerKind k) {
  switch (k) {
    case MixerKind::kda:
      return "kda";
    case MixerKind::nope_attention:
      return "nope_attention";
    case MixerKind::teacher_attention:
      return "rope_attention";
  }
  return "?";
}

// "layers.L.<rest>" -> L (the layer index of a hybrid-model parameter name), -1 for others.
int64_t layer_of(const std::string& param) {
  if (!param.starts_with("layers.")) return -1;
  return std::stoll(param.substr(7, param.find('.', 7) - 7));
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw Error::at(path.string(), "", "cannot open for writing");
  f << text;
  f.close();
  if (!f) throw Error::at(path.string(), "", "write failed");
}

void copy_into(const fs::path& src, const fs::path& dir) {
  std::error_code ec;
  fs::copy_file(src, dir / src.filename(), fs::copy_options::overwrite_existing, ec);
  if (ec) throw Error::at(src.string(), "", "cannot copy into " + dir.string() + ": " + ec.message());
}

// Tensors grouped into files of at most shard_bytes (a tensor larger than that alone in its file).
std::vector<std::vector<size_t>> plan_shards(const std::vector<ExportTensorSpec>& specs, uint64_t shard_bytes) {
  std::vector<std::vector<size_t>> shards(1);
  uint64_t used = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const uint64_t b = specs[i].nbytes();
    if (!shards.back().empty() && used + b > shard_bytes) {
      shards.emplace_back();
      used = 0;
    }
    shards.back().push_back(i);
    used += b;
  }
  return shards;
}

std::string shard_name(size_t k, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", k + 1, n);
  return buf;
}

}  // namespace

int64_t ExportTensorSpec::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

std::vector<ExportTensorSpec> hf_hybrid_tensors(const HybridConfig& cfg, const std::string& dtype) {
  const SafetensorsDType mat = matrix_dtype(dtype);
  const ModelConfig& mc = cfg.model;
  HYD_CHECK(static_cast<int64_t>(cfg.layers.size()) == mc.num_layers,
            "hf_hybrid_tensors: the HybridConfig is not finalized");
  std::map<std::string, std::vector<int64_t>> hf_shape;
  for (const HfTensorSpec& t : hf_dense_tensors(mc)) hf_shape[t.name] = t.shape;

  std::vector<ExportTensorSpec> out;
  // The KDA mixer of layer l in KdaLayer's parameter order (trainer/layer_kda.h); conv weights get the
  // PyTorch Conv1d shape [C, 1, K] (same element order as the stored [C, K]).
  auto add_kda = [&](int64_t l) {
    const KdaConfig& k = cfg.kda;
    const int64_t D = mc.hidden_size, kd = k.key_dim(), vd = k.value_dim(), K = k.conv_size;
    const std::vector<std::pair<std::string, std::vector<int64_t>>> kda = {
        {"q_proj.weight", {kd, D}},        {"k_proj.weight", {kd, D}},
        {"v_proj.weight", {vd, D}},        {"q_conv1d.weight", {kd, 1, K}},
        {"k_conv1d.weight", {kd, 1, K}},   {"v_conv1d.weight", {vd, 1, K}},
        {"f_proj.0.weight", {k.dv, D}},    {"f_proj.1.weight", {k.gate_dim(), k.dv}},
        {"b_proj.weight", {k.v_heads, D}}, {"A_log", {k.v_heads}},
        {"dt_bias", {k.gate_dim()}},       {"g_proj.0.weight", {k.dv, D}},
        {"g_proj.1.weight", {vd, k.dv}},   {"g_proj.1.bias", {vd}},
        {"o_norm.weight", {k.dv}},         {"o_proj.weight", {D, vd}}};
    const std::string p = "layers." + std::to_string(l) + ".";
    const std::string hp = "model.layers." + std::to_string(l) + ".self_attn.";
    for (const auto& [name, shape] : kda) {
      const bool fp32 = name == "A_log" || name == "dt_bias";
      out.push_back({hp + name, shape, fp32 ? SafetensorsDType::F32 : mat, p + name, 0});
    }
  };

  // The dense skeleton through the teacher loader's mapping, read backwards: a parameter made of
  // several HF tensors (concatenated along dim 0) is split at their row counts.
  for (const HfParamSource& src : hf_dense_param_sources(mc)) {
    const int64_t l = layer_of(src.param);
    if (l >= 0 && cfg.layers[static_cast<size_t>(l)] == MixerKind::kda) {
      // The teacher's attention tensors of this layer are replaced by the KDA mixer's, which go where
      // the mixer's first tensor (wqkv) would.
      const std::string rest = src.param.substr(src.param.find('.', 7) + 1);
      if (rest == "wqkv") add_kda(l);
      if (rest == "wqkv" || rest == "bqkv" || rest == "q_norm" || rest == "k_norm" || rest == "wo") continue;
    }
    int64_t row = 0;
    for (const std::string& hf : src.hf_names) {
      const auto it = hf_shape.find(hf);
      HYD_CHECK(it != hf_shape.end(), "hf_hybrid_tensors: no shape for ", hf);
      out.push_back({hf, it->second, mat, src.param, row});
      row += it->second.at(0);
    }
  }
  return out;
}

namespace {

// The fields a hybrid and a dense config.json share: the skeleton's dimensions, RoPE, token ids.
json skeleton_config_json(const ModelConfig& mc, const std::string& dtype, int64_t pad_token_id) {
  matrix_dtype(dtype);  // validates
  json j;
  j["vocab_size"] = mc.vocab_size;
  j["hidden_size"] = mc.hidden_size;
  j["intermediate_size"] = mc.intermediate_size;
  j["num_hidden_layers"] = mc.num_layers;
  j["num_attention_heads"] = mc.num_heads;
  j["num_key_value_heads"] = mc.num_kv_heads;
  j["head_dim"] = mc.head_dim;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = mc.rms_norm_eps;
  j["rope_theta"] = mc.rope_theta;
  j["rope_scaling"] = rope_scaling_json(mc);
  j["max_position_embeddings"] = mc.max_position_embeddings;
  j["tie_word_embeddings"] = mc.tie_word_embeddings;
  j["bos_token_id"] = token_id(mc.bos_token_id);
  j["eos_token_id"] = token_id(mc.eos_token_id);
  j["pad_token_id"] = token_id(pad_token_id);
  j["torch_dtype"] = dtype;
  return j;
}

}  // namespace

json hf_hybrid_config_json(const HybridConfig& cfg, const std::string& dtype, int64_t pad_token_id) {
  const ModelConfig& mc = cfg.model;
  json mixer_types = json::array();
  for (MixerKind k : cfg.layers) mixer_types.push_back(mixer_type_name(k));
  // Without K layers the KDA fields are unused: the schema's defaults keep the Python config valid.
  const bool kda = cfg.has(MixerKind::kda);
  const KdaConfig& k = cfg.kda;
  json j = skeleton_config_json(mc, dtype, pad_token_id);
  j["architectures"] = {"HydistillForCausalLM"};
  j["model_type"] = "hydistill_hybrid";
  j["auto_map"] = {{"AutoConfig", "configuration_hydistill.HydistillConfig"},
                   {"AutoModelForCausalLM", "modeling_hydistill.HydistillForCausalLM"}};
  j["attention_bias"] = mc.qkv_bias;
  j["qk_norm"] = mc.qk_norm;
  j["mixer_types"] = mixer_types;
  j["kda_num_heads"] = kda ? k.heads : mc.num_heads;
  j["kda_num_v_heads"] = kda ? k.v_heads : mc.num_heads;
  j["kda_head_dim"] = kda ? k.dk : mc.head_dim;
  j["kda_v_head_dim"] = kda ? k.dv : mc.head_dim;
  j["kda_conv_size"] = kda ? k.conv_size : int64_t(4);
  j["kda_norm_eps"] = kda ? float_as_decimal(k.norm_eps) : mc.rms_norm_eps;
  if (mc.has_moe_layers()) {
    // The exported modeling code (checkpoint/python) has qwen3_moe's MoE only: a dots1 student's sigmoid
    // router, selection bias, routed scaling and shared experts would be dropped, so it is refused.
    if (mc.moe_score_func != "softmax" || mc.moe_selection_bias || mc.num_shared_experts > 0 ||
        mc.routed_scaling_factor != 1.0 || mc.first_k_dense_replace > 0)
      throw Error::at("export", "model.family",
                      "'" + mc.family +
                          "': exporting a student of a dots1-style MoE teacher (sigmoid router, selection bias, "
                          "routed scaling, shared experts, first_k_dense_replace) is not supported yet; only "
                          "qwen3_moe-style MoE layers can be exported");
    // qwen3_moe's keys and meaning (Qwen3MoeConfig): layer l has the MoE FFN iff l is not in mlp_only_layers
    // and (l + 1) % decoder_sparse_step == 0; the others keep the SwiGLU MLP of intermediate_size.
    j["num_experts"] = mc.num_experts;
    j["num_experts_per_tok"] = mc.num_experts_per_tok;
    j["moe_intermediate_size"] = mc.moe_intermediate_size;
    j["norm_topk_prob"] = mc.norm_topk_prob;
    j["decoder_sparse_step"] = mc.decoder_sparse_step;
    j["mlp_only_layers"] = mc.mlp_only_layers;
    j["router_aux_loss_coef"] = mc.router_aux_loss_coef;
  }
  j["use_cache"] = false;
  return j;
}

json hf_dense_config_json(const ModelConfig& mc, const std::string& dtype, int64_t pad_token_id) {
  // transformers ties the biases and norms to the family: llama none, qwen2 q/k/v biases, qwen3 q/k norms.
  const bool want_bias = mc.family == "qwen2", want_norm = mc.family == "qwen3";
  if (mc.family != "llama" && mc.family != "qwen2" && mc.family != "qwen3")
    throw Error::at("export", "model.family", "'" + mc.family + "' has no transformers model (llama, qwen2, qwen3)");
  if (mc.qkv_bias != want_bias)
    throw Error::at("export", "model.qkv_bias",
                    std::string("a transformers ") + mc.family + " model " + (want_bias ? "has" : "has no") +
                        " q/k/v biases; this model " + (mc.qkv_bias ? "has" : "has none"));
  if (mc.qk_norm != want_norm)
    throw Error::at("export", "model.qk_norm",
                    std::string("a transformers ") + mc.family + " model " + (want_norm ? "has" : "has no") +
                        " q/k norms; this model " + (mc.qk_norm ? "has" : "has none"));
  static const std::map<std::string, std::string> kArchitecture = {
      {"llama", "LlamaForCausalLM"}, {"qwen2", "Qwen2ForCausalLM"}, {"qwen3", "Qwen3ForCausalLM"}};
  json j = skeleton_config_json(mc, dtype, pad_token_id);
  j["architectures"] = {kArchitecture.at(mc.family)};
  j["model_type"] = mc.family;
  if (mc.family != "qwen2") j["attention_bias"] = false;
  if (mc.family == "llama") j["mlp_bias"] = false;
  j["use_cache"] = true;
  return j;
}

bool has_tokenizer_files(const std::string& dir) {
  std::error_code ec;
  for (const char* f : kTokenizerFiles)
    if (fs::is_regular_file(fs::path(dir) / f, ec)) return true;
  return false;
}

void export_hf(const HybridModel& model, const ExportOptions& opt) {
  if (opt.out_dir.empty()) throw Error::at("export", "out", "no output directory given");
  const HybridConfig& cfg = model.config();
  const std::vector<ExportTensorSpec> specs = hf_hybrid_tensors(cfg, opt.dtype);
  if (opt.dense && (cfg.has(MixerKind::kda) || cfg.has(MixerKind::nope_attention)))
    throw Error::at("export", "dense",
                    "a dense export needs a model of T layers only, this one is " + layer_pattern_string(cfg.layers));
  const json config = opt.dense ? hf_dense_config_json(cfg.model, opt.dtype, opt.pad_token_id)
                                : hf_hybrid_config_json(cfg, opt.dtype, opt.pad_token_id);
  if (opt.shard_bytes == 0) throw Error::at("export", "shard_bytes", "must be > 0");

  // Inputs first, so that a bad one writes nothing.
  fs::path out = fs::path(opt.out_dir);
  if (!out.has_filename()) out = out.parent_path();  // "dir/" -> "dir"
  std::error_code ec;
  if (fs::exists(out, ec)) {
    if (!fs::is_directory(out, ec)) throw Error::at(out.string(), "", "exists and is not a directory; not overwritten");
    if (!fs::is_empty(out, ec)) {
      throw Error::at(out.string(), "", "exists and is not empty; refusing to overwrite (choose another --out)");
    }
  }
  std::vector<fs::path> copies;
  if (!opt.dense) {  // a dense export uses transformers' own modeling code
    if (opt.python_dir.empty())
      throw Error::at("export", "python_dir", "not given (the source tree's checkpoint/python)");
    for (const char* f : kPythonFiles) {
      const fs::path p = fs::path(opt.python_dir) / f;
      if (!fs::is_regular_file(p, ec)) throw Error::at(p.string(), "", "missing: the export ships this modeling file");
      copies.push_back(p);
    }
  }
  if (!opt.tokenizer_dir.empty()) {
    if (!fs::is_directory(opt.tokenizer_dir, ec))
      throw Error::at(opt.tokenizer_dir, "", "tokenizer directory does not exist");
    size_t found = 0;
    for (const char* f : kTokenizerFiles) {
      const fs::path p = fs::path(opt.tokenizer_dir) / f;
      if (fs::is_regular_file(p, ec)) {
        copies.push_back(p);
        ++found;
      }
    }
    if (found == 0) {
      throw Error::at(opt.tokenizer_dir, "", "no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...)");
    }
  }
  for (const ExportTensorSpec& s : specs) {
    if (!model.has_param(s.param)) throw Error::at("export", s.name, "the model has no parameter '" + s.param + "'");
  }

  const fs::path tmp = out.string() + ".tmp";
  fs::remove_all(tmp, ec);  // left over from an interrupted export: never a finished one
  if (ec) throw Error::at(tmp.string(), "", "cannot remove a stale temporary directory: " + ec.message());
  fs::create_directories(tmp, ec);
  if (ec) throw Error::at(tmp.string(), "", "cannot create: " + ec.message());

  write_text(tmp / "config.json", config.dump(2) + "\n");
  for (const fs::path& p : copies) copy_into(p, tmp);

  // Tensors, one shard in memory at a time.
  const auto shards = plan_shards(specs, opt.shard_bytes);
  json weight_map = json::object();
  uint64_t total = 0;
  std::string cached_param;
  std::vector<float> cached;
  for (size_t k = 0; k < shards.size(); ++k) {
    const std::string file = shards.size() == 1 ? "model.safetensors" : shard_name(k, shards.size());
    SafetensorsWriter w;
    w.set_metadata("format", "pt");
    for (size_t i : shards[k]) {
      const ExportTensorSpec& s = specs[i];
      if (s.param != cached_param) {
        cached = model.get_param(s.param);
        cached_param = s.param;
      }
      const int64_t cols = s.numel() / s.shape.at(0);
      const size_t begin = static_cast<size_t>(s.row_begin * cols), n = static_cast<size_t>(s.numel());
      if (begin + n > cached.size()) {
        throw Error::at("export", s.name,
                        "parameter '" + s.param + "' is smaller than the tensor's shape " + shape_to_string(s.shape));
      }
      const std::vector<float> values(cached.begin() + static_cast<std::ptrdiff_t>(begin),
                                      cached.begin() + static_cast<std::ptrdiff_t>(begin + n));
      if (s.dtype == SafetensorsDType::F32)
        w.add_f32(s.name, s.shape, values);
      else
        w.add_bf16(s.name, s.shape, values);
      weight_map[s.name] = file;
      total += s.nbytes();
    }
    w.write((tmp / file).string());
  }
  if (shards.size() > 1) {
    const json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    write_text(tmp / "model.safetensors.index.json", index.dump(2) + "\n");
  }

  if (fs::exists(out, ec)) fs::remove(out, ec);  // checked empty above
  fs::rename(tmp, out, ec);
  if (ec) throw Error::at(out.string(), "", "cannot rename " + tmp.string() + " into place: " + ec.message());
}

}  // namespace hyd

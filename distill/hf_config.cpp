#include "distill/hf_config.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "trainer/core/error.h"

namespace hyd {

namespace {

using json = nlohmann::json;

// Accessors that treat a JSON null like an absent key (HF writes nulls for unset options) and name
// the field in every error.
class ConfigReader {
 public:
  ConfigReader(const json& j, std::string source, std::string prefix = "")
      : j_(j), source_(std::move(source)), prefix_(std::move(prefix)) {}

  bool has(const char* key) const {
    auto it = j_.find(key);
    return it != j_.end() && !it->is_null();
  }
  const json& at(const char* key) const { return j_.at(key); }
  std::string field(const std::string& key) const { return prefix_ + key; }
  [[noreturn]] void fail(const std::string& key, const std::string& msg) const {
    throw Error::at(source_, field(key), msg);
  }

  int64_t required_int(const char* key) const {
    if (!has(key)) fail(key, "missing (required)");
    return int_value(key);
  }
  int64_t get_int(const char* key, int64_t fallback) const { return has(key) ? int_value(key) : fallback; }
  double required_number(const char* key) const {
    if (!has(key)) fail(key, "missing (required for this rope type)");
    return number_value(key);
  }
  double get_number(const char* key, double fallback) const { return has(key) ? number_value(key) : fallback; }
  bool get_bool(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_.at(key);
    if (!v.is_boolean()) fail(key, "expected true or false, got " + v.dump());
    return v.get<bool>();
  }
  std::string get_string(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_.at(key);
    if (!v.is_string()) fail(key, "expected a string, got " + v.dump());
    return v.get<std::string>();
  }

 private:
  int64_t int_value(const char* key) const {
    const json& v = j_.at(key);
    if (v.is_number_integer()) return v.get<int64_t>();
    // Some exporters write integral values as floats (64.0).
    if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>())
      return static_cast<int64_t>(v.get<double>());
    fail(key, "expected an integer, got " + v.dump());
  }
  double number_value(const char* key) const {
    const json& v = j_.at(key);
    if (!v.is_number()) fail(key, "expected a number, got " + v.dump());
    return v.get<double>();
  }

  const json& j_;
  std::string source_;
  std::string prefix_;
};

// HF's YaRN attention factor ("mscale") for a context extension `scale`.
double yarn_mscale(double scale, double mscale) { return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0; }

int32_t token_id(const ConfigReader& r, const char* key) {
  if (!r.has(key)) return -1;
  const json& v = r.at(key);
  const json* first = &v;
  if (v.is_array()) {
    if (v.empty()) return -1;
    first = &v[0];  // e.g. Llama 3 instruct lists several end-of-turn ids: the first is the primary eos
  }
  if (!first->is_number_integer()) r.fail(key, "expected an integer token id or a list of them, got " + v.dump());
  const int64_t id = first->get<int64_t>();
  if (id < 0 || id > std::numeric_limits<int32_t>::max()) r.fail(key, "token id out of range: " + std::to_string(id));
  return static_cast<int32_t>(id);
}

void parse_rope(const json& root, const ConfigReader& top, const std::string& source, ModelConfig& cfg) {
  // Where the RoPE parameters live: 4.x "rope_scaling" (HF gives it priority), 5.x "rope_parameters",
  // possibly nested per layer type ({"full_attention": {...}}), else only a top-level rope_theta.
  std::string where;
  if (top.has("rope_scaling"))
    where = "rope_scaling";
  else if (top.has("rope_parameters"))
    where = "rope_parameters";
  const json empty = json::object();
  const json* params = &empty;
  if (!where.empty()) {
    params = &root.at(where);
    if (!params->is_object()) top.fail(where, "expected an object, got " + params->dump());
    auto nested = params->find("full_attention");
    if (nested != params->end() && nested->is_object()) {
      params = &*nested;
      where += ".full_attention";
    }
  }
  // Errors about keys of the rope dict read "config.json: 'rope_parameters.factor': ...".
  const ConfigReader rp(*params, source, where.empty() ? "" : where + ".");

  cfg.rope_theta = rp.has("rope_theta") ? rp.get_number("rope_theta", 0) : top.get_number("rope_theta", 10000.0);
  if (!(cfg.rope_theta > 0)) (rp.has("rope_theta") ? rp : top).fail("rope_theta", "must be > 0");

  // Partial rotary embeddings (RoPE on a prefix of each head) are not implemented.
  const ConfigReader& pr = rp.has("partial_rotary_factor") ? rp : top;
  const double partial = pr.get_number("partial_rotary_factor", 1.0);
  if (static_cast<int64_t>(static_cast<double>(cfg.head_dim) * partial) != cfg.head_dim) {
    pr.fail("partial_rotary_factor",
            "partial rotary embeddings are not supported (factor " + std::to_string(partial) + ")");
  }

  const std::string type_key = rp.has("rope_type") ? "rope_type" : "type";
  const std::string type = rp.get_string(type_key.c_str(), "default");
  kernels::RopeScaling& s = cfg.rope_scaling;
  s = kernels::RopeScaling{};
  auto positive = [&](const char* key, double v) {
    if (!(v > 0)) rp.fail(key, "must be > 0, got " + std::to_string(v));
    return v;
  };
  // Pretraining context for llama3 / yarn: a top-level original_max_position_embeddings wins (as in HF),
  // then the rope dict, then max_position_embeddings.
  auto original_max = [&]() {
    if (top.has("original_max_position_embeddings")) {
      return static_cast<double>(top.required_int("original_max_position_embeddings"));
    }
    return rp.get_number("original_max_position_embeddings", static_cast<double>(cfg.max_position_embeddings));
  };

  if (type == "default") {
    s.type = "default";
  } else if (type == "linear") {
    s.type = "linear";
    s.factor = positive("factor", rp.required_number("factor"));
  } else if (type == "llama3") {
    s.type = "llama3";
    s.factor = positive("factor", rp.required_number("factor"));
    s.low_freq_factor = positive("low_freq_factor", rp.required_number("low_freq_factor"));
    s.high_freq_factor = positive("high_freq_factor", rp.required_number("high_freq_factor"));
    if (!(s.high_freq_factor > s.low_freq_factor)) rp.fail("high_freq_factor", "must be greater than low_freq_factor");
    s.original_max_position_embeddings = positive("original_max_position_embeddings", original_max());
  } else if (type == "yarn") {
    s.type = "yarn";
    s.original_max_position_embeddings = positive("original_max_position_embeddings", original_max());
    s.factor = positive("factor", rp.get_number("factor", static_cast<double>(cfg.max_position_embeddings) /
                                                              s.original_max_position_embeddings));
    // HF reads `beta_fast or 32`: a zero counts as unset.
    s.beta_fast = rp.get_number("beta_fast", 0.0);
    if (s.beta_fast == 0.0) s.beta_fast = 32.0;
    s.beta_slow = rp.get_number("beta_slow", 0.0);
    if (s.beta_slow == 0.0) s.beta_slow = 1.0;
    s.truncate = rp.get_bool("truncate", true);
    // Always resolved here, so the rope kernel never has to derive it.
    if (rp.has("attention_factor")) {
      s.attention_factor = positive("attention_factor", rp.required_number("attention_factor"));
    } else {
      const double mscale = rp.get_number("mscale", 0.0), mscale_all_dim = rp.get_number("mscale_all_dim", 0.0);
      s.attention_factor = (mscale != 0.0 && mscale_all_dim != 0.0)
                               ? yarn_mscale(s.factor, mscale) / yarn_mscale(s.factor, mscale_all_dim)
                               : yarn_mscale(s.factor, 1.0);
    }
  } else {
    rp.fail(type_key, "rope type '" + type + "' is not supported (default, linear, llama3, yarn are)");
  }
}

// Qwen3MoeConfig's expert keys (defaults as its class has them). transformers 5.x writes the expert count
// as num_local_experts; num_experts (4.x and the released checkpoints) wins when both are present.
void parse_moe(const json& j, const ConfigReader& r, ModelConfig& cfg) {
  const char* experts_key = r.has("num_experts") || !r.has("num_local_experts") ? "num_experts" : "num_local_experts";
  cfg.num_experts = r.get_int(experts_key, 128);
  if (cfg.num_experts < 0) r.fail(experts_key, "must be >= 0, got " + std::to_string(cfg.num_experts));
  cfg.num_experts_per_tok = r.get_int("num_experts_per_tok", 8);
  cfg.moe_intermediate_size = r.get_int("moe_intermediate_size", 768);
  cfg.norm_topk_prob = r.get_bool("norm_topk_prob", false);
  cfg.decoder_sparse_step = r.get_int("decoder_sparse_step", 1);
  cfg.router_aux_loss_coef = r.get_number("router_aux_loss_coef", 0.001);
  if (cfg.num_experts > 0) {
    if (cfg.num_experts_per_tok <= 0 || cfg.num_experts_per_tok > cfg.num_experts)
      r.fail("num_experts_per_tok", "must be in 1.." + std::to_string(cfg.num_experts) + " (" + experts_key +
                                        "), got " + std::to_string(cfg.num_experts_per_tok));
    if (cfg.moe_intermediate_size <= 0)
      r.fail("moe_intermediate_size", "must be > 0, got " + std::to_string(cfg.moe_intermediate_size));
    if (cfg.decoder_sparse_step <= 0)
      r.fail("decoder_sparse_step", "must be > 0, got " + std::to_string(cfg.decoder_sparse_step));
  }
  if (!(cfg.router_aux_loss_coef >= 0)) r.fail("router_aux_loss_coef", "must be >= 0");
  if (r.has("mlp_only_layers")) {
    const json& v = j.at("mlp_only_layers");
    if (!v.is_array()) r.fail("mlp_only_layers", "expected a list of layer indices, got " + v.dump());
    for (size_t i = 0; i < v.size(); ++i) {
      const std::string key = "mlp_only_layers[" + std::to_string(i) + "]";
      if (!v[i].is_number_integer()) r.fail(key, "expected a layer index, got " + v[i].dump());
      const int64_t l = v[i].get<int64_t>();
      if (l < 0 || l >= cfg.num_layers)
        r.fail(key, "layer " + std::to_string(l) + " does not exist (num_hidden_layers " +
                        std::to_string(cfg.num_layers) + ")");
      cfg.mlp_only_layers.push_back(l);
    }
  }
  // output_router_logits only makes HF add coef * L_aux to its training loss; the teacher's logits do not
  // depend on it, and the model's loss here is the plain CE (router_aux_loss_coef is kept, unused).
  (void)r.get_bool("output_router_logits", false);
}

// Dots1Config's expert keys (DeepSeek-V3-style router; defaults as its class has them, and required where it
// has none that runs). transformers writes the expert count as n_routed_experts (num_local_experts is its alias).
void parse_dots1_moe(const ConfigReader& r, ModelConfig& cfg) {
  const char* experts_key =
      r.has("n_routed_experts") || !r.has("num_local_experts") ? "n_routed_experts" : "num_local_experts";
  cfg.num_experts = r.required_int(experts_key);
  if (cfg.num_experts <= 0) r.fail(experts_key, "must be > 0, got " + std::to_string(cfg.num_experts));
  cfg.num_experts_per_tok = r.required_int("num_experts_per_tok");
  if (cfg.num_experts_per_tok <= 0 || cfg.num_experts_per_tok > cfg.num_experts)
    r.fail("num_experts_per_tok", "must be in 1.." + std::to_string(cfg.num_experts) + " (" + experts_key + "), got " +
                                      std::to_string(cfg.num_experts_per_tok));
  cfg.moe_intermediate_size = r.get_int("moe_intermediate_size", 1408);
  if (cfg.moe_intermediate_size <= 0)
    r.fail("moe_intermediate_size", "must be > 0, got " + std::to_string(cfg.moe_intermediate_size));
  // HF builds one shared MLP of width n_shared_experts * moe_intermediate_size (no default that runs).
  cfg.num_shared_experts = r.required_int("n_shared_experts");
  if (cfg.num_shared_experts < 0)
    r.fail("n_shared_experts", "must be >= 0, got " + std::to_string(cfg.num_shared_experts));
  cfg.first_k_dense_replace = r.get_int("first_k_dense_replace", 0);
  if (cfg.first_k_dense_replace < 0)
    r.fail("first_k_dense_replace", "must be >= 0, got " + std::to_string(cfg.first_k_dense_replace));
  cfg.norm_topk_prob = r.get_bool("norm_topk_prob", false);
  cfg.routed_scaling_factor = r.get_number("routed_scaling_factor", 1.0);
  if (!(cfg.routed_scaling_factor > 0) || !std::isfinite(cfg.routed_scaling_factor))
    r.fail("routed_scaling_factor", "must be a positive finite number, got " + r.at("routed_scaling_factor").dump());
  // Dots1TopkRouter always uses sigmoid scores; an explicit scoring_func (DeepSeek-V3 configs) must agree.
  const std::string scoring = r.get_string("scoring_func", "sigmoid");
  if (scoring != "sigmoid")
    r.fail("scoring_func", "'" + scoring + "' is not supported for dots1 (its router scores are sigmoid)");
  cfg.moe_score_func = "sigmoid";
  cfg.moe_selection_bias = true;  // mlp.gate.e_score_correction_bias
  // Group-limited routing (top topk_group groups of n_group, then top-k inside them) is not implemented; with
  // n_group = topk_group = 1 it is no limit at all.
  for (const char* key : {"n_group", "topk_group"}) {
    const int64_t v = r.get_int(key, 1);
    if (v != 1)
      r.fail(key, "is " + std::to_string(v) +
                      ": group-limited expert routing is not supported (only n_group = 1 and topk_group = 1, i.e. "
                      "no group limit)");
  }
  cfg.decoder_sparse_step = 1;
  cfg.router_aux_loss_coef = 0.0;  // Dots1Config has no auxiliary loss
  (void)r.get_bool("output_router_logits", false);
}

}  // namespace

ModelConfig model_config_from_hf_json(const json& j, const std::string& source) {
  if (!j.is_object()) throw Error::at(source, "", "config is not a JSON object");
  ConfigReader r(j, source);
  ModelConfig cfg;

  if (!r.has("model_type")) r.fail("model_type", "missing (expected llama, qwen2, qwen3, qwen3_moe or dots1)");
  const std::string family = r.get_string("model_type", "");
  if (family != "llama" && family != "qwen2" && family != "qwen3" && family != "qwen3_moe" && family != "dots1") {
    r.fail("model_type", "unsupported model_type '" + family + "' (supported: llama, qwen2, qwen3, qwen3_moe, dots1)");
  }
  const bool qwen3_like = family == "qwen3" || family == "qwen3_moe";  // q/k norm, head_dim default 128
  const bool dots1 = family == "dots1";  // q/k norm too, head_dim default hidden_size / heads
  cfg.family = family;

  if (r.has("quantization_config")) r.fail("quantization_config", "quantized checkpoints are not supported");
  const std::string act = r.get_string("hidden_act", "silu");
  if (act != "silu") r.fail("hidden_act", "activation '" + act + "' is not supported (the MLP is SwiGLU with silu)");

  cfg.vocab_size = r.required_int("vocab_size");
  cfg.hidden_size = r.required_int("hidden_size");
  cfg.intermediate_size = r.required_int("intermediate_size");
  cfg.num_layers = r.required_int("num_hidden_layers");
  cfg.num_heads = r.required_int("num_attention_heads");
  cfg.num_kv_heads = r.get_int("num_key_value_heads", cfg.num_heads);
  // Checked here with the HF field names; ModelConfig::finalize repeats them under its own names.
  for (auto [key, v] : {std::pair<const char*, int64_t>{"vocab_size", cfg.vocab_size},
                        {"hidden_size", cfg.hidden_size},
                        {"intermediate_size", cfg.intermediate_size},
                        {"num_hidden_layers", cfg.num_layers},
                        {"num_attention_heads", cfg.num_heads},
                        {"num_key_value_heads", cfg.num_kv_heads}}) {
    if (v <= 0) r.fail(key, "must be > 0, got " + std::to_string(v));
  }
  if (cfg.num_heads % cfg.num_kv_heads != 0) {
    r.fail("num_key_value_heads", "must divide num_attention_heads (" + std::to_string(cfg.num_heads) + "), got " +
                                      std::to_string(cfg.num_kv_heads));
  }
  // head_dim: explicit when present; Qwen3's config class defaults it to 128, the others derive it.
  const int64_t derived_head_dim = cfg.hidden_size / cfg.num_heads;
  cfg.head_dim = r.get_int("head_dim", qwen3_like ? 128 : derived_head_dim);
  if (cfg.head_dim <= 0 || cfg.head_dim % 2 != 0) {
    r.fail("head_dim", "must be positive and even (RoPE rotates halves), got " + std::to_string(cfg.head_dim));
  }
  cfg.rms_norm_eps = r.get_number("rms_norm_eps", 1e-6);
  if (!(cfg.rms_norm_eps > 0)) r.fail("rms_norm_eps", "must be > 0");
  cfg.max_position_embeddings = r.get_int("max_position_embeddings", family == "llama" ? 2048 : 32768);
  cfg.tie_word_embeddings = r.get_bool("tie_word_embeddings", false);
  cfg.bos_token_id = token_id(r, "bos_token_id");
  cfg.eos_token_id = token_id(r, "eos_token_id");

  // Biases and norms by family. Llama and Qwen3 put attention_bias on q, k, v and o; the dense model
  // has no o_proj bias, so attention_bias=true is refused. Qwen2 always has q/k/v biases and no o bias.
  if (family == "qwen2") {
    cfg.qkv_bias = true;
  } else if (r.get_bool("attention_bias", false)) {
    r.fail("attention_bias", "true adds an o_proj bias, which the dense model does not implement");
  }
  cfg.qk_norm = qwen3_like || dots1;
  if (r.get_bool("mlp_bias", false)) r.fail("mlp_bias", "MLP biases are not supported");
  if (family == "qwen3_moe") parse_moe(j, r, cfg);
  if (dots1) parse_dots1_moe(r, cfg);

  // Sliding-window attention: the explicit per-layer list when present, else the Qwen rule
  // (layers >= max_window_layers slide when use_sliding_window and sliding_window are set).
  if (r.has("layer_types")) {
    const json& lt = j.at("layer_types");
    if (!lt.is_array()) r.fail("layer_types", "expected a list of strings");
    for (size_t i = 0; i < lt.size(); ++i) {
      if (!lt[i].is_string() || lt[i].get<std::string>() != "full_attention") {
        r.fail("layer_types[" + std::to_string(i) + "]",
               "layer type " + lt[i].dump() + " is not supported (only full_attention; no sliding window)");
      }
    }
  } else if (dots1) {
    // Dots1Config: layers >= max_window_layers slide whenever sliding_window is set (an absent key means its
    // default 4096, an explicit null none); there is no use_sliding_window switch.
    const bool window = !j.contains("sliding_window") || !j.at("sliding_window").is_null();
    if (window && r.get_int("max_window_layers", 62) < cfg.num_layers)
      r.fail("max_window_layers",
             "is below num_hidden_layers with sliding_window set: sliding-window attention "
             "is not supported");
  } else if (r.get_bool("use_sliding_window", false) && r.has("sliding_window") &&
             r.get_int("max_window_layers", 0) < cfg.num_layers) {
    r.fail("use_sliding_window", "sliding-window attention is not supported");
  }

  parse_rope(j, r, source, cfg);
  cfg.finalize(source);
  return cfg;
}

ModelConfig read_hf_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error::at(path, "", "cannot open (expected a Hugging Face config.json)");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::parse_error& e) {
    throw Error::at(path, "", std::string("malformed JSON: ") + e.what());
  }
  return model_config_from_hf_json(j, path);
}

}  // namespace hyd

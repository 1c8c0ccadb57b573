#include "distill/teacher.h"

#include <filesystem>
#include <map>
#include <set>
#include <sstream>

#include "checkpoint/safetensors.h"
#include "distill/hf_config.h"
#include "trainer/core/error.h"

namespace hyd {

namespace {

namespace fs = std::filesystem;

std::string layer_prefix(int64_t l) { return "model.layers." + std::to_string(l) + "."; }

// Tensors HF checkpoints may carry that the model does not use and that are safe to ignore.
bool harmless_extra(const std::string& name, const ModelConfig& cfg) {
  const std::string inv = "rotary_emb.inv_freq";
  if (name.size() >= inv.size() && name.compare(name.size() - inv.size(), inv.size(), inv) == 0) return true;
  // Some exporters keep lm_head.weight next to tied embeddings; HF ties it to embed_tokens on load.
  return cfg.tie_word_embeddings && name == "lm_head.weight";
}

std::string human_bytes(uint64_t b) {
  std::ostringstream os;
  os.precision(3);
  if (b >= (uint64_t(1) << 30))
    os << double(b) / double(uint64_t(1) << 30) << " GiB";
  else if (b >= (uint64_t(1) << 20))
    os << double(b) / double(uint64_t(1) << 20) << " MiB";
  else if (b >= 1024)
    os << double(b) / 1024.0 << " KiB";
  else
    os << b << " B";
  return os.str();
}

std::string human_count(int64_t n) {
  std::ostringstream os;
  os.precision(4);
  if (n >= 1000000000)
    os << double(n) / 1e9 << " B";
  else if (n >= 1000000)
    os << double(n) / 1e6 << " M";
  else if (n >= 1000)
    os << double(n) / 1e3 << " K";
  else
    os << n;
  return os.str();
}

struct OpenTeacher {
  TeacherInfo info;
  SafetensorsCheckpoint ckpt;
};

// Opens config + tensors and checks them against each other.
OpenTeacher open_teacher(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error::at(dir, "", "teacher directory does not exist");
  const std::string config_path = (fs::path(dir) / "config.json").string();
  if (!fs::exists(config_path, ec)) throw Error::at(config_path, "", "missing: a teacher directory needs config.json");

  OpenTeacher t;
  t.info.config = read_hf_config(config_path);
  const ModelConfig& cfg = t.info.config;
  t.ckpt.open_dir(dir);
  const auto& ck = t.ckpt;

  t.info.files.push_back(config_path);
  if (ck.sharded()) t.info.files.push_back(ck.source());
  for (const auto& f : ck.files()) t.info.files.push_back(f);

  std::set<std::string> expected;
  std::map<std::string, int> dtype_counts;
  for (const auto& spec : hf_dense_tensors(cfg)) {
    expected.insert(spec.name);
    if (!ck.contains(spec.name)) {
      throw Error::at(ck.source(), spec.name,
                      "missing tensor (config.json of model_type " + cfg.family + " needs shape " +
                          shape_to_string(spec.shape) + ")");
    }
    const auto& ti = ck.info(spec.name);
    if (ti.shape != spec.shape) {
      throw Error::at(
          ck.file_of(spec.name), spec.name,
          "shape " + ti.shape_str() + " does not match " + shape_to_string(spec.shape) + " implied by config.json");
    }
    if (ti.dtype != SafetensorsDType::F32 && ti.dtype != SafetensorsDType::BF16 && ti.dtype != SafetensorsDType::F16 &&
        ti.dtype != SafetensorsDType::F64) {
      throw Error::at(
          ck.file_of(spec.name), spec.name,
          std::string("dtype ") + safetensors_dtype_name(ti.dtype) + " is not a float type (F32, BF16, F16)");
    }
    ++dtype_counts[safetensors_dtype_name(ti.dtype)];
    t.info.num_parameters += ti.numel();
  }
  std::vector<std::string> ignored;
  for (const auto& name : ck.names()) {
    if (expected.count(name)) continue;
    if (!harmless_extra(name, cfg)) {
      throw Error::at(ck.file_of(name), name,
                      "unexpected tensor for model_type " + cfg.family + " with this config.json (not a " + cfg.family +
                          " weight of these dimensions)");
    }
    if (name == "lm_head.weight") {
      const std::vector<int64_t> want{cfg.vocab_size, cfg.hidden_size};
      if (ck.info(name).shape != want) {
        throw Error::at(ck.file_of(name), name,
                        "shape " + ck.info(name).shape_str() + " does not match " + shape_to_string(want));
      }
    }
    ignored.push_back(name);
  }

  // Summary for `hydistill inspect`.
  std::ostringstream os;
  os << "teacher " << dir << "\n";
  os << "  model_type        " << cfg.family << (cfg.qk_norm ? " (q/k norm)" : "")
     << (cfg.qkv_bias ? " (qkv bias)" : "") << "\n";
  os << "  layers            " << cfg.num_layers << "\n";
  os << "  hidden / ffn      " << cfg.hidden_size << " / " << cfg.intermediate_size << "\n";
  if (cfg.num_experts > 0) {
    int64_t sparse = 0;
    for (int64_t l = 0; l < cfg.num_layers; ++l) sparse += cfg.is_moe_layer(l) ? 1 : 0;
    os << "  experts           " << cfg.num_experts << " (top " << cfg.num_experts_per_tok << ", ffn "
       << cfg.moe_intermediate_size << (cfg.norm_topk_prob ? ", normalised top-k" : "") << ") in " << sparse << " of "
       << cfg.num_layers << " layers\n";
    if (cfg.family == "dots1") {
      os << "  router            " << cfg.moe_score_func << (cfg.moe_selection_bias ? ", selection bias" : "")
         << ", scale " << cfg.routed_scaling_factor << ", " << cfg.num_shared_experts << " shared experts (ffn "
         << cfg.shared_expert_ffn() << "), first " << cfg.first_k_dense_replace << " layers dense\n";
    }
  }
  os << "  heads / kv heads  " << cfg.num_heads << " / " << cfg.num_kv_heads << ", head_dim " << cfg.head_dim << "\n";
  os << "  vocab             " << cfg.vocab_size
     << (cfg.tie_word_embeddings ? " (tied embeddings)" : " (untied lm_head)") << "\n";
  os << "  rope              theta " << cfg.rope_theta << ", " << cfg.rope_scaling.type;
  if (cfg.rope_scaling.type != "default") {
    os << " (factor " << cfg.rope_scaling.factor;
    if (cfg.rope_scaling.type == "llama3") {
      os << ", low " << cfg.rope_scaling.low_freq_factor << ", high " << cfg.rope_scaling.high_freq_factor;
    }
    if (cfg.rope_scaling.type == "yarn") {
      os << ", beta " << cfg.rope_scaling.beta_fast << "/" << cfg.rope_scaling.beta_slow << ", attention factor "
         << cfg.rope_scaling.attention_factor;
    }
    if (cfg.rope_scaling.original_max_position_embeddings > 0) {
      os << ", original context " << cfg.rope_scaling.original_max_position_embeddings;
    }
    os << ")";
  }
  os << "\n";
  os << "  max positions     " << cfg.max_position_embeddings << ", rms_norm_eps " << cfg.rms_norm_eps << "\n";
  os << "  bos / eos         " << cfg.bos_token_id << " / " << cfg.eos_token_id << "\n";
  os << "  parameters        " << t.info.num_parameters << " (" << human_count(t.info.num_parameters) << ")";
  os << ", stored as";
  for (const auto& [d, n] : dtype_counts) os << " " << d << " x" << n;
  os << "\n";
  os << "  files            ";
  for (const auto& f : t.info.files) {
    os << " " << fs::path(f).filename().string() << " (" << human_bytes(fs::file_size(f, ec)) << ")";
  }
  os << "\n";
  if (!ignored.empty()) {
    os << "  ignored tensors  ";
    for (const auto& n : ignored) os << " " << n;
    os << "\n";
  }
  t.info.summary = os.str();
  return t;
}

}  // namespace

std::vector<HfTensorSpec> hf_dense_tensors(const ModelConfig& cfg) {
  const int64_t D = cfg.hidden_size, F = cfg.intermediate_size, V = cfg.vocab_size, d = cfg.head_dim;
  std::vector<HfTensorSpec> out;
  out.push_back({"model.embed_tokens.weight", {V, D}});
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const std::string p = layer_prefix(l);
    out.push_back({p + "input_layernorm.weight", {D}});
    out.push_back({p + "self_attn.q_proj.weight", {cfg.q_dim(), D}});
    out.push_back({p + "self_attn.k_proj.weight", {cfg.kv_dim(), D}});
    out.push_back({p + "self_attn.v_proj.weight", {cfg.kv_dim(), D}});
    if (cfg.qkv_bias) {
      out.push_back({p + "self_attn.q_proj.bias", {cfg.q_dim()}});
      out.push_back({p + "self_attn.k_proj.bias", {cfg.kv_dim()}});
      out.push_back({p + "self_attn.v_proj.bias", {cfg.kv_dim()}});
    }
    if (cfg.qk_norm) {
      out.push_back({p + "self_attn.q_norm.weight", {d}});
      out.push_back({p + "self_attn.k_norm.weight", {d}});
    }
    out.push_back({p + "self_attn.o_proj.weight", {D, cfg.q_dim()}});
    out.push_back({p + "post_attention_layernorm.weight", {D}});
    if (cfg.is_moe_layer(l)) {
      const int64_t Fe = cfg.moe_intermediate_size;
      out.push_back({p + "mlp.gate.weight", {cfg.num_experts, D}});
      if (cfg.moe_selection_bias) out.push_back({p + "mlp.gate.e_score_correction_bias", {cfg.num_experts}});
      for (int64_t e = 0; e < cfg.num_experts; ++e) {
        const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
        out.push_back({x + "gate_proj.weight", {Fe, D}});
        out.push_back({x + "up_proj.weight", {Fe, D}});
        out.push_back({x + "down_proj.weight", {D, Fe}});
      }
      if (const int64_t Fs = cfg.shared_expert_ffn(); Fs > 0) {
        out.push_back({p + "mlp.shared_experts.gate_proj.weight", {Fs, D}});
        out.push_back({p + "mlp.shared_experts.up_proj.weight", {Fs, D}});
        out.push_back({p + "mlp.shared_experts.down_proj.weight", {D, Fs}});
      }
    } else {
      out.push_back({p + "mlp.gate_proj.weight", {F, D}});
      out.push_back({p + "mlp.up_proj.weight", {F, D}});
      out.push_back({p + "mlp.down_proj.weight", {D, F}});
    }
  }
  out.push_back({"model.norm.weight", {D}});
  if (!cfg.tie_word_embeddings) out.push_back({"lm_head.weight", {V, D}});
  return out;
}

std::vector<HfParamSource> hf_dense_param_sources(const ModelConfig& cfg) {
  std::vector<HfParamSource> out;
  out.push_back({"embed", {"model.embed_tokens.weight"}});
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const std::string p = layer_prefix(l);
    const std::string q = "layers." + std::to_string(l) + ".";
    out.push_back({q + "attn_norm", {p + "input_layernorm.weight"}});
    out.push_back(
        {q + "wqkv", {p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"}});
    if (cfg.qkv_bias) {
      out.push_back(
          {q + "bqkv", {p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias", p + "self_attn.v_proj.bias"}});
    }
    if (cfg.qk_norm) {
      out.push_back({q + "q_norm", {p + "self_attn.q_norm.weight"}});
      out.push_back({q + "k_norm", {p + "self_attn.k_norm.weight"}});
    }
    out.push_back({q + "wo", {p + "self_attn.o_proj.weight"}});
    out.push_back({q + "mlp_norm", {p + "post_attention_layernorm.weight"}});
    if (cfg.is_moe_layer(l)) {
      // Stacked expert storage (trainer/model.h): per expert gate rows then up rows; then the down matrices.
      HfParamSource gate_up{q + "mlp.gate_up", {}}, down{q + "mlp.down", {}};
      for (int64_t e = 0; e < cfg.num_experts; ++e) {
        const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
        gate_up.hf_names.push_back(x + "gate_proj.weight");
        gate_up.hf_names.push_back(x + "up_proj.weight");
        down.hf_names.push_back(x + "down_proj.weight");
      }
      out.push_back({q + "mlp.gate.weight", {p + "mlp.gate.weight"}});
      out.push_back(std::move(gate_up));
      out.push_back(std::move(down));
      // dots1: HF's one shared MLP is the stack of one shared expert; the selection bias a [E] buffer.
      if (cfg.shared_expert_ffn() > 0) {
        const std::string x = p + "mlp.shared_experts.";
        out.push_back({q + "mlp.shared_gate_up", {x + "gate_proj.weight", x + "up_proj.weight"}});
        out.push_back({q + "mlp.shared_down", {x + "down_proj.weight"}});
      }
      if (cfg.moe_selection_bias)
        out.push_back({q + "mlp.gate.e_score_correction_bias", {p + "mlp.gate.e_score_correction_bias"}});
    } else {
      out.push_back({q + "w_gate_up", {p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"}});
      out.push_back({q + "w_down", {p + "mlp.down_proj.weight"}});
    }
  }
  out.push_back({"final_norm", {"model.norm.weight"}});
  if (!cfg.tie_word_embeddings) out.push_back({"lm_head", {"lm_head.weight"}});
  return out;
}

TeacherInfo inspect_teacher(const std::string& dir) { return open_teacher(dir).info; }

namespace {

const ModelConfig& model_config_of(const DenseModel& m) { return m.config(); }
const ModelConfig& model_config_of(const HybridModel& m) { return m.config().model; }

// The loader of both targets: every tensor into `model`; with expert shards (S > 1) only the routed
// experts [shard E / S, (shard + 1) E / S) of each MoE layer, into its local storage.
template <class Model>
void load_into(const std::string& dir, Model& model, int64_t shards, int64_t shard) {
  OpenTeacher t = open_teacher(dir);
  const ModelConfig& tc = t.info.config;
  const ModelConfig& mc = model_config_of(model);
  const std::string config_path = t.info.files.front();

  // The model must have the teacher's architecture; name the first config.json field that differs.
  auto same = [&](const char* field, auto teacher_value, auto model_value) {
    if (teacher_value != model_value) {
      std::ostringstream os;
      os << std::boolalpha << "teacher has " << teacher_value << " but the model was built with " << model_value;
      throw Error::at(config_path, field, os.str());
    }
  };
  same("vocab_size", tc.vocab_size, mc.vocab_size);
  same("hidden_size", tc.hidden_size, mc.hidden_size);
  same("intermediate_size", tc.intermediate_size, mc.intermediate_size);
  same("num_hidden_layers", tc.num_layers, mc.num_layers);
  same("num_attention_heads", tc.num_heads, mc.num_heads);
  same("num_key_value_heads", tc.num_kv_heads, mc.num_kv_heads);
  same("head_dim", tc.head_dim, mc.head_dim);
  same("tie_word_embeddings", tc.tie_word_embeddings, mc.tie_word_embeddings);
  same("model_type (q/k norm)", tc.qk_norm, mc.qk_norm);
  same("model_type (qkv bias)", tc.qkv_bias, mc.qkv_bias);
  same("num_experts", tc.num_experts, mc.num_experts);
  if (tc.num_experts > 0) {
    same("num_experts_per_tok", tc.num_experts_per_tok, mc.num_experts_per_tok);
    same("moe_intermediate_size", tc.moe_intermediate_size, mc.moe_intermediate_size);
    same("norm_topk_prob", tc.norm_topk_prob, mc.norm_topk_prob);
    same("scoring_func", tc.moe_score_func, mc.moe_score_func);
    same("e_score_correction_bias (selection bias)", tc.moe_selection_bias, mc.moe_selection_bias);
    same("routed_scaling_factor", tc.routed_scaling_factor, mc.routed_scaling_factor);
    same("n_shared_experts", tc.num_shared_experts, mc.num_shared_experts);
    for (int64_t l = 0; l < tc.num_layers; ++l) {
      const std::string field =
          "decoder_sparse_step / mlp_only_layers / first_k_dense_replace (layer " + std::to_string(l) + " is MoE)";
      same(field.c_str(), tc.is_moe_layer(l), mc.is_moe_layer(l));
    }
  }

  std::set<std::string> filled;
  for (auto src : hf_dense_param_sources(tc)) {
    if (shards > 1 && (src.param.ends_with(".mlp.gate_up") || src.param.ends_with(".mlp.down"))) {
      // HF's per-expert tensors, in expert order (gate_up: gate, up per expert): keep this shard's.
      const size_t per = src.hf_names.size() / static_cast<size_t>(tc.num_experts);
      const size_t local = static_cast<size_t>(tc.num_experts / shards), first = static_cast<size_t>(shard) * local;
      src.hf_names = std::vector<std::string>(src.hf_names.begin() + static_cast<std::ptrdiff_t>(first * per),
                                              src.hf_names.begin() + static_cast<std::ptrdiff_t>((first + local) * per));
    }
    if (!model.has_param(src.param)) {
      throw Error::at(config_path, src.param, "the model has no parameter for teacher tensor " + src.hf_names.front());
    }
    const ParamInfo& p = model.param(src.param);
    std::vector<float> buf;
    buf.reserve(static_cast<size_t>(p.numel));
    int64_t rows = 0;
    for (const auto& hf : src.hf_names) {
      const auto& ti = t.ckpt.info(hf);
      rows += ti.shape[0];
      std::vector<float> v = t.ckpt.read_f32(hf);
      buf.insert(buf.end(), v.begin(), v.end());
    }
    std::vector<int64_t> shape = t.ckpt.info(src.hf_names.front()).shape;
    shape[0] = rows;
    // Stacked expert parameters [E, R, C] are filled from R x C matrices concatenated to [E R, C].
    std::vector<int64_t> want = p.shape;
    if (want.size() == 3) want = {want[0] * want[1], want[2]};
    if (shape != want || static_cast<int64_t>(buf.size()) != p.numel) {
      throw Error::at(t.ckpt.file_of(src.hf_names.front()), src.hf_names.front(),
                      "assembles parameter '" + src.param + "' of shape " + shape_to_string(shape) +
                          " but the model's is " + shape_to_string(p.shape));
    }
    model.set_param(src.param, buf.data(), static_cast<int64_t>(buf.size()));
    filled.insert(src.param);
  }
  for (const auto& p : model.params()) {
    if (!filled.count(p.name)) {
      throw Error::at(config_path, p.name, "model parameter has no tensor in the teacher checkpoint");
    }
  }
}

}  // namespace

void load_teacher_weights(const std::string& dir, DenseModel& model) { load_into(dir, model, 1, 0); }

void load_teacher_weights(const std::string& dir, HybridModel& model) {
  const HybridConfig& c = model.config();
  for (MixerKind k : c.layers)
    if (k != MixerKind::teacher_attention)
      throw Error::at(dir, "teacher", "load_teacher_weights: the HybridModel must be all-T (the teacher's own layers), "
                                      "its pattern is " + layer_pattern_string(c.layers));
  load_into(dir, model, c.expert_shards, c.expert_shard);
}

}  // namespace hyd

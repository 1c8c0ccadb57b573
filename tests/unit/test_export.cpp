// export_hf (checkpoint/export.h): a tiny HybridModel with K, A and T layers exported and read back.
//   * Layout: for llama (untied), qwen2 (qkv bias) and qwen3 (q/k norm, tied) skeletons, in float32 and
//     bfloat16: the file holds exactly the tensors of docs/export.md's table (the expected list is written
//     here from the table, independently of the exporter's own), each with its shape and dtype (A_log and
//     dt_bias F32 always), and each value equals the model parameter it comes from (split rows of wqkv /
//     w_gate_up, conv weights [C, K] -> [C, 1, K]; bf16-rounded when bf16). The attention and MLP names of
//     T layers are the teacher loader's (hf_dense_tensors). config.json has every schema field with the
//     model's values; the two .py files are byte copies; tokenizer files (only those) are copied.
//   * Sharding: with a tiny shard_bytes the index maps every tensor to a shard that holds it, shard names
//     are model-0000k-of-0000n, no shard exceeds the limit unless it holds a single tensor, total_size is
//     the sum, and the values read through SafetensorsCheckpoint equal the model's.
//   * Refusals: a non-empty out dir (its content untouched), a file in the way, a bad dtype, a missing
//     python dir or tokenizer dir: errors naming the path / field, nothing written, no OUT.tmp left.
// ExportParity.WriteCase: only when HYD_EXPORT_PARITY_DIR is set (tests/cli/test_export_parity.sh sets
// it); writes f32 and bf16 exports plus input ids and the C++ f32 logits for
// tests/python/check_export_parity.py, which compares them with transformers' forward.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint/export.h"
#include "checkpoint/safetensors.h"
#include "distill/teacher.h"
#include "tests/common/test_util.h"
#include "tests/common/tiny_model.h"
#include "trainer/hybrid_model.h"

namespace hyd {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kPythonDir = std::string(HYD_SOURCE_DIR) + "/checkpoint/python";

// The tiny dense skeleton (V=61, D=32, F=40, Hq=4, Hkv=2, d=8) with KDA H=2, HV=4, dk=8, dv=4, conv 3
// (dv != dk and conv != 4 so that a swapped dimension shows), and kda.norm_eps != rms_norm_eps.
HybridConfig tiny_hybrid(const std::string& variant, const std::string& pattern, int64_t layers = 4) {
  HybridConfig c;
  c.model = test::tiny_dense_variant(variant);
  c.model.num_layers = layers;
  c.model.bos_token_id = 1;
  c.model.eos_token_id = 2;
  c.kda.heads = 2;
  c.kda.v_heads = 4;
  c.kda.dk = 8;
  c.kda.dv = 4;
  c.kda.conv_size = 3;
  c.kda.norm_eps = 1e-5f;
  c.pattern = pattern;
  c.finalize("test");
  return c;
}

// docs/export.md's tensor table for this config, with the parameter slice each tensor comes from.
struct Expected {
  std::vector<int64_t> shape;
  SafetensorsDType dtype;
  std::string param;
  int64_t row_begin;
};
std::map<std::string, Expected> expected_tensors(const HybridConfig& c, SafetensorsDType mat) {
  const ModelConfig& m = c.model;
  const int64_t V = m.vocab_size, D = m.hidden_size, F = m.intermediate_size, A = m.num_heads, G = m.num_kv_heads,
                d = m.head_dim;
  const int64_t H = c.kda.heads, HV = c.kda.v_heads, dk = c.kda.dk, dv = c.kda.dv, K = c.kda.conv_size;
  std::map<std::string, Expected> e;
  e["model.embed_tokens.weight"] = {{V, D}, mat, "embed", 0};
  e["model.norm.weight"] = {{D}, mat, "final_norm", 0};
  if (!m.tie_word_embeddings) e["lm_head.weight"] = {{V, D}, mat, "lm_head", 0};
  for (int64_t l = 0; l < m.num_layers; ++l) {
    const std::string h = "model.layers." + std::to_string(l) + ".", p = "layers." + std::to_string(l) + ".";
    const std::string sa = h + "self_attn.";
    e[h + "input_layernorm.weight"] = {{D}, mat, p + "attn_norm", 0};
    e[h + "post_attention_layernorm.weight"] = {{D}, mat, p + "mlp_norm", 0};
    e[h + "mlp.gate_proj.weight"] = {{F, D}, mat, p + "w_gate_up", 0};
    e[h + "mlp.up_proj.weight"] = {{F, D}, mat, p + "w_gate_up", F};
    e[h + "mlp.down_proj.weight"] = {{D, F}, mat, p + "w_down", 0};
    if (c.layers[static_cast<size_t>(l)] == MixerKind::kda) {
      e[sa + "q_proj.weight"] = {{H * dk, D}, mat, p + "q_proj.weight", 0};
      e[sa + "k_proj.weight"] = {{H * dk, D}, mat, p + "k_proj.weight", 0};
      e[sa + "v_proj.weight"] = {{HV * dv, D}, mat, p + "v_proj.weight", 0};
      e[sa + "q_conv1d.weight"] = {{H * dk, 1, K}, mat, p + "q_conv1d.weight", 0};
      e[sa + "k_conv1d.weight"] = {{H * dk, 1, K}, mat, p + "k_conv1d.weight", 0};
      e[sa + "v_conv1d.weight"] = {{HV * dv, 1, K}, mat, p + "v_conv1d.weight", 0};
      e[sa + "f_proj.0.weight"] = {{dv, D}, mat, p + "f_proj.0.weight", 0};
      e[sa + "f_proj.1.weight"] = {{HV * dk, dv}, mat, p + "f_proj.1.weight", 0};
      e[sa + "b_proj.weight"] = {{HV, D}, mat, p + "b_proj.weight", 0};
      e[sa + "A_log"] = {{HV}, SafetensorsDType::F32, p + "A_log", 0};
      e[sa + "dt_bias"] = {{HV * dk}, SafetensorsDType::F32, p + "dt_bias", 0};
      e[sa + "g_proj.0.weight"] = {{dv, D}, mat, p + "g_proj.0.weight", 0};
      e[sa + "g_proj.1.weight"] = {{HV * dv, dv}, mat, p + "g_proj.1.weight", 0};
      e[sa + "g_proj.1.bias"] = {{HV * dv}, mat, p + "g_proj.1.bias", 0};
      e[sa + "o_norm.weight"] = {{dv}, mat, p + "o_norm.weight", 0};
      e[sa + "o_proj.weight"] = {{D, HV * dv}, mat, p + "o_proj.weight", 0};
    } else {
      e[sa + "q_proj.weight"] = {{A * d, D}, mat, p + "wqkv", 0};
      e[sa + "k_proj.weight"] = {{G * d, D}, mat, p + "wqkv", A * d};
      e[sa + "v_proj.weight"] = {{G * d, D}, mat, p + "wqkv", A * d + G * d};
      if (m.qkv_bias) {
        e[sa + "q_proj.bias"] = {{A * d}, mat, p + "bqkv", 0};
        e[sa + "k_proj.bias"] = {{G * d}, mat, p + "bqkv", A * d};
        e[sa + "v_proj.bias"] = {{G * d}, mat, p + "bqkv", A * d + G * d};
      }
      if (m.qk_norm) {
        e[sa + "q_norm.weight"] = {{d}, mat, p + "q_norm", 0};
        e[sa + "k_norm.weight"] = {{d}, mat, p + "k_norm", 0};
      }
      e[sa + "o_proj.weight"] = {{D, A * d}, mat, p + "wo", 0};
    }
  }
  return e;
}

std::vector<float> expected_values(const HybridModel& model, const Expected& e, bool bf16) {
  const std::vector<float> all = model.get_param(e.param);
  int64_t n = 1;
  for (int64_t s : e.shape) n *= s;
  const int64_t cols = n / e.shape.at(0);
  std::vector<float> v(all.begin() + e.row_begin * cols, all.begin() + e.row_begin * cols + n);
  return bf16 ? test::round_bf16(v) : v;
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

json read_json(const fs::path& p) { return json::parse(read_file(p)); }

// Every expected tensor present with its shape, dtype and values; nothing else stored.
template <class Reader>
void check_tensors(const Reader& r, const std::vector<std::string>& names, const HybridModel& model,
                   const std::string& dtype, const std::string& what) {
  const bool bf16 = dtype == "bfloat16";
  const auto expected = expected_tensors(model.config(), bf16 ? SafetensorsDType::BF16 : SafetensorsDType::F32);
  std::set<std::string> stored(names.begin(), names.end());
  for (const auto& [name, e] : expected) {
    SCOPED_TRACE(what + " " + name);
    ASSERT_TRUE(r.contains(name)) << "missing";
    const SafetensorsTensorInfo& ti = r.info(name);
    EXPECT_EQ(ti.shape, e.shape);
    EXPECT_EQ(safetensors_dtype_name(ti.dtype), std::string(safetensors_dtype_name(e.dtype)));
    const std::vector<float> got = r.read_f32(name);
    const std::vector<float> want = expected_values(model, e, e.dtype == SafetensorsDType::BF16);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(got, want) << "values differ from parameter " << e.param;
    stored.erase(name);
  }
  EXPECT_TRUE(stored.empty()) << what << ": unexpected tensor " << (stored.empty() ? "" : *stored.begin());
}

void check_config(const json& j, const HybridConfig& c, const std::string& dtype) {
  const ModelConfig& m = c.model;
  EXPECT_EQ(j.at("model_type"), "hydistill_hybrid");
  EXPECT_EQ(j.at("architectures"), json::array({"HydistillForCausalLM"}));
  EXPECT_EQ(j.at("auto_map").at("AutoConfig"), "configuration_hydistill.HydistillConfig");
  EXPECT_EQ(j.at("auto_map").at("AutoModelForCausalLM"), "modeling_hydistill.HydistillForCausalLM");
  EXPECT_EQ(j.at("vocab_size"), m.vocab_size);
  EXPECT_EQ(j.at("hidden_size"), m.hidden_size);
  EXPECT_EQ(j.at("intermediate_size"), m.intermediate_size);
  EXPECT_EQ(j.at("num_hidden_layers"), m.num_layers);
  EXPECT_EQ(j.at("num_attention_heads"), m.num_heads);
  EXPECT_EQ(j.at("num_key_value_heads"), m.num_kv_heads);
  EXPECT_EQ(j.at("head_dim"), m.head_dim);
  EXPECT_EQ(j.at("hidden_act"), "silu");
  EXPECT_DOUBLE_EQ(j.at("rms_norm_eps").get<double>(), m.rms_norm_eps);
  EXPECT_DOUBLE_EQ(j.at("rope_theta").get<double>(), m.rope_theta);
  if (m.rope_scaling.type == "default") {
    EXPECT_TRUE(j.at("rope_scaling").is_null());
  } else {
    EXPECT_EQ(j.at("rope_scaling").at("rope_type"), m.rope_scaling.type);
    EXPECT_DOUBLE_EQ(j.at("rope_scaling").at("factor").get<double>(), m.rope_scaling.factor);
  }
  EXPECT_EQ(j.at("max_position_embeddings"), m.max_position_embeddings);
  EXPECT_EQ(j.at("tie_word_embeddings"), m.tie_word_embeddings);
  EXPECT_EQ(j.at("attention_bias"), m.qkv_bias);
  EXPECT_EQ(j.at("qk_norm"), m.qk_norm);
  json types = json::array();
  for (MixerKind k : c.layers)
    types.push_back(k == MixerKind::kda ? "kda" : k == MixerKind::nope_attention ? "nope_attention" : "rope_attention");
  EXPECT_EQ(j.at("mixer_types"), types);
  EXPECT_FALSE(j.contains("layer_types"));
  EXPECT_EQ(j.at("kda_num_heads"), c.kda.heads);
  EXPECT_EQ(j.at("kda_num_v_heads"), c.kda.v_heads);
  EXPECT_EQ(j.at("kda_head_dim"), c.kda.dk);
  EXPECT_EQ(j.at("kda_v_head_dim"), c.kda.dv);
  EXPECT_EQ(j.at("kda_conv_size"), c.kda.conv_size);
  EXPECT_EQ(static_cast<float>(j.at("kda_norm_eps").get<double>()), c.kda.norm_eps);
  EXPECT_EQ(j.at("bos_token_id"), m.bos_token_id);
  EXPECT_EQ(j.at("eos_token_id"), m.eos_token_id);
  EXPECT_TRUE(j.at("pad_token_id").is_null());
  EXPECT_EQ(j.at("torch_dtype"), dtype);
}

struct Variant {
  const char* skeleton;
  const char* pattern;
};
// llama: untied; qwen2: qkv bias; qwen3: q/k norm and tied embeddings. Every pattern has K, A and T.
const Variant kVariants[] = {{"llama", "K,A,T,K"}, {"qwen2", "T,K,K,A"}, {"qwen3", "K,T,A,K"}};

TEST(Export, LayoutValuesAndConfig) {
  // A fake teacher folder: tokenizer files and things that must not be copied.
  test::TempDir teacher("hyd_export_teacher_");
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "merges.txt",
                        "config.json", "model.safetensors"}) {
    std::ofstream(teacher.file(f)) << "{\"name\": \"" << f << "\"}\n";
  }
  for (const Variant& v : kVariants) {
    const HybridConfig cfg = tiny_hybrid(v.skeleton, v.pattern);
    HybridModel model(cfg, Device::cpu(), 16);
    test::randomize_hybrid(model);
    for (const std::string dtype : {"float32", "bfloat16"}) {
      const std::string what = std::string(v.skeleton) + " " + v.pattern + " " + dtype;
      SCOPED_TRACE(what);
      test::TempDir tmp("hyd_export_");
      const fs::path out = tmp.path() / "student";
      ExportOptions opt;
      opt.out_dir = out.string();
      opt.dtype = dtype;
      opt.python_dir = kPythonDir;
      opt.tokenizer_dir = teacher.str();
      export_hf(model, opt);

      EXPECT_FALSE(fs::exists(out.string() + ".tmp"));
      std::set<std::string> files;
      for (const auto& entry : fs::directory_iterator(out)) files.insert(entry.path().filename().string());
      const std::set<std::string> want_files = {
          "config.json",    "model.safetensors",     "configuration_hydistill.py", "modeling_hydistill.py",
          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",    "merges.txt"};
      EXPECT_EQ(files, want_files);
      for (const char* py : {"configuration_hydistill.py", "modeling_hydistill.py"}) {
        EXPECT_EQ(read_file(out / py), read_file(fs::path(kPythonDir) / py)) << py;
      }
      EXPECT_EQ(read_file(out / "tokenizer.json"), read_file(teacher.path() / "tokenizer.json"));

      SafetensorsFile f((out / "model.safetensors").string());
      check_tensors(f, f.names(), model, dtype, what);
      EXPECT_EQ(f.metadata().count("format"), 1u);
      if (f.metadata().count("format")) {
        EXPECT_EQ(f.metadata().at("format"), "pt");
      }

      // The exporter's own list agrees with the file, in file order.
      const auto specs = hf_hybrid_tensors(cfg, dtype);
      std::vector<std::string> spec_names;
      for (const auto& s : specs) spec_names.push_back(s.name);
      EXPECT_EQ(spec_names, f.names());

      // Dense parts carry the teacher loader's names and shapes: every T layer's tensors, and every
      // non-mixer tensor of the other layers, are in hf_dense_tensors.
      for (const HfTensorSpec& t : hf_dense_tensors(cfg.model)) {
        const std::string prefix = "model.layers.";
        bool mixer_of_other_kind = false;
        if (t.name.starts_with(prefix) && t.name.find(".self_attn.") != std::string::npos) {
          const int64_t l = std::stoll(t.name.substr(prefix.size()));
          mixer_of_other_kind = cfg.layers[static_cast<size_t>(l)] == MixerKind::kda;
        }
        if (mixer_of_other_kind) continue;
        ASSERT_TRUE(f.contains(t.name)) << t.name;
        EXPECT_EQ(f.info(t.name).shape, t.shape) << t.name;
      }

      check_config(read_json(out / "config.json"), cfg, dtype);
    }
  }
}

TEST(Export, NoKdaLayersWritesSchemaDefaults) {
  const HybridConfig cfg = tiny_hybrid("llama", "T,A", 2);
  HybridModel model(cfg, Device::cpu(), 16);
  test::randomize_hybrid(model);
  test::TempDir tmp("hyd_export_");
  ExportOptions opt;
  opt.out_dir = tmp.file("out");
  opt.dtype = "float32";
  opt.python_dir = kPythonDir;
  export_hf(model, opt);
  const json j = read_json(fs::path(opt.out_dir) / "config.json");
  EXPECT_EQ(j.at("mixer_types"), json::array({"rope_attention", "nope_attention"}));
  EXPECT_EQ(j.at("kda_num_heads"), cfg.model.num_heads);
  EXPECT_EQ(j.at("kda_num_v_heads"), cfg.model.num_heads);
  EXPECT_EQ(j.at("kda_head_dim"), cfg.model.head_dim);
  EXPECT_EQ(j.at("kda_v_head_dim"), cfg.model.head_dim);
  SafetensorsFile f(opt.out_dir + "/model.safetensors");
  check_tensors(f, f.names(), model, "float32", "T,A");
  EXPECT_FALSE(fs::exists(fs::path(opt.out_dir) / "tokenizer.json"));
}

TEST(Export, ShardsWithIndex) {
  const HybridConfig cfg = tiny_hybrid("qwen2", "K,A,T,K");
  HybridModel model(cfg, Device::cpu(), 16);
  test::randomize_hybrid(model);
  for (const std::string dtype : {"float32", "bfloat16"}) {
    SCOPED_TRACE(dtype);
    test::TempDir tmp("hyd_export_");
    ExportOptions opt;
    opt.out_dir = tmp.file("sharded");
    opt.dtype = dtype;
    opt.python_dir = kPythonDir;
    opt.shard_bytes = 6000;  // embed [61, 32] alone is 7808 bytes in f32: a shard of its own
    export_hf(model, opt);
    const fs::path out = opt.out_dir;
    EXPECT_FALSE(fs::exists(out / "model.safetensors"));

    const json idx = read_json(out / "model.safetensors.index.json");
    const SafetensorsIndex index = read_safetensors_index((out / "model.safetensors.index.json").string());
    const std::vector<std::string> shard_files = index.files();
    ASSERT_GE(shard_files.size(), 3u);
    const size_t n = shard_files.size();
    uint64_t total = 0;
    size_t tensors_in_shards = 0;
    for (size_t k = 0; k < n; ++k) {
      char want[64];
      std::snprintf(want, sizeof(want), "model-%05zu-of-%05zu.safetensors", k + 1, n);
      EXPECT_EQ(shard_files[k], want);
      SafetensorsFile shard((out / shard_files[k]).string());
      uint64_t bytes = 0;
      for (const auto& name : shard.names()) {
        const auto& ti = shard.info(name);
        bytes += ti.end - ti.begin;
        EXPECT_EQ(index.weight_map.at(name), shard_files[k]) << name;
      }
      EXPECT_TRUE(bytes <= opt.shard_bytes || shard.names().size() == 1) << shard_files[k] << " holds " << bytes;
      total += bytes;
      tensors_in_shards += shard.names().size();
    }
    EXPECT_EQ(tensors_in_shards, index.weight_map.size());
    EXPECT_EQ(idx.at("metadata").at("total_size").get<uint64_t>(), total);
    // Every shard file present in the folder, nothing more.
    size_t shard_count = 0;
    for (const auto& entry : fs::directory_iterator(out))
      if (entry.path().extension() == ".safetensors") ++shard_count;
    EXPECT_EQ(shard_count, n);

    SafetensorsCheckpoint ck;
    ck.open_dir(out.string());
    EXPECT_TRUE(ck.sharded());
    check_tensors(ck, ck.names(), model, dtype, "sharded " + dtype);
    check_config(read_json(out / "config.json"), cfg, dtype);
  }
}

TEST(Export, RefusesToOverwriteAndValidatesInputs) {
  const HybridConfig cfg = tiny_hybrid("llama", "K,A", 2);
  HybridModel model(cfg, Device::cpu(), 16);
  test::randomize_hybrid(model);
  test::TempDir tmp("hyd_export_");
  ExportOptions opt;
  opt.python_dir = kPythonDir;
  opt.dtype = "float32";

  // A non-empty folder is left exactly as it was.
  opt.out_dir = tmp.file("taken");
  fs::create_directories(opt.out_dir);
  std::ofstream(tmp.file("taken/keep.txt")) << "precious\n";
  test::expect_error([&] { export_hf(model, opt); }, {opt.out_dir, "not empty"});
  EXPECT_EQ(read_file(tmp.file("taken/keep.txt")), "precious\n");
  EXPECT_EQ(std::distance(fs::directory_iterator(opt.out_dir), fs::directory_iterator{}), 1);
  EXPECT_FALSE(fs::exists(opt.out_dir + ".tmp"));

  // A file in the way.
  opt.out_dir = tmp.file("a_file");
  std::ofstream(opt.out_dir) << "x";
  test::expect_error([&] { export_hf(model, opt); }, {opt.out_dir, "not a directory"});
  EXPECT_EQ(read_file(opt.out_dir), "x");

  // Bad inputs write nothing.
  opt.out_dir = tmp.file("fresh");
  ExportOptions bad = opt;
  bad.dtype = "float16";
  test::expect_error([&] { export_hf(model, bad); }, {"dtype", "float16"});
  bad = opt;
  bad.python_dir = tmp.file("no_such_python");
  test::expect_error([&] { export_hf(model, bad); }, {"no_such_python", "modeling"});
  bad = opt;
  bad.python_dir.clear();
  test::expect_error([&] { export_hf(model, bad); }, {"python_dir"});
  bad = opt;
  bad.tokenizer_dir = tmp.file("no_such_teacher");
  test::expect_error([&] { export_hf(model, bad); }, {"no_such_teacher"});
  fs::create_directories(tmp.file("empty_teacher"));
  bad.tokenizer_dir = tmp.file("empty_teacher");
  test::expect_error([&] { export_hf(model, bad); }, {"empty_teacher", "tokenizer"});
  EXPECT_FALSE(fs::exists(opt.out_dir));
  EXPECT_FALSE(fs::exists(opt.out_dir + ".tmp"));

  // An existing empty folder is fine, and so is a stale OUT.tmp from an interrupted export.
  fs::create_directories(opt.out_dir);
  fs::create_directories(opt.out_dir + ".tmp");
  std::ofstream(opt.out_dir + ".tmp/partial.safetensors") << "junk";
  export_hf(model, opt);
  EXPECT_TRUE(fs::exists(fs::path(opt.out_dir) / "model.safetensors"));
  EXPECT_FALSE(fs::exists(fs::path(opt.out_dir) / "partial.safetensors"));
  EXPECT_FALSE(fs::exists(opt.out_dir + ".tmp"));
  // ... and a second export into it now fails.
  test::expect_error([&] { export_hf(model, opt); }, {opt.out_dir, "not empty"});
}

// ------------------------------------------------------------------ parity case for transformers

// Writes DIR/<case>/{model_f32/, model_bf16/, reference.safetensors}: the exports and the C++ f32
// logits [B, T, V] (F32) for input_ids [B, T] (I64), B documents of T tokens each, every one starting
// at position 0 as the Python model assumes.
void write_parity_case(const fs::path& dir, const std::string& skeleton, const std::string& pattern,
                       const std::string& rope) {
  HybridConfig cfg;
  cfg.model = test::tiny_dense_variant(skeleton);
  cfg.model.num_layers = 4;
  cfg.model.bos_token_id = 1;
  cfg.model.eos_token_id = 2;
  if (rope == "llama3") {
    cfg.model.rope_theta = 5e4;
    cfg.model.rope_scaling.type = "llama3";
    cfg.model.rope_scaling.factor = 8.0;
    cfg.model.rope_scaling.low_freq_factor = 1.0;
    cfg.model.rope_scaling.high_freq_factor = 4.0;
    cfg.model.rope_scaling.original_max_position_embeddings = 16;
  } else if (rope == "linear") {
    cfg.model.rope_scaling.type = "linear";
    cfg.model.rope_scaling.factor = 2.0;
  }
  cfg.kda.heads = 2;
  cfg.kda.v_heads = 4;
  cfg.kda.dk = 8;
  cfg.kda.dv = 4;
  cfg.kda.conv_size = 4;
  cfg.kda.norm_eps = 1e-5f;
  cfg.pattern = pattern;
  cfg.finalize("parity");

  constexpr int64_t B = 3, T = 21;
  HybridModel model(cfg, Device::cpu(), B * T);
  test::randomize_hybrid(model);
  std::vector<std::vector<int32_t>> docs = test::random_documents(std::vector<int32_t>(B, T), cfg.model.vocab_size);
  const test::PackedBatch batch = test::pack_documents(docs);
  ExecContext ctx(Device::cpu());
  const std::vector<float> logits = model.forward_logits(ctx, batch.batch);
  ASSERT_EQ(static_cast<int64_t>(logits.size()), B * T * cfg.model.vocab_size);

  fs::create_directories(dir);
  for (const std::string dtype : {"float32", "bfloat16"}) {
    ExportOptions opt;
    opt.out_dir = (dir / (dtype == "float32" ? "model_f32" : "model_bf16")).string();
    opt.dtype = dtype;
    opt.python_dir = kPythonDir;
    export_hf(model, opt);
  }
  SafetensorsWriter w;
  std::vector<int64_t> ids;
  for (const auto& d : docs) ids.insert(ids.end(), d.begin(), d.end());
  w.add_i64("input_ids", {B, T}, ids);
  w.add_f32("logits", {B, T, cfg.model.vocab_size}, logits);
  w.set_metadata("pattern", layer_pattern_string(cfg.layers));
  w.write((dir / "reference.safetensors").string());
}

TEST(ExportParity, WriteCase) {
  const char* dir = std::getenv("HYD_EXPORT_PARITY_DIR");
  if (dir == nullptr || *dir == '\0') GTEST_SKIP() << "HYD_EXPORT_PARITY_DIR not set (tests/cli/test_export_parity.sh)";
  write_parity_case(fs::path(dir) / "llama_untied_llama3", "llama", "K,A,T,K", "llama3");
  write_parity_case(fs::path(dir) / "qwen2_bias_linear", "qwen2", "T,K,K,A", "linear");
  write_parity_case(fs::path(dir) / "qwen3_tied_qknorm", "qwen3", "K,T,A,K", "default");
}

}  // namespace
}  // namespace hyd

// HF teacher folders: config.json parsing (4.x and 5.x layouts, every supported and refused feature),
// inspect_teacher on the golden models, sharded checkpoints, and every teacher error naming the file and
// the tensor or field. Broken teachers are made by copying a golden folder to a temp dir and rewriting
// its files with SafetensorsWriter.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "distill/hf_config.h"
#include "distill/teacher.h"
#include "tests/common/test_util.h"
#include "trainer/core/error.h"
#include "trainer/model.h"

namespace hyd {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kGolden = std::string(HYD_SOURCE_DIR) + "/tests/golden/data/";

using test::expect_error;

// A temp dir for broken teachers, made from writable copies of golden model folders.
class TeacherDir : public test::TempDir {
 public:
  TeacherDir() : test::TempDir("hyd_teacher_") {}
  // A writable copy of a golden model folder.
  std::string copy_of(const std::string& model) const {
    const fs::path dst = path() / model;
    fs::create_directories(dst);
    for (const char* f : {"config.json", "model.safetensors"}) fs::copy_file(kGolden + model + "/" + f, dst / f);
    return dst.string();
  }
};

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}
void write_json(const std::string& path, const json& j) { std::ofstream(path) << j.dump(2); }

// Rewrites `path` keeping every tensor for which `keep` returns true, then calling `extra` to add more.
template <class Keep, class Extra>
void rewrite_safetensors(const std::string& path, Keep keep, Extra extra) {
  SafetensorsWriter w;
  {
    SafetensorsFile f(path);
    for (const auto& name : f.names()) {
      if (!keep(name)) continue;
      const auto& info = f.info(name);
      const std::vector<char> bytes = f.read_bytes(name);
      w.add(name, info.dtype, info.shape, bytes.data(), bytes.size());
    }
  }
  extra(w);
  w.write(path);
}

ModelConfig parse(const json& j) { return model_config_from_hf_json(j, "cfg.json"); }
json golden_config(const std::string& model) { return read_json(kGolden + model + "/config.json"); }

// ----------------------------------------------------------------------------------------- config.json

TEST(HfConfig, GoldenConfigs) {
  const ModelConfig l = read_hf_config(kGolden + "llama/config.json");
  EXPECT_EQ(l.family, "llama");
  EXPECT_EQ(l.vocab_size, 256);
  EXPECT_EQ(l.hidden_size, 64);
  EXPECT_EQ(l.intermediate_size, 160);
  EXPECT_EQ(l.num_layers, 2);
  EXPECT_EQ(l.num_heads, 4);
  EXPECT_EQ(l.num_kv_heads, 2);
  EXPECT_EQ(l.head_dim, 16);
  EXPECT_EQ(l.max_position_embeddings, 128);
  EXPECT_DOUBLE_EQ(l.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(l.rope_theta, 10000.0);
  EXPECT_EQ(l.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(l.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(l.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(l.rope_scaling.high_freq_factor, 4.0);
  EXPECT_DOUBLE_EQ(l.rope_scaling.original_max_position_embeddings, 32.0);
  EXPECT_FALSE(l.tie_word_embeddings);
  EXPECT_FALSE(l.qk_norm);
  EXPECT_FALSE(l.qkv_bias);
  EXPECT_EQ(l.bos_token_id, 1);
  EXPECT_EQ(l.eos_token_id, 2);

  const ModelConfig q3 = read_hf_config(kGolden + "qwen3/config.json");
  EXPECT_EQ(q3.family, "qwen3");
  EXPECT_EQ(q3.head_dim, 32);  // != hidden / heads
  EXPECT_EQ(q3.q_dim(), 128);
  EXPECT_TRUE(q3.tie_word_embeddings);
  EXPECT_TRUE(q3.qk_norm);
  EXPECT_FALSE(q3.qkv_bias);
  EXPECT_DOUBLE_EQ(q3.rope_theta, 1e6);
  EXPECT_EQ(q3.rope_scaling.type, "default");
  EXPECT_EQ(q3.eos_token_id, 2);  // first of [2, 3]

  const ModelConfig q2 = read_hf_config(kGolden + "qwen2/config.json");
  EXPECT_EQ(q2.family, "qwen2");
  EXPECT_TRUE(q2.qkv_bias);
  EXPECT_FALSE(q2.qk_norm);
  EXPECT_EQ(q2.head_dim, 16);
  EXPECT_EQ(q2.rope_scaling.type, "yarn");
  EXPECT_DOUBLE_EQ(q2.rope_scaling.factor, 4.0);
  EXPECT_DOUBLE_EQ(q2.rope_scaling.original_max_position_embeddings, 32.0);
  EXPECT_DOUBLE_EQ(q2.rope_scaling.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(q2.rope_scaling.beta_slow, 1.0);
  EXPECT_TRUE(q2.rope_scaling.truncate);
  EXPECT_NEAR(q2.rope_scaling.attention_factor, 0.1 * std::log(4.0) + 1.0, 1e-12);
}

TEST(HfConfig, TransformersV4Layout) {
  // 4.x: rope_theta at the top level, rope_scaling with "type" (older) or "rope_type", no head_dim.
  json j = golden_config("llama");
  j.erase("rope_parameters");
  j.erase("head_dim");
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  ModelConfig c = parse(j);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, "linear");
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 2.0);
  EXPECT_EQ(c.head_dim, 16);

  j["rope_scaling"] = nullptr;  // HF writes null when unset
  c = parse(j);
  EXPECT_EQ(c.rope_scaling.type, "default");
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);

  // Llama 3.1 style, original context defaulting to max_position_embeddings; a top-level value wins.
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0}};
  c = parse(j);
  EXPECT_DOUBLE_EQ(c.rope_scaling.original_max_position_embeddings, 128.0);
  j["original_max_position_embeddings"] = 64;
  c = parse(j);
  EXPECT_DOUBLE_EQ(c.rope_scaling.original_max_position_embeddings, 64.0);

  // YaRN with DeepSeek-style mscale, factor derived from the context ratio, explicit betas.
  j = golden_config("qwen2");
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 1e4},       {"original_max_position_embeddings", 32},
                          {"mscale", 0.707},     {"mscale_all_dim", 0.707}, {"beta_fast", 16},
                          {"beta_slow", 2},      {"truncate", false}};
  c = parse(j);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 4.0);  // 128 / 32
  EXPECT_NEAR(c.rope_scaling.attention_factor, 1.0, 1e-12);
  EXPECT_DOUBLE_EQ(c.rope_scaling.beta_fast, 16.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.beta_slow, 2.0);
  EXPECT_FALSE(c.rope_scaling.truncate);

  // Nested per layer type (newer transformers for mixed-attention models).
  j["rope_parameters"] = {{"full_attention", {{"rope_type", "default"}, {"rope_theta", 12345.0}}}};
  c = parse(j);
  EXPECT_DOUBLE_EQ(c.rope_theta, 12345.0);

  // Optional fields: num_key_value_heads defaults to heads, eos may be null.
  j = golden_config("llama");
  j.erase("num_key_value_heads");
  j["eos_token_id"] = nullptr;
  c = parse(j);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.eos_token_id, -1);
}

TEST(HfConfig, UnsupportedFeaturesNameTheField) {
  auto bad = [](json j, std::vector<std::string> needles) {
    needles.insert(needles.begin(), "cfg.json");
    expect_error([&] { parse(j); }, needles);
  };
  json j = golden_config("llama");
  bad(
      [&] {
        json x = j;
        x["model_type"] = "gpt2";
        return x;
      }(),
      {"'model_type'", "gpt2"});
  bad(
      [&] {
        json x = j;
        x.erase("model_type");
        return x;
      }(),
      {"'model_type'", "missing"});
  bad(
      [&] {
        json x = j;
        x.erase("hidden_size");
        return x;
      }(),
      {"'hidden_size'", "missing"});
  bad(
      [&] {
        json x = j;
        x["hidden_size"] = "64";
        return x;
      }(),
      {"'hidden_size'", "integer"});
  bad(
      [&] {
        json x = j;
        x["num_key_value_heads"] = 3;
        return x;
      }(),
      {"'num_key_value_heads'"});
  bad(
      [&] {
        json x = j;
        x["mlp_bias"] = true;
        return x;
      }(),
      {"'mlp_bias'"});
  bad(
      [&] {
        json x = j;
        x["attention_bias"] = true;
        return x;
      }(),
      {"'attention_bias'", "o_proj"});
  bad(
      [&] {
        json x = j;
        x["hidden_act"] = "gelu";
        return x;
      }(),
      {"'hidden_act'"});
  bad(
      [&] {
        json x = j;
        x["tie_word_embeddings"] = 1;
        return x;
      }(),
      {"'tie_word_embeddings'"});
  bad(
      [&] {
        json x = j;
        x["quantization_config"] = {{"quant_method", "gptq"}};
        return x;
      }(),
      {"'quantization_config'"});
  bad(
      [&] {
        json x = j;
        x["rope_parameters"]["rope_type"] = "dynamic";
        return x;
      }(),
      {"'rope_parameters.rope_type'", "dynamic"});
  bad(
      [&] {
        json x = j;
        x["rope_parameters"].erase("low_freq_factor");
        return x;
      }(),
      {"'rope_parameters.low_freq_factor'", "missing"});
  bad(
      [&] {
        json x = j;
        x["rope_parameters"]["partial_rotary_factor"] = 0.5;
        return x;
      }(),
      {"'rope_parameters.partial_rotary_factor'"});
  bad(
      [&] {
        json x = j;
        x["partial_rotary_factor"] = 0.25;
        return x;
      }(),
      {"'partial_rotary_factor'"});
  bad(
      [&] {
        json x = j;
        x["head_dim"] = 15;
        return x;
      }(),
      {"'head_dim'"});

  json q = golden_config("qwen2");
  bad(
      [&] {
        json x = q;
        x["layer_types"][1] = "sliding_attention";
        return x;
      }(),
      {"'layer_types[1]'", "sliding"});
  bad(
      [&] {
        json x = q;
        x.erase("layer_types");
        x["use_sliding_window"] = true;
        x["sliding_window"] = 16;
        x["max_window_layers"] = 1;
        return x;
      }(),
      {"'use_sliding_window'"});
  // Sliding window switched off (the Qwen2.5 default) is fine.
  json ok = q;
  ok.erase("layer_types");
  ok["use_sliding_window"] = false;
  ok["sliding_window"] = 131072;
  EXPECT_NO_THROW(parse(ok));

  expect_error([] { read_hf_config("/nonexistent/config.json"); }, {"/nonexistent/config.json"});
}

// ----------------------------------------------------------------------------------------- teacher folders

TEST(Teacher, InspectGoldenModels) {
  struct Want {
    const char* name;
    int64_t params;
  };
  // Parameter counts as printed by gen_dense_goldens.py (torch's numel over unique parameters).
  for (const Want& w : {Want{"llama", 119104}, Want{"qwen3", 127424}, Want{"qwen2", 119360}}) {
    SCOPED_TRACE(w.name);
    const TeacherInfo info = inspect_teacher(kGolden + w.name);
    EXPECT_EQ(info.config.family, w.name);
    EXPECT_EQ(info.num_parameters, w.params);
    ASSERT_EQ(info.files.size(), 2u);
    EXPECT_NE(info.files[0].find("config.json"), std::string::npos);
    EXPECT_NE(info.files[1].find("model.safetensors"), std::string::npos);
    EXPECT_NE(info.summary.find(w.name), std::string::npos) << info.summary;
    EXPECT_NE(info.summary.find(std::to_string(w.params)), std::string::npos) << info.summary;
    EXPECT_GT(std::count(info.summary.begin(), info.summary.end(), '\n'), 5) << info.summary;
  }
}

TEST(Teacher, MissingTensor) {
  TeacherDir tmp;
  const std::string dir = tmp.copy_of("llama");
  const std::string st = dir + "/model.safetensors";
  rewrite_safetensors(
      st, [](const std::string& n) { return n != "model.layers.1.mlp.up_proj.weight"; }, [](SafetensorsWriter&) {});
  expect_error([&] { inspect_teacher(dir); }, {st, "'model.layers.1.mlp.up_proj.weight'", "missing"});
}

TEST(Teacher, WrongShape) {
  TeacherDir tmp;
  const std::string dir = tmp.copy_of("qwen3");
  const std::string st = dir + "/model.safetensors";
  rewrite_safetensors(
      st, [](const std::string& n) { return n != "model.layers.0.self_attn.q_proj.weight"; },
      [](SafetensorsWriter& w) {
        w.add_f32("model.layers.0.self_attn.q_proj.weight", {64, 64}, std::vector<float>(64 * 64));
      });
  expect_error([&] { inspect_teacher(dir); },
               {st, "'model.layers.0.self_attn.q_proj.weight'", "[64, 64]", "[128, 64]"});
}

TEST(Teacher, WrongDtype) {
  TeacherDir tmp;
  const std::string dir = tmp.copy_of("llama");
  const std::string st = dir + "/model.safetensors";
  rewrite_safetensors(
      st, [](const std::string& n) { return n != "model.norm.weight"; },
      [](SafetensorsWriter& w) { w.add_i32("model.norm.weight", {64}, std::vector<int32_t>(64)); });
  expect_error([&] { inspect_teacher(dir); }, {st, "'model.norm.weight'", "I32"});
}

TEST(Teacher, UnexpectedTensor) {
  TeacherDir tmp;
  const std::string dir = tmp.copy_of("qwen2");
  const std::string st = dir + "/model.safetensors";
  // Harmless: rotary buffers (older exports) are ignored.
  rewrite_safetensors(
      st, [](const std::string&) { return true; },
      [](SafetensorsWriter& w) {
        w.add_f32("model.layers.0.self_attn.rotary_emb.inv_freq", {8}, std::vector<float>(8));
      });
  const TeacherInfo info = inspect_teacher(dir);
  EXPECT_NE(info.summary.find("rotary_emb.inv_freq"), std::string::npos) << info.summary;
  // Not harmless: a weight the model has no place for (e.g. an o_proj bias).
  rewrite_safetensors(
      st, [](const std::string&) { return true; },
      [](SafetensorsWriter& w) { w.add_f32("model.layers.1.self_attn.o_proj.bias", {64}, std::vector<float>(64)); });
  expect_error([&] { inspect_teacher(dir); }, {st, "'model.layers.1.self_attn.o_proj.bias'", "unexpected"});
}

TEST(Teacher, WrongModelTypeAndMissingFiles) {
  TeacherDir tmp;
  const std::string dir = tmp.copy_of("llama");
  const std::string cfg = dir + "/config.json";
  json j = read_json(cfg);
  j["model_type"] = "mistral";
  write_json(cfg, j);
  expect_error([&] { inspect_teacher(dir); }, {cfg, "'model_type'", "mistral"});

  // A config that disagrees with the weights: the tensors' shapes are reported against it.
  j["model_type"] = "llama";
  j["intermediate_size"] = 128;
  write_json(cfg, j);
  expect_error([&] { inspect_teacher(dir); }, {dir + "/model.safetensors", "mlp.gate_proj.weight", "[160, 64]"});

  fs::remove(cfg);
  expect_error([&] { inspect_teacher(dir); }, {cfg, "missing"});
  const std::string dir2 = tmp.copy_of("qwen2");
  fs::remove(dir2 + "/model.safetensors");
  expect_error([&] { inspect_teacher(dir2); }, {dir2, "model.safetensors"});
  expect_error([&] { inspect_teacher(tmp.file("nope")); }, {tmp.file("nope"), "does not exist"});
}

// The golden llama split into two shards (+ index, as save_pretrained writes above max_shard_size).
std::string make_sharded_llama(const TeacherDir& tmp) {
  const std::string dir = tmp.file("sharded");
  fs::create_directories(dir);
  fs::copy_file(kGolden + "llama/config.json", dir + "/config.json");
  SafetensorsFile f(kGolden + "llama/model.safetensors");
  SafetensorsWriter a, b;
  json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
  for (const auto& name : f.names()) {
    const bool first = name.find("model.layers.1.") == std::string::npos && name != "lm_head.weight";
    const auto bytes = f.read_bytes(name);
    (first ? a : b).add(name, f.info(name).dtype, f.info(name).shape, bytes.data(), bytes.size());
    index["weight_map"][name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  a.write(dir + "/model-00001-of-00002.safetensors");
  b.write(dir + "/model-00002-of-00002.safetensors");
  write_json(dir + "/model.safetensors.index.json", index);
  return dir;
}

TEST(Teacher, ShardedCheckpointLoadsLikeSingleFile) {
  TeacherDir tmp;
  const std::string dir = make_sharded_llama(tmp);
  const TeacherInfo info = inspect_teacher(dir);
  EXPECT_EQ(info.num_parameters, 119104);
  ASSERT_EQ(info.files.size(), 4u);  // config, index, 2 shards
  EXPECT_NE(info.files[1].find("model.safetensors.index.json"), std::string::npos);

  DenseModel sharded(info.config, Device::cpu(), 8), single(info.config, Device::cpu(), 8);
  load_teacher_weights(dir, sharded);
  load_teacher_weights(kGolden + "llama", single);
  for (const auto& p : single.params()) EXPECT_EQ(sharded.get_param(p.name), single.get_param(p.name)) << p.name;

  // Removing a tensor from a shard but not from the index is reported against the shard.
  const std::string shard2 = dir + "/model-00002-of-00002.safetensors";
  rewrite_safetensors(
      shard2, [](const std::string& n) { return n != "lm_head.weight"; }, [](SafetensorsWriter&) {});
  expect_error([&] { inspect_teacher(dir); }, {shard2, "'lm_head.weight'"});
}

TEST(Teacher, LoadMapsHfNamesOntoDenseParams) {
  // Every DenseModel parameter is the row-concatenation of its HF tensors (wqkv = q;k;v, w_gate_up = gate;up).
  for (const char* name : {"llama", "qwen3", "qwen2"}) {
    SCOPED_TRACE(name);
    const std::string dir = kGolden + name;
    const TeacherInfo info = inspect_teacher(dir);
    DenseModel m(info.config, Device::cpu(), 8);
    load_teacher_weights(dir, m);
    SafetensorsFile f(dir + "/model.safetensors");
    size_t checked = 0;
    for (const auto& src : hf_dense_param_sources(info.config)) {
      std::vector<float> want;
      for (const auto& hf : src.hf_names) {
        const auto v = f.read_f32(hf);
        want.insert(want.end(), v.begin(), v.end());
      }
      EXPECT_EQ(m.get_param(src.param), want) << src.param;
      ++checked;
    }
    EXPECT_EQ(checked, m.params().size());
  }

  // A model built with other dimensions is refused, naming the differing field.
  const TeacherInfo info = inspect_teacher(kGolden + "llama");
  ModelConfig other = info.config;
  other.intermediate_size = 96;
  DenseModel m(other, Device::cpu(), 8);
  expect_error([&] { load_teacher_weights(kGolden + "llama", m); },
               {"config.json", "'intermediate_size'", "160", "96"});
}

}  // namespace
}  // namespace hyd

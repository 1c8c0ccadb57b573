// MoE teachers (issue 7), qwen3_moe and dots1: ModelConfig's MoE fields (the HF sparse-layer rules, finalize
// errors naming the field, parameter and FLOP counts), config.json parsing of the qwen3_moe and dots1 keys
// (dots1's group-limited routing refused naming the key), the DenseModel's MoE parameters (names, shapes,
// count), the teacher loader's per-expert, shared-expert and selection-bias tensor mapping and its errors
// naming the tensor, students built from MoE teachers (the MoE FFNs copied, dots1's shared experts and
// selection bias included; the bias stays put under AdamW), and the export's refusal of dots1 students.
// (MoE on CUDA: tests/gpu/test_gpu_moe.cpp.) The logits themselves are checked against transformers in
// golden.test_golden_dense (qwen3_moe, dots1).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/export.h"
#include "checkpoint/safetensors.h"
#include "distill/hf_config.h"
#include "distill/student_checkpoint.h"
#include "distill/student_init.h"
#include "distill/teacher.h"
#include "tests/common/test_util.h"
#include "tests/common/tiny_model.h"
#include "trainer/core/error.h"
#include "trainer/hybrid_model.h"
#include "trainer/model.h"
#include "trainer/optimizer.h"

namespace hyd {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::expect_error;

const std::string kMoeDir = std::string(HYD_SOURCE_DIR) + "/tests/golden/data/qwen3_moe";
const std::string kDots1Dir = std::string(HYD_SOURCE_DIR) + "/tests/golden/data/dots1";

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}
json moe_json() { return read_json(kMoeDir + "/config.json"); }
json dots1_json() { return read_json(kDots1Dir + "/config.json"); }
ModelConfig parse(const json& j) { return model_config_from_hf_json(j, "cfg.json"); }

// The tiny qwen3_moe config of the model tests: 3 layers, layer 1 dense, 4 experts of F = 16, top 2.
ModelConfig tiny_moe() {
  ModelConfig c = test::tiny_dense_variant("qwen3");
  c.family = "qwen3_moe";
  c.num_layers = 3;
  c.num_experts = 4;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = 16;
  c.norm_topk_prob = true;
  c.mlp_only_layers = {1};
  c.finalize("test");
  return c;
}

TEST(MoeConfig, SparseLayerRuleIsHfs) {
  ModelConfig c = tiny_moe();
  c.num_layers = 8;
  c.decoder_sparse_step = 2;
  c.mlp_only_layers = {3};
  // HF: sparse iff l not in mlp_only_layers and num_experts > 0 and (l + 1) % step == 0.
  const std::vector<bool> want{false, true, false, false, false, true, false, true};
  for (int64_t l = 0; l < 8; ++l) EXPECT_EQ(c.is_moe_layer(l), want[l]) << l;
  c.num_experts = 0;
  for (int64_t l = 0; l < 8; ++l) EXPECT_FALSE(c.is_moe_layer(l)) << l;
  EXPECT_FALSE(test::tiny_dense_variant("qwen3").has_moe_layers());
}

TEST(MoeConfig, FinalizeNamesTheField) {
  auto bad = [](const std::function<void(ModelConfig&)>& edit, const std::string& field) {
    ModelConfig c = tiny_moe();
    edit(c);
    expect_error([&] { c.finalize("src"); }, {"src", field});
  };
  bad([](ModelConfig& c) { c.num_experts_per_tok = 0; }, "model.num_experts_per_tok");
  bad([](ModelConfig& c) { c.num_experts_per_tok = 5; }, "model.num_experts_per_tok");
  bad([](ModelConfig& c) { c.moe_intermediate_size = 0; }, "model.moe_intermediate_size");
  bad([](ModelConfig& c) { c.decoder_sparse_step = 0; }, "model.decoder_sparse_step");
  bad([](ModelConfig& c) { c.mlp_only_layers = {3}; }, "model.mlp_only_layers[0]");
  bad([](ModelConfig& c) { c.router_aux_loss_coef = -1; }, "model.router_aux_loss_coef");
  bad([](ModelConfig& c) { c.num_experts = -1; }, "model.num_experts");
  bad([](ModelConfig& c) { c.family = "qwen3"; }, "model.num_experts");  // experts only in qwen3_moe
  bad([](ModelConfig& c) { c.family = "mixtral"; }, "model.family");
}

TEST(MoeConfig, ParameterCountMatchesTheModelAndFlopsCountActiveExperts) {
  const ModelConfig c = tiny_moe();
  DenseModel m(c, Device::cpu(), 8);
  int64_t n = 0;
  for (const ParamInfo& p : m.params()) n += p.numel;
  EXPECT_EQ(c.num_parameters(), n);
  const int64_t D = c.hidden_size, Fe = c.moe_intermediate_size;
  // Dropping the 2 inactive experts of each of the 2 sparse layers from the 6N term.
  const double inactive = 2.0 * 2.0 * 3.0 * static_cast<double>(Fe * D);
  EXPECT_DOUBLE_EQ(c.train_flops_per_token(16),
                   6.0 * (static_cast<double>(c.num_parameters()) - inactive) + 6.0 * 3 * 16 * c.q_dim());
  // Dense configs are unchanged: no expert fields, same count as before (golden llama: 119104 + lm_head).
  EXPECT_EQ(test::tiny_dense_variant("llama").num_experts, 0);
}

TEST(MoeModel, ParametersNamesAndShapes) {
  const ModelConfig c = tiny_moe();
  DenseModel m(c, Device::cpu(), 8);
  const int64_t D = c.hidden_size, E = 4, Fe = 16, F = c.intermediate_size;
  for (int64_t l : {0, 2}) {
    const std::string p = "layers." + std::to_string(l) + ".";
    EXPECT_EQ(m.param(p + "mlp.gate.weight").shape, (std::vector<int64_t>{E, D}));
    EXPECT_EQ(m.param(p + "mlp.gate_up").shape, (std::vector<int64_t>{E, 2 * Fe, D}));
    EXPECT_EQ(m.param(p + "mlp.down").shape, (std::vector<int64_t>{E, D, Fe}));
    EXPECT_TRUE(m.param(p + "mlp.gate_up").weight_decay);
    EXPECT_TRUE(m.has_param(p + "mlp_norm"));
    EXPECT_FALSE(m.has_param(p + "w_gate_up"));
    EXPECT_FALSE(m.has_param(p + "w_down"));
  }
  EXPECT_EQ(m.param("layers.1.w_gate_up").shape, (std::vector<int64_t>{2 * F, D}));
  EXPECT_FALSE(m.has_param("layers.1.mlp.gate_up"));
  // init_random: experts' down stacks scaled like w_down (std / sqrt(2 L)), the router like other matrices.
  m.init_random(3, 0.02f);
  auto stddev = [&](const std::string& name) {
    double s = 0;
    const std::vector<float> v = m.get_param(name);
    for (float x : v) s += double(x) * x;
    return std::sqrt(s / static_cast<double>(v.size()));
  };
  EXPECT_NEAR(stddev("layers.0.mlp.gate_up"), 0.02, 0.002);
  EXPECT_NEAR(stddev("layers.0.mlp.gate.weight"), 0.02, 0.004);
  EXPECT_NEAR(stddev("layers.2.mlp.down"), 0.02 / std::sqrt(6.0), 0.001);
}

// init_student_from_teacher after every student parameter was set to NaN: each must have been written (all
// finite), and the transfer table has one row per parameter.
TransferReport init_student_checked(const DenseModel& teacher, HybridModel& student) {
  for (const ParamInfo& p : student.params()) {
    const std::vector<float> nan(static_cast<size_t>(p.numel), NAN);
    student.set_param(p.name, nan.data(), p.numel);
  }
  TransferReport rep = init_student_from_teacher(teacher, student, 3);
  EXPECT_EQ(rep.rows.size(), student.params().size());
  for (const ParamInfo& p : student.params())
    for (float x : student.get_param(p.name))
      if (!std::isfinite(x)) {
        ADD_FAILURE() << p.name << " was not written";
        break;
      }
  return rep;
}

// A student of a MoE teacher keeps the teacher's MoE settings and gets the MoE FFN parameters (router and
// stacked experts) copied like the dense MLP's, each listed in the transfer table; the KDA layers' mixers
// are initialised as for a dense teacher, and the A / T layers' attention is copied.
TEST(MoeModel, StudentFromMoeTeacherCopiesTheExperts) {
  const ModelConfig tc = tiny_moe();  // layers 0 and 2 MoE, 1 dense
  DenseModel teacher(tc, Device::cpu(), 16);
  teacher.init_random(7, 0.3f);
  const HybridConfig sc = student_config_from_teacher(tc, "K,A,K");
  EXPECT_EQ(sc.model.family, "qwen3_moe");
  EXPECT_EQ(sc.model.num_experts, tc.num_experts);
  EXPECT_EQ(sc.model.num_experts_per_tok, tc.num_experts_per_tok);
  EXPECT_EQ(sc.model.moe_intermediate_size, tc.moe_intermediate_size);
  EXPECT_EQ(sc.model.norm_topk_prob, tc.norm_topk_prob);
  EXPECT_EQ(sc.model.mlp_only_layers, tc.mlp_only_layers);
  HybridModel student(sc, Device::cpu(), 16);
  const TransferReport rep = init_student_checked(teacher, student);
  int moe_params = 0;
  for (const ParamInfo& p : student.params()) {
    const std::vector<float> v = student.get_param(p.name);
    if (p.name.find(".mlp.") == std::string::npos) continue;
    ++moe_params;
    EXPECT_EQ(p.shape, teacher.param(p.name).shape) << p.name;
    EXPECT_EQ(v, teacher.get_param(p.name)) << p.name;
    EXPECT_TRUE(rep.row(p.name).from_teacher) << p.name;
    EXPECT_EQ(rep.row(p.name).source, "teacher:" + p.name);
  }
  EXPECT_EQ(moe_params, 6);  // router, gate_up, down of layers 0 and 2
  for (const char* n : {"layers.1.w_gate_up", "layers.1.w_down", "layers.0.mlp_norm", "layers.1.wqkv"})
    EXPECT_EQ(student.get_param(n), teacher.get_param(n)) << n;
  EXPECT_NE(rep.table().find("layers.2.mlp.gate_up"), std::string::npos);
  // mixer_params: the mixer only, no FFN parameter.
  for (int64_t l = 0; l < 3; ++l)
    for (const ParamInfo& p : student.mixer_params(l)) EXPECT_EQ(p.name.find("mlp"), std::string::npos) << p.name;
  // The student runs (CPU) and its loss is finite.
  test::PackedBatch hb = test::pack_documents({{1, 5, 9, 3, 7, 2}, {4, 4, 8, 1}});
  ExecContext ctx(Device::cpu());
  EXPECT_TRUE(std::isfinite(student.forward_loss(ctx, hb.batch)));
}

// ----------------------------------------------------------------------------------------- config.json

TEST(MoeHfConfig, GoldenConfig) {
  const ModelConfig c = read_hf_config(kMoeDir + "/config.json");
  EXPECT_EQ(c.family, "qwen3_moe");
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.intermediate_size, 96);
  EXPECT_EQ(c.num_experts, 8);  // written as num_local_experts by transformers 5.x
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.moe_intermediate_size, 32);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.decoder_sparse_step, 1);
  EXPECT_EQ(c.mlp_only_layers, (std::vector<int64_t>{0}));
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.001);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
}

TEST(MoeHfConfig, KeysAndDefaults) {
  json j = moe_json();
  j.erase("num_local_experts");
  j["num_experts"] = 4;  // the 4.x / released-checkpoint name
  j.erase("head_dim");   // Qwen3MoeConfig's default, like qwen3's
  j.erase("mlp_only_layers");
  j["decoder_sparse_step"] = 2;
  const ModelConfig c = parse(j);
  EXPECT_EQ(c.num_experts, 4);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_TRUE(c.mlp_only_layers.empty());
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  j["num_experts"] = 0;  // HF: every layer dense
  EXPECT_FALSE(parse(j).has_moe_layers());
}

TEST(MoeHfConfig, ErrorsNameTheKey) {
  auto bad = [](const std::function<void(json&)>& edit, const std::string& key) {
    json j = moe_json();
    edit(j);
    expect_error([&] { (void)parse(j); }, {"cfg.json", "'" + key + "'"});
  };
  bad([](json& j) { j["num_experts_per_tok"] = 9; }, "num_experts_per_tok");
  bad([](json& j) { j["num_experts_per_tok"] = 1.5; }, "num_experts_per_tok");
  bad([](json& j) { j["moe_intermediate_size"] = 0; }, "moe_intermediate_size");
  bad([](json& j) { j["decoder_sparse_step"] = 0; }, "decoder_sparse_step");
  bad([](json& j) { j["norm_topk_prob"] = "yes"; }, "norm_topk_prob");
  bad([](json& j) { j["mlp_only_layers"] = 0; }, "mlp_only_layers");
  bad([](json& j) { j["mlp_only_layers"] = {0, 2}; }, "mlp_only_layers[1]");
  bad([](json& j) { j["mlp_only_layers"] = {"a"}; }, "mlp_only_layers[0]");
  bad([](json& j) { j["router_aux_loss_coef"] = -0.5; }, "router_aux_loss_coef");
  bad([](json& j) { j["num_local_experts"] = -2; }, "num_local_experts");
  bad([](json& j) { j["num_experts"] = -2; }, "num_experts");
}

// ------------------------------------------------------------------------------------------- teacher

TEST(MoeTeacher, MapsEveryExpertTensor) {
  const TeacherInfo info = inspect_teacher(kMoeDir);
  EXPECT_NE(info.summary.find("experts           8 (top 2"), std::string::npos) << info.summary;
  EXPECT_EQ(info.num_parameters, info.config.num_parameters());
  const std::vector<HfTensorSpec> specs = hf_dense_tensors(info.config);
  int experts = 0;
  for (const auto& s : specs) experts += s.name.find(".mlp.experts.") != std::string::npos;
  EXPECT_EQ(experts, 8 * 3);

  DenseModel m(info.config, Device::cpu(), 8);
  load_teacher_weights(kMoeDir, m);
  SafetensorsFile f(kMoeDir + "/model.safetensors");
  const int64_t D = 64, Fe = 32;
  const std::vector<float> gu = m.get_param("layers.1.mlp.gate_up"), dn = m.get_param("layers.1.mlp.down");
  for (int64_t e : {0, 5, 7}) {
    const std::string x = "model.layers.1.mlp.experts." + std::to_string(e) + ".";
    const std::vector<float> g = f.read_f32(x + "gate_proj.weight"), u = f.read_f32(x + "up_proj.weight"),
                             d = f.read_f32(x + "down_proj.weight");
    for (int64_t i : {int64_t(0), Fe * D - 1, int64_t(77)}) {
      EXPECT_EQ(gu[e * 2 * Fe * D + i], g[i]) << e;
      EXPECT_EQ(gu[e * 2 * Fe * D + Fe * D + i], u[i]) << e;
      EXPECT_EQ(dn[e * D * Fe + i], d[i]) << e;
    }
  }
  EXPECT_EQ(m.get_param("layers.1.mlp.gate.weight"), f.read_f32("model.layers.1.mlp.gate.weight"));
}

// A copy of a golden teacher (qwen3_moe by default) whose tensors a test may rewrite.
class MoeTeacherDir : public test::TempDir {
 public:
  explicit MoeTeacherDir(const std::string& source = kMoeDir) : test::TempDir("hyd_moe_teacher_") {
    fs::create_directories(path() / "t");
    for (const char* f : {"config.json", "model.safetensors"}) fs::copy_file(source + "/" + f, path() / "t" / f);
  }
  std::string dir() const { return (path() / "t").string(); }
  // Rewrites model.safetensors without `drop`, adding `add` (F32 zeros of `shape`, or `dtype` bytes) when non-empty.
  void rewrite(const std::string& drop, const std::string& add = "", std::vector<int64_t> shape = {},
               SafetensorsDType dtype = SafetensorsDType::F32) const {
    const std::string p = dir() + "/model.safetensors";
    SafetensorsWriter w;
    {
      SafetensorsFile f(p);
      for (const auto& name : f.names()) {
        if (name == drop) continue;
        const auto& info = f.info(name);
        const std::vector<char> bytes = f.read_bytes(name);
        w.add(name, info.dtype, info.shape, bytes.data(), bytes.size());
      }
    }
    if (!add.empty()) {
      int64_t n = 1;
      for (int64_t v : shape) n *= v;
      std::vector<char> zeros(static_cast<size_t>(n) * safetensors_dtype_size(dtype), 0);
      w.add(add, dtype, shape, zeros.data(), zeros.size());
    }
    w.write(p);
  }
};

TEST(MoeTeacher, ErrorsNameTheTensor) {
  const std::string e3 = "model.layers.1.mlp.experts.3.up_proj.weight";
  {
    MoeTeacherDir t;
    t.rewrite(e3);
    expect_error([&] { (void)inspect_teacher(t.dir()); }, {e3, "missing tensor", "qwen3_moe"});
  }
  {
    MoeTeacherDir t;
    t.rewrite(e3, e3, {32, 63});
    expect_error([&] { (void)inspect_teacher(t.dir()); }, {e3, "shape"});
  }
  {
    MoeTeacherDir t;
    t.rewrite(e3, e3, {32, 64}, SafetensorsDType::I32);
    expect_error([&] { (void)inspect_teacher(t.dir()); }, {e3, "dtype"});
  }
  {
    MoeTeacherDir t;  // an expert the config does not have
    t.rewrite("", "model.layers.1.mlp.experts.8.gate_proj.weight", {32, 64});
    expect_error([&] { (void)inspect_teacher(t.dir()); },
                 {"model.layers.1.mlp.experts.8.gate_proj.weight", "unexpected"});
  }
  {
    MoeTeacherDir t;  // a dense MLP tensor in a sparse layer
    t.rewrite("", "model.layers.1.mlp.gate_proj.weight", {96, 64});
    expect_error([&] { (void)inspect_teacher(t.dir()); }, {"model.layers.1.mlp.gate_proj.weight", "unexpected"});
  }
  {
    MoeTeacherDir t;  // the router missing
    t.rewrite("model.layers.1.mlp.gate.weight");
    expect_error([&] { (void)inspect_teacher(t.dir()); }, {"model.layers.1.mlp.gate.weight", "missing"});
  }
  {
    // A model built with different expert settings is refused naming the config field.
    ModelConfig c = read_hf_config(kMoeDir + "/config.json");
    c.num_experts_per_tok = 3;
    DenseModel m(c, Device::cpu(), 8);
    expect_error([&] { load_teacher_weights(kMoeDir, m); }, {"num_experts_per_tok"});
    ModelConfig c2 = read_hf_config(kMoeDir + "/config.json");
    c2.mlp_only_layers = {};
    DenseModel m2(c2, Device::cpu(), 8);
    expect_error([&] { load_teacher_weights(kMoeDir, m2); }, {"layer 0 is MoE"});
  }
}

// ------------------------------------------------------------------------------------------------- dots1

TEST(Dots1HfConfig, GoldenConfig) {
  const ModelConfig c = read_hf_config(kDots1Dir + "/config.json");
  EXPECT_EQ(c.family, "dots1");
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.head_dim, 16);  // no head_dim key: Dots1Config derives hidden_size / heads (not Qwen3's 128)
  EXPECT_EQ(c.intermediate_size, 96);
  EXPECT_EQ(c.num_experts, 8);  // n_routed_experts
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.moe_intermediate_size, 32);
  EXPECT_EQ(c.num_shared_experts, 2);
  EXPECT_EQ(c.shared_expert_ffn(), 64);  // HF's one shared MLP of width n_shared_experts * moe_intermediate_size
  EXPECT_EQ(c.first_k_dense_replace, 1);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_EQ(c.moe_score_func, "sigmoid");
  EXPECT_TRUE(c.moe_selection_bias);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.0);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
}

TEST(Dots1HfConfig, KeysAndDefaults) {
  json j = dots1_json();
  j.erase("first_k_dense_replace");  // default 0: every layer sparse
  j.erase("routed_scaling_factor");  // default 1
  j.erase("norm_topk_prob");         // default false
  j.erase("n_group");                // defaults 1: no group limit
  j.erase("topk_group");
  j["num_local_experts"] = j["n_routed_experts"];  // transformers' alias, read when n_routed_experts is absent
  j.erase("n_routed_experts");
  j["scoring_func"] = "sigmoid";  // explicit and agreeing
  ModelConfig c = parse(j);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.first_k_dense_replace, 0);
  EXPECT_TRUE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 1.0);
  EXPECT_FALSE(c.norm_topk_prob);
  j["n_shared_experts"] = 0;  // no shared MLP
  EXPECT_EQ(parse(j).shared_expert_ffn(), 0);
  j["first_k_dense_replace"] = 5;  // beyond the layers: all dense, as in HF
  EXPECT_FALSE(parse(j).has_moe_layers());

  // Sliding windows without layer_types: Dots1Config slides layers >= max_window_layers whenever
  // sliding_window is set (default 4096), so only a null window or max_window_layers >= layers is accepted.
  json w = dots1_json();
  w.erase("layer_types");
  EXPECT_NO_THROW((void)parse(w));  // max_window_layers 62 >= 2 layers
  w["max_window_layers"] = 1;
  expect_error([&] { (void)parse(w); }, {"cfg.json", "'max_window_layers'", "sliding-window"});
  w["sliding_window"] = nullptr;
  EXPECT_NO_THROW((void)parse(w));
  json lt = dots1_json();
  lt["layer_types"] = {"full_attention", "sliding_attention"};
  expect_error([&] { (void)parse(lt); }, {"cfg.json", "'layer_types[1]'"});
}

TEST(Dots1HfConfig, ErrorsNameTheKey) {
  auto bad = [](const std::function<void(json&)>& edit, const std::string& key, const std::string& what = "") {
    json j = dots1_json();
    edit(j);
    std::vector<std::string> needles = {"cfg.json", "'" + key + "'"};
    if (!what.empty()) needles.push_back(what);
    expect_error([&] { (void)parse(j); }, needles);
  };
  // Group-limited routing is refused, whatever the combination.
  bad([](json& j) { j["n_group"] = 2; }, "n_group", "group-limited");
  bad([](json& j) { j["topk_group"] = 2; }, "topk_group", "group-limited");
  bad(
      [](json& j) {
        j["n_group"] = 4;
        j["topk_group"] = 2;
      },
      "n_group", "group-limited");
  bad([](json& j) { j["n_group"] = 1.5; }, "n_group");
  bad([](json& j) { j["scoring_func"] = "softmax"; }, "scoring_func", "sigmoid");
  bad([](json& j) { j.erase("n_routed_experts"); }, "n_routed_experts", "missing");
  bad([](json& j) { j["n_routed_experts"] = 0; }, "n_routed_experts");
  bad([](json& j) { j.erase("n_shared_experts"); }, "n_shared_experts", "missing");
  bad([](json& j) { j["n_shared_experts"] = -1; }, "n_shared_experts");
  bad([](json& j) { j.erase("num_experts_per_tok"); }, "num_experts_per_tok", "missing");
  bad([](json& j) { j["num_experts_per_tok"] = 9; }, "num_experts_per_tok");
  bad([](json& j) { j["moe_intermediate_size"] = 0; }, "moe_intermediate_size");
  bad([](json& j) { j["routed_scaling_factor"] = 0.0; }, "routed_scaling_factor");
  bad([](json& j) { j["routed_scaling_factor"] = "2.5"; }, "routed_scaling_factor");
  bad([](json& j) { j["first_k_dense_replace"] = -1; }, "first_k_dense_replace");
  bad([](json& j) { j["norm_topk_prob"] = 1; }, "norm_topk_prob");
}

TEST(Dots1Config, FinalizeNamesTheFieldAndCountsSharedExpertsAndBias) {
  ModelConfig c = read_hf_config(kDots1Dir + "/config.json");
  auto bad = [&](const std::function<void(ModelConfig&)>& edit, const std::string& field) {
    ModelConfig b = c;
    edit(b);
    expect_error([&] { b.finalize("test"); }, {"test", "'" + field + "'"});
  };
  bad([](ModelConfig& b) { b.moe_score_func = "tanh"; }, "model.moe_score_func");
  bad([](ModelConfig& b) { b.routed_scaling_factor = 0; }, "model.routed_scaling_factor");
  bad([](ModelConfig& b) { b.num_shared_experts = -1; }, "model.num_shared_experts");
  bad([](ModelConfig& b) { b.first_k_dense_replace = -1; }, "model.first_k_dense_replace");
  bad([](ModelConfig& b) { b.family = "llama"; }, "model.num_experts");

  // The parameter count is the DenseModel's and the teacher checkpoint's; the FLOPs count the shared MLP.
  DenseModel m(c, Device::cpu(), 8);
  int64_t n = 0;
  for (const ParamInfo& p : m.params()) n += p.numel;
  EXPECT_EQ(c.num_parameters(), n);
  const int64_t D = c.hidden_size, Fe = c.moe_intermediate_size;
  const double inactive = 6.0 * 3.0 * static_cast<double>(Fe * D);  // 6 of 8 experts idle in the sparse layer
  const double embed = static_cast<double>(c.vocab_size * D);       // untied: the lookup costs no FLOPs
  EXPECT_DOUBLE_EQ(c.train_flops_per_token(16),
                   6.0 * (static_cast<double>(c.num_parameters()) - inactive - embed) + 6.0 * 2 * 16 * c.q_dim());
  EXPECT_EQ(m.param("layers.1.mlp.shared_gate_up").shape, (std::vector<int64_t>{1, 2 * 64, D}));
  EXPECT_EQ(m.param("layers.1.mlp.shared_down").shape, (std::vector<int64_t>{1, D, 64}));
  EXPECT_EQ(m.param("layers.1.mlp.gate.e_score_correction_bias").shape, (std::vector<int64_t>{8}));
  EXPECT_FALSE(m.param("layers.1.mlp.gate.e_score_correction_bias").weight_decay);
  EXPECT_FALSE(m.has_param("layers.0.mlp.shared_gate_up"));  // layer 0 dense
  EXPECT_TRUE(m.has_param("layers.0.w_gate_up"));
  m.init_random(3, 0.02f);  // HF's init: the selection bias 0
  for (float v : m.get_param("layers.1.mlp.gate.e_score_correction_bias")) EXPECT_EQ(v, 0.0f);
}

TEST(Dots1Teacher, MapsSharedExpertsAndTheSelectionBias) {
  const TeacherInfo info = inspect_teacher(kDots1Dir);
  EXPECT_NE(info.summary.find("router            sigmoid, selection bias, scale 2.5, 2 shared experts (ffn 64)"),
            std::string::npos)
      << info.summary;
  EXPECT_EQ(info.num_parameters, info.config.num_parameters());

  DenseModel m(info.config, Device::cpu(), 8);
  load_teacher_weights(kDots1Dir, m);
  SafetensorsFile f(kDots1Dir + "/model.safetensors");
  const std::string x = "model.layers.1.mlp.";
  const std::vector<float> gate = f.read_f32(x + "shared_experts.gate_proj.weight"),
                           up = f.read_f32(x + "shared_experts.up_proj.weight");
  std::vector<float> gate_up = gate;
  gate_up.insert(gate_up.end(), up.begin(), up.end());
  EXPECT_EQ(m.get_param("layers.1.mlp.shared_gate_up"), gate_up);
  EXPECT_EQ(m.get_param("layers.1.mlp.shared_down"), f.read_f32(x + "shared_experts.down_proj.weight"));
  const std::vector<float> bias = f.read_f32(x + "gate.e_score_correction_bias");
  EXPECT_EQ(m.get_param("layers.1.mlp.gate.e_score_correction_bias"), bias);
  int nonzero = 0;
  for (float v : bias) nonzero += v != 0.0f;
  EXPECT_EQ(nonzero, 8);  // the golden's bias is random, so a loader that skipped it would differ
}

TEST(Dots1Teacher, ErrorsNameTheTensor) {
  const std::string bias = "model.layers.1.mlp.gate.e_score_correction_bias";
  const std::string shared_up = "model.layers.1.mlp.shared_experts.up_proj.weight";
  {
    MoeTeacherDir t(kDots1Dir);
    t.rewrite(bias);
    expect_error([&] { (void)inspect_teacher(t.dir()); }, {bias, "missing tensor", "dots1"});
  }
  {
    MoeTeacherDir t(kDots1Dir);
    t.rewrite(shared_up);
    expect_error([&] { (void)inspect_teacher(t.dir()); }, {shared_up, "missing tensor"});
  }
  {
    MoeTeacherDir t(kDots1Dir);  // one expert's width instead of n_shared_experts'
    t.rewrite(shared_up, shared_up, {32, 64});
    expect_error([&] { (void)inspect_teacher(t.dir()); }, {shared_up, "shape"});
  }
  {
    MoeTeacherDir t(kDots1Dir);
    t.rewrite(bias, bias, {9});
    expect_error([&] { (void)inspect_teacher(t.dir()); }, {bias, "shape"});
  }
  {
    MoeTeacherDir t(kDots1Dir);  // a per-expert shared tensor (DeepSeek-style numbering) is not HF's dots1 layout
    t.rewrite("", "model.layers.1.mlp.shared_experts.0.gate_proj.weight", {32, 64});
    expect_error([&] { (void)inspect_teacher(t.dir()); },
                 {"model.layers.1.mlp.shared_experts.0.gate_proj.weight", "unexpected"});
  }
  {
    // A model built with different router settings is refused naming the config field.
    auto refused = [](const std::function<void(ModelConfig&)>& edit, const std::string& field) {
      ModelConfig c = read_hf_config(kDots1Dir + "/config.json");
      edit(c);
      DenseModel m(c, Device::cpu(), 8);
      expect_error([&] { load_teacher_weights(kDots1Dir, m); }, {"config.json", field});
    };
    refused([](ModelConfig& c) { c.routed_scaling_factor = 1.0; }, "routed_scaling_factor");
    refused([](ModelConfig& c) { c.num_shared_experts = 1; }, "n_shared_experts");
    refused([](ModelConfig& c) { c.moe_score_func = "softmax"; }, "scoring_func");
    refused([](ModelConfig& c) { c.first_k_dense_replace = 0; }, "layer 0 is MoE");
  }
}

// A student of the dots1 golden teacher keeps its MoE FFN (router, experts, the shared MLP and the selection
// bias, copied and listed in the transfer table); the all-T teacher the distill loop runs (copy_dense_weights)
// is the DenseModel exactly; a stage-2-like step (forward_backward + AdamW over every parameter) gives the
// shared MLP a gradient and moves it, while the selection bias gets none and stays the teacher's.
TEST(Dots1Model, StudentKeepsSharedExpertsAndSelectionBias) {
  const TeacherInfo info = inspect_teacher(kDots1Dir);
  const ModelConfig& tc = info.config;
  DenseModel teacher(tc, Device::cpu(), 32);
  load_teacher_weights(kDots1Dir, teacher);
  test::PackedBatch hb = test::pack_documents({{1, 5, 9, 3, 7, 2, 11, 40}, {4, 4, 8, 1, 200, 17}});
  ExecContext ctx(Device::cpu());

  HybridConfig tcfg;
  tcfg.model = tc;
  tcfg.pattern = "T";
  tcfg.finalize("test");
  HybridModel all_t(tcfg, Device::cpu(), 32);
  copy_dense_weights(teacher, all_t);
  const std::vector<float> zd = teacher.forward_logits(ctx, hb.batch);
  ASSERT_TRUE(test::all_finite(zd));
  EXPECT_EQ(zd, all_t.forward_logits(ctx, hb.batch));

  const HybridConfig sc = student_config_from_teacher(tc, "K,A");
  EXPECT_EQ(sc.model.family, "dots1");
  EXPECT_EQ(sc.model.num_shared_experts, tc.num_shared_experts);
  EXPECT_EQ(sc.model.moe_selection_bias, tc.moe_selection_bias);
  EXPECT_EQ(sc.model.routed_scaling_factor, tc.routed_scaling_factor);
  EXPECT_EQ(sc.model.first_k_dense_replace, tc.first_k_dense_replace);
  HybridModel student(sc, Device::cpu(), 32);
  const TransferReport rep = init_student_checked(teacher, student);
  std::vector<std::string> moe;
  for (const ParamInfo& p : student.params()) {
    const std::vector<float> v = student.get_param(p.name);
    if (p.name.find(".mlp.") == std::string::npos) continue;
    moe.push_back(p.name);
    EXPECT_EQ(v, teacher.get_param(p.name)) << p.name;
    EXPECT_TRUE(rep.row(p.name).from_teacher) << p.name;
  }
  EXPECT_EQ(moe, (std::vector<std::string>{"layers.1.mlp.gate.weight", "layers.1.mlp.gate_up", "layers.1.mlp.down",
                                           "layers.1.mlp.shared_gate_up", "layers.1.mlp.shared_down",
                                           "layers.1.mlp.gate.e_score_correction_bias"}));
  const std::string bias = "layers.1.mlp.gate.e_score_correction_bias";
  const std::vector<float> teacher_bias = teacher.get_param(bias);

  student.zero_grad();
  const double loss = student.forward_backward(ctx, hb.batch);
  ASSERT_TRUE(std::isfinite(loss));
  for (float g : student.get_grad(bias)) EXPECT_EQ(g, 0.0f);
  double sq = 0;
  for (float g : student.get_grad("layers.1.mlp.shared_gate_up")) sq += double(g) * g;
  EXPECT_GT(sq, 0.0) << "no gradient reaches the shared MLP";
  AdamWConfig ac;
  ac.weight_decay = 0.1;
  AdamW opt(student.params(), Device::cpu(), ac);
  const std::vector<float> shared_before = student.get_param("layers.1.mlp.shared_gate_up");
  opt.step(ctx, 1e-2);
  EXPECT_EQ(student.get_param(bias), teacher_bias);
  EXPECT_NE(student.get_param("layers.1.mlp.shared_gate_up"), shared_before);

  // The export's modeling code has qwen3_moe's MoE only: a dots1 student is refused, naming the reason.
  expect_error([&] { (void)hf_hybrid_config_json(student.config(), "float32"); },
               {"export", "model.family", "dots1", "not supported"});
}

}  // namespace
}  // namespace hyd

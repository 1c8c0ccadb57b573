// Student construction from a teacher (distill/student_init.h), on the CPU with tiny dims:
//   * every tensor copied from the teacher equals its source exactly: the skeleton, A/T mixers, and
//     the K layers' q/k/v/o (k and v with the teacher's GQA kv heads repeated to the KDA heads), for
//     MHA, GQA and MQA teachers and the llama / qwen2 / qwen3 / tied families;
//   * a student of T layers gives exactly the teacher's logits;
//   * with the identity convolutions, a K layer's q/k/v entering the KDA core are silu(teacher
//     projections) (q, k then l2-normalised, q scaled), checked on the KdaLayer's saved tensors;
//   * the decay starts close to 1 (exp(g) > 0.8 for every token, head and channel), beta ~ 0.5;
//   * initialised parameters: identity conv taps, A_log / dt_bias ranges, small normal projections,
//     zero bias, unit o_norm; same seed same student;
//   * errors: a pattern of the wrong length (naming student.pattern), KDA dims that cannot be mapped
//     (naming the parameter), a skeleton that differs; the student is untouched after an error;
//   * the report's table names every layer with its kind and every parameter with its source.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "distill/student_init.h"
#include "tests/common/test_util.h"
#include "tests/common/tiny_model.h"
#include "trainer/hybrid_model.h"
#include "trainer/layer_kda.h"
#include "trainer/model.h"

namespace hyd {
namespace {

constexpr int64_t kMaxTokens = 32;

// The tiny teacher (V=61, D=32, F=40, Hq=4, Hkv=2, d=8) with `layers` layers and `kv_heads` kv heads.
ModelConfig tiny_teacher(const std::string& variant, int64_t layers = 4, int64_t kv_heads = 2) {
  ModelConfig c = test::tiny_dense_variant(variant);
  c.num_layers = layers;
  c.num_kv_heads = kv_heads;
  c.finalize("test");
  return c;
}

// Every student parameter set to `value`, to see what the transfer writes (and what it leaves).
void fill_student(HybridModel& s, float value) {
  for (const ParamInfo& p : s.params()) {
    const std::vector<float> v(static_cast<size_t>(p.numel), value);
    s.set_param(p.name, v.data(), p.numel);
  }
}

bool is_mixer_param(const HybridModel& s, const std::string& name) {
  for (int64_t l = 0; l < s.num_layers(); ++l)
    for (const ParamInfo& p : s.mixer_params(l))
      if (p.name == name) return true;
  return false;
}

// Rows [r0, r0 + n) of a row-major [*, cols] matrix.
std::vector<float> rows_of(const std::vector<float>& m, int64_t cols, int64_t r0, int64_t n) {
  return {m.begin() + r0 * cols, m.begin() + (r0 + n) * cols};
}

double silu(double u) { return u / (1.0 + std::exp(-u)); }

// --------------------------------------------------------------------------------- config

TEST(StudentInit, ConfigFromTeacherDefaults) {
  const ModelConfig tc = tiny_teacher("qwen3", 6);
  const HybridConfig c = student_config_from_teacher(tc, "KKKA");
  EXPECT_EQ(layer_pattern_string(c.layers), "KKKAKA");
  EXPECT_EQ(c.model.hidden_size, tc.hidden_size);
  EXPECT_EQ(c.model.num_layers, 6);
  EXPECT_TRUE(c.model.qk_norm);
  EXPECT_EQ(c.kda.hidden, 32);
  EXPECT_EQ(c.kda.heads, 4);
  EXPECT_EQ(c.kda.v_heads, 4);
  EXPECT_EQ(c.kda.dk, 8);
  EXPECT_EQ(c.kda.dv, 8);
  EXPECT_EQ(c.kda.conv_size, 4);
  EXPECT_FLOAT_EQ(c.kda.norm_eps, static_cast<float>(tc.rms_norm_eps));
  KdaOptions o;
  o.heads = 2;
  o.dk = 16;
  o.conv_size = 3;
  o.norm_eps = 1e-5f;
  const HybridConfig c2 = student_config_from_teacher(tc, "K,A,T,K,K,A", o);
  EXPECT_EQ(layer_pattern_string(c2.layers), "KATKKA");
  EXPECT_EQ(c2.kda.heads, 2);
  EXPECT_EQ(c2.kda.v_heads, 4);
  EXPECT_EQ(c2.kda.dk, 16);
  EXPECT_EQ(c2.kda.dv, 8);
  EXPECT_EQ(c2.kda.conv_size, 3);
  EXPECT_FLOAT_EQ(c2.kda.norm_eps, 1e-5f);
}

// --------------------------------------------------------------------------------- copies

// Everything outside the K mixers equals the teacher's tensor of the same name, bit for bit; K layers'
// q/k/v/o equal the teacher's rows (k / v: kv head h / (H / Hkv) for KDA head h), for every family and
// for MHA (Hkv = 4), GQA (2) and MQA (1) teachers.
TEST(StudentInit, CopiedTensorsEqualTheirTeacherSources) {
  for (const std::string variant : {"llama", "qwen2", "qwen3", "tied"}) {
    for (const int64_t hkv : {int64_t(4), int64_t(2), int64_t(1)}) {
      SCOPED_TRACE(variant + ", kv heads " + std::to_string(hkv));
      const ModelConfig tc = tiny_teacher(variant, 4, hkv);
      DenseModel teacher(tc, Device::cpu(), kMaxTokens);
      teacher.init_random(test::rng()(), 0.3f);
      const HybridConfig sc = student_config_from_teacher(tc, "K,A,T,K");
      HybridModel student(sc, Device::cpu(), kMaxTokens);
      fill_student(student, NAN);
      const TransferReport rep = init_student_from_teacher(teacher, student, 5);

      ASSERT_EQ(rep.rows.size(), student.params().size());
      for (const ParamInfo& p : student.params()) {
        const std::vector<float> v = student.get_param(p.name);
        EXPECT_TRUE(test::all_finite(v)) << p.name << " was not written";
        EXPECT_EQ(rep.row(p.name).shape, p.shape);
        if (is_mixer_param(student, p.name) && student.layer_kind(rep.row(p.name).layer) == MixerKind::kda) continue;
        EXPECT_EQ(v, teacher.get_param(p.name)) << p.name;
        EXPECT_TRUE(rep.row(p.name).from_teacher) << p.name;
        EXPECT_EQ(rep.row(p.name).source, "teacher:" + p.name);
      }

      const int64_t D = tc.hidden_size, d = tc.head_dim, hq = tc.num_heads, rep_kv = hq / hkv;
      for (const int64_t l : {int64_t(0), int64_t(3)}) {
        const std::string lp = "layers." + std::to_string(l) + ".";
        const std::vector<float> wqkv = teacher.get_param(lp + "wqkv");
        const std::vector<float> q = student.get_param(lp + "q_proj.weight");
        const std::vector<float> k = student.get_param(lp + "k_proj.weight");
        const std::vector<float> v = student.get_param(lp + "v_proj.weight");
        EXPECT_EQ(q, rows_of(wqkv, D, 0, hq * d));
        ASSERT_EQ(static_cast<int64_t>(k.size()), hq * d * D);
        ASSERT_EQ(static_cast<int64_t>(v.size()), hq * d * D);
        for (int64_t h = 0; h < hq; ++h) {
          const int64_t g = h / rep_kv;  // the teacher's kv head of q head h
          EXPECT_EQ(rows_of(k, D, h * d, d), rows_of(wqkv, D, hq * d + g * d, d)) << lp << " k head " << h;
          EXPECT_EQ(rows_of(v, D, h * d, d), rows_of(wqkv, D, (hq + hkv) * d + g * d, d)) << lp << " v head " << h;
        }
        EXPECT_EQ(student.get_param(lp + "o_proj.weight"), teacher.get_param(lp + "wo"));
        for (const char* n : {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"})
          EXPECT_TRUE(rep.row(lp + n).from_teacher) << lp << n;
        EXPECT_EQ(rep.row(lp + "q_proj.weight").source.rfind("teacher:" + lp + "wqkv rows [0,32)", 0), 0u);
        if (rep_kv > 1) {
          EXPECT_NE(rep.row(lp + "k_proj.weight").source.find("repeated " + std::to_string(rep_kv) + "x"),
                    std::string::npos)
              << rep.row(lp + "k_proj.weight").source;
        }
        if (tc.qkv_bias) {
          EXPECT_NE(rep.row(lp + "q_proj.weight").source.find(lp + "bqkv dropped"), std::string::npos);
        }
        EXPECT_FALSE(rep.row(lp + "A_log").from_teacher);
      }
    }
  }
}

// A tied teacher's embedding becomes an untied student's lm_head.
TEST(StudentInit, UntiedStudentOfTiedTeacherGetsEmbedAsLmHead) {
  const ModelConfig tc = tiny_teacher("tied", 2);
  DenseModel teacher(tc, Device::cpu(), kMaxTokens);
  teacher.init_random(test::rng()(), 0.3f);
  HybridConfig sc = student_config_from_teacher(tc, "KA");
  sc.model.tie_word_embeddings = false;
  HybridModel student(sc, Device::cpu(), kMaxTokens);
  const TransferReport rep = init_student_from_teacher(teacher, student, 1);
  ASSERT_TRUE(student.has_param("lm_head"));
  EXPECT_EQ(student.get_param("lm_head"), teacher.get_param("embed"));
  EXPECT_EQ(rep.row("lm_head").source, "teacher:embed (tied embeddings)");
}

// --------------------------------------------------------------------------------- function

// A student of T layers is the teacher: identical logits.
TEST(StudentInit, AllTeacherLayerStudentGivesTheTeachersLogits) {
  for (const std::string variant : {"llama", "qwen2", "qwen3"}) {
    SCOPED_TRACE(variant);
    const ModelConfig tc = tiny_teacher(variant, 3);
    DenseModel teacher(tc, Device::cpu(), kMaxTokens);
    teacher.init_random(test::rng()(), 0.3f);
    HybridModel student(student_config_from_teacher(tc, "T"), Device::cpu(), kMaxTokens);
    const TransferReport rep = init_student_from_teacher(teacher, student, 2);
    for (const TransferRow& r : rep.rows) EXPECT_TRUE(r.from_teacher) << r.name;
    test::PackedBatch hb = test::pack_documents(test::random_documents({11, 13}, static_cast<int32_t>(tc.vocab_size)));
    ExecContext ctx(Device::cpu());
    const std::vector<float> zt = teacher.forward_logits(ctx, hb.batch), zs = student.forward_logits(ctx, hb.batch);
    ASSERT_TRUE(test::all_finite(zt));
    EXPECT_EQ(zt, zs);
    // Not vacuous: a K student of the same teacher computes something else.
    HybridModel other(student_config_from_teacher(tc, "K"), Device::cpu(), kMaxTokens);
    init_student_from_teacher(teacher, other, 2);
    EXPECT_GT(test::rel_err(other.forward_logits(ctx, hb.batch), zt), 1e-3);
  }
}

// A K layer run alone (KdaLayer with the student's layer-0 weights) on random inputs of two documents:
// the projections are the teacher's (k, v with GQA repetition), the identity convolution makes the
// KDA core's inputs silu of them (q, k l2-normalised, q scaled by dk^-1/2); the decay exp(g) starts
// close to 1 and beta = sigmoid(small) close to 1/2.
TEST(StudentInit, KdaLayerSeesSiluOfTeacherProjectionsAndDecayNearOne) {
  const ModelConfig tc = tiny_teacher("llama", 2, 2);
  DenseModel teacher(tc, Device::cpu(), kMaxTokens);
  teacher.init_random(test::rng()(), 0.3f);
  const HybridConfig sc = student_config_from_teacher(tc, "KA");
  HybridModel student(sc, Device::cpu(), kMaxTokens);
  init_student_from_teacher(teacher, student, test::rng()());

  KdaLayerWeights w(sc.kda, Device::cpu(), DType::f32);
  for (const KdaLayerWeights::Param& p : w.params())
    w.set_param(p.name, test::to_f64(student.get_param("layers.0." + p.name)));

  const int64_t n = 20, D = tc.hidden_size, d = tc.head_dim, hq = tc.num_heads, hkv = tc.num_kv_heads;
  std::vector<int32_t> cu = {0, 9, 20};
  PackedSequence seq;
  seq.num_tokens = n;
  seq.num_docs = 2;
  seq.cu_seqlens = test::cpu_i32(cu, {3});
  std::vector<float> x = test::randn(n * D), out(n * D, NAN);
  Arena act("act", Device::cpu(), 8 << 20), scratch("scratch", Device::cpu(), 8 << 20);
  KdaLayer::Saved s = w.layer().alloc_saved(act, n, DType::f32);
  ExecContext ctx(Device::cpu());
  w.layer().forward(ctx, seq, test::cpu_f32(x, {n, D}), test::cpu_f32(out, {n, D}), s, scratch);
  ASSERT_TRUE(test::all_finite(out));
  auto host = [](const Tensor& t) { return test::DeviceBuffers::download(t); };

  // Teacher projections in f64: p[t, head, i] = sum_j x[t, j] wqkv[row(head, i), j].
  const std::vector<float> wqkv = teacher.get_param("layers.0.wqkv");
  auto project = [&](int64_t first_row, bool kv) {
    std::vector<double> p(static_cast<size_t>(n * hq * d));
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < hq; ++h)
        for (int64_t i = 0; i < d; ++i) {
          const int64_t row = first_row + (kv ? h / (hq / hkv) : h) * d + i;
          double acc = 0;
          for (int64_t j = 0; j < D; ++j) acc += double(x[t * D + j]) * wqkv[row * D + j];
          p[(t * hq + h) * d + i] = acc;
        }
    return p;
  };
  const std::vector<double> pq = project(0, false), pk = project(hq * d, true), pv = project((hq + hkv) * d, true);
  EXPECT_LT(test::rel_err(test::to_f64(host(s.q_lin)), pq), 1e-5);
  EXPECT_LT(test::rel_err(test::to_f64(host(s.k_lin)), pk), 1e-5);
  EXPECT_LT(test::rel_err(test::to_f64(host(s.v_lin)), pv), 1e-5);

  // silu after the identity conv; q, k l2-normalised per head, q scaled by dk^-1/2.
  auto expected = [&](const std::vector<double>& p, bool l2, double scale) {
    std::vector<double> e(p.size());
    for (int64_t th = 0; th < n * hq; ++th) {
      double ss = 0;
      for (int64_t i = 0; i < d; ++i) {
        e[th * d + i] = silu(p[th * d + i]);
        ss += e[th * d + i] * e[th * d + i];
      }
      const double r = l2 ? 1.0 / std::sqrt(ss + 1e-6) : 1.0;
      for (int64_t i = 0; i < d; ++i) e[th * d + i] *= r * scale;
    }
    return e;
  };
  EXPECT_LT(test::rel_err(test::to_f64(host(s.v)), expected(pv, false, 1.0)), 1e-5);
  EXPECT_LT(test::rel_err(test::to_f64(host(s.k)), expected(pk, true, 1.0)), 1e-4);
  EXPECT_LT(test::rel_err(test::to_f64(host(s.q)), expected(pq, true, 1.0 / std::sqrt(double(d)))), 1e-4);

  // Decay: g = -exp(A_log) softplus(f + dt_bias) with f ~ 0 -> per-token decay exp(g) in about [0.85, 1).
  const std::vector<float> g = host(s.g), beta = host(s.beta);
  ASSERT_EQ(static_cast<int64_t>(g.size()), n * sc.kda.gate_dim());
  for (float gi : g) {
    ASSERT_LT(gi, 0.f);
    ASSERT_GT(std::exp(gi), 0.8f) << "decay not close to 1 at init: g = " << gi;
  }
  for (float b : beta) ASSERT_NEAR(b, 0.5f, 0.2f);  // sigmoid(x Wb^T), x Wb^T ~ N(0, 0.11^2)
}

// --------------------------------------------------------------------------------- initialisation

TEST(StudentInit, NewKdaParametersFollowTheInitRules) {
  const ModelConfig tc = tiny_teacher("qwen3", 4);
  DenseModel teacher(tc, Device::cpu(), kMaxTokens);
  teacher.init_random(test::rng()(), 0.3f);
  const HybridConfig sc = student_config_from_teacher(tc, "KKKA");
  HybridModel student(sc, Device::cpu(), kMaxTokens);
  const TransferReport rep = init_student_from_teacher(teacher, student, 77);

  std::vector<float> small;  // every small-random value of every K layer
  for (int64_t l = 0; l < 3; ++l) {
    const std::string lp = "layers." + std::to_string(l) + ".";
    for (const char* conv : {"q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"}) {
      const std::vector<float> c = student.get_param(lp + conv);
      const int64_t K = sc.kda.conv_size;
      for (size_t i = 0; i < c.size(); ++i) EXPECT_EQ(c[i], int64_t(i) % K == K - 1 ? 1.f : 0.f) << lp << conv << i;
      EXPECT_EQ(rep.row(lp + conv).source.rfind("init:identity", 0), 0u);
    }
    for (float a : student.get_param(lp + "A_log")) {
      EXPECT_GE(a, 0.f);
      EXPECT_LE(a, std::log(16.f) + 1e-6f);
    }
    for (float b : student.get_param(lp + "dt_bias")) {
      const double dt = std::log1p(std::exp(double(b)));
      EXPECT_GE(dt, kDtMin * (1 - 1e-5));
      EXPECT_LE(dt, kDtMax * (1 + 1e-5));
    }
    for (float b : student.get_param(lp + "g_proj.1.bias")) EXPECT_EQ(b, 0.f);
    for (float o : student.get_param(lp + "o_norm.weight")) EXPECT_EQ(o, 1.f);
    for (const char* m :
         {"f_proj.0.weight", "f_proj.1.weight", "b_proj.weight", "g_proj.0.weight", "g_proj.1.weight"}) {
      const std::vector<float> v = student.get_param(lp + m);
      small.insert(small.end(), v.begin(), v.end());
      EXPECT_EQ(rep.row(lp + m).source, "init:normal(0.02)");
    }
    // Layers differ (independent streams).
    if (l > 0) {
      EXPECT_NE(student.get_param(lp + "f_proj.0.weight"), student.get_param("layers.0.f_proj.0.weight"));
    }
  }
  double mean = 0, sq = 0;
  for (float v : small) mean += v;
  mean /= double(small.size());
  for (float v : small) sq += (v - mean) * (v - mean);
  const double sd = std::sqrt(sq / double(small.size()));
  EXPECT_NEAR(sd, kSmallInitStd, 0.1 * kSmallInitStd) << small.size() << " values";
  EXPECT_LT(std::abs(mean), 0.1 * kSmallInitStd);

  // Same seed, same student; another seed, other random parameters but the same copies.
  HybridModel again(sc, Device::cpu(), kMaxTokens), other(sc, Device::cpu(), kMaxTokens);
  init_student_from_teacher(teacher, again, 77);
  init_student_from_teacher(teacher, other, 78);
  EXPECT_EQ(again.get_param("layers.1.dt_bias"), student.get_param("layers.1.dt_bias"));
  EXPECT_EQ(again.get_param("layers.2.b_proj.weight"), student.get_param("layers.2.b_proj.weight"));
  EXPECT_NE(other.get_param("layers.2.b_proj.weight"), student.get_param("layers.2.b_proj.weight"));
  EXPECT_EQ(other.get_param("layers.2.q_proj.weight"), student.get_param("layers.2.q_proj.weight"));
}

// --------------------------------------------------------------------------------- errors

TEST(StudentInit, PatternOfTheWrongLengthIsAnError) {
  const ModelConfig tc = tiny_teacher("llama", 4);
  test::expect_error([&] { student_config_from_teacher(tc, "KKKAK"); }, {"student", "student.pattern", "4"});
  test::expect_error([&] { student_config_from_teacher(tc, "K,K,A"); }, {"student", "student.pattern", "3"});
  test::expect_error([&] { student_config_from_teacher(tc, "KXA"); }, {"student.pattern", "X"});
  EXPECT_NO_THROW(student_config_from_teacher(tc, "KA"));  // shorter: repeated (KAKA)
  test::expect_error_mentioning([&] { student_config_from_teacher(tc, "KKKAK", {}, "run.ini"); }, "run.ini");
}

// KDA dims that cannot be mapped onto the teacher's heads name the parameter (and the student is left
// as it was); so does a skeleton that is not the teacher's.
TEST(StudentInit, IncompatibleDimsNameTheParameter) {
  const ModelConfig tc = tiny_teacher("llama", 2);
  DenseModel teacher(tc, Device::cpu(), kMaxTokens);
  teacher.init_random(test::rng()(), 0.3f);
  struct Case {
    KdaOptions opt;
    std::vector<std::string> needles;
  };
  std::vector<Case> cases;
  {
    KdaOptions o;
    o.dk = 16;
    cases.push_back({o, {"layers.0.q_proj.weight", "dk", "head_dim"}});
  }
  {
    KdaOptions o;
    o.heads = 2;
    cases.push_back({o, {"layers.0.q_proj.weight", "heads"}});
  }
  {
    KdaOptions o;
    o.dv = 4;
    cases.push_back({o, {"layers.0.v_proj.weight", "dv"}});
  }
  {
    KdaOptions o;
    o.v_heads = 8;
    cases.push_back({o, {"layers.0.o_proj.weight", "v_heads"}});
  }
  for (const Case& c : cases) {
    SCOPED_TRACE(c.needles[0]);
    HybridModel student(student_config_from_teacher(tc, "KA", c.opt), Device::cpu(), kMaxTokens);
    fill_student(student, 7.f);
    test::expect_error([&] { init_student_from_teacher(teacher, student, 1); }, c.needles);
    for (const ParamInfo& p : student.params())
      for (float v : student.get_param(p.name)) ASSERT_EQ(v, 7.f) << p.name << " written despite the error";
  }

  // Skeletons that differ from the teacher's.
  {
    HybridModel student(student_config_from_teacher(tiny_teacher("llama", 3), "KA"), Device::cpu(), kMaxTokens);
    test::expect_error([&] { init_student_from_teacher(teacher, student, 1); }, {"num_layers", "3", "2"});
  }
  {
    ModelConfig wide = tc;
    wide.intermediate_size = 48;
    HybridModel student(student_config_from_teacher(wide, "KA"), Device::cpu(), kMaxTokens);
    test::expect_error([&] { init_student_from_teacher(teacher, student, 1); }, {"layers.0.w_gate_up", "[80, 32]"});
  }
  {
    HybridModel student(student_config_from_teacher(tiny_teacher("qwen3", 2), "AK"), Device::cpu(), kMaxTokens);
    test::expect_error([&] { init_student_from_teacher(teacher, student, 1); }, {"layers.0.q_norm"});
  }
  {
    HybridConfig sc = student_config_from_teacher(tc, "KA");
    sc.model.tie_word_embeddings = true;  // a tied student cannot hold an untied teacher's lm_head
    sc.finalize("test");
    HybridModel student(sc, Device::cpu(), kMaxTokens);
    test::expect_error([&] { init_student_from_teacher(teacher, student, 1); }, {"tie_word_embeddings", "lm_head"});
  }
  {
    const ModelConfig qwen2 = tiny_teacher("qwen2", 2);
    DenseModel biased(qwen2, Device::cpu(), kMaxTokens);
    biased.init_random(test::rng()(), 0.3f);
    HybridConfig sc = student_config_from_teacher(qwen2, "KA");
    sc.model.qkv_bias = false;  // the A layer would lose the teacher's bqkv
    sc.finalize("test");
    HybridModel student(sc, Device::cpu(), kMaxTokens);
    test::expect_error([&] { init_student_from_teacher(biased, student, 1); }, {"qkv_bias", "bqkv"});
    // With only K layers the biases have no place anyway (the report says they are not carried).
    HybridConfig sk = student_config_from_teacher(qwen2, "K");
    sk.model.qkv_bias = false;
    sk.finalize("test");
    HybridModel kda_only(sk, Device::cpu(), kMaxTokens);
    EXPECT_NO_THROW(init_student_from_teacher(biased, kda_only, 1));
  }
}

// --------------------------------------------------------------------------------- table

TEST(StudentInit, TableNamesEveryLayerKindAndSource) {
  const ModelConfig tc = tiny_teacher("qwen2", 5);
  DenseModel teacher(tc, Device::cpu(), kMaxTokens);
  teacher.init_random(test::rng()(), 0.3f);
  HybridModel student(student_config_from_teacher(tc, "K,T,K,A,K"), Device::cpu(), kMaxTokens);
  const TransferReport rep = init_student_from_teacher(teacher, student, 3);
  const std::string table = rep.table();
  if (std::getenv("HYD_SHOW_TABLE")) std::printf("%s", table.c_str());
  EXPECT_NE(table.find("KTKAK"), std::string::npos);

  // One line per parameter (plus title and header); each layer's first line carries its index and kind.
  std::istringstream is(table);
  std::string line;
  std::vector<std::string> lines;
  while (std::getline(is, line)) lines.push_back(line);
  ASSERT_EQ(lines.size(), rep.rows.size() + 2);
  const std::string kinds = "KTKAK";
  for (int64_t l = 0; l < 5; ++l) {
    bool found = false;
    for (const std::string& ln : lines) {
      std::istringstream ls(ln);
      std::string idx, kind;
      ls >> idx >> kind;
      found = found || (idx == std::to_string(l) && kind == std::string(1, kinds[l]));
    }
    EXPECT_TRUE(found) << "layer " << l << " with kind " << kinds[l] << " missing from\n" << table;
  }
  for (size_t i = 0; i < rep.rows.size(); ++i) {
    EXPECT_NE(lines[i + 2].find(rep.rows[i].source), std::string::npos) << lines[i + 2];
  }
  for (const char* s : {"embed", "final_norm", "lm_head", "q_proj.weight", "wqkv", "bqkv", "init:identity",
                        "init:normal(0.02)", "teacher:layers.2.wqkv rows [0,32)", "teacher:layers.3.wqkv"})
    EXPECT_NE(table.find(s), std::string::npos) << s;
  EXPECT_THROW(rep.row("layers.0.nope"), Error);
}

}  // namespace
}  // namespace hyd

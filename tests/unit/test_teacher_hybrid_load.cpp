// load_teacher_weights straight into an all-T HybridModel (distill/teacher.h) on the golden teachers: every
// parameter equals the DenseModel load (the teacher path hydistill distill used: DenseModel, then
// copy_dense_weights); an expert-sharded HybridModel (expert_shards 2) holds exactly its half of every MoE
// layer's experts; a student initialised from the HybridModel teacher equals one initialised from the
// DenseModel; a HybridModel with other mixers is refused.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "distill/student_checkpoint.h"
#include "distill/student_init.h"
#include "distill/teacher.h"
#include "tests/common/test_util.h"
#include "trainer/hybrid_model.h"
#include "trainer/model.h"

namespace hyd {
namespace {

const std::string kGolden = std::string(HYD_SOURCE_DIR) + "/tests/golden/data/";

bool is_expert(const std::string& name) { return name.ends_with(".mlp.gate_up") || name.ends_with(".mlp.down"); }

TEST(TeacherHybridLoad, EqualsTheDenseModelLoad) {
  for (const char* model : {"llama", "qwen3", "qwen3_moe", "dots1"}) {
    SCOPED_TRACE(model);
    const std::string dir = kGolden + model;
    const TeacherInfo info = inspect_teacher(dir);
    DenseModel dense(info.config, Device::cpu(), 8);
    load_teacher_weights(dir, dense);
    HybridModel hybrid(teacher_hybrid_config(info.config, "test"), Device::cpu(), 8, ModelUse::inference);
    load_teacher_weights(dir, hybrid);
    ASSERT_EQ(hybrid.params().size(), dense.params().size());
    for (const ParamInfo& p : hybrid.params()) EXPECT_EQ(hybrid.get_param(p.name), dense.get_param(p.name)) << p.name;
    // A KA student initialised from either teacher form is the same student.
    const HybridConfig sc0 = student_config_from_teacher(info.config, "KA", KdaOptions{}, "test");
    HybridModel from_dense(sc0, Device::cpu(), 8), from_hybrid(sc0, Device::cpu(), 8);
    const TransferReport rd = init_student_from_teacher(dense, from_dense, 5);
    const TransferReport rh = init_student_from_teacher(hybrid, from_hybrid, 5);
    EXPECT_EQ(rd.rows.size(), rh.rows.size());
    for (const ParamInfo& p : from_dense.params())
      EXPECT_EQ(from_hybrid.get_param(p.name), from_dense.get_param(p.name)) << "student " << p.name;
    if (info.config.num_experts == 0) continue;

    const int64_t E = info.config.num_experts, half = E / 2;
    HybridConfig sc = teacher_hybrid_config(info.config, "test");
    sc.expert_shards = 2;
    sc.expert_shard = 1;
    sc.finalize("test");
    HybridModel sharded(sc, Device::cpu(), 8, ModelUse::inference);
    load_teacher_weights(dir, sharded);
    int experts = 0;
    for (const ParamInfo& p : sharded.params()) {
      std::vector<float> want = dense.get_param(p.name);
      if (is_expert(p.name)) {
        ++experts;
        ASSERT_EQ(p.shape[0], half) << p.name;
        const int64_t per = p.numel / half;
        want = std::vector<float>(want.begin() + half * per, want.end());
      }
      EXPECT_EQ(sharded.get_param(p.name), want) << p.name;
    }
    EXPECT_GT(experts, 0);
  }
}

TEST(TeacherHybridLoad, AStudentPatternIsRefused) {
  const std::string dir = kGolden + "qwen3";
  const TeacherInfo info = inspect_teacher(dir);
  HybridConfig c = teacher_hybrid_config(info.config, "test");
  c.pattern = std::string(1, 'A');  // (a one-letter literal trips a GCC 12 -Wrestrict false positive here)
  c.finalize("test");
  HybridModel m(c, Device::cpu(), 8);
  test::expect_error_mentioning([&] { load_teacher_weights(dir, m); }, "all-T");
}

}  // namespace
}  // namespace hyd

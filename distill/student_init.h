// Student construction from a teacher (DISTILL.md "Students"): the hybrid student's config from the
// teacher's, and its initial weights, copied from the teacher where DISTILL.md says so and initialised
// otherwise, with a report of where every parameter came from.
//
// Transfer rules (teacher = DenseModel, names as trainer/model.h; student = HybridModel):
//   outside the mixers (embed, layers.L.attn_norm, mlp_norm, w_gate_up, w_down, final_norm, lm_head):
//       copied by name (a tied teacher's embed becomes an untied student's lm_head)
//   A and T layers: layers.L.wqkv, wo (and bqkv, q_norm, k_norm where the family has them) copied
//   K layers (teacher head dim d, Hq query heads, Hkv kv heads, group G = Hq / Hkv):
//       q_proj.weight [H dk, D]   = wqkv rows [0, Hq d)                           needs H = Hq, dk = d
//       k_proj.weight [H dk, D]   block h = teacher k head h / (H / Hkv)          needs H = Hq, dk = d
//       v_proj.weight [HV dv, D]  block hv = teacher v head hv / (HV / Hkv)       needs HV % Hkv = 0, dv = d
//       o_proj.weight [D, HV dv]  = wo                                            needs HV = Hq, dv = d
//     (with H = HV = Hq the KDA value head h reads q head h, and k / v of kv head h / G: the teacher's
//     GQA grouping). The teacher's q/k/v biases (qwen2) and q/k norms (qwen3) have no KDA counterpart
//     and are not carried over (the report says so).
//       q/k/v_conv1d.weight [C, K] identity: w[c, K-1] = 1 (the current-token tap, kernels/short_conv.h),
//                                  0 elsewhere, so q/k/v enter the KDA core as silu(teacher projection)
//       A_log [HV]          log(U(1, 16))                          (FLA)
//       dt_bias [HV dk]     softplus^-1(dt), dt log-uniform in [kDtMin, kDtMax]: with f_proj ~ 0 the
//                           log-decay g = -exp(A_log) softplus(f + dt_bias) lies in about [-0.16, -1e-3],
//                           i.e. per-token decay exp(g) in [0.85, 0.999]: close to 1
//       f_proj.0/1.weight, b_proj.weight, g_proj.0/1.weight   Normal(0, kSmallInitStd)
//       g_proj.1.bias 0, o_norm.weight 1
// Every mapping is checked before anything is written: a shape that cannot be mapped is a hyd::Error
// naming the student parameter (and the option to change), and the student is left untouched.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "trainer/hybrid_model.h"
#include "trainer/model.h"
#include "trainer/model_config.h"

namespace hyd {

// The KDA dimensions of the student; 0 = derived from the teacher so the q/k/v/o transfer maps head
// for head: heads = v_heads = teacher num_heads, dk = dv = teacher head_dim, norm_eps = teacher
// rms_norm_eps.
struct KdaOptions {
  int64_t heads = 0;
  int64_t v_heads = 0;
  int64_t dk = 0;
  int64_t dv = 0;
  int64_t conv_size = 4;
  float norm_eps = 0.f;
};

// Init constants of the new KDA parameters (DISTILL.md: small random projections, decay close to 1).
constexpr float kSmallInitStd = 0.02f;
constexpr double kDtMin = 1e-3, kDtMax = 1e-2;

// The student's config: the teacher's skeleton (the config as is), `pattern` (student.pattern, as
// parse_layer_pattern reads it) and the KDA dims of `kda`, finalized. Errors (hyd::Error) name
// `source` and the field, e.g. 'student.pattern' for a pattern longer than the teacher's layers.
HybridConfig student_config_from_teacher(const ModelConfig& teacher, const std::string& pattern,
                                         const KdaOptions& kda = {}, const std::string& source = "student");

// One student parameter and where its initial value came from.
struct TransferRow {
  std::string name;            // student parameter name
  std::vector<int64_t> shape;  // its shape
  int64_t layer = -1;          // its layer, -1 for embed / final_norm / lm_head
  bool from_teacher = false;   // copied (possibly rearranged) from the teacher, else initialised
  // "teacher:layers.3.wqkv rows [0,512)", "teacher:embed", "init:identity (tap 3 of 4)",
  // "init:normal(0.02)", ...
  std::string source;
};

struct TransferReport {
  std::vector<MixerKind> layers;  // the student's mixers, one per layer
  std::vector<TransferRow> rows;  // one per student parameter, in the student's parameter order

  // The row of a student parameter; throws hyd::Error naming an unknown one.
  const TransferRow& row(const std::string& name) const;
  // Printable table: the pattern, then per layer its index, kind (K/A/T) and every parameter with its
  // shape and source; the non-layer parameters first and last.
  std::string table() const;
};

// Writes every student parameter as the rules above say (on the student's device; values through
// set_param, so bf16 students hold the teacher's bf16-rounded values). The student's skeleton must
// match the teacher's (num_layers, and every copied parameter's shape). `seed` drives the random
// initialisations (the same seed gives the same student).
TransferReport init_student_from_teacher(const DenseModel& teacher, HybridModel& student, uint64_t seed);
// The same from the teacher as an all-T HybridModel (parameter names and shapes as DenseModel's; what
// hydistill distill holds), e.g. one loaded by load_teacher_weights(dir, HybridModel&).
TransferReport init_student_from_teacher(const HybridModel& teacher, HybridModel& student, uint64_t seed);

}  // namespace hyd

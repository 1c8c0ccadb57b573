// `hydistill distill` on one device (DISTILL.md "Stages"): a teacher directory (HF layout) and a token
// dataset in, a hybrid student trained in two stages out.
//
//   stage 1 (alignment)  only the K layers' token mixers train. Per batch the teacher (an all-T
//                        HybridModel holding the teacher's weights) runs forward once, keeping every layer's
//                        input h_l and its attention output y_l = Attn_l(RMSNorm(h_l)). For every K layer l
//                        of the student:  x = RMSNorm_student(h_l),  o = KDA_l(x),
//                        mse_l = sum (o - y_l)^2 / numel,  dL/do = 2 (o - y_l) / numel.
//                        The logged mse is the mean of mse_l over the K layers; the optimizer holds the K
//                        layers' mixer parameters only (everything else is frozen).
//   stage 2 (end-to-end) every student parameter trains on
//                        L = (1 / n) sum_i [ w_kl tau^2 KL(p_t,i || p_s,i) + w_ce CE_i ]
//                        over the n tokens with a target (kernels/distill_loss.h), chunk by chunk over
//                        the LM head: the teacher's logits for the same chunk are recomputed from its kept
//                        final hidden states, so neither model's full [N, V] logits ever exist.
// Each stage has its own AdamW state and cosine schedule (warmup distill.warmup_steps, peak
// distill.stageK_lr, floor stageK_lr * distill.min_lr_ratio).
//
// Order of work, so that a bad configuration writes nothing (as trainer/train_loop.h): the run
// directory, the teacher directory (inspect_teacher), the dataset and its vocabulary against the
// teacher's, the student pattern against the teacher's layers; only then the run directory is created
// and RUN_DIR/config.ini and RUN_DIR/metrics.jsonl are written.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>

#include "trainer/train_loop.h"

namespace hyd {

struct DistillStageOptions {
  int64_t stage1_steps = 100;
  double stage1_lr = 1e-3;
  int64_t stage2_steps = 1000;
  double stage2_lr = 3e-4;
  double min_lr_ratio = 0.1;  // floor of each stage's cosine schedule, as a fraction of its peak
  int64_t warmup_steps = 10;  // per stage (capped at the stage's steps)
  double temperature = 1.0;   // tau of the KL term
  double w_kl = 1.0;
  double w_ce = 0.0;
};

struct DistillConfig {
  std::string source = "command line";  // where the options came from (the config file), for errors
  std::string device = "cpu";           // cpu | cuda | cuda:N
  RunOptions run;
  DataOptions data;
  // Used: weight_decay, beta1, beta2, eps, grad_clip, seed (student init), max_bad_steps. The steps,
  // learning rates and schedule come from `distill`.
  TrainOptions train;
  LogOptions log;                        // interval (eval_* are not used yet)
  std::string teacher_dir;               // teacher.dir (required): HF directory (distill/teacher.h)
  std::string student_pattern = "KKKA";  // student.pattern (trainer/hybrid_model.h parse_layer_pattern)
  DistillStageOptions distill;
};

struct DistillResult {
  int64_t stage1_steps = 0;
  int64_t stage2_steps = 0;
  double first_mse = -1, last_mse = -1;  // stage 1, first and last logged interval (-1: no stage 1)
  double first_kl = -1, last_kl = -1;    // stage 2 (-1: no stage 2)
  double last_ce = -1;
  int64_t tokens = 0;
  double elapsed_s = 0;
};

// Range and choice checks that need neither the teacher nor the dataset; ConfigError naming the key.
void validate_distill_config(const DistillConfig& cfg);

// Runs both stages. config_ini is written verbatim to RUN_DIR/config.ini; progress goes to `out`.
// Throws ConfigError for configuration problems (exit code 2) and hyd::Error otherwise.
DistillResult run_distillation(const DistillConfig& cfg, const std::string& config_ini, std::ostream& out);

}  // namespace hyd

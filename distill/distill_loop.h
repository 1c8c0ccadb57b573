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
//                        L = (1 / n) sum_i [ w_kl tau^2 KL(p_t,i || p_s,i) + w_ce CE_i ]  [+ w_hidden H]
//                        over the n tokens with a target (kernels/distill_loss.h; H: the hidden-state MSE
//                        of DistillStageOptions::w_hidden, logged as hidden_mse), chunk by chunk over
//                        the LM head: the teacher's logits for the same chunk are recomputed from its kept
//                        final hidden states, so neither model's full [N, V] logits ever exist.
// Each stage has its own AdamW state and cosine schedule (warmup distill.warmup_steps, peak
// distill.stageK_lr, floor stageK_lr * distill.min_lr_ratio).
//
// Evaluation (distill/evaluation.h DistillEvaluator) every eval.interval steps (both stages counted)
// and at the end: a table on `out` and one record per evaluation in RUN_DIR/eval.jsonl.
// Checkpoints (checkpoint/run_directory.h) every checkpoint.interval steps, at the end of the run and
// where run.stop_after stops it; a checkpoint's step counts both stages (step-00000150 is stage 2 step
// 50 after 100 stage-1 steps), its manifest holds the stage and the step within it. train.resume
// continues bit for bit, in either stage: the student, the AdamW state of the stage it was in, the
// sampler position and the loop's running sums are all a run carries from step to step.
//
// Order of work, so that a bad configuration writes nothing (as trainer/train_loop.h): the run
// directory and the checkpoint to resume from, the teacher directory (inspect_teacher), the dataset and
// its vocabulary against the teacher's, the student pattern against the teacher's layers, the passkey
// data, the models and the restored checkpoint; only then the run directory is created and
// RUN_DIR/config.ini and RUN_DIR/metrics.jsonl are written.
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
  // Weight of the hidden-state term (0 = off, nothing computed):
  //   H = (1 / (L n)) sum_l sum_t ||h_s[l,t] - h_t[l,t]||^2 / D
  // over the student's L layers and the n loss tokens t (target >= 0, the tokens of the KL), h[l] the
  // residual stream after layer l (h[L-1] before final_norm); the stage-2 loss gains w_hidden * H
  // (HybridModel::HiddenStateMatch).
  double w_hidden = 0.0;
  // Coefficient of the student's MoE load-balancing loss in stage 2 (0 = off; MoE teachers only): per MoE
  // layer coef x E x sum_e f_e P_e (trainer/layer_moe.h L_aux), summed over the layers, averaged over the
  // ranks (each computes it on its own tokens); the stage-2 loss gains that term. qwen3_moe models were
  // trained with their config.json's router_aux_loss_coef (e.g. 0.001).
  double router_aux_coef = 0.0;
  // Auxiliary-loss-free load balancing in stage 2 (DeepSeek-V3; 0 = off; students of teachers with a selection
  // bias, e.g. dots1): after every stage-2 optimizer step each MoE layer's selection bias moves by
  // rate x sign(mean load - load_e) (trainer/layer_moe.h moe_update_selection_bias), the loads being the
  // step's routed rows per expert summed over every rank. The bias stays a parameter without gradient: the
  // update goes to the optimizer's f32 master of it (CUDA; the bf16 working copy follows) or to the f32
  // parameter itself (CPU), so checkpoints and resumes carry it. DeepSeek-V3 used 0.001.
  double router_bias_rate = 0.0;
};

struct EvalOptions {
  int64_t interval = 0;      // eval.interval: steps between evaluations (both stages counted); 0 = only at the end
  int64_t batches = 4;       // eval.batches: held-out micro-batches; 0 = no held-out metrics
  std::string passkey_data;  // eval.passkey_data: passkey prompts (data/make_passkey.py); empty = none
};

struct DistillConfig {
  std::string source = "command line";  // where the options came from (the config file), for errors
  std::string device = "cpu";           // cpu | cuda | cuda:N
  RunOptions run;
  DataOptions data;
  // Used: weight_decay, beta1, beta2, eps, grad_clip, seed (student init), max_bad_steps. The steps,
  // learning rates and schedule come from `distill`.
  TrainOptions train;
  LogOptions log;                        // interval (evaluation is configured by `eval`)
  std::string teacher_dir;               // teacher.dir (required): HF directory (distill/teacher.h)
  std::string student_pattern = "KKKA";  // student.pattern (trainer/hybrid_model.h parse_layer_pattern)
  DistillStageOptions distill;
  CheckpointOptions checkpoint;
  EvalOptions eval;
  // parallel.dp x parallel.sp ranks (mpirun -np dp*sp; the CPU for now): dp ranks take different sequences
  // (data.batch_size each), sp ranks slices of the same sequences; gradients are summed over all ranks,
  // every rank holds the whole models and optimizer state, rank 0 prints, evaluates and checkpoints.
  ParallelOptions parallel;
};

struct DistillResult {
  int64_t stage1_steps = 0;  // steps done by the end of this invocation (a resumed run counts the earlier ones)
  int64_t stage2_steps = 0;
  double first_mse = -1, last_mse = -1;  // stage 1, first and last logged interval (-1: no stage 1)
  double first_kl = -1, last_kl = -1;    // stage 2 (-1: no stage 2)
  double last_ce = -1;
  int64_t tokens = 0;
  double elapsed_s = 0;
};

// Range and choice checks that need neither the teacher nor the dataset; ConfigError naming the key.
void validate_distill_config(const DistillConfig& cfg);

// Runs both stages. effective: recorded in RUN_DIR/config.ini and every checkpoint; progress goes to
// `out`. Throws ConfigError for configuration problems (exit code 2) and hyd::Error otherwise.
DistillResult run_distillation(const DistillConfig& cfg, const EffectiveConfig& effective, std::ostream& out);

// `hydistill eval`: the student of a distill checkpoint against its teacher, as the evaluations during
// distill do (a table on `out`, one record appended to RUN_DIR/eval.jsonl). cfg supplies the data,
// eval.* and run.dir; its teacher.dir and student.pattern must be the checkpoint's (ConfigError naming
// the key otherwise). A missing or broken checkpoint is a hyd::Error naming the file and the field;
// nothing is written before every input has been checked. One process, or W ranks (mpirun) with
// parallel.dp = parallel.ep = W and parallel.sp = 1: each rank then holds 1 / W of the routed experts of both
// models, the ranks evaluate together and rank 0 reports.
void run_evaluation(const DistillConfig& cfg, const std::string& checkpoint_dir, std::ostream& out);

}  // namespace hyd

#include "distill/distill_loop.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <ostream>
#include <sstream>

#include "checkpoint/run_directory.h"
#include "checkpoint/training_state.h"
#include "data/dataset.h"
#include "distill/evaluation.h"
#include "distill/router_balance.h"
#include "distill/student_checkpoint.h"
#include "distill/student_init.h"
#include "distill/teacher.h"
#include "kernels/distill_loss.h"
#include "kernels/elementwise.h"
#include "kernels/global_norm.h"
#include "parallel/checks.h"
#include "parallel/comm.h"
#include "parallel/grid.h"
#include "trainer/layer_moe.h"
#include "trainer/stop_signal.h"
#include "trainer/zero1.h"
#include "parallel/sequence_parallel.h"
#include "trainer/batch_upload.h"
#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/hybrid_model.h"
#include "trainer/lasp.h"
#include "trainer/metrics.h"
#include "trainer/model.h"
#include "trainer/optimizer.h"
#include "trainer/schedule.h"

#ifdef HYD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace hyd {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kPad = 512;  // per-allocation slack for the arena's alignment

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Host f32 copy of a device f32 tensor, after everything queued on ctx has finished.
std::vector<float> download_f32(ExecContext& ctx, const Tensor& t) {
  HYD_CHECK(t.dtype == DType::f32, "download_f32: expected an f32 tensor");
  ctx.synchronize();
  device_fence(t.device);
  std::vector<float> host(static_cast<size_t>(t.numel()));
  copy_tensor(Tensor(host.data(), DType::f32, Device::cpu(), {t.numel()}), t.view({t.numel()}));
  return host;
}

// dst (f32) = src (f32 or bf16), same device, on ctx's stream where a kernel is needed.
void to_f32(ExecContext& ctx, const Tensor& dst, const Tensor& src) {
  if (src.dtype == DType::f32 && src.device.is_cpu())
    copy_tensor(dst, src);
  else
    kernels::convert(ctx, dst, src);
}

LrSchedule stage_schedule(double lr, int64_t steps, const DistillStageOptions& d) {
  LrSchedule s;
  s.kind = ScheduleKind::cosine;
  s.lr = lr;
  s.min_lr = lr * d.min_lr_ratio;
  s.total_steps = std::max<int64_t>(steps, 1);
  s.warmup_steps = std::min(d.warmup_steps, s.total_steps);
  s.validate();
  return s;
}

using json = nlohmann::json;

// What a distillation or an evaluation reads before it builds anything, checked against each other.
struct DistillInputs {
  TeacherInfo teacher;
  std::unique_ptr<TokenDataset> data;
  HybridConfig student_cfg, teacher_cfg;
  std::unique_ptr<TokenDataset> passkey;    // eval.passkey_data; null when not given
  std::unique_ptr<PackedSampler> held_out;  // the validation split for eval.batches; null when none
  int64_t max_tokens = 0;                   // the models' micro-batch: B * T, or the longest passkey prompt
};

// The teacher directory, the dataset (its vocabulary within the teacher's), the student pattern against
// the teacher's layers, the evaluation's data; ConfigError naming the option for every problem.
DistillInputs open_inputs(const DistillConfig& cfg, const std::string& pattern) {
  const std::string& src = cfg.source;
  DistillInputs in;
  if (!fs::is_directory(cfg.teacher_dir))
    throw ConfigError::at(src, "teacher.dir", cfg.teacher_dir + ": no such directory");
  try {
    in.teacher = inspect_teacher(cfg.teacher_dir);
  } catch (const Error& e) {
    throw ConfigError::at(src, "teacher.dir", e.what());
  }
  const ModelConfig& tc = in.teacher.config;

  if (!fs::exists(cfg.data.path)) throw ConfigError::at(src, "data.path", cfg.data.path + ": no such file");
  in.data = std::make_unique<TokenDataset>(cfg.data.path);
  const DatasetInfo& info = in.data->info();
  if (info.vocab_size > tc.vocab_size)
    throw ConfigError::at(src, "data.path",
                          "the dataset " + info.path + " has vocab_size " + std::to_string(info.vocab_size) +
                              ", larger than the vocab_size " + std::to_string(tc.vocab_size) + " of the teacher " +
                              cfg.teacher_dir + " (teacher.dir): the dataset was not tokenized for this teacher");
  if (cfg.data.seq_len > tc.max_position_embeddings)
    throw ConfigError::at(src, "data.seq_len",
                          std::to_string(cfg.data.seq_len) + " exceeds the teacher's max_position_embeddings = " +
                              std::to_string(tc.max_position_embeddings));
  try {
    in.student_cfg = student_config_from_teacher(tc, pattern, KdaOptions{}, src);
    in.teacher_cfg = teacher_hybrid_config(tc, src);
  } catch (const ConfigError&) {
    throw;
  } catch (const Error& e) {
    throw ConfigError::from(e, src);
  }
  in.max_tokens = cfg.data.batch_size * cfg.data.seq_len;

  if (!cfg.eval.passkey_data.empty()) {
    const std::string& path = cfg.eval.passkey_data;
    if (!fs::is_regular_file(path)) throw ConfigError::at(src, "eval.passkey_data", path + ": no such file");
    in.passkey = std::make_unique<TokenDataset>(path);
    const DatasetInfo& p = in.passkey->info();
    if (p.vocab_size > tc.vocab_size)
      throw ConfigError::at(src, "eval.passkey_data",
                            path + " has vocab_size " + std::to_string(p.vocab_size) + ", larger than the teacher's " +
                                std::to_string(tc.vocab_size) + ": it was not tokenized for this teacher");
    if (in.passkey->loss_mask().empty())
      throw ConfigError::at(src, "eval.passkey_data",
                            path + " has no /loss_mask marking the answers (make it with data/make_passkey.py)");
    const int64_t longest = longest_document(*in.passkey);
    if (longest > tc.max_position_embeddings)
      throw ConfigError::at(
          src, "eval.passkey_data",
          path + " holds a prompt of " + std::to_string(longest) +
              " tokens, beyond the teacher's max_position_embeddings = " + std::to_string(tc.max_position_embeddings));
    in.max_tokens = std::max(in.max_tokens, longest);
  }
  if (cfg.eval.batches > 0 && cfg.data.val_fraction > 0) {
    in.held_out = std::make_unique<PackedSampler>(*in.data, Split::validation, cfg.data.val_fraction, cfg.data.seq_len,
                                                  cfg.data.batch_size, cfg.data.seed);
    if (in.held_out->num_docs() == 0)
      throw ConfigError::at(src, "data.val_fraction",
                            "the validation split of " + info.path + " has no documents (" +
                                std::to_string(info.num_docs) + " in the file); raise it or set eval.batches = 0");
  }
  return in;
}

// The loop's counters and running sums at a checkpoint (manifest.loop): with the student, the optimizer
// of the current stage and the step they make a resumed run continue exactly as one that never stopped.
struct DistillLoopState {
  int64_t tokens = 0;
  double first_mse = -1, last_mse = -1, first_kl = -1, last_kl = -1, last_ce = -1;
  // The current stage's log interval.
  double interval_mse = 0, interval_kl = 0, interval_ce = 0, last_norm = 0;
  int64_t interval_steps = 0, interval_tokens = 0, bad_in_row = 0;
  // Stage 2's hidden-state term (distill.w_hidden > 0 only: a run without it keeps the manifest it had,
  // so its checkpoints and those written before the option existed resume alike).
  bool with_hidden = false;
  double interval_hidden = 0;
  // Stage 2's MoE load-balancing term (distill.router_aux_coef > 0 only, for the same reason).
  bool with_aux = false;
  double interval_aux = 0;

  void start_stage() {
    interval_mse = interval_kl = interval_ce = last_norm = interval_hidden = interval_aux = 0;
    interval_steps = interval_tokens = bad_in_row = 0;
  }
  template <class F>
  void visit(F&& f) {
    f("tokens", tokens), f("first_mse", first_mse), f("last_mse", last_mse), f("first_kl", first_kl);
    f("last_kl", last_kl), f("last_ce", last_ce), f("interval_mse", interval_mse), f("interval_kl", interval_kl);
    f("interval_ce", interval_ce), f("last_norm", last_norm), f("interval_steps", interval_steps);
    f("interval_tokens", interval_tokens), f("bad_in_row", bad_in_row);
    if (with_hidden) f("interval_hidden", interval_hidden);
    if (with_aux) f("interval_aux", interval_aux);
  }
};

// The teacher's weights straight into the all-T HybridModel `teacher` (no DenseModel copy of the teacher in
// between); when `student` is given it is initialised from them, its transfer table in *report.
void load_teacher(const std::string& dir, HybridModel& teacher, HybridModel* student, uint64_t seed,
                  TransferReport* report) {
  load_teacher_weights(dir, teacher);
  if (student) *report = init_student_from_teacher(teacher, *student, seed);
}

// Expert parallelism over groups of ep > 1 ranks: the teacher must have routed experts that ep divides
// (ConfigError naming parallel.ep otherwise); world rank `rank` then stores expert shard rank % ep of both models.
void shard_experts(const DistillConfig& cfg, int ep, int rank, DistillInputs& in) {
  const ModelConfig& tc = in.teacher.config;
  if (tc.num_experts == 0)
    throw ConfigError::at(cfg.source, "parallel.ep",
                          "= " + std::to_string(ep) + " but the teacher " + cfg.teacher_dir + " has no MoE layers");
  if (tc.num_experts % ep != 0)
    throw ConfigError::at(cfg.source, "parallel.ep",
                          "= " + std::to_string(ep) + " must divide the teacher's " + std::to_string(tc.num_experts) +
                              " experts");
  for (HybridConfig* c : {&in.teacher_cfg, &in.student_cfg}) {
    c->expert_shards = ep;
    c->expert_shard = rank % ep;
  }
}

// FLOPs per token of a stage-2 step, for MFU: the student's forward + backward (hybrid_train_flops_per_token) and
// the teacher's forward by ModelConfig::train_flops_per_token's convention (a third of its training FLOPs).
double stage2_flops_per_token(HybridModel& student, const HybridConfig& sc, const ModelConfig& tc, int64_t T) {
  return hybrid_train_flops_per_token(student, sc, T) + tc.train_flops_per_token(T) / 3.0;
}

}  // namespace

void validate_distill_config(const DistillConfig& cfg) {
  const std::string& src = cfg.source;
  auto require = [&](bool ok, const char* key, const std::string& msg) {
    if (!ok) throw ConfigError::at(src, key, msg);
  };
  require(!cfg.run.dir.empty(), "run.dir", "required key is missing");
  require(!cfg.data.path.empty(), "data.path", "required key is missing");
  require(!cfg.teacher_dir.empty(), "teacher.dir", "required key is missing");
  require(!cfg.student_pattern.empty(), "student.pattern", "must not be empty");
  require(cfg.data.seq_len >= 2, "data.seq_len", "must be >= 2, got " + std::to_string(cfg.data.seq_len));
  require(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1, got " + std::to_string(cfg.data.batch_size));
  require(cfg.data.val_fraction >= 0 && cfg.data.val_fraction < 1, "data.val_fraction",
          "must lie in [0, 1), got " + format_number("%g", cfg.data.val_fraction));
  const DistillStageOptions& d = cfg.distill;
  require(d.stage1_steps >= 0, "distill.stage1_steps", "must be >= 0, got " + std::to_string(d.stage1_steps));
  require(d.stage2_steps >= 0, "distill.stage2_steps", "must be >= 0, got " + std::to_string(d.stage2_steps));
  require(d.stage1_steps + d.stage2_steps >= 1, "distill.stage2_steps",
          "distill.stage1_steps and distill.stage2_steps are both 0: nothing to do");
  require(d.stage1_lr > 0 && std::isfinite(d.stage1_lr), "distill.stage1_lr",
          "must be > 0, got " + format_number("%g", d.stage1_lr));
  require(d.stage2_lr > 0 && std::isfinite(d.stage2_lr), "distill.stage2_lr",
          "must be > 0, got " + format_number("%g", d.stage2_lr));
  require(d.min_lr_ratio >= 0 && d.min_lr_ratio <= 1, "distill.min_lr_ratio",
          "must lie in [0, 1], got " + format_number("%g", d.min_lr_ratio));
  require(d.warmup_steps >= 0, "distill.warmup_steps", "must be >= 0, got " + std::to_string(d.warmup_steps));
  require(d.temperature > 0 && std::isfinite(d.temperature), "distill.temperature",
          "must be > 0, got " + format_number("%g", d.temperature));
  require(d.w_kl >= 0 && std::isfinite(d.w_kl), "distill.w_kl", "must be >= 0, got " + format_number("%g", d.w_kl));
  require(d.w_ce >= 0 && std::isfinite(d.w_ce), "distill.w_ce", "must be >= 0, got " + format_number("%g", d.w_ce));
  require(d.w_hidden >= 0 && std::isfinite(d.w_hidden), "distill.w_hidden",
          "must be >= 0 (0 = off), got " + format_number("%g", d.w_hidden));
  require(d.router_aux_coef >= 0 && std::isfinite(d.router_aux_coef), "distill.router_aux_coef",
          "must be >= 0 (0 = off), got " + format_number("%g", d.router_aux_coef));
  require(d.router_bias_rate >= 0 && std::isfinite(d.router_bias_rate), "distill.router_bias_rate",
          "must be >= 0 (0 = off), got " + format_number("%g", d.router_bias_rate));
  require(d.stage2_steps == 0 || d.w_kl + d.w_ce > 0, "distill.w_kl",
          "distill.w_kl and distill.w_ce are both 0: stage 2 would have no loss");
  const TrainOptions& t = cfg.train;
  require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0, got " + format_number("%g", t.weight_decay));
  require(t.beta1 >= 0 && t.beta1 < 1, "train.beta1", "must lie in [0, 1), got " + format_number("%g", t.beta1));
  require(t.beta2 >= 0 && t.beta2 < 1, "train.beta2", "must lie in [0, 1), got " + format_number("%g", t.beta2));
  require(t.eps > 0, "train.eps", "must be > 0, got " + format_number("%g", t.eps));
  require(t.grad_clip >= 0, "train.grad_clip",
          "must be >= 0 (0 = no clipping), got " + format_number("%g", t.grad_clip));
  require(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1, got " + std::to_string(t.max_bad_steps));
  require(cfg.log.interval >= 1, "log.interval", "must be >= 1, got " + std::to_string(cfg.log.interval));
  require(cfg.eval.interval >= 0, "eval.interval",
          "must be >= 0 (0 = only at the end), got " + std::to_string(cfg.eval.interval));
  require(cfg.eval.batches >= 0, "eval.batches", "must be >= 0 (0 = none), got " + std::to_string(cfg.eval.batches));
  require(cfg.parallel.dp >= 1 && cfg.parallel.dp <= 65536, "parallel.dp",
          "must lie in [1, 65536], got " + std::to_string(cfg.parallel.dp));
  require(cfg.parallel.sp >= 1 && cfg.parallel.sp <= 65536, "parallel.sp",
          "must lie in [1, 65536], got " + std::to_string(cfg.parallel.sp));
  require(cfg.parallel.ep >= 1 && (cfg.parallel.dp * cfg.parallel.sp) % cfg.parallel.ep == 0, "parallel.ep",
          "= " + std::to_string(cfg.parallel.ep) + " must be >= 1 and divide parallel.dp x parallel.sp = " +
              std::to_string(cfg.parallel.dp * cfg.parallel.sp));
  validate_run_options(cfg.run, cfg.checkpoint, cfg.train.resume, src);
  try {
    (void)parse_device(cfg.device);
  } catch (const Error& e) {
    throw ConfigError::at(src, "device", e.what());
  }
}

DistillResult run_distillation(const DistillConfig& cfg, const EffectiveConfig& effective, std::ostream& all_out) {
  const std::string& src = cfg.source;
  validate_distill_config(cfg);

  // The dp x sp process grid (world size 1 when MPI is not running). Every rank holds the whole teacher
  // and student (but for the routed experts under expert parallelism, below); the dp ranks take different
  // sequences, the sp ranks slices of the same sequences (LASP-2 for the K layers, LASP-2H for the A and T
  // layers of both models); the gradients are summed over all ranks, so every rank applies the same update
  // and rank 0 alone prints and reports; the checkpoints are sharded.
  int mpi_up = 0;
  CHECK_MPI(MPI_Initialized(&mpi_up));
  std::optional<Communicator> world;
  if (mpi_up) world = Communicator::world();
  const int dp = static_cast<int>(cfg.parallel.dp), sp = static_cast<int>(cfg.parallel.sp);
  try {
    validate_grid(dp, sp, world ? world->size() : 1);
  } catch (const Error& e) {
    throw ConfigError::at(src, "parallel.dp", e.what());
  }
  if (sp > 1 && (cfg.data.seq_len % sp != 0 || cfg.data.seq_len / sp < 4))
    throw ConfigError::at(src, "parallel.sp",
                          std::to_string(sp) + " must divide data.seq_len = " + std::to_string(cfg.data.seq_len) +
                              " into slices of at least 4 tokens");
  std::optional<ProcessGrid> grid;
  if (world) grid.emplace(*world, dp, sp);
  const int dp_rank = grid ? grid->dp_rank() : 0;
  const bool rank0 = !world || world->rank() == 0;
  std::ostream null_out(nullptr);
  std::ostream& out = rank0 ? all_out : null_out;

  // Run directory and the checkpoint to resume from, before anything is read or written.
  RunDirectory run("distill", cfg.run, cfg.checkpoint, cfg.train.resume, effective,
                   {{"data.path", canonical_path(cfg.data.path)}, {"teacher.dir", canonical_path(cfg.teacher_dir)}},
                   src, out);
  const Checkpoint* resume = run.resume_from();
  if (world) world->barrier();  // every rank has read the run directory before rank 0 writes it
  const Device device = rank_device(cfg.device, world ? world->size() : 1, src);
  DistillInputs in = open_inputs(cfg, cfg.student_pattern);
  const ModelConfig& tc = in.teacher.config;
  const DatasetInfo& info = in.data->info();
  if (resume) {
    check_data_identity(*resume, info, src);
    check_resume_global_batch(*resume, cfg.data.batch_size, dp, src);
    check_teacher_identity(*resume, cfg.teacher_dir, src, "teacher.dir");
  }

  // N: this rank's tokens per step (its slice of B sequences of T tokens); the step moves dp B T tokens.
  const int64_t B = cfg.data.batch_size, T = cfg.data.seq_len, N = B * T / sp, step_tokens = B * T * dp;
  PackedSampler sampler(*in.data, Split::train, cfg.data.val_fraction, T, B, cfg.data.seed, dp_rank, dp);
  std::optional<SequenceParallel> sp_ctx;
  if (sp > 1) sp_ctx.emplace(grid->sp_group(), device);
  // This rank's part of step `s`'s micro-batch, uploaded; with sp > 1 the batch carries the SP layout.
  // Expert parallelism: groups of parallel.ep consecutive ranks compute the MoE layers' routed experts
  // together (trainer/layer_moe.h MoeExpertParallel: rank p of a group runs experts [p E/ep, (p+1) E/ep) for
  // the tokens of the whole group). Each rank stores only those experts, of the teacher and of the student
  // (HybridConfig::expert_shards), replicated over the W / ep ranks with the same EP index; ZeRO-1 reduces and
  // shards their gradients and optimizer state over those replicas only (its expert region); checkpoints
  // hold each expert once (param/NAME[a:b] from the ranks of the first EP group); every rank evaluates.
  const int ep = static_cast<int>(cfg.parallel.ep);
  std::optional<Communicator> ep_group, ep_replicas;
  std::unique_ptr<MoeExpertParallel> ep_ctx;
  if (ep > 1) {
    shard_experts(cfg, ep, world->rank(), in);
    ep_group.emplace(world->split(world->rank() / ep, world->rank() % ep));
    ep_replicas.emplace(world->split(world->rank() % ep, world->rank() / ep));
    ep_ctx = std::make_unique<MoeExpertParallel>(*ep_group, device);
  }
  auto batch_for = [&](ExecContext& c, BatchUploader& up, int64_t s, HostBatch& hb) {
    hb = sampler.batch(s);
    Batch b = upload_sp_batch(c, up, sp_ctx ? &*sp_ctx : nullptr, B, T, hb);
    b.ep = ep_ctx.get();
    return b;
  };
  // Sums over all ranks (no-op on one).
  auto sum_all = [&](std::span<double> v) {
    if (world && world->size() > 1) world->all_reduce(v, ReduceOp::kSum);
  };
  if (sampler.num_docs() == 0)
    throw ConfigError::at(src, "data.val_fraction", "no training documents left in " + info.path);

  // The teacher's weights go straight into the all-T HybridModel that serves stage 1's layer inputs and
  // stage 2's logits; the student is initialised from it.
  // Under sequence parallelism both hold this rank's N = B x T / sp tokens (the held-out evaluation runs on
  // the slices too); passkey prompts need whole documents, which sp > 1 does not offer yet.
  if (sp > 1 && in.passkey)
    throw ConfigError::at(src, "eval.passkey_data",
                          "passkey evaluation is not available with parallel.sp = " + std::to_string(sp) +
                              " (it needs whole prompts on one rank); evaluate checkpoints with `hydistill eval` "
                              "in one process, or leave eval.passkey_data empty");
  const int64_t model_tokens = sp > 1 ? N : in.max_tokens;
  ExecContext ctx(device);
  // Stage 2 runs the teacher's forward on a stream of its own, overlapping with the student's forward (it
  // only has to be done before the first logits chunk). Not under sequence or expert parallelism: both
  // models' forwards would then issue collectives on the same communicators from two streams.
  std::optional<ExecContext> own_teacher_ctx;
  if (device.is_cuda() && sp == 1 && ep == 1) own_teacher_ctx.emplace(device);
  ExecContext& teacher_ctx = own_teacher_ctx ? *own_teacher_ctx : ctx;
  // The teacher only runs forwards: an inference model (no gradients, one layer's activations).
  HybridModel teacher(in.teacher_cfg, device, model_tokens, ModelUse::inference);
  HybridModel student(in.student_cfg, device, model_tokens);
  TransferReport report;
  load_teacher(cfg.teacher_dir, teacher, &student, cfg.train.seed, &report);
  // Several ranks: ZeRO-1 over all of them (trainer/zero1.h): the student's gradients are reduce-scattered,
  // each rank's optimizer keeps the state of its shard, the parameters are all-gathered after the update;
  // checkpoints are sharded.
  std::optional<Zero1> zero;
  if (world && world->size() > 1) {
    const Zero1::ExpertRegion experts{student.expert_region_offset(), ep_replicas ? &*ep_replicas : nullptr};
    zero.emplace(*world, student.params(), student.flat_params(), student.flat_grads(), ep > 1 ? &experts : nullptr);
  }
  // The optimizer of a stage over `trained` (this rank's shard of it under ZeRO-1).
  auto make_optimizer = [&](const std::vector<ParamInfo>& trained) {
    auto opt = std::make_unique<AdamW>(zero ? zero->shard_params_of(trained) : trained, device, cfg.train.adamw());
    if (zero) opt->set_sum_squares_reduction([&](double ss) { return zero->all_reduce_sum(ss); });
    return opt;
  };
  BatchUploader uploader(device, N, /*with_loss_mask=*/true);
  const DType act = device.is_cuda() ? DType::bf16 : DType::f32;
  const int64_t D = tc.hidden_size, V = tc.vocab_size, L = tc.num_layers;
  std::vector<int64_t> k_layers;
  for (int64_t l = 0; l < L; ++l)
    if (student.layer_kind(l) == MixerKind::kda) k_layers.push_back(l);
  const int64_t stage1_steps = k_layers.empty() ? 0 : cfg.distill.stage1_steps;
  const int64_t stage2_steps = cfg.distill.stage2_steps;
  const int64_t total = stage1_steps + stage2_steps;

  // Resuming: the checkpoint's place in the stages, the student and the loop's sums (the optimizer
  // state is restored when its stage starts below).
  int64_t start = 0;  // global steps done
  DistillLoopState st;
  st.with_hidden = cfg.distill.w_hidden > 0;
  st.with_aux = cfg.distill.router_aux_coef > 0;
  if (st.with_aux && tc.num_experts == 0)
    throw ConfigError::at(src, "distill.router_aux_coef",
                          "= " + format_number("%g", cfg.distill.router_aux_coef) + " but the teacher " +
                              cfg.teacher_dir + " has no MoE layers");
  if (cfg.distill.router_bias_rate > 0 && !tc.moe_selection_bias)
    throw ConfigError::at(src, "distill.router_bias_rate",
                          "= " + format_number("%g", cfg.distill.router_bias_rate) + " but the teacher " +
                              cfg.teacher_dir + " has no MoE selection bias (e_score_correction_bias, e.g. dots1)");
  if (resume) {
    const CheckpointManifest& m = resume->manifest;
    const bool fits = m.stage == 1 ? m.stage_step == m.step && m.step <= stage1_steps
                                   : m.stage == 2 && m.step == stage1_steps + m.stage_step && m.step <= total;
    if (!fits || resume_next_batch(*resume) != m.step)
      throw Error::at(resume->manifest_path(), "stage_step",
                      "stage " + std::to_string(m.stage) + " step " + std::to_string(m.stage_step) + " (step " +
                          std::to_string(m.step) + ") does not fit this run's stages of " +
                          std::to_string(stage1_steps) + " and " + std::to_string(stage2_steps) + " steps");
    restore_parameters(*resume, student.params());
    read_loop_state(*resume, st);
    start = m.step;
  }
  // Resume the optimizer of `stage` when the checkpoint was taken inside it (after at least one step).
  auto resume_optimizer = [&](int64_t stage, AdamW& optimizer) {
    if (resume && resume->manifest.stage == stage && resume->manifest.stage_step > 0) {
      if (zero || resume->manifest.world_size > 1) {
        restore_optimizer_resharded(*resume, student.params(), optimizer);
        if (zero) zero->gather_parameters(ctx);  // every rank's exact masters into every replica
        ctx.synchronize();
      } else {
        restore_optimizer_state(resume->tensors, resume->manifest.optimizer, resume->manifest_path(), optimizer);
      }
    } else {
      st.start_stage();
    }
  };
  DistillEvaluator evaluator(teacher, student, model_tokens, in.held_out.get(), cfg.eval.batches, in.passkey.get(),
                             sp > 1 ? &*sp_ctx : nullptr, B, T, ep_ctx.get());
  // Held-out evaluation: rank 0, or under sequence parallelism the ranks of its SP group (dp rank 0); under
  // expert parallelism every rank (each EP group computes its experts for all of its ranks' tokens; the DP
  // replicas repeat rank 0's evaluation, in the time rank 0 needs anyway). Rank 0 reports.
  const bool evaluates = ep > 1 || (sp > 1 ? dp_rank == 0 : rank0);

  // Everything checked: now the run directory is written.
  std::optional<MetricsWriter> metrics, evals;
  if (rank0) {
    run.begin();
    metrics.emplace(run.file(kMetricsFile), /*truncate=*/false);
    evals.emplace(run.file(kEvalFile), /*truncate=*/false);
  }

  {
    std::ostringstream os;
    os << "device           " << device.str() << "\n"
       << "teacher          " << cfg.teacher_dir << " (" << tc.family << ", " << L << " layers, hidden " << D
       << ", vocab " << V << ", " << format_count(static_cast<double>(in.teacher.num_parameters)) << " parameters)\n"
       << "student          pattern " << layer_pattern_string(in.student_cfg.layers) << "\n"
       << "tokens/step      " << step_tokens << " (" << B << " sequences x " << T << " tokens"
       << (dp > 1 ? " x " + std::to_string(dp) + " data-parallel ranks" : std::string())
       << (sp > 1 ? ", each sequence over " + std::to_string(sp) + " sequence-parallel ranks (LASP-2 / LASP-2H)"
                  : std::string())
       << (ep > 1 ? ", routed experts over groups of " + std::to_string(ep) + " expert-parallel ranks, each storing " +
                        std::to_string(tc.num_experts / ep) + " of the " + std::to_string(tc.num_experts) +
                        " per MoE layer"
                  : std::string())
       << ")\n"
       << in.data->summary() << "train split      " << sampler.num_docs() << " documents, "
       << sampler.tokens_per_epoch() << " tokens\n"
       << "stage 1          " << stage1_steps << " steps, lr " << format_number("%.3g", cfg.distill.stage1_lr) << " ("
       << k_layers.size() << " KDA layers align to the teacher's attention)\n"
       << "stage 2          " << stage2_steps << " steps, lr " << format_number("%.3g", cfg.distill.stage2_lr)
       << ", tau " << format_number("%g", cfg.distill.temperature) << ", w_kl " << format_number("%g", cfg.distill.w_kl)
       << ", w_ce " << format_number("%g", cfg.distill.w_ce)
       << (cfg.distill.w_hidden > 0 ? ", w_hidden " + format_number("%g", cfg.distill.w_hidden) : std::string())
       << (cfg.distill.router_aux_coef > 0 ? ", router aux " + format_number("%g", cfg.distill.router_aux_coef)
                                           : std::string())
       << (cfg.distill.router_bias_rate > 0
               ? ", router bias rate " + format_number("%g", cfg.distill.router_bias_rate) + " (aux-loss-free)"
               : std::string())
       << "\n"
       << "evaluation       "
       << (cfg.eval.interval > 0 ? "every " + std::to_string(cfg.eval.interval) + " steps and " : "")
       << "at the end: " << (in.held_out ? std::to_string(cfg.eval.batches) + " held-out batches" : "no held-out data")
       << ", " << (in.passkey ? "passkey " + cfg.eval.passkey_data : "no passkey data") << "\n"
       << "memory           " << format_megabytes(teacher.memory_bytes() + student.memory_bytes() + uploader.bytes())
       << " (teacher " << format_megabytes(teacher.memory_bytes()) << ", student "
       << format_megabytes(student.memory_bytes()) << ", before optimizer state)\n"
       << "run dir          " << run.dir() << "\n";
    if (resume)
      os << "resumed from     " << resume->dir << " (stage " << resume->manifest.stage << " step "
         << resume->manifest.stage_step << ")\n";
    out << "hydistill distill\n";
    std::istringstream lines(os.str());
    for (std::string line; std::getline(lines, line);) out << "  " << line << "\n";
    if (!resume) {
      out << "student initialisation (transfer table)\n" << report.table();
      if (!report.table().empty() && report.table().back() != '\n') out << "\n";
    }
    out.flush();
  }

  DistillResult result;
  const auto t_start = Clock::now();
  // A skipped step (non-finite loss or gradient) leaves the student and the optimizer as they were;
  // train.max_bad_steps of them in a row end the run after a checkpoint of that state (after_step).
  double bad_loss = 0;
  auto skip_or_throw = [&](int, int64_t, double loss) {
    ++st.bad_in_row;
    bad_loss = loss;
  };
  // SIGTERM / SIGUSR1 end the run after the current step, with a checkpoint.
  const StopSignals signals;
  // After stage step `stage_step` of `stage`: evaluation, checkpoint, and whether run.stop_after, a stop
  // signal or divergence ends the run here. optimizer: the stage's (nullptr before any step).
  int64_t done = start;
  auto after_step = [&](int64_t stage, int64_t stage_step, const AdamW* optimizer) {
    const int64_t g = (stage == 1 ? 0 : stage1_steps) + stage_step;
    done = g;
    fault_point_after_step(g);
    const int signal = signals.agreed(world ? &*world : nullptr);
    const bool diverged = st.bad_in_row >= cfg.train.max_bad_steps;
    const bool stopping = signal != 0 || diverged;
    if (evaluates && !stopping && ((cfg.eval.interval > 0 && g % cfg.eval.interval == 0) || g == total)) {
      DistillEvaluation e = evaluator.evaluate(ctx);
      e.global_step = g;
      e.stage = stage;
      e.stage_step = stage_step;
      out << e.table() << std::flush;
      if (evals) evals->write(e.json());
    }
    if ((rank0 || zero) && (run.checkpoint_due(g, total) || stopping)) {
      CheckpointManifest m;
      m.step = g;
      m.stage = stage;
      m.stage_step = stage_step;
      m.data = data_position(info, cfg.data, g);
      m.loop = loop_state_json(st);
      m.teacher = teacher_identity(cfg.teacher_dir, in.teacher);
      m.dp = dp;
      m.sp = sp;
      SafetensorsWriter w;
      // ZeRO-1: a sharded checkpoint (rank 0: the parameters and its shard's optimizer state; the others:
      // their shards'), written by every rank together. Expert-sharded: the ranks of the first EP group write
      // their experts' pieces of the routed experts' parameters.
      if (rank0) add_parameters(w, student.params(), ParamSelection::whole);
      if (ep > 1 && world->rank() < ep) add_parameters(w, student.params(), ParamSelection::pieces);
      if (optimizer) {
        m.optimizer =
            zero ? zero1_counters(*optimizer, world->size(), zero->shard_numel(), student.flat_params().numel(),
                                  static_cast<int64_t>(student.params().size()), ep)
                 : optimizer_counters(*optimizer);
        add_optimizer_state(w, *optimizer);
      }
      run.save(std::move(m), w, device.str(), zero ? &*world : nullptr);
    }
    if (diverged) {
      if (world && world->size() > 1) world->barrier();  // rank 0's checkpoint is complete
      HYD_THROW("distillation stage ", stage, " diverged: ", st.bad_in_row,
                " consecutive steps with a non-finite loss or gradient (last: step ", stage_step, ", loss ", bad_loss,
                "); the state before them is checkpointed in ", run.dir(), "/", checkpoint_dir_name(g),
                "; lower distill.stage", stage, "_lr or raise distill.warmup_steps and start afresh");
    }
    if (signal != 0) {
      out << "received " << stop_signal_name(signal) << ": stopped after step " << g
          << " with a checkpoint; continue with --train.resume auto" << std::endl;
      return true;
    }
    if (!run.stop_due(g, total)) return false;
    out << "stopped after step " << g << " (run.stop_after); continue with --train.resume auto" << std::endl;
    return true;
  };
  bool stopped = false;

  // ---- Stage 1: alignment of the K layers' mixers to the teacher's attention outputs.
  if (stage1_steps > 0 && start < stage1_steps) {
    const LrSchedule schedule = stage_schedule(cfg.distill.stage1_lr, stage1_steps, cfg.distill);
    std::vector<ParamInfo> trained;
    for (int64_t l : k_layers)
      for (const ParamInfo& p : student.mixer_params(l)) trained.push_back(p);
    const std::unique_ptr<AdamW> optimizer_ptr = make_optimizer(trained);
    AdamW& optimizer = *optimizer_ptr;
    resume_optimizer(1, optimizer);
    const auto nk = static_cast<int64_t>(k_layers.size());
    const size_t act_bytes = static_cast<size_t>(N * D) * dtype_size(act);
    const size_t f32_bytes = static_cast<size_t>(N * D) * 4;
    Arena work("distill stage 1", device,
               static_cast<size_t>(L + nk + 3) * (act_bytes + kPad) + 2 * (f32_bytes + kPad) +
                   static_cast<size_t>(nk) * 4 + kPad);
    std::vector<Tensor> inputs, targets(static_cast<size_t>(L));
    for (int64_t l = 0; l < L; ++l) inputs.push_back(work.alloc({N, D}, act));
    for (int64_t l : k_layers) targets[static_cast<size_t>(l)] = work.alloc({N, D}, act);
    const Tensor normed = work.alloc({N, D}, act), mixed = work.alloc({N, D}, act);
    const Tensor diff = work.alloc({N, D}, DType::f32), target32 = work.alloc({N, D}, DType::f32);
    const Tensor dout = act == DType::f32 ? diff : work.alloc({N, D}, act);
    const Tensor sq = work.alloc({nk}, DType::f32);             // per K layer: sum (o - y)^2
    const double numel = static_cast<double>(N * D) * sp * dp;  // the mean runs over every rank's elements

    auto t_interval = Clock::now();
    for (int64_t step = start; step < stage1_steps && !stopped; ++step) {
      const double lr = schedule.at(step);
      HostBatch hb;
      const Batch batch = batch_for(ctx, uploader, step, hb);
      student.zero_grad(ctx);
      teacher.forward_layer_inputs(ctx, batch, inputs, targets);
      kernels::fill(ctx, sq, 0.0f);
      for (int64_t i = 0; i < nk; ++i) {
        const int64_t l = k_layers[static_cast<size_t>(i)];
        student.mixer_input_norm(ctx, l, batch, inputs[static_cast<size_t>(l)], normed);
        student.mixer_forward(ctx, l, batch, normed, mixed);
        // diff = o - y in f32; sq[i] = sum diff^2; dL/do = 2 diff / numel.
        to_f32(ctx, diff, mixed);
        to_f32(ctx, target32, targets[static_cast<size_t>(l)]);
        kernels::scale_inplace(ctx, target32, -1.0f);
        kernels::add_inplace(ctx, diff, target32);
        kernels::sum_squares_accumulate(ctx, diff.view({N * D}), sq.slice0(i, i + 1));
        kernels::scale_inplace(ctx, diff, static_cast<float>(2.0 / numel));
        if (act != DType::f32) kernels::convert(ctx, dout, diff);
        student.mixer_backward(ctx, l, batch, dout);
      }
      const std::vector<float> sums = download_f32(ctx, sq);
      double mse = 0;
      for (float s : sums) mse += static_cast<double>(s) / numel;
      mse /= static_cast<double>(nk);
      sum_all(std::span<double>(&mse, 1));
      if (zero) zero->reduce_gradients(ctx);
      bool good = std::isfinite(mse);
      if (good) {
        st.last_norm = optimizer.step(ctx, lr);
        good = std::isfinite(st.last_norm);
        if (zero) zero->gather_parameters(ctx);
      }
      if (good) {
        st.bad_in_row = 0;
        st.interval_mse += mse;
        ++st.interval_steps;
      } else {
        skip_or_throw(1, step, mse);
      }
      st.interval_tokens += step_tokens;
      st.tokens += step_tokens;
      if ((step + 1) % cfg.log.interval == 0 || step + 1 == stage1_steps) {
        ctx.synchronize();
        const double s = seconds_since(t_interval);
        const double tps = s > 0 ? static_cast<double>(st.interval_tokens) / s : 0;
        const double m = st.interval_steps > 0 ? st.interval_mse / static_cast<double>(st.interval_steps) : NAN;
        out << "stage 1 step " << step + 1 << "/" << stage1_steps << " | mse " << format_number("%.6g", m) << " | lr "
            << format_number("%.2e", lr) << " | gnorm " << format_number("%.3g", st.last_norm) << " | "
            << format_count(tps) << " tok/s" << std::endl;
        if (metrics)
          metrics->write({{"stage", 1},
                          {"step", step + 1},
                          {"total_steps", stage1_steps},
                          {"mse", m},
                          {"lr", lr},
                          {"grad_norm", st.last_norm},
                          {"tokens_per_s", tps},
                          {"tokens", st.tokens},
                          {"skipped_steps", optimizer.skipped_steps()},
                          {"elapsed_s", seconds_since(t_start)}});
        if (st.first_mse < 0) st.first_mse = m;
        st.last_mse = m;
        st.interval_mse = 0;
        st.interval_steps = 0;
        st.interval_tokens = 0;
        t_interval = Clock::now();
      }
      ctx.synchronize();  // the update is complete before the next stage's optimizer or a checkpoint reads it
      stopped = after_step(1, step + 1, &optimizer);
    }
  } else if (cfg.distill.stage1_steps > 0 && k_layers.empty()) {
    out << "stage 1 skipped: the student has no K layers" << std::endl;
  }

  // ---- Stage 2: end-to-end KL (+ CE) distillation of every student parameter.
  if (stage2_steps > 0 && start < total && !stopped) {
    const LrSchedule schedule = stage_schedule(cfg.distill.stage2_lr, stage2_steps, cfg.distill);
    const std::unique_ptr<AdamW> optimizer_ptr = make_optimizer(student.params());
    AdamW& optimizer = *optimizer_ptr;
    resume_optimizer(2, optimizer);
    const int64_t C = student.logits_chunk_size();
    const bool with_hidden = cfg.distill.w_hidden > 0;
    const size_t hidden_bytes =
        with_hidden ? static_cast<size_t>(L) * (static_cast<size_t>(N * D) * dtype_size(act) + kPad) : 0;
    Arena work("distill stage 2", device,
               static_cast<size_t>(C * V) * dtype_size(act) + 2 * static_cast<size_t>(N) * 4 + 3 * kPad + hidden_bytes);
    const Tensor teacher_chunk = work.alloc({C, V}, act);
    const Tensor kl = work.alloc({N}, DType::f32), ce = work.alloc({N}, DType::f32);
    // distill.w_hidden > 0: the teacher's layer outputs h_t[l], the targets of the hidden-state term.
    HybridModel::HiddenStateMatch hidden;
    hidden.weight = static_cast<float>(cfg.distill.w_hidden);
    if (with_hidden)
      for (int64_t l = 0; l < L; ++l) hidden.targets.push_back(work.alloc({N, D}, act));
    kernels::DistillLossOptions opt;
    opt.temperature = static_cast<float>(cfg.distill.temperature);
    opt.w_kl = static_cast<float>(cfg.distill.w_kl);
    opt.w_ce = static_cast<float>(cfg.distill.w_ce);
    opt.write_grad = true;
    // distill.router_aux_coef > 0: the student's MoE layers add their load-balancing loss; each rank's term is
    // weighted 1 / ranks (the logged and optimised value is the mean over the ranks).
    const bool with_aux = st.with_aux;
    const int ranks = world ? world->size() : 1;
    if (with_aux) student.set_moe_aux_loss(cfg.distill.router_aux_coef, 1.0 / ranks);
    // distill.router_bias_rate > 0: the selection biases follow the loads; the log shows the last step's
    // max load / mean load (averaged over the MoE layers).
    const bool balance_routers = cfg.distill.router_bias_rate > 0;
    double last_imbalance = NAN;
    // Several ranks: the share of the interval's wall time this rank spent in the synchronous collectives (the
    // ZeRO-1 reduce-scatter and all-gather, Zero1's timing, and the SP collectives where they time themselves:
    // MPI, or NCCL with HYD_SP_ASYNC=0); the expert-parallel exchanges and the default NCCL SP collectives
    // overlap compute on GPUs and are not counted.
    const bool time_comm = ranks > 1;
    auto sp_seconds = [&] {
      double t = 0;
      if (sp_ctx)
        for (int k = 0; k < kSpTrafficKinds; ++k) t += sp_ctx->traffic(static_cast<SpTraffic>(k)).seconds;
      return t;
    };
    if (zero) zero->set_timing(time_comm);
    double comm_mark = sp_seconds() + (zero ? zero->seconds() : 0.0);
    // MFU per GPU (the log's tokens/s counts every rank's tokens); not reported where the peak is unknown.
    const double peak_flops = device_peak_flops(device) * static_cast<double>(ranks);
    const double flops_per_token = stage2_flops_per_token(student, in.student_cfg, tc, T);

    auto t_interval = Clock::now();
    for (int64_t step = std::max<int64_t>(0, start - stage1_steps); step < stage2_steps && !stopped; ++step) {
      const double lr = schedule.at(step);
      HostBatch hb;  // the sampler continues where stage 1 stopped
      const Batch batch = batch_for(ctx, uploader, stage1_steps + step, hb);
      const Tensor mask = uploader.loss_mask();
      double kl_mean = NAN, ce_mean = NAN, hidden_mse = 0, aux = 0;
      double targets = static_cast<double>(hb.num_targets);  // over every rank: the means' denominator
      sum_all(std::span<double>(&targets, 1));
      bool good = targets > 0;
      if (good) {
        student.zero_grad(ctx);
        teacher_ctx.wait_for(ctx);  // the last step's logits chunks (on ctx) have read the teacher's buffers
        if (with_hidden) {
          teacher.forward_layer_outputs(teacher_ctx, batch, hidden.targets);  // also keeps the final hidden states
          hidden.token_mask.resize(hb.targets.size());                // the KL's tokens: those with a target
          for (size_t i = 0; i < hb.targets.size(); ++i) hidden.token_mask[i] = hb.targets[i] >= 0 ? 1 : 0;
          hidden.count = static_cast<int64_t>(targets);  // the mean runs over every rank's tokens
        } else {
          teacher.forward_hidden(teacher_ctx, batch);
        }
        opt.grad_scale = static_cast<float>(1.0 / targets);
        kernels::fill(ctx, kl, 0.0f);
        kernels::fill(ctx, ce, 0.0f);
        // Per-token kl / ce stay on the device; they are summed once after the call (no host
        // synchronisation per chunk), so the callback returns 0.
        const HybridModel::LogitsChunkLoss chunk_loss = [&](ExecContext& c, int64_t t0, int64_t t1, const Tensor& s) {
          if (t0 == 0) c.wait_for(teacher_ctx);  // the teacher's final (and, with_hidden, layer) outputs are written
          const Tensor t = teacher_chunk.slice0(0, t1 - t0);
          teacher.lm_head_logits(c, t0, t1, t);
          kernels::distill_loss(c, s, t, batch.targets.slice0(t0, t1), mask.slice0(t0, t1), kl.slice0(t0, t1),
                                ce.slice0(t0, t1), Tensor{}, opt);
          return 0.0;
        };
        if (with_hidden) {
          student.forward_backward_logits(ctx, batch, chunk_loss, &hidden);
          hidden_mse = hidden.mse;
        } else {
          student.forward_backward_logits(ctx, batch, chunk_loss);
        }
        const std::vector<float> kl_host = download_f32(ctx, kl), ce_host = download_f32(ctx, ce);
        double kl_sum = 0, ce_sum = 0;
        for (size_t i = 0; i < kl_host.size(); ++i) {
          kl_sum += kl_host[i];
          ce_sum += ce_host[i];
        }
        double sums[4] = {kl_sum, ce_sum, hidden_mse, with_aux ? student.moe_aux_loss() : 0.0};
        sum_all(std::span<double>(sums, 4));
        hidden_mse = sums[2];
        aux = sums[3] / ranks;
        if (zero) zero->reduce_gradients(ctx);
        kl_mean = sums[0] / targets;
        ce_mean = sums[1] / targets;
        good = std::isfinite(kl_mean) && std::isfinite(ce_mean) && std::isfinite(hidden_mse) && std::isfinite(aux);
      }
      if (good) {
        st.last_norm = optimizer.step(ctx, lr);
        good = std::isfinite(st.last_norm);
        // Auxiliary-loss-free balancing: the step's loads over every rank move the selection biases (this
        // rank's pieces of them; the gather below spreads them).
        if (good && balance_routers) {
          std::vector<HybridModel::MoeLoad> loads = student.moe_expert_loads();
          std::vector<double> all;
          for (const HybridModel::MoeLoad& l : loads) all.insert(all.end(), l.load.begin(), l.load.end());
          sum_all(std::span<double>(all));
          size_t at = 0;
          for (HybridModel::MoeLoad& l : loads)
            for (int64_t& v : l.load) v = static_cast<int64_t>(all[at++]);
          last_imbalance =
              apply_selection_bias_update(ctx, student.params(), optimizer, loads, cfg.distill.router_bias_rate);
        }
        if (zero) zero->gather_parameters(ctx);
      }
      if (good) {
        st.bad_in_row = 0;
        st.interval_kl += kl_mean;
        st.interval_ce += ce_mean;
        st.interval_hidden += hidden_mse;
        st.interval_aux += aux;
        ++st.interval_steps;
      } else if (targets > 0) {
        skip_or_throw(2, step,
                      cfg.distill.w_kl * kl_mean + cfg.distill.w_ce * ce_mean + cfg.distill.w_hidden * hidden_mse +
                          aux);
      }
      st.interval_tokens += step_tokens;
      st.tokens += step_tokens;
      if ((step + 1) % cfg.log.interval == 0 || step + 1 == stage2_steps) {
        ctx.synchronize();
        const double s = seconds_since(t_interval);
        const double tps = s > 0 ? static_cast<double>(st.interval_tokens) / s : 0;
        const double k = st.interval_steps > 0 ? st.interval_kl / static_cast<double>(st.interval_steps) : NAN;
        const double e = st.interval_steps > 0 ? st.interval_ce / static_cast<double>(st.interval_steps) : NAN;
        const double hm = st.interval_steps > 0 ? st.interval_hidden / static_cast<double>(st.interval_steps) : NAN;
        const double ax = st.interval_steps > 0 ? st.interval_aux / static_cast<double>(st.interval_steps) : NAN;
        const double loss = cfg.distill.w_kl * k + cfg.distill.w_ce * e +
                            (with_hidden ? cfg.distill.w_hidden * hm : 0) + (with_aux ? ax : 0);
        out << "stage 2 step " << step + 1 << "/" << stage2_steps << " | kl " << format_number("%.5g", k) << " | ce "
            << format_number("%.4f", e);
        if (with_hidden) out << " | hidden_mse " << format_number("%.5g", hm);
        if (with_aux) out << " | aux " << format_number("%.5g", ax);
        if (balance_routers) out << " | load max/mean " << format_number("%.3f", last_imbalance);
        const double mfu = peak_flops > 0 ? tps * flops_per_token / peak_flops : NAN;
        out << " | lr " << format_number("%.2e", lr) << " | gnorm " << format_number("%.3g", st.last_norm) << " | "
            << format_count(tps) << " tok/s";
        if (peak_flops > 0) out << " | MFU " << format_number("%.3f", mfu);
        const double comm_now = sp_seconds() + (zero ? zero->seconds() : 0.0);
        const double comm_share = s > 0 ? (comm_now - comm_mark) / s : NAN;
        comm_mark = comm_now;
        if (time_comm) out << " | comm " << format_number("%.0f", 100 * comm_share) << "%";
        out << std::endl;
        json record = {{"stage", 2},
                       {"step", step + 1},
                       {"total_steps", stage2_steps},
                       {"loss", loss},
                       {"kl", k},
                       {"ce", e},
                       {"lr", lr},
                       {"grad_norm", st.last_norm},
                       {"tokens_per_s", tps},
                       {"tokens", st.tokens},
                       {"skipped_steps", optimizer.skipped_steps()},
                       {"elapsed_s", seconds_since(t_start)}};
        if (with_hidden) record["hidden_mse"] = hm;
        if (with_aux) record["aux"] = ax;
        if (balance_routers) record["load_imbalance"] = last_imbalance;
        if (peak_flops > 0) record["mfu"] = mfu;
        if (time_comm) record["comm_share"] = comm_share;
        if (metrics) metrics->write(record);
        if (st.first_kl < 0) st.first_kl = k;
        st.last_kl = k;
        st.last_ce = e;
        st.interval_kl = st.interval_ce = st.interval_hidden = st.interval_aux = 0;
        st.interval_steps = 0;
        st.interval_tokens = 0;
        t_interval = Clock::now();
      }
      ctx.synchronize();
      stopped = after_step(2, step + 1, &optimizer);
    }
  }
  // A run with no step at all (a student without K layers and no stage 2) still evaluates and
  // checkpoints its initial student, which is what later commands read.
  if (total == 0 && !resume) after_step(1, 0, nullptr);

  result.stage1_steps = std::min(done, stage1_steps);
  result.stage2_steps = done - result.stage1_steps;
  result.first_mse = st.first_mse;
  result.last_mse = st.last_mse;
  result.first_kl = st.first_kl;
  result.last_kl = st.last_kl;
  result.last_ce = st.last_ce;
  result.tokens = st.tokens;
  result.elapsed_s = seconds_since(t_start);
  if (ep_group)
    out << "expert parallelism: rank 0 took part in " << ep_group->counters().calls << " exchanges of its group, "
        << format_megabytes(static_cast<size_t>(ep_group->counters().bytes + ep_ctx->device_bytes_sent()))
        << " sent" << (device.is_cuda() ? " (token rows over NCCL)" : "") << std::endl;
  out << (stopped ? "stopped: stage 1 " : "done: stage 1 ") << result.stage1_steps << " steps";
  if (result.last_mse >= 0)
    out << " (mse " << format_number("%.6g", result.first_mse) << " -> " << format_number("%.6g", result.last_mse)
        << ")";
  out << ", stage 2 " << result.stage2_steps << " steps";
  if (result.last_kl >= 0)
    out << " (kl " << format_number("%.5g", result.first_kl) << " -> " << format_number("%.5g", result.last_kl) << ")";
  out << ", " << format_count(static_cast<double>(result.tokens)) << " tokens in " << format_duration(result.elapsed_s)
      << std::endl;
  return result;
}

void run_evaluation(const DistillConfig& cfg, const std::string& checkpoint_dir, std::ostream& out) {
  const std::string& src = cfg.source;
  validate_distill_config(cfg);
  // One process, or for a MoE student too large for one device W ranks with parallel.dp = parallel.ep = W:
  // each rank holds its share of the routed experts (of both models), the ranks evaluate the same batches
  // together (expert parallelism) and rank 0 reports.
  int mpi_up = 0;
  CHECK_MPI(MPI_Initialized(&mpi_up));
  std::optional<Communicator> world;
  if (mpi_up) world = Communicator::world();
  const int world_size = world ? world->size() : 1;
  const int ep = static_cast<int>(cfg.parallel.ep);
  const bool expert_parallel = world_size > 1 && ep == world_size && cfg.parallel.dp == world_size &&
                               cfg.parallel.sp == 1;
  if ((world_size > 1 || cfg.parallel.dp * cfg.parallel.sp > 1) && !expert_parallel)
    throw ConfigError::at(src, "parallel.dp",
                          "hydistill eval runs in one process, or on W ranks with parallel.dp = parallel.ep = W and "
                          "parallel.sp = 1 (got " +
                              std::to_string(world_size) + " ranks, parallel.dp " + std::to_string(cfg.parallel.dp) +
                              ", parallel.sp " + std::to_string(cfg.parallel.sp) + ", parallel.ep " +
                              std::to_string(ep) + ")");
  const bool rank0 = !world || world->rank() == 0;
  std::ostream null_out(nullptr);
  std::ostream& log = rank0 ? out : null_out;
  // The checkpoint first (a broken one names its file and field), then whether this configuration
  // describes its student.
  const StudentCheckpoint sc = open_student_checkpoint(checkpoint_dir);
  const Checkpoint& ck = sc.checkpoint;
  const std::string& pattern = *ck.manifest.config_value("student.pattern");
  if (pattern != cfg.student_pattern)
    throw ConfigError::at(src, "student.pattern",
                          "'" + cfg.student_pattern + "' differs from the checkpoint's '" + pattern + "' (" +
                              ck.manifest_path() + ", config)");
  check_teacher_identity(ck, cfg.teacher_dir, src, "teacher.dir");
  const Device device = expert_parallel ? rank_device(cfg.device, world_size, src) : parse_device(cfg.device);
  DistillInputs in = open_inputs(cfg, pattern);
  std::unique_ptr<MoeExpertParallel> ep_ctx;
  if (expert_parallel) {
    shard_experts(cfg, ep, world->rank(), in);
    ep_ctx = std::make_unique<MoeExpertParallel>(*world, device);
  }

  ExecContext ctx(device);
  HybridModel teacher(in.teacher_cfg, device, in.max_tokens, ModelUse::inference);
  HybridModel student(in.student_cfg, device, in.max_tokens, ModelUse::inference);  // evaluated, not trained
  load_teacher(cfg.teacher_dir, teacher, nullptr, 0, nullptr);
  restore_parameters(ck, student.params());
  DistillEvaluator evaluator(teacher, student, in.max_tokens, in.held_out.get(), cfg.eval.batches, in.passkey.get(),
                             nullptr, 0, 0, ep_ctx.get());

  log << "hydistill eval\n"
      << "  checkpoint       " << ck.dir << " (stage " << ck.manifest.stage << " step " << ck.manifest.stage_step
      << ", step " << ck.manifest.step << " of the run)\n"
      << "  teacher          " << cfg.teacher_dir << "\n"
      << "  student          pattern " << layer_pattern_string(in.student_cfg.layers) << "\n"
      << "  held-out data    "
      << (in.held_out ? std::to_string(cfg.eval.batches) + " batches of the validation split of " + cfg.data.path
                      : std::string("none"))
      << "\n"
      << "  passkey data     " << (in.passkey ? cfg.eval.passkey_data : std::string("none")) << "\n";
  if (expert_parallel)
    log << "  expert parallel  " << ep << " ranks, each storing " << in.teacher.config.num_experts / ep << " of the "
        << in.teacher.config.num_experts << " routed experts per MoE layer\n";
  DistillEvaluation e = evaluator.evaluate(ctx);
  e.global_step = ck.manifest.step;
  e.stage = ck.manifest.stage;
  e.stage_step = ck.manifest.stage_step;
  e.checkpoint = ck.dir;
  log << e.table() << std::flush;
  if (!rank0) return;

  // Written only now that every input was read.
  std::error_code ec;
  fs::create_directories(cfg.run.dir, ec);
  if (ec) throw Error::at(cfg.run.dir, "", "cannot create the run directory: " + ec.message());
  MetricsWriter evals((fs::path(cfg.run.dir) / kEvalFile).string(), /*truncate=*/false);
  evals.write(e.json());
  out << "appended to " << evals.path() << std::endl;
}

}  // namespace hyd

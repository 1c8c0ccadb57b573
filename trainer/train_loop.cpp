#include "trainer/train_loop.h"

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
#include "parallel/checks.h"
#include "parallel/grid.h"
#include "parallel/nccl_comm.h"
#include "parallel/sequence_parallel.h"
#include "trainer/batch_upload.h"
#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/hybrid_model.h"
#include "trainer/lasp.h"
#include "trainer/metrics.h"
#include "trainer/model.h"
#include "trainer/stop_signal.h"
#include "trainer/zero1.h"

#ifdef HYD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace hyd {

namespace fs = std::filesystem;

LrSchedule TrainOptions::lr_schedule() const {
  LrSchedule s;
  s.kind = parse_schedule_kind(schedule);
  s.lr = lr;
  s.min_lr = min_lr;
  s.warmup_steps = warmup_steps;
  s.total_steps = steps;
  s.wsd_decay_fraction = wsd_decay_fraction;
  return s;
}

AdamWConfig TrainOptions::adamw() const {
  AdamWConfig a;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.grad_clip = grad_clip;
  return a;
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The network `hydistill train` trains: the DenseModel, or for sequence parallelism the all-T HybridModel
// (kernel for kernel the same network, with the same parameter list and initialisation), whose attention
// layers run LASP-2H on sequence slices.
class TrainModel {
 public:
  TrainModel(const ModelConfig& mc, Device device, int64_t max_tokens, bool hybrid, const std::string& src) {
    if (!hybrid) {
      dense_ = std::make_unique<DenseModel>(mc, device, max_tokens);
      return;
    }
    HybridConfig h;
    h.model = mc;
    h.pattern = std::string(static_cast<size_t>(mc.num_layers), 'T');
    h.finalize(src);
    hybrid_ = std::make_unique<HybridModel>(h, device, max_tokens);
  }
  void init_random(uint64_t seed) { dense_ ? dense_->init_random(seed) : hybrid_->init_random(seed); }
  std::vector<ParamInfo>& params() { return dense_ ? dense_->params() : hybrid_->params(); }
  Tensor flat_params() const { return dense_ ? dense_->flat_params() : hybrid_->flat_params(); }
  Tensor flat_grads() const { return dense_ ? dense_->flat_grads() : hybrid_->flat_grads(); }
  size_t memory_bytes() const { return dense_ ? dense_->memory_bytes() : hybrid_->memory_bytes(); }
  void zero_grad(const ExecContext& ctx) { dense_ ? dense_->zero_grad(ctx) : hybrid_->zero_grad(ctx); }
  double forward_backward(ExecContext& ctx, const Batch& b, float loss_scale) {
    return dense_ ? dense_->forward_backward(ctx, b, loss_scale) : hybrid_->forward_backward(ctx, b, loss_scale);
  }
  double forward_loss(ExecContext& ctx, const Batch& b) {
    return dense_ ? dense_->forward_loss(ctx, b) : hybrid_->forward_loss(ctx, b);
  }

 private:
  std::unique_ptr<DenseModel> dense_;
  std::unique_ptr<HybridModel> hybrid_;
};

}  // namespace

void validate_train_config(const TrainConfig& cfg) {
  const std::string& src = cfg.source;
  auto require = [&](bool ok, const char* key, const std::string& msg) {
    if (!ok) throw ConfigError::at(src, key, msg);
  };
  require(!cfg.run.dir.empty(), "run.dir", "required key is missing");
  require(!cfg.data.path.empty(), "data.path", "required key is missing");
  require(cfg.data.seq_len >= 2, "data.seq_len", "must be >= 2, got " + std::to_string(cfg.data.seq_len));
  require(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1, got " + std::to_string(cfg.data.batch_size));
  require(cfg.data.val_fraction >= 0 && cfg.data.val_fraction < 1, "data.val_fraction",
          "must lie in [0, 1), got " + format_number("%g", cfg.data.val_fraction));
  const TrainOptions& t = cfg.train;
  require(t.steps >= 1, "train.steps", "must be >= 1, got " + std::to_string(t.steps));
  require(t.grad_accum >= 1, "train.grad_accum", "must be >= 1, got " + std::to_string(t.grad_accum));
  require(t.lr > 0 && std::isfinite(t.lr), "train.lr", "must be > 0, got " + format_number("%g", t.lr));
  require(t.min_lr >= 0 && t.min_lr <= t.lr, "train.min_lr",
          "must lie in [0, train.lr = " + format_number("%g", t.lr) + "], got " + format_number("%g", t.min_lr));
  require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0, got " + std::to_string(t.warmup_steps));
  require(t.schedule == "cosine" || t.schedule == "wsd" || t.schedule == "constant", "train.schedule",
          "unknown schedule '" + t.schedule + "' (expected cosine, wsd or constant)");
  require(t.wsd_decay_fraction >= 0 && t.wsd_decay_fraction <= 1, "train.wsd_decay_fraction",
          "must lie in [0, 1], got " + format_number("%g", t.wsd_decay_fraction));
  require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0, got " + format_number("%g", t.weight_decay));
  require(t.beta1 >= 0 && t.beta1 < 1, "train.beta1", "must lie in [0, 1), got " + format_number("%g", t.beta1));
  require(t.beta2 >= 0 && t.beta2 < 1, "train.beta2", "must lie in [0, 1), got " + format_number("%g", t.beta2));
  require(t.eps > 0, "train.eps", "must be > 0, got " + format_number("%g", t.eps));
  require(t.grad_clip >= 0, "train.grad_clip",
          "must be >= 0 (0 = no clipping), got " + format_number("%g", t.grad_clip));
  require(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1, got " + std::to_string(t.max_bad_steps));
  const ParallelOptions& par = cfg.parallel;
  require(par.dp >= 1 && par.dp <= 65536, "parallel.dp", "must lie in [1, 65536], got " + std::to_string(par.dp));
  require(par.sp >= 1 && par.sp <= 65536, "parallel.sp", "must lie in [1, 65536], got " + std::to_string(par.sp));
  if (par.sp > 1)
    require(cfg.data.seq_len % par.sp == 0 && cfg.data.seq_len / par.sp >= 4, "parallel.sp",
            std::to_string(par.sp) + " must divide data.seq_len = " + std::to_string(cfg.data.seq_len) +
                " into slices of at least 4 tokens");
  require(cfg.log.interval >= 1, "log.interval", "must be >= 1, got " + std::to_string(cfg.log.interval));
  require(cfg.log.eval_interval >= 0, "log.eval_interval",
          "must be >= 0 (0 = only at the end), got " + std::to_string(cfg.log.eval_interval));
  require(cfg.log.eval_batches >= 0, "log.eval_batches",
          "must be >= 0 (0 = no evaluation), got " + std::to_string(cfg.log.eval_batches));
  validate_run_options(cfg.run, cfg.checkpoint, cfg.train.resume, src);
  try {
    (void)parse_device(cfg.device);
  } catch (const Error& e) {
    throw ConfigError::at(src, "device", e.what());
  }
  // The model's own checks, with a stand-in vocabulary when it comes from the dataset.
  ModelConfig m = cfg.model;
  if (m.vocab_size == 0) m.vocab_size = 1;
  try {
    m.finalize(src);
  } catch (const Error& e) {
    throw ConfigError::from(e, src);
  }
}

void validate_run_options(const RunOptions& run, const CheckpointOptions& checkpoint, const std::string& resume,
                          const std::string& source) {
  auto require = [&](bool ok, const char* key, const std::string& msg) {
    if (!ok) throw ConfigError::at(source, key, msg);
  };
  require(run.stop_after >= 0, "run.stop_after",
          "must be >= 0 (0 = run to the end), got " + std::to_string(run.stop_after));
  require(checkpoint.interval >= 0, "checkpoint.interval",
          "must be >= 0 (0 = only at the end), got " + std::to_string(checkpoint.interval));
  require(checkpoint.keep_last >= 1, "checkpoint.keep_last",
          "must be >= 1 (the newest checkpoint is always kept), got " + std::to_string(checkpoint.keep_last));
  require(checkpoint.keep_every >= 0, "checkpoint.keep_every",
          "must be >= 0 (0 = none), got " + std::to_string(checkpoint.keep_every));
  require(!resume.empty(), "train.resume", "must be none, auto or a checkpoint path");
}

Device rank_device(const std::string& option, int world_size, const std::string& source) {
  Device d;
  try {
    d = parse_device(option);
  } catch (const Error& e) {
    throw ConfigError::at(source, "device", e.what());
  }
  if (!d.is_cuda() || world_size <= 1) return d;
  const MpiRuntime rt(nullptr, nullptr);  // MPI is up: only reads the ranks
  if (option != "cuda") {
    if (rt.local_size() > 1)
      throw ConfigError::at(source, "device",
                            "= " + option + " with " + std::to_string(rt.local_size()) +
                                " ranks on this node would put all of them on one GPU; use device = cuda (each rank "
                                "takes the GPU of its node-local rank)");
    return d;
  }
  const int visible = cuda_device_count();
  if (visible < rt.local_size())
    throw ConfigError::at(source, "device",
                          "= cuda with " + std::to_string(rt.local_size()) + " ranks on this node but " +
                              std::to_string(visible) +
                              " visible GPUs: every rank needs a GPU of its own (start fewer ranks per node, or check "
                              "CUDA_VISIBLE_DEVICES)");
  return Device::cuda(bind_local_gpu(rt));
}

namespace {

// The loop's counters and running sums at a checkpoint (manifest.loop): with the model, the optimizer
// and the step they make a resumed run continue exactly as one that never stopped.
struct TrainLoopState {
  int64_t tokens = 0, interval_steps = 0, interval_tokens = 0, bad_in_row = 0, skipped = 0;
  double interval_loss = 0, last_norm = 0, final_train_loss = 0, final_val_loss = -1;

  template <class F>
  void visit(F&& f) {
    f("tokens", tokens), f("interval_steps", interval_steps), f("interval_tokens", interval_tokens);
    f("bad_in_row", bad_in_row), f("skipped", skipped), f("interval_loss", interval_loss);
    f("last_norm", last_norm), f("final_train_loss", final_train_loss), f("final_val_loss", final_val_loss);
  }
};

std::string model_summary(const ModelConfig& m) {
  std::string s = m.family + ": " + std::to_string(m.num_layers) + " layers, hidden " + std::to_string(m.hidden_size) +
                  ", heads " + std::to_string(m.num_heads) + "/" + std::to_string(m.num_kv_heads) + " x " +
                  std::to_string(m.head_dim) + ", ffn " + std::to_string(m.intermediate_size) + ", vocab " +
                  std::to_string(m.vocab_size);
  if (m.tie_word_embeddings) s += ", tied embeddings";
  if (m.qk_norm) s += ", qk-norm";
  if (m.qkv_bias) s += ", qkv bias";
  if (m.rope_scaling.type != "default")
    s += ", rope " + m.rope_scaling.type + " x" + format_number("%g", m.rope_scaling.factor);
  return s;
}

}  // namespace

TrainResult run_training(const TrainConfig& cfg, const EffectiveConfig& effective, std::ostream& all_out) {
  const std::string& src = cfg.source;
  validate_train_config(cfg);

  // The process grid: world size 1 when MPI is not running (a plain call of run_training).
  int mpi_up = 0;
  CHECK_MPI(MPI_Initialized(&mpi_up));
  std::optional<Communicator> world;
  if (mpi_up) world = Communicator::world();
  const int dp = static_cast<int>(cfg.parallel.dp);
  try {
    validate_grid(dp, static_cast<int>(cfg.parallel.sp), world ? world->size() : 1);
  } catch (const Error& e) {
    throw ConfigError::at(src, "parallel.dp", e.what());
  }
  std::optional<ProcessGrid> grid;
  if (world) grid.emplace(*world, dp, static_cast<int>(cfg.parallel.sp));
  const int dp_rank = grid ? grid->dp_rank() : 0, sp = static_cast<int>(cfg.parallel.sp);
  const int ranks = dp * sp;  // ZeRO-1 shards and gradient sums run over all of them
  const bool rank0 = !world || world->rank() == 0;
  // Only rank 0 prints and writes the run directory.
  std::ostream null_out(nullptr);
  std::ostream& out = rank0 ? all_out : null_out;

  // Run directory and the checkpoint to resume from, before anything is read or written.
  RunDirectory run("train", cfg.run, cfg.checkpoint, cfg.train.resume, effective,
                   {{"data.path", canonical_path(cfg.data.path)}}, src, out);
  const Checkpoint* resume = run.resume_from();
  // Every rank has checked the run directory before rank 0 creates it.
  if (world) world->barrier();

  // Several ranks on CUDA: one GPU per rank, the node-local rank's (device = cuda); cuda:N would put every
  // rank of a node on GPU N.
  const Device device = rank_device(cfg.device, world ? world->size() : 1, src);
  const LrSchedule schedule = cfg.train.lr_schedule();

  // Dataset and the model that must fit it.
  if (!fs::exists(cfg.data.path)) throw ConfigError::at(src, "data.path", cfg.data.path + ": no such file");
  TokenDataset data(cfg.data.path);
  const DatasetInfo& info = data.info();
  if (resume) check_data_identity(*resume, info, src);
  ModelConfig mc = cfg.model;
  if (mc.vocab_size == 0) {
    mc.vocab_size = info.vocab_size;
  } else if (mc.vocab_size < info.vocab_size) {
    throw ConfigError::at(src, "model.vocab_size",
                          "model.vocab_size = " + std::to_string(mc.vocab_size) + " is smaller than the vocab_size " +
                              std::to_string(info.vocab_size) + " of the dataset " + info.path);
  }
  if (mc.eos_token_id < 0) mc.eos_token_id = info.eos_id;
  try {
    mc.finalize(src);
  } catch (const Error& e) {
    throw ConfigError::from(e, src);
  }
  if (cfg.data.seq_len > mc.max_position_embeddings)
    throw ConfigError::at(src, "data.seq_len",
                          std::to_string(cfg.data.seq_len) +
                              " exceeds model.max_position_embeddings = " + std::to_string(mc.max_position_embeddings));

  const int64_t B = cfg.data.batch_size, T = cfg.data.seq_len, ga = cfg.train.grad_accum;
  const int64_t micro_tokens = B * T;
  PackedSampler train_sampler(data, Split::train, cfg.data.val_fraction, T, B, cfg.data.seed, dp_rank, dp);
  if (train_sampler.num_docs() == 0)
    throw ConfigError::at(src, "data.val_fraction", "no training documents left in " + info.path);
  const bool evaluate = cfg.log.eval_batches > 0 && cfg.data.val_fraction > 0;
  std::unique_ptr<PackedSampler> val_sampler;
  // Held-out evaluation covers the same sequences as one process: with dp > 1 an evaluation batch is the
  // dp shards of B sequences each (dp samplers, one per dp rank). One rank evaluates every shard; over
  // several ranks each evaluates its own shard (its slice of it under sequence parallelism) and the sums
  // are all-reduced.
  std::vector<PackedSampler> val_shards;
  if (evaluate) {
    val_sampler = std::make_unique<PackedSampler>(data, Split::validation, cfg.data.val_fraction, T, B, cfg.data.seed);
    for (int r = 0; dp > 1 && r < dp; ++r)
      val_shards.emplace_back(data, Split::validation, cfg.data.val_fraction, T, B, cfg.data.seed, r, dp);
    if (val_sampler->num_docs() == 0)
      throw ConfigError::at(src, "data.val_fraction",
                            "the validation split of " + info.path + " has no documents (" +
                                std::to_string(info.num_docs) + " in the file); raise it or set log.eval_batches = 0");
  }

  ExecContext ctx(device);
  // MFU counts the model's forward + backward FLOPs (ModelConfig::train_flops_per_token).
  const double peak_flops = device_peak_flops(device);
  const double flops_per_token = mc.train_flops_per_token(T);
  // sp > 1: the all-T HybridModel, the same network kernel for kernel and the same initialisation, whose
  // attention layers run LASP-2H on sequence slices of B x T / sp tokens.
  TrainModel model(mc, device, micro_tokens / sp, sp > 1, src);
  model.init_random(cfg.train.seed);
  std::optional<SequenceParallel> sp_ctx;
  if (sp > 1) sp_ctx.emplace(grid->sp_group(), device);
  // ZeRO-1 over all dp x sp ranks (trainer/zero1.h): this rank's AdamW keeps masters and moments for its
  // shard of the flat parameters only.
  std::optional<Zero1> zero;
  if (ranks > 1) zero.emplace(*world, model.params(), model.flat_params(), model.flat_grads());
  AdamW optimizer(zero ? zero->shard_params() : model.params(), device, cfg.train.adamw());
  if (zero) optimizer.set_sum_squares_reduction([&](double ss) { return zero->all_reduce_sum(ss); });
  BatchUploader uploader(device, micro_tokens);
  const size_t memory =
      model.memory_bytes() + optimizer.memory_bytes() + uploader.bytes() + (zero ? zero->memory_bytes() : 0);

  const int64_t steps = cfg.train.steps;
  int64_t start_step = 0;
  TrainLoopState st;
  if (resume) {
    const CheckpointManifest& m = resume->manifest;
    if (m.step > steps || resume_next_batch(*resume) != m.step * ga)
      throw Error::at(
          resume->manifest_path(), "step",
          "step " + std::to_string(m.step) + " with data.next_batch " + std::to_string(resume_next_batch(*resume)) +
              " does not fit train.steps = " + std::to_string(steps) + " x train.grad_accum = " + std::to_string(ga));
    check_resume_global_batch(*resume, B, dp, src);
    restore_parameters(*resume, model.params());
    // ZeRO-1 state comes from whatever shards hold it (re-sharded when the rank count changed).
    if (zero || m.world_size > 1)
      restore_optimizer_resharded(*resume, model.params(), optimizer);
    else
      restore_optimizer_state(resume->tensors, m.optimizer, resume->manifest_path(), optimizer);
    // Every rank's exact masters into every replica (a CUDA checkpoint's bf16 parameters on the CPU).
    if (zero) zero->gather_parameters(ctx);
    ctx.synchronize();
    read_loop_state(*resume, st);
    start_step = m.step;
  }

  // Everything checked: now the run directory is written.
  std::optional<MetricsWriter> metrics;
  if (rank0) {
    run.begin();
    metrics.emplace(run.file(kMetricsFile), /*truncate=*/false);
  }

  TrainResult result;
  result.unigram_entropy = data.unigram_entropy();
  {
    std::ostringstream os;
    os << "device           " << device.str() << "\n"
       << "model            " << model_summary(mc) << "\n"
       << "parameters       " << mc.num_parameters() << " (" << format_count(static_cast<double>(mc.num_parameters()))
       << ")\n"
       << "tokens/step      " << micro_tokens * ga * dp << " (" << B << " sequences x " << T << " tokens x " << ga
       << " micro-batches" << (dp > 1 ? " x " + std::to_string(dp) + " data-parallel ranks" : "")
       << (sp > 1 ? ", each sequence over " + std::to_string(sp) + " sequence-parallel ranks (LASP-2H)" : "")
       << (ranks > 1 ? ", ZeRO-1 over " + std::to_string(ranks) + " ranks" : "") << ")\n"
       << data.summary() << "train split      " << train_sampler.num_docs() << " documents, "
       << train_sampler.tokens_per_epoch() << " tokens\n";
    if (val_sampler)
      os << "validation split " << val_sampler->num_docs() << " documents, " << val_sampler->tokens_per_epoch()
         << " tokens (" << cfg.log.eval_batches << " batches per evaluation)\n";
    os << "schedule         " << schedule_kind_name(schedule.kind) << ", lr " << format_number("%.3g", schedule.lr)
       << " -> " << format_number("%.3g", schedule.min_lr) << ", warmup " << schedule.warmup_steps << ", "
       << schedule.total_steps << " steps ("
       << format_count(static_cast<double>(schedule.total_steps * micro_tokens * ga)) << " tokens)\n"
       << "memory           " << format_megabytes(memory) << " (model " << format_megabytes(model.memory_bytes())
       << ", optimizer " << format_megabytes(optimizer.memory_bytes()) << ")\n"
       << "run dir          " << run.dir() << "\n";
    if (ranks > 1) os << "checkpoints      sharded: one state file per rank (ZeRO-1)\n";
    if (resume) os << "resumed from     " << resume->dir << " (step " << start_step << ")\n";
    out << "hydistill train\n";
    std::istringstream lines(os.str());
    for (std::string line; std::getline(lines, line);) out << "  " << line << "\n";
    out.flush();
  }

  auto run_eval = [&](int64_t step) {
    if (!evaluate) return;
    double loss_sum = 0;
    int64_t targets = 0;
    for (int64_t i = 0; i < cfg.log.eval_batches; ++i) {
      for (int r = 0; r < dp; ++r) {
        if (ranks > 1 && r != dp_rank) continue;
        HostBatch hb = dp > 1 ? val_shards[static_cast<size_t>(r)].batch(i) : val_sampler->batch(i);
        if (hb.num_targets == 0) continue;  // the whole sequences' count: the same on every SP rank
        const Batch batch = upload_sp_batch(ctx, uploader, sp_ctx ? &*sp_ctx : nullptr, B, T, hb);
        const double l = model.forward_loss(ctx, batch);
        if (hb.num_targets > 0) loss_sum += l * static_cast<double>(hb.num_targets);
        targets += hb.num_targets;
      }
    }
    if (ranks > 1) {
      double sums[2] = {loss_sum, static_cast<double>(targets)};
      world->all_reduce(std::span<double>(sums, 2), ReduceOp::kSum);
      loss_sum = sums[0];
      targets = static_cast<int64_t>(sums[1]);
    }
    const double val_loss = targets > 0 ? loss_sum / static_cast<double>(targets) : NAN;
    st.final_val_loss = val_loss;
    out << "eval step " << step << " | val_loss " << format_number("%.4f", val_loss) << " | ppl "
        << format_number("%.2f", std::exp(val_loss)) << " | unigram entropy "
        << format_number("%.4f", result.unigram_entropy) << std::endl;
    if (metrics) metrics->write({{"step", step}, {"val_loss", val_loss}, {"val_tokens", targets}});
  };

  auto save_checkpoint = [&](int64_t step) {
    CheckpointManifest m;
    m.step = m.stage_step = step;
    m.data = data_position(info, cfg.data, step * ga);
    m.loop = loop_state_json(st);
    m.dp = dp;
    m.sp = sp;
    SafetensorsWriter w;
    // One process: rank-00000 holds everything. ZeRO-1: every rank writes its shard's optimizer state,
    // rank 0 also the parameters (the same on every replica).
    if (!zero || rank0) add_parameters(w, model.params());
    add_optimizer_state(w, optimizer);
    m.optimizer = zero ? zero1_counters(optimizer, ranks, zero->shard_numel(), model.flat_params().numel(),
                                        static_cast<int64_t>(model.params().size()))
                       : optimizer_counters(optimizer);
    run.save(std::move(m), w, device.str(), zero ? &*world : nullptr);
  };

  // SIGTERM / SIGUSR1 end the run after the current step, with a checkpoint.
  const StopSignals signals;
  double bad_loss = 0;
  const auto t_start = Clock::now();
  auto t_interval = t_start;
  double eval_seconds = 0;
  int64_t end_step = steps;
  for (int64_t step = start_step; step < steps; ++step) {
    const double lr = schedule.at(step);
    model.zero_grad(ctx);
    double loss_sum = 0;
    int64_t step_tokens = 0;
    for (int64_t micro = 0; micro < ga; ++micro) {
      HostBatch hb = train_sampler.batch(step * ga + micro);
      // With sp > 1: this rank's slice of every sequence.
      const Batch batch = upload_sp_batch(ctx, uploader, sp_ctx ? &*sp_ctx : nullptr, B, T, hb);
      step_tokens += static_cast<int64_t>(hb.tokens.size());
      if (ranks == 1) {
        loss_sum += model.forward_backward(ctx, batch, 1.0f / static_cast<float>(ga));
        continue;
      }
      // The single-rank loss is the mean over the micro-batch's targets; over the ranks (different sequences
      // or slices of the same ones) that mean is sum_r n_r * mean_r / N, so this rank's gradients are scaled
      // by n_r / N (and 1 / ga): under sequence parallelism the gradients that cross ranks carry the same
      // scale, since every rank's loss is its share of the one mean.
      int64_t global_targets = hb.num_targets;
      world->all_reduce(std::span<int64_t>(&global_targets, 1), ReduceOp::kSum);
      const double weight =
          global_targets > 0 ? static_cast<double>(hb.num_targets) / static_cast<double>(global_targets) : 0.0;
      const double l = model.forward_backward(ctx, batch, static_cast<float>(weight / ga));
      if (weight > 0) loss_sum += l * weight;
    }
    if (ranks > 1) {
      double sums[2] = {loss_sum, static_cast<double>(step_tokens)};
      world->all_reduce(std::span<double>(sums, 2), ReduceOp::kSum);
      loss_sum = sums[0];
      step_tokens = static_cast<int64_t>(sums[1]);
    }
    st.interval_tokens += step_tokens;
    st.tokens += step_tokens;
    const double loss = loss_sum / static_cast<double>(ga);
    // A non-finite loss or gradient skips the update; too many in a row end the run.
    bool good = std::isfinite(loss);
    if (good && zero) {
      // ZeRO-1: sum the gradients into this rank's shard, update the shard, all-gather the parameters.
      zero->reduce_gradients(ctx);
      st.last_norm = optimizer.step(ctx, lr);
      good = std::isfinite(st.last_norm);
      zero->gather_parameters(ctx);
    } else if (good) {
      st.last_norm = optimizer.step(ctx, lr);
      good = std::isfinite(st.last_norm);
    }
    if (good) {
      st.bad_in_row = 0;
      st.interval_loss += loss;
      ++st.interval_steps;
    } else {
      ++st.skipped;
      ++st.bad_in_row;
      bad_loss = loss;
    }

    const bool last = step + 1 == steps;
    if ((step + 1) % cfg.log.interval == 0 || last) {
      ctx.synchronize();
      const double interval_s = seconds_since(t_interval);
      StepMetrics sm;
      sm.step = step + 1;
      sm.total_steps = steps;
      sm.loss = st.interval_steps > 0 ? st.interval_loss / static_cast<double>(st.interval_steps) : NAN;
      sm.lr = lr;
      sm.grad_norm = st.last_norm;
      sm.tokens_per_s = interval_s > 0 ? static_cast<double>(st.interval_tokens) / interval_s : 0;
      sm.tokens = st.tokens;
      sm.elapsed_s = seconds_since(t_start);
      sm.memory_bytes = memory;
      sm.skipped_steps = st.skipped;
      // ETA from the training time only: evaluations are few and short.
      sm.eta_s = estimate_eta(sm.elapsed_s - eval_seconds, step + 1 - start_step, steps - start_step);
      if (peak_flops > 0) sm.mfu = sm.tokens_per_s * flops_per_token / peak_flops;
      out << sm.line() << std::endl;
      if (metrics) metrics->write(sm.json());
      st.final_train_loss = sm.loss;
      st.interval_loss = 0;
      st.interval_steps = 0;
      st.interval_tokens = 0;
      t_interval = Clock::now();
    }
    if ((rank0 || ranks > 1) && ((cfg.log.eval_interval > 0 && (step + 1) % cfg.log.eval_interval == 0) || last)) {
      const auto t_eval = Clock::now();
      run_eval(step + 1);
      eval_seconds += seconds_since(t_eval);
      t_interval += Clock::now() - t_eval;  // keep evaluation out of the throughput
    }
    fault_point_after_step(step + 1);
    const int signal = signals.agreed(world ? &*world : nullptr);
    const bool diverged = st.bad_in_row >= cfg.train.max_bad_steps;
    if (run.checkpoint_due(step + 1, steps) || signal != 0 || diverged) {
      const auto t_save = Clock::now();
      save_checkpoint(step + 1);
      t_interval += Clock::now() - t_save;
    }
    // Skipped steps leave the parameters and the optimizer state as they were: the checkpoint just written
    // holds the last good state.
    if (diverged)
      HYD_THROW("training diverged: ", st.bad_in_row,
                " consecutive steps with a non-finite loss or gradient (last: step ", step + 1, ", loss ", bad_loss,
                ", lr ", lr, "); the state before them is checkpointed in ", run.dir(), "/",
                checkpoint_dir_name(step + 1), "; lower train.lr or raise train.warmup_steps and start afresh");
    if (signal != 0) {
      end_step = step + 1;
      out << "received " << stop_signal_name(signal) << ": stopped after step " << end_step
          << " with a checkpoint; continue with --train.resume auto" << std::endl;
      break;
    }
    if (run.stop_due(step + 1, steps)) {
      end_step = step + 1;
      out << "stopped after step " << end_step << " (run.stop_after); continue with --train.resume auto" << std::endl;
      break;
    }
  }
  result.steps = end_step;
  result.tokens = st.tokens;
  result.final_train_loss = st.final_train_loss;
  result.final_val_loss = st.final_val_loss;
  result.elapsed_s = seconds_since(t_start);
  out << "done: " << end_step << " steps, " << format_count(static_cast<double>(st.tokens)) << " tokens in "
      << format_duration(result.elapsed_s) << " | train loss " << format_number("%.4f", result.final_train_loss);
  if (result.final_val_loss >= 0) out << " | val_loss " << format_number("%.4f", result.final_val_loss);
  out << " | unigram entropy " << format_number("%.4f", result.unigram_entropy) << std::endl;
  return result;
}

}  // namespace hyd

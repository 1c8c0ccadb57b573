#include "distill/distill_loop.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <ostream>
#include <sstream>

#include "data/dataset.h"
#include "distill/student_init.h"
#include "distill/teacher.h"
#include "kernels/distill_loss.h"
#include "kernels/elementwise.h"
#include "kernels/global_norm.h"
#include "trainer/batch_upload.h"
#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/hybrid_model.h"
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
  require(d.stage2_steps == 0 || d.w_kl + d.w_ce > 0, "distill.w_kl",
          "distill.w_kl and distill.w_ce are both 0: stage 2 would have no loss");
  const TrainOptions& t = cfg.train;
  require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0, got " + format_number("%g", t.weight_decay));
  require(t.beta1 >= 0 && t.beta1 < 1, "train.beta1", "must lie in [0, 1), got " + format_number("%g", t.beta1));
  require(t.beta2 >= 0 && t.beta2 < 1, "train.beta2", "must lie in [0, 1), got " + format_number("%g", t.beta2));
  require(t.eps > 0, "train.eps", "must be > 0, got " + format_number("%g", t.eps));
  require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = no clipping), got " + format_number("%g", t.grad_clip));
  require(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1, got " + std::to_string(t.max_bad_steps));
  require(cfg.log.interval >= 1, "log.interval", "must be >= 1, got " + std::to_string(cfg.log.interval));
  try {
    (void)parse_device(cfg.device);
  } catch (const Error& e) {
    throw ConfigError::at(src, "device", e.what());
  }
}

DistillResult run_distillation(const DistillConfig& cfg, const std::string& config_ini, std::ostream& out) {
  const std::string& src = cfg.source;
  validate_distill_config(cfg);

  // Run directory: refuse to mix two runs' metrics before anything is read or written.
  const fs::path run_dir(cfg.run.dir);
  const fs::path metrics_path = run_dir / "metrics.jsonl";
  if (fs::exists(run_dir) && !fs::is_directory(run_dir))
    throw ConfigError::at(src, "run.dir", run_dir.string() + " exists and is not a directory");
  if (fs::exists(metrics_path) && !cfg.run.overwrite)
    throw ConfigError::at(
        src, "run.dir",
        metrics_path.string() + " already exists (an earlier run); choose another run.dir or set run.overwrite = true");
  const Device device = parse_device(cfg.device);

  // Teacher: its directory must be complete and consistent before anything is built.
  if (!fs::is_directory(cfg.teacher_dir))
    throw ConfigError::at(src, "teacher.dir", cfg.teacher_dir + ": no such directory");
  TeacherInfo tinfo;
  try {
    tinfo = inspect_teacher(cfg.teacher_dir);
  } catch (const Error& e) {
    throw ConfigError::at(src, "teacher.dir", e.what());
  }
  const ModelConfig& tc = tinfo.config;

  // Dataset: its tokens must be in the teacher's vocabulary.
  if (!fs::exists(cfg.data.path)) throw ConfigError::at(src, "data.path", cfg.data.path + ": no such file");
  TokenDataset data(cfg.data.path);
  const DatasetInfo& info = data.info();
  if (info.vocab_size > tc.vocab_size)
    throw ConfigError::at(src, "data.path",
                          "the dataset " + info.path + " has vocab_size " + std::to_string(info.vocab_size) +
                              ", larger than the vocab_size " + std::to_string(tc.vocab_size) + " of the teacher " +
                              cfg.teacher_dir + " (teacher.dir): the dataset was not tokenized for this teacher");
  if (cfg.data.seq_len > tc.max_position_embeddings)
    throw ConfigError::at(src, "data.seq_len",
                          std::to_string(cfg.data.seq_len) + " exceeds the teacher's max_position_embeddings = " +
                              std::to_string(tc.max_position_embeddings));

  // Student and teacher configs (the pattern is checked against the teacher's layers here).
  HybridConfig student_cfg;
  HybridConfig teacher_cfg;
  try {
    student_cfg = student_config_from_teacher(tc, cfg.student_pattern, KdaOptions{}, src);
    teacher_cfg.model = tc;
    teacher_cfg.pattern = std::string(static_cast<size_t>(tc.num_layers), 'T');
    teacher_cfg.finalize(src);
  } catch (const ConfigError&) {
    throw;
  } catch (const Error& e) {
    throw ConfigError::from(e, src);
  }

  const int64_t B = cfg.data.batch_size, T = cfg.data.seq_len, N = B * T;
  PackedSampler sampler(data, Split::train, cfg.data.val_fraction, T, B, cfg.data.seed);
  if (sampler.num_docs() == 0)
    throw ConfigError::at(src, "data.val_fraction", "no training documents left in " + info.path);

  // Build the models: teacher weights through a DenseModel (the loader's target), copied by name into
  // the all-T HybridModel that serves stage 1's layer inputs and stage 2's logits; the student
  // initialised from the DenseModel, which is then released.
  ExecContext ctx(device);
  HybridModel teacher(teacher_cfg, device, N);
  HybridModel student(student_cfg, device, N);
  TransferReport report;
  {
    DenseModel dense(tc, device, N);
    load_teacher_weights(cfg.teacher_dir, dense);
    for (const ParamInfo& p : dense.params()) {
      const std::vector<float> v = dense.get_param(p.name);
      teacher.set_param(p.name, v.data(), static_cast<int64_t>(v.size()));
    }
    report = init_student_from_teacher(dense, student, cfg.train.seed);
  }
  BatchUploader uploader(device, N, /*with_loss_mask=*/true);
  const DType act = device.is_cuda() ? DType::bf16 : DType::f32;
  const int64_t D = tc.hidden_size, V = tc.vocab_size, L = tc.num_layers;
  std::vector<int64_t> k_layers;
  for (int64_t l = 0; l < L; ++l)
    if (student.layer_kind(l) == MixerKind::kda) k_layers.push_back(l);
  const int64_t stage1_steps = k_layers.empty() ? 0 : cfg.distill.stage1_steps;
  const int64_t stage2_steps = cfg.distill.stage2_steps;

  // Everything checked: now the run directory is written.
  fs::create_directories(run_dir);
  {
    const fs::path ini_path = run_dir / "config.ini";
    std::ofstream ini(ini_path, std::ios::out | std::ios::trunc);
    ini << config_ini;
    ini.flush();
    if (!ini) throw Error::at(ini_path.string(), "", "cannot write the effective configuration");
  }
  MetricsWriter metrics(metrics_path.string(), /*truncate=*/true);

  {
    std::ostringstream os;
    os << "device           " << device.str() << "\n"
       << "teacher          " << cfg.teacher_dir << " (" << tc.family << ", " << L << " layers, hidden " << D
       << ", vocab " << V << ", " << format_count(static_cast<double>(tinfo.num_parameters)) << " parameters)\n"
       << "student          pattern " << layer_pattern_string(student_cfg.layers) << "\n"
       << "tokens/step      " << N << " (" << B << " sequences x " << T << " tokens)\n"
       << data.summary() << "train split      " << sampler.num_docs() << " documents, " << sampler.tokens_per_epoch()
       << " tokens\n"
       << "stage 1          " << stage1_steps << " steps, lr " << format_number("%.3g", cfg.distill.stage1_lr) << " ("
       << k_layers.size() << " KDA layers align to the teacher's attention)\n"
       << "stage 2          " << stage2_steps << " steps, lr " << format_number("%.3g", cfg.distill.stage2_lr) << ", tau "
       << format_number("%g", cfg.distill.temperature) << ", w_kl " << format_number("%g", cfg.distill.w_kl) << ", w_ce "
       << format_number("%g", cfg.distill.w_ce) << "\n"
       << "memory           " << format_megabytes(teacher.memory_bytes() + student.memory_bytes() + uploader.bytes())
       << " (teacher " << format_megabytes(teacher.memory_bytes()) << ", student " << format_megabytes(student.memory_bytes())
       << ", before optimizer state)\n"
       << "run dir          " << run_dir.string() << "\n";
    out << "hydistill distill\n";
    std::istringstream lines(os.str());
    for (std::string line; std::getline(lines, line);) out << "  " << line << "\n";
    out << "student initialisation (transfer table)\n" << report.table();
    if (!report.table().empty() && report.table().back() != '\n') out << "\n";
    out.flush();
  }

  DistillResult result;
  const auto t_start = Clock::now();
  int64_t batch_index = 0;  // the sampler's step: stage 2 continues where stage 1 stopped
  auto skip_or_throw = [&](int64_t& bad_in_row, int stage, int64_t step, double loss) {
    if (++bad_in_row >= cfg.train.max_bad_steps)
      HYD_THROW("distillation stage ", stage, " diverged: ", bad_in_row,
                " consecutive steps with a non-finite loss or gradient (last: step ", step + 1, ", loss ", loss,
                "); lower distill.stage", stage, "_lr or raise distill.warmup_steps");
  };

  // ---- Stage 1: alignment of the K layers' mixers to the teacher's attention outputs.
  if (stage1_steps > 0) {
    const LrSchedule schedule = stage_schedule(cfg.distill.stage1_lr, stage1_steps, cfg.distill);
    std::vector<ParamInfo> trained;
    for (int64_t l : k_layers)
      for (const ParamInfo& p : student.mixer_params(l)) trained.push_back(p);
    AdamW optimizer(trained, device, cfg.train.adamw());
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
    const Tensor sq = work.alloc({nk}, DType::f32);  // per K layer: sum (o - y)^2
    const double numel = static_cast<double>(N * D);

    auto t_interval = Clock::now();
    double interval_mse = 0, last_norm = 0;
    int64_t interval_steps = 0, interval_tokens = 0, bad_in_row = 0;
    for (int64_t step = 0; step < stage1_steps; ++step, ++batch_index) {
      const double lr = schedule.at(step);
      const HostBatch hb = sampler.batch(batch_index);
      const Batch batch = uploader.upload(ctx, hb);
      student.zero_grad();
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
      bool good = std::isfinite(mse);
      if (good) {
        last_norm = optimizer.step(ctx, lr);
        good = std::isfinite(last_norm);
      }
      if (good) {
        bad_in_row = 0;
        interval_mse += mse;
        ++interval_steps;
      } else {
        skip_or_throw(bad_in_row, 1, step, mse);
      }
      interval_tokens += N;
      result.tokens += N;
      const bool last = step + 1 == stage1_steps;
      if ((step + 1) % cfg.log.interval == 0 || last) {
        ctx.synchronize();
        const double s = seconds_since(t_interval);
        const double tps = s > 0 ? static_cast<double>(interval_tokens) / s : 0;
        const double m = interval_steps > 0 ? interval_mse / static_cast<double>(interval_steps) : NAN;
        out << "stage 1 step " << step + 1 << "/" << stage1_steps << " | mse " << format_number("%.6g", m) << " | lr "
            << format_number("%.2e", lr) << " | gnorm " << format_number("%.3g", last_norm) << " | " << format_count(tps) << " tok/s"
            << std::endl;
        metrics.write({{"stage", 1},
                       {"step", step + 1},
                       {"total_steps", stage1_steps},
                       {"mse", m},
                       {"lr", lr},
                       {"grad_norm", last_norm},
                       {"tokens_per_s", tps},
                       {"tokens", result.tokens},
                       {"skipped_steps", optimizer.skipped_steps()},
                       {"elapsed_s", seconds_since(t_start)}});
        if (result.first_mse < 0) result.first_mse = m;
        result.last_mse = m;
        interval_mse = 0;
        interval_steps = 0;
        interval_tokens = 0;
        t_interval = Clock::now();
      }
    }
    ctx.synchronize();  // the last update is complete before stage 2's optimizer reads the weights
    result.stage1_steps = stage1_steps;
  } else if (cfg.distill.stage1_steps > 0) {
    out << "stage 1 skipped: the student has no K layers" << std::endl;
  }

  // ---- Stage 2: end-to-end KL (+ CE) distillation of every student parameter.
  if (stage2_steps > 0) {
    const LrSchedule schedule = stage_schedule(cfg.distill.stage2_lr, stage2_steps, cfg.distill);
    AdamW optimizer(student.params(), device, cfg.train.adamw());
    const int64_t C = student.logits_chunk_size();
    Arena work("distill stage 2", device,
               static_cast<size_t>(C * V) * dtype_size(act) + 2 * static_cast<size_t>(N) * 4 + 3 * kPad);
    const Tensor teacher_chunk = work.alloc({C, V}, act);
    const Tensor kl = work.alloc({N}, DType::f32), ce = work.alloc({N}, DType::f32);
    kernels::DistillLossOptions opt;
    opt.temperature = static_cast<float>(cfg.distill.temperature);
    opt.w_kl = static_cast<float>(cfg.distill.w_kl);
    opt.w_ce = static_cast<float>(cfg.distill.w_ce);
    opt.write_grad = true;

    auto t_interval = Clock::now();
    double interval_kl = 0, interval_ce = 0, last_norm = 0;
    int64_t interval_steps = 0, interval_tokens = 0, bad_in_row = 0;
    for (int64_t step = 0; step < stage2_steps; ++step, ++batch_index) {
      const double lr = schedule.at(step);
      const HostBatch hb = sampler.batch(batch_index);
      const Batch batch = uploader.upload(ctx, hb);
      const Tensor mask = uploader.loss_mask();
      double kl_mean = NAN, ce_mean = NAN;
      bool good = hb.num_targets > 0;
      if (good) {
        student.zero_grad();
        teacher.forward_hidden(ctx, batch);
        opt.grad_scale = 1.0f / static_cast<float>(hb.num_targets);
        kernels::fill(ctx, kl, 0.0f);
        kernels::fill(ctx, ce, 0.0f);
        // Per-token kl / ce stay on the device; they are summed once after the call (no host
        // synchronisation per chunk), so the callback returns 0.
        student.forward_backward_logits(ctx, batch, [&](ExecContext& c, int64_t t0, int64_t t1, const Tensor& s) {
          const Tensor t = teacher_chunk.slice0(0, t1 - t0);
          teacher.lm_head_logits(c, t0, t1, t);
          kernels::distill_loss(c, s, t, batch.targets.slice0(t0, t1), mask.slice0(t0, t1), kl.slice0(t0, t1),
                                ce.slice0(t0, t1), Tensor{}, opt);
          return 0.0;
        });
        const std::vector<float> kl_host = download_f32(ctx, kl), ce_host = download_f32(ctx, ce);
        double kl_sum = 0, ce_sum = 0;
        for (size_t i = 0; i < kl_host.size(); ++i) {
          kl_sum += kl_host[i];
          ce_sum += ce_host[i];
        }
        kl_mean = kl_sum / static_cast<double>(hb.num_targets);
        ce_mean = ce_sum / static_cast<double>(hb.num_targets);
        good = std::isfinite(kl_mean) && std::isfinite(ce_mean);
      }
      if (good) {
        last_norm = optimizer.step(ctx, lr);
        good = std::isfinite(last_norm);
      }
      if (good) {
        bad_in_row = 0;
        interval_kl += kl_mean;
        interval_ce += ce_mean;
        ++interval_steps;
      } else if (hb.num_targets > 0) {
        skip_or_throw(bad_in_row, 2, step, cfg.distill.w_kl * kl_mean + cfg.distill.w_ce * ce_mean);
      }
      interval_tokens += N;
      result.tokens += N;
      const bool last = step + 1 == stage2_steps;
      if ((step + 1) % cfg.log.interval == 0 || last) {
        ctx.synchronize();
        const double s = seconds_since(t_interval);
        const double tps = s > 0 ? static_cast<double>(interval_tokens) / s : 0;
        const double k = interval_steps > 0 ? interval_kl / static_cast<double>(interval_steps) : NAN;
        const double e = interval_steps > 0 ? interval_ce / static_cast<double>(interval_steps) : NAN;
        const double loss = cfg.distill.w_kl * k + cfg.distill.w_ce * e;
        out << "stage 2 step " << step + 1 << "/" << stage2_steps << " | kl " << format_number("%.5g", k) << " | ce "
            << format_number("%.4f", e) << " | lr " << format_number("%.2e", lr) << " | gnorm " << format_number("%.3g", last_norm) << " | "
            << format_count(tps) << " tok/s" << std::endl;
        metrics.write({{"stage", 2},
                       {"step", step + 1},
                       {"total_steps", stage2_steps},
                       {"loss", loss},
                       {"kl", k},
                       {"ce", e},
                       {"lr", lr},
                       {"grad_norm", last_norm},
                       {"tokens_per_s", tps},
                       {"tokens", result.tokens},
                       {"skipped_steps", optimizer.skipped_steps()},
                       {"elapsed_s", seconds_since(t_start)}});
        if (result.first_kl < 0) result.first_kl = k;
        result.last_kl = k;
        result.last_ce = e;
        interval_kl = interval_ce = 0;
        interval_steps = 0;
        interval_tokens = 0;
        t_interval = Clock::now();
      }
    }
    ctx.synchronize();
    result.stage2_steps = stage2_steps;
  }

  result.elapsed_s = seconds_since(t_start);
  out << "done: stage 1 " << result.stage1_steps << " steps";
  if (result.last_mse >= 0)
    out << " (mse " << format_number("%.6g", result.first_mse) << " -> " << format_number("%.6g", result.last_mse) << ")";
  out << ", stage 2 " << result.stage2_steps << " steps";
  if (result.last_kl >= 0)
    out << " (kl " << format_number("%.5g", result.first_kl) << " -> " << format_number("%.5g", result.last_kl) << ")";
  out << ", " << format_count(static_cast<double>(result.tokens)) << " tokens in " << format_duration(result.elapsed_s)
      << std::endl;
  return result;
}

}  // namespace hyd

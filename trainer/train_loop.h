// Plain next-token language-model training (`hydistill train`): a DenseModel on one device, AdamW,
// an LR schedule, packed batches from an HDF5 token dataset, periodic held-out evaluation.
//
// Checkpoints (checkpoint/run_directory.h): RUN_DIR/step-XXXXXXXX/ every checkpoint.interval steps
// and at the end; train.resume = auto | PATH continues from one bit for bit (the sampler is a pure
// function of the step, so the model, the AdamW state and the loop's running sums are all there is).
//
// Order of work, so that a bad configuration writes nothing: check the run directory and the
// checkpoint to resume from (an earlier run's metrics.jsonl without run.overwrite or train.resume is
// an error naming it), open and validate the dataset, resolve and check the model configuration against
// it, build the model and restore the checkpoint; only then create the run directory and write
// RUN_DIR/config.ini and RUN_DIR/metrics.jsonl.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <utility>
#include <vector>

#include "trainer/core/error.h"
#include "trainer/model_config.h"
#include "trainer/optimizer.h"
#include "trainer/schedule.h"

namespace hyd {

// A bad configuration value or a configuration that does not fit the data: `hydistill` exits with 2.
// what() reads "SOURCE: 'KEY': MESSAGE" (Error::at); key() and message() keep the parts, so that a
// caller who knows better where a value came from (command line or file) can restate it.
class ConfigError : public Error {
 public:
  explicit ConfigError(const std::string& what) : Error(what), message_(what) {}
  static ConfigError at(const std::string& source, const std::string& key, const std::string& message) {
    ConfigError e(Error::at(source, key, message).what());
    e.key_ = key;
    e.message_ = message;
    return e;
  }
  // An Error of the form "SOURCE: 'KEY': MESSAGE" (Error::at, as ModelConfig::finalize throws) as a
  // ConfigError that keeps the key; any other message is kept whole.
  static ConfigError from(const Error& e, const std::string& source) {
    const std::string what = e.what();
    const std::string head = source + ": '";
    if (what.rfind(head, 0) == 0) {
      const size_t end = what.find("': ", head.size());
      if (end != std::string::npos)
        return at(source, what.substr(head.size(), end - head.size()), what.substr(end + 3));
    }
    return ConfigError(what);
  }
  const std::string& key() const { return key_; }  // empty when not about one key
  const std::string& message() const { return message_; }

 private:
  std::string key_;
  std::string message_;
};

struct RunOptions {
  std::string dir;         // run.dir (required)
  bool overwrite = false;  // run.overwrite: replace an earlier run in the run dir (its metrics and checkpoints)
  int64_t stop_after = 0;  // run.stop_after: stop after this step with a checkpoint (0: run to the end)
};

struct CheckpointOptions {
  int64_t interval = 0;    // checkpoint.interval: steps between checkpoints; 0 = only at the end
  int64_t keep_last = 3;   // checkpoint.keep_last: newest checkpoints kept
  int64_t keep_every = 0;  // checkpoint.keep_every: also keep every M-th periodic checkpoint for good; 0 = none
};

// The effective configuration of a run: every option as (key, value text), after the defaults, the
// config file and the command line, and the same as INI text (RUN_DIR/config.ini).
struct EffectiveConfig {
  std::vector<std::pair<std::string, std::string>> values;
  std::string ini;
};

struct DataOptions {
  std::string path;            // data.path (required): HDF5 token dataset
  double val_fraction = 0.01;  // documents held out for validation
  int64_t seq_len = 256;
  int64_t batch_size = 8;  // sequences per micro-batch
  uint64_t seed = 1234;    // document split and shuffling
};

struct TrainOptions {
  int64_t steps = 1000;
  int64_t grad_accum = 1;
  double lr = 3e-4;
  double min_lr = 3e-5;
  int64_t warmup_steps = 100;
  std::string schedule = "cosine";  // cosine | wsd | constant
  double wsd_decay_fraction = 0.2;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;
  uint64_t seed = 42;           // parameter initialisation
  int64_t max_bad_steps = 5;    // consecutive non-finite steps that stop the run
  std::string resume = "none";  // none | auto | PATH (checkpoint/run_directory.h)

  LrSchedule lr_schedule() const;
  AdamWConfig adamw() const;
};

struct LogOptions {
  int64_t interval = 10;        // steps per progress line / metrics record
  int64_t eval_interval = 100;  // steps between held-out evaluations; 0 = only at the end
  int64_t eval_batches = 8;     // validation micro-batches per evaluation; 0 = no evaluation
};

// The dp x sp process grid (parallel/grid.h). dp ranks take different sequences, sp ranks slices of the
// same sequences (train: the all-T HybridModel with LASP-2H; distill: LASP-2 / LASP-2H in student and
// teacher). Gradients reduce-scattered over all dp x sp ranks, AdamW on each rank's contiguous shard of the
// flat parameters (ZeRO-1, trainer/zero1.h), parameters all-gathered; MPI on the CPU, NCCL on GPUs.
struct ParallelOptions {
  int64_t dp = 1;  // parallel.dp
  int64_t sp = 1;  // parallel.sp
  int64_t ep = 1;  // parallel.ep (distill with MoE models): expert-parallel group size, dividing dp x sp
};

struct TrainConfig {
  std::string source = "command line";  // where the options came from (the config file), for errors
  std::string device = "cpu";           // cpu | cuda | cuda:N
  RunOptions run;
  ModelConfig model;  // vocab_size 0 = the dataset's
  DataOptions data;
  TrainOptions train;
  LogOptions log;
  CheckpointOptions checkpoint;
  ParallelOptions parallel;
};

struct TrainResult {
  int64_t steps = 0;  // the step the run ended at (run.stop_after may end it early)
  int64_t tokens = 0;
  double final_train_loss = 0;  // mean over the last log interval
  double final_val_loss = -1;   // -1 when no evaluation ran
  double unigram_entropy = 0;   // of the dataset, nats per token
  double elapsed_s = 0;
};

// Checks every option that can be checked without the dataset (ranges, choices, the model's fields
// with a placeholder vocabulary); throws ConfigError naming cfg.source and the key.
void validate_train_config(const TrainConfig& cfg);
// The run.*, checkpoint.* and train.resume checks that `train` and `distill` share.
void validate_run_options(const RunOptions& run, const CheckpointOptions& checkpoint, const std::string& resume,
                          const std::string& source);

// Runs the training described by cfg. effective: recorded in RUN_DIR/config.ini and every checkpoint.
// Progress goes to `out`. Throws ConfigError for configuration problems and hyd::Error for everything
// else (unreadable data, a broken checkpoint, device failures, diverged training).
// This rank's device for the `device` option of `source` in a job of world_size ranks: the option itself
// for one rank or the CPU. Several ranks on CUDA take one GPU each, the one of their node-local rank
// (bind_local_gpu, which also makes it current); device = cuda:N is accepted only with one rank per node,
// and a node with more ranks than visible GPUs is refused (ConfigError naming `device`).
Device rank_device(const std::string& option, int world_size, const std::string& source);

TrainResult run_training(const TrainConfig& cfg, const EffectiveConfig& effective, std::ostream& out);

}  // namespace hyd

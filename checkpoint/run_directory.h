// A run directory and its checkpoints, as `hydistill train` and `hydistill distill` share them:
// how a run starts (afresh or resumed), what it writes at its start, when it checkpoints, which old
// checkpoints it keeps.
//
//   RUN_DIR/config.ini       the effective configuration of the latest start
//   RUN_DIR/metrics.jsonl    one record per log interval (and per evaluation for train)
//   RUN_DIR/eval.jsonl       distill: one record per evaluation
//   RUN_DIR/step-XXXXXXXX/   checkpoints (checkpoint/checkpoint.h)
//
// The constructor only reads, so that a refused run writes nothing. train.resume:
//   none    start afresh. A run directory holding an earlier run (metrics.jsonl or checkpoints) is
//           refused unless run.overwrite, which then removes that run's checkpoints and records.
//   auto    the newest checkpoint of run.dir that verifies (a broken one is reported and skipped);
//           afresh, as `none`, when run.dir holds none.
//   PATH    a checkpoint folder (step-XXXXXXXX), or a run directory whose newest valid checkpoint is
//           taken; it must verify.
// A resumed checkpoint must come from the same command and agree with this run's configuration
// (check_resume_config). Resuming inside run.dir discards what the run directory holds after the
// checkpoint (later records of metrics.jsonl / eval.jsonl, later checkpoints), so that a resumed run's
// files equal those of a run that never stopped; a checkpoint from elsewhere starts run.dir as a fresh
// run does.
// Records are ordered by their ("stage", "step") fields (stage 0 when absent); a checkpoint's
// position is (manifest.stage, manifest.stage_step).
#pragma once

#include <iosfwd>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "data/dataset.h"
#include "trainer/train_loop.h"

namespace hyd {

inline constexpr const char* kMetricsFile = "metrics.jsonl";
inline constexpr const char* kEvalFile = "eval.jsonl";

class RunDirectory {
 public:
  // command: "train" | "distill". paths: the canonical forms of this run's path options
  // ({"data.path", ...}), recorded in manifests and used by the resume check. Throws ConfigError
  // (naming `source` and run.dir or train.resume) or hyd::Error (a broken checkpoint named by PATH).
  RunDirectory(std::string command, const RunOptions& run, const CheckpointOptions& checkpoint,
               const std::string& resume, EffectiveConfig config,
               std::vector<std::pair<std::string, std::string>> paths, const std::string& source, std::ostream& out);

  // The checkpoint the run resumes from; nullptr for a fresh run.
  const Checkpoint* resume_from() const { return resumed_ ? &*resumed_ : nullptr; }
  // Creates the run directory and writes config.ini; prepares metrics.jsonl and eval.jsonl (emptied for
  // a fresh run, cut after the checkpoint for a resumed one) so the loop appends to them.
  void begin();
  std::string file(const std::string& name) const;
  const std::string& dir() const { return run_.dir; }

  // After global step `step` of `total`: a checkpoint every checkpoint.interval steps, at the end, and
  // where the run stops early.
  bool checkpoint_due(int64_t step, int64_t total) const;
  // run.stop_after: the run stops after this step (with a checkpoint), before its end.
  bool stop_due(int64_t step, int64_t total) const;
  // Completes the manifest (command, config, paths, device), writes the checkpoint, removes those the
  // keep policy drops, and reports on `out`. Returns the checkpoint's folder. With `world` (more than one
  // rank): collective, every rank passes its own tensors (a sharded checkpoint, write_checkpoint); rank 0
  // prunes and reports.
  std::string save(CheckpointManifest manifest, const SafetensorsWriter& tensors, const std::string& device,
                   const Communicator* world = nullptr);

 private:
  void refuse_earlier_run(const std::string& why) const;
  std::string command_;
  RunOptions run_;
  CheckpointOptions checkpoint_;
  EffectiveConfig config_;
  std::vector<std::pair<std::string, std::string>> paths_;
  std::string source_;
  std::ostream& out_;
  std::optional<Checkpoint> resumed_;
  bool resumed_here_ = false;  // the checkpoint is one of run.dir's
};

// The manifest's `data` object: the dataset's identity and the sampler's settings; next_batch is the
// index of the next micro-batch the sampler draws (PackedSampler::batch is a pure function of it).
nlohmann::json data_position(const DatasetInfo& info, const DataOptions& data, int64_t next_batch);
// Resuming: the dataset opened now must be the one the checkpoint was trained on (tokens, documents,
// vocabulary, tokenizer); throws ConfigError naming `source`, data.path and the checkpoint's manifest.
void check_data_identity(const Checkpoint& ck, const DatasetInfo& info, const std::string& source);
// manifest.data.next_batch, checked.
int64_t resume_next_batch(const Checkpoint& ck);

}  // namespace hyd

// Checkpoint directories (DESIGN.md "Formats"; docs/formats.md is the schema).
//
//   RUN_DIR/step-XXXXXXXX/         XXXXXXXX = the optimizer steps the run has completed, 8 digits
//     rank-00000.safetensors       the training state of rank 0 (checkpoint/training_state.h names it)
//     rank-00001.safetensors ...   sharded checkpoints (topology.world_size > 1): one file per rank
//     config.ini                   the effective configuration of the run that wrote it
//     manifest.json                written last: what makes the folder a checkpoint
//
// Writing: every file goes to RUN_DIR/step-XXXXXXXX.tmp/ and is fsynced, the manifest (with each
// file's size and SHA-256) last; then the folder is renamed to step-XXXXXXXX and RUN_DIR is fsynced.
// Over several ranks (write_checkpoint with a communicator): rank 0 prepares the .tmp folder, every rank
// writes, fsyncs and hashes its own file, rank 0 gathers the sizes and checksums, writes config.ini and
// the manifest and renames after all ranks are done; a rank that dies mid-write leaves only the .tmp
// folder.
// A crash leaves at most a .tmp folder, which nothing reads (the next write of that step replaces it):
// a folder without a valid manifest is not a checkpoint.
// Reading (open_checkpoint): the manifest is parsed and checked field by field, then every file it
// lists is checked for its size and SHA-256. Every problem is a hyd::Error naming the file and the
// field ("runs/a/step-00000040/rank-00000.safetensors: 'sha256': ...").
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "checkpoint/safetensors.h"

namespace hyd {

inline constexpr const char* kCheckpointManifest = "manifest.json";
inline constexpr const char* kCheckpointRankFile = "rank-00000.safetensors";
inline constexpr const char* kCheckpointConfig = "config.ini";
inline constexpr int64_t kCheckpointFormatVersion = 1;
// "rank-00003.safetensors".
std::string checkpoint_rank_file(int64_t rank);

// hydistill's version (CMake's project version), as manifests record it.
const char* hydistill_version();

// The canonical absolute form of a path (absolute but unresolved when it cannot be resolved): what a
// manifest's `paths` records.
std::string canonical_path(const std::string& p);

struct CheckpointFile {
  std::string name;  // relative to the checkpoint folder
  uint64_t size = 0;
  std::string sha256;  // 64 lower-case hex digits
};

struct CheckpointManifest {
  std::string command;     // "train" | "distill": the subcommand that wrote it
  int64_t step = 0;        // optimizer steps the run has completed (distill: stage 1 + stage 2)
  int64_t stage = 0;       // distill: the stage of the last step, 1 or 2; train: 0
  int64_t stage_step = 0;  // steps completed in that stage (train: = step)
  // Every option of the run ("section.key" -> value text), as RUN_DIR/config.ini records them.
  std::vector<std::pair<std::string, std::string>> config;
  // Canonical absolute paths of the path options the run read ("data.path", "teacher.dir"): compared
  // instead of the text when a run resumes from another working directory.
  std::vector<std::pair<std::string, std::string>> paths;
  nlohmann::json data = nlohmann::json::object();       // data position and the dataset's identity
  nlohmann::json loop = nlohmann::json::object();       // the loop's counters and running sums
  nlohmann::json optimizer = nlohmann::json::object();  // training_state.h's optimizer counters
  nlohmann::json teacher = nullptr;                     // distill: the teacher's identity
  std::string device;                                   // where it was written (informative)
  std::string library_version = hydistill_version();
  // topology: ranks that wrote a state file each (1: rank-00000 alone, also for replicated multi-rank runs),
  // and the run's dp x sp grid (informative; dp x sp = world_size for sharded checkpoints).
  int64_t world_size = 1, dp = 1, sp = 1;
  std::vector<CheckpointFile> files;

  nlohmann::json to_json() const;
  // Validates every field; errors name `path` (the manifest file) and the field.
  static CheckpointManifest from_json(const nlohmann::json& j, const std::string& path);
  // The value of option `key` in `config`, nullptr when absent.
  const std::string* config_value(const std::string& key) const;
};

// "step-00000040".
std::string checkpoint_dir_name(int64_t step);

class Communicator;

// Writes RUN_DIR/step-XXXXXXXX as described above (RUN_DIR must exist) and returns its path. The
// manifest's files are filled here. An existing folder of that step is replaced, only after the new
// one is complete. With `world` (collective over its ranks; nullptr or one rank: a single-rank
// checkpoint) every rank passes its own tensors and rank r's go to rank-r's file; the manifest
// (world_size = world->size()) and config_ini are rank 0's.
std::string write_checkpoint(const std::string& run_dir, CheckpointManifest manifest, const SafetensorsWriter& tensors,
                             const std::string& config_ini, const Communicator* world = nullptr);

// A verified checkpoint: the manifest and the opened state file.
struct Checkpoint {
  std::string dir;
  CheckpointManifest manifest;
  SafetensorsFile tensors;  // rank-00000's
  std::string manifest_path() const;
  // The state file of rank r < manifest.world_size (verified with the others by open_checkpoint).
  SafetensorsFile open_rank(int64_t r) const;
};

// Reads and verifies `dir` (sizes and SHA-256 of every listed file, the state file's header).
Checkpoint open_checkpoint(const std::string& dir);

// `hydistill inspect CHECKPOINT`: what it is (command, step, stage, data position, teacher), its
// files with sizes and checksums (verified), and its configuration.
std::string checkpoint_summary(const Checkpoint& ck);

// A loop's own values in manifest.loop: a number (null, which JSON makes of NaN and Inf, reads as
// NaN) or a non-negative integer. Errors name the manifest and "loop.KEY".
double loop_number(const Checkpoint& ck, const char* key);
int64_t loop_count(const Checkpoint& ck, const char* key);

// A loop's counters and running sums as manifest.loop and back: State::visit(f) calls f(name, member)
// for each of its int64_t (counts) and double (numbers) members, so every field is named once.
template <class State>
nlohmann::json loop_state_json(State& state) {
  nlohmann::json j = nlohmann::json::object();
  state.visit([&](const char* key, const auto& value) { j[key] = value; });
  return j;
}
template <class State>
void read_loop_state(const Checkpoint& ck, State& state) {
  state.visit([&](const char* key, auto& value) {
    if constexpr (std::is_same_v<std::decay_t<decltype(value)>, double>)
      value = loop_number(ck, key);
    else
      value = loop_count(ck, key);
  });
}

// The step-XXXXXXXX folders of run_dir holding a manifest.json (not verified), by increasing step.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& run_dir);

// Removes the checkpoints of run_dir that are neither among the keep_last newest nor at a step that
// is a multiple of keep_every_steps (0: none kept for that reason). Returns the removed folders.
std::vector<std::string> prune_checkpoints(const std::string& run_dir, int64_t keep_last, int64_t keep_every_steps);

// Options that may differ between a checkpoint and the run resuming from it: where and how the run
// writes and reports (run.*, train.resume, device, log.*, checkpoint.*, eval.*) and how it is spread over
// ranks (parallel.*, data.batch_size). Every other option changes what the run computes.
// parallel.* and data.batch_size may change as long as the global batch (data.batch_size x parallel.dp)
// stays: check_resume_global_batch.
bool option_may_change_on_resume(const std::string& key);
// Throws ConfigError naming `source` and data.batch_size unless batch_size x dp equals the checkpoint's.
void check_resume_global_batch(const Checkpoint& ck, int64_t batch_size, int64_t dp, const std::string& source);

// Throws ConfigError naming `source` and the first option that differs from the checkpoint's
// (both values and the checkpoint's manifest.json in the message), or that one side lacks. Path
// options listed in the manifest's `paths` compare by canonical path (`paths` of this run).
void check_resume_config(const Checkpoint& ck, const std::vector<std::pair<std::string, std::string>>& effective,
                         const std::vector<std::pair<std::string, std::string>>& paths, const std::string& source);

}  // namespace hyd

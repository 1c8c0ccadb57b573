#include "checkpoint/run_directory.h"

#include "parallel/comm.h"

#include <chrono>
#include <filesystem>
#include <fstream>
#include <ostream>

#include "trainer/core/error.h"
#include "trainer/metrics.h"

namespace hyd {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// A record's or a checkpoint's place in a run: (stage, step within the stage).
using Position = std::pair<int64_t, int64_t>;

// Keeps the records of a JSON-lines file at or before `last`; drops the later ones and any line that
// does not parse (the torn last line of a crash). Written to PATH.tmp and renamed.
void cut_records_after(const fs::path& path, Position last) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return;
  std::ifstream in(path);
  if (!in) throw Error::at(path.string(), "", "cannot open for reading");
  std::string kept;
  for (std::string line; std::getline(in, line);) {
    const json rec = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!rec.is_object() || !rec.contains("step") || !rec["step"].is_number_integer()) continue;
    const Position at{rec.value("stage", int64_t{0}), rec["step"].get<int64_t>()};
    if (at <= last) kept += line + "\n";
  }
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << kept;
    out.close();
    if (!out) throw Error::at(tmp.string(), "", "write failed");
  }
  fs::rename(tmp, path, ec);
  if (ec) throw Error::at(path.string(), "", "cannot replace: " + ec.message());
}

void write_empty(const fs::path& path) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw Error::at(path.string(), "", "cannot open for writing");
}

// The step-XXXXXXXX(.tmp) folders of run_dir (complete or not).
std::vector<fs::path> checkpoint_folders(const fs::path& run_dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec)) return out;
  for (const fs::directory_entry& e : fs::directory_iterator(run_dir, ec))
    if (e.is_directory(ec) && e.path().filename().string().rfind("step-", 0) == 0) out.push_back(e.path());
  return out;
}

// The newest checkpoint of `run_dir` that verifies; broken ones are reported on `out` and skipped.
std::optional<Checkpoint> newest_valid(const std::string& run_dir, std::ostream& out) {
  const auto all = list_checkpoints(run_dir);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    try {
      return open_checkpoint(it->second);
    } catch (const Error& e) {
      out << "resume: skipping " << it->second << ": " << e.what() << std::endl;
    }
  }
  return std::nullopt;
}

}  // namespace

RunDirectory::RunDirectory(std::string command, const RunOptions& run, const CheckpointOptions& checkpoint,
                           const std::string& resume, EffectiveConfig config,
                           std::vector<std::pair<std::string, std::string>> paths, const std::string& source,
                           std::ostream& out)
    : command_(std::move(command)),
      run_(run),
      checkpoint_(checkpoint),
      config_(std::move(config)),
      paths_(std::move(paths)),
      source_(source),
      out_(out) {
  const fs::path run_dir(run_.dir);
  std::error_code ec;
  if (fs::exists(run_dir, ec) && !fs::is_directory(run_dir, ec))
    throw ConfigError::at(source_, "run.dir", run_dir.string() + " exists and is not a directory");

  if (resume == "auto") {
    resumed_ = newest_valid(run_.dir, out_);
    if (!resumed_ && !list_checkpoints(run_.dir).empty())
      refuse_earlier_run("holds no checkpoint that verifies (see above)");
  } else if (resume != "none") {
    if (!fs::exists(resume, ec))
      throw ConfigError::at(source_, "train.resume", resume + ": no such checkpoint or run directory");
    if (fs::exists(fs::path(resume) / kCheckpointManifest, ec) || !fs::is_directory(resume, ec)) {
      resumed_ = open_checkpoint(resume);
    } else {
      resumed_ = newest_valid(resume, out_);
      if (!resumed_)
        throw ConfigError::at(source_, "train.resume",
                              resume + ": no checkpoint (step-XXXXXXXX/manifest.json) that verifies in this directory");
    }
  }
  if (resumed_) {
    const Checkpoint& ck = *resumed_;
    if (ck.manifest.command != command_)
      throw ConfigError::at(source_, "train.resume",
                            ck.manifest_path() + ": 'command': a `" + ck.manifest.command +
                                "` checkpoint cannot resume `hydistill " + command_ + "`");
    check_resume_config(ck, config_.values, paths_, source_);
    resumed_here_ = canonical_path(fs::path(ck.dir).parent_path().string()) == canonical_path(run_.dir);
  }
  if (!resumed_here_) {
    if (fs::exists(run_dir / kMetricsFile, ec))
      refuse_earlier_run("already holds " + (run_dir / kMetricsFile).string() + " (an earlier run)");
    if (!list_checkpoints(run_.dir).empty()) refuse_earlier_run("already holds checkpoints of an earlier run");
  }
}

void RunDirectory::refuse_earlier_run(const std::string& why) const {
  if (run_.overwrite) return;
  throw ConfigError::at(source_, "run.dir",
                        run_.dir + " " + why +
                            "; resume it with train.resume = auto, choose another run.dir, or set run.overwrite = true "
                            "to replace it");
}

void RunDirectory::begin() {
  const fs::path run_dir(run_.dir);
  std::error_code ec;
  fs::create_directories(run_dir, ec);
  if (ec) throw Error::at(run_dir.string(), "", "cannot create the run directory: " + ec.message());
  if (resumed_here_) {
    const CheckpointManifest& m = resumed_->manifest;
    const Position last{m.stage, m.stage_step};
    cut_records_after(run_dir / kMetricsFile, last);
    cut_records_after(run_dir / kEvalFile, last);
    for (const auto& [step, path] : list_checkpoints(run_.dir)) {
      if (step <= m.step) continue;
      fs::remove_all(path, ec);
      out_ << "resume: removed " << path << " (after the resumed checkpoint)" << std::endl;
    }
  } else {
    // An earlier run here was allowed only with run.overwrite: its checkpoints go with its records.
    size_t removed = 0;
    for (const fs::path& p : checkpoint_folders(run_dir)) removed += fs::remove_all(p, ec) > 0 ? 1 : 0;
    if (removed > 0)
      out_ << "run.overwrite: removed " << removed << " checkpoint folders of an earlier run" << std::endl;
    write_empty(run_dir / kMetricsFile);
    fs::remove(run_dir / kEvalFile, ec);
  }
  const fs::path ini_path = run_dir / kCheckpointConfig;
  std::ofstream ini(ini_path, std::ios::out | std::ios::trunc);
  ini << config_.ini;
  ini.flush();
  if (!ini) throw Error::at(ini_path.string(), "", "cannot write the effective configuration");
}

std::string RunDirectory::file(const std::string& name) const { return (fs::path(run_.dir) / name).string(); }

bool RunDirectory::stop_due(int64_t step, int64_t total) const {
  return run_.stop_after > 0 && step == run_.stop_after && step < total;
}

bool RunDirectory::checkpoint_due(int64_t step, int64_t total) const {
  return step == total || (checkpoint_.interval > 0 && step % checkpoint_.interval == 0) || stop_due(step, total);
}

std::string RunDirectory::save(CheckpointManifest manifest, const SafetensorsWriter& tensors, const std::string& device,
                               const Communicator* world) {
  const auto t0 = std::chrono::steady_clock::now();
  manifest.command = command_;
  manifest.config = config_.values;
  manifest.paths = paths_;
  manifest.device = device;
  const std::string dir = write_checkpoint(run_.dir, std::move(manifest), tensors, config_.ini, world);
  if (world && world->rank() != 0) return dir;
  const int64_t keep_every_steps =
      checkpoint_.interval > 0 && checkpoint_.keep_every > 0 ? checkpoint_.interval * checkpoint_.keep_every : 0;
  const std::vector<std::string> removed = prune_checkpoints(run_.dir, checkpoint_.keep_last, keep_every_steps);
  uint64_t bytes = 0;
  const int ranks = world ? world->size() : 1;
  for (int r = 0; r < ranks; ++r) {
    std::error_code ec;
    const auto b = fs::file_size(fs::path(dir) / checkpoint_rank_file(r), ec);
    if (!ec) bytes += b;
  }
  out_ << "checkpoint " << dir << " (" << format_megabytes(bytes);
  if (ranks > 1) out_ << " in " << ranks << " shards";
  out_ << ", " << format_number("%.2f", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count())
       << " s";
  if (!removed.empty()) out_ << "; removed " << removed.size() << " older";
  out_ << ")" << std::endl;
  return dir;
}

// ---------------------------------------------------------------- data position

json data_position(const DatasetInfo& info, const DataOptions& data, int64_t next_batch) {
  return {{"path", canonical_path(info.path)},
          {"num_tokens", info.num_tokens},
          {"num_docs", info.num_docs},
          {"vocab_size", info.vocab_size},
          {"eos_id", info.eos_id},
          {"tokenizer_sha256", info.tokenizer_sha256},
          {"sampler", "PackedSampler"},
          {"seed", data.seed},
          {"val_fraction", data.val_fraction},
          {"seq_len", data.seq_len},
          {"batch_size", data.batch_size},
          {"next_batch", next_batch}};
}

void check_data_identity(const Checkpoint& ck, const DatasetInfo& info, const std::string& source) {
  const json now = data_position(info, DataOptions{}, 0);
  for (const char* key : {"num_tokens", "num_docs", "vocab_size", "eos_id", "tokenizer_sha256"}) {
    const auto it = ck.manifest.data.find(key);
    if (it == ck.manifest.data.end() || *it != now[key])
      throw ConfigError::at(source, "data.path",
                            info.path + " has " + key + " " + now[key].dump() + ", the dataset of the checkpoint (" +
                                ck.manifest_path() + ", data." + key + ") had " +
                                (it == ck.manifest.data.end() ? std::string("none") : it->dump()) +
                                ": the dataset changed since the checkpoint was written");
  }
}

int64_t resume_next_batch(const Checkpoint& ck) {
  const auto it = ck.manifest.data.find("next_batch");
  if (it == ck.manifest.data.end() || !it->is_number_integer() || it->get<int64_t>() < 0)
    throw Error::at(ck.manifest_path(), "data.next_batch", "missing or not a non-negative integer");
  return it->get<int64_t>();
}

}  // namespace hyd

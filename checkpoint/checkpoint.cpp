#include "checkpoint/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <csignal>
#include <cstdlib>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>

#include "checkpoint/sha256.h"
#include "parallel/checks.h"
#include "parallel/comm.h"
#include "trainer/core/error.h"
#include "trainer/train_loop.h"  // ConfigError

#ifndef HYD_VERSION
#define HYD_VERSION "unknown"
#endif

namespace hyd {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kFormatName = "hydistill-checkpoint";

// fsync of a file or folder: the data (or the folder's entries) reach the disk before what follows.
void fsync_path(const fs::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY);
  if (fd < 0) throw Error::at(p.string(), "", std::string("cannot open to fsync: ") + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw Error::at(p.string(), "", std::string("fsync failed: ") + std::strerror(err));
}

void write_file(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  if (!f) throw Error::at(p.string(), "", std::string("cannot open for writing: ") + std::strerror(errno));
  f << text;
  f.close();
  if (!f) throw Error::at(p.string(), "", "write failed");
}

// Field-by-field reading of a manifest: every failure names the file and the field.
class ManifestReader {
 public:
  // prefix: the path of j inside the manifest ("files[1]."), for the field names of errors.
  ManifestReader(const json& j, std::string path, std::string prefix = "")
      : j_(j), path_(std::move(path)), prefix_(std::move(prefix)) {}

  [[noreturn]] void fail(const std::string& field, const std::string& msg) const {
    throw Error::at(path_, prefix_ + field, msg);
  }
  const json& at(const std::string& field, json::value_t type, const char* what) const {
    const auto it = j_.find(field);
    if (it == j_.end()) fail(field, "missing");
    const bool ok = type == json::value_t::number_integer ? it->is_number_integer() : it->type() == type;
    if (!ok) fail(field, std::string("expected ") + what + ", got " + it->dump());
    return *it;
  }
  int64_t count(const std::string& field) const {
    const int64_t v = at(field, json::value_t::number_integer, "an integer").get<int64_t>();
    if (v < 0) fail(field, "must be >= 0, got " + std::to_string(v));
    return v;
  }
  std::string string(const std::string& field) const {
    return at(field, json::value_t::string, "a string").get<std::string>();
  }
  const json& object(const std::string& field) const { return at(field, json::value_t::object, "an object"); }
  // An object of strings -> its pairs (in the object's order, i.e. sorted by key).
  std::vector<std::pair<std::string, std::string>> string_map(const std::string& field) const {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& [k, v] : object(field).items()) {
      if (!v.is_string()) fail(field + "." + k, "expected a string, got " + v.dump());
      out.emplace_back(k, v.get<std::string>());
    }
    return out;
  }

 private:
  const json& j_;
  std::string path_;
  std::string prefix_;
};

json string_map_json(const std::vector<std::pair<std::string, std::string>>& pairs) {
  json j = json::object();
  for (const auto& [k, v] : pairs) j[k] = v;
  return j;
}

bool is_hex_digest(const std::string& s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           const auto u = static_cast<unsigned char>(c);
           return std::isxdigit(u) && !std::isupper(u);
         });
}

// "step-00000040" -> 40; -1 for any other name.
int64_t step_of_dir_name(const std::string& name) {
  if (name.size() != 13 || name.rfind("step-", 0) != 0) return -1;
  int64_t v = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    v = v * 10 + (name[i] - '0');
  }
  return v;
}

}  // namespace

const char* hydistill_version() { return HYD_VERSION; }

std::string canonical_path(const std::string& p) {
  std::error_code ec;
  const fs::path abs = fs::absolute(p, ec);
  if (ec) return p;
  const fs::path c = fs::weakly_canonical(abs, ec);
  return ec ? abs.string() : c.string();
}

// ---------------------------------------------------------------- manifest

json CheckpointManifest::to_json() const {
  json files_json = json::array();
  for (const CheckpointFile& f : files)
    files_json.push_back({{"name", f.name}, {"size", f.size}, {"sha256", f.sha256}});
  return {{"format", kFormatName},
          {"format_version", kCheckpointFormatVersion},
          {"library_version", library_version},
          {"command", command},
          {"step", step},
          {"stage", stage},
          {"stage_step", stage_step},
          {"config", string_map_json(config)},
          {"paths", string_map_json(paths)},
          {"data", data},
          {"loop", loop},
          {"optimizer", optimizer},
          {"teacher", teacher},
          {"device", device},
          {"topology", {{"world_size", world_size}, {"dp", dp}, {"sp", sp}, {"ep", 1}}},
          {"files", files_json}};
}

CheckpointManifest CheckpointManifest::from_json(const json& j, const std::string& path) {
  if (!j.is_object()) throw Error::at(path, "", "not a JSON object");
  const ManifestReader r(j, path);
  if (r.string("format") != kFormatName)
    r.fail("format", "'" + r.string("format") + "' is not a hydistill checkpoint manifest ('" + kFormatName + "')");
  if (const int64_t v = r.count("format_version"); v != kCheckpointFormatVersion)
    r.fail("format_version", "version " + std::to_string(v) + " is not readable by this hydistill (" +
                                 hydistill_version() + " reads version " + std::to_string(kCheckpointFormatVersion) +
                                 ")");
  CheckpointManifest m;
  m.library_version = r.string("library_version");
  m.command = r.string("command");
  if (m.command != "train" && m.command != "distill")
    r.fail("command", "'" + m.command + "' is not a command that writes checkpoints (train, distill)");
  m.step = r.count("step");
  m.stage = r.count("stage");
  m.stage_step = r.count("stage_step");
  if (m.stage_step > m.step) r.fail("stage_step", "exceeds 'step' (" + std::to_string(m.step) + ")");
  m.config = r.string_map("config");
  m.paths = r.string_map("paths");
  m.data = r.object("data");
  m.loop = r.object("loop");
  m.optimizer = r.object("optimizer");
  if (!j.contains("teacher")) r.fail("teacher", "missing");
  m.teacher = j.at("teacher");
  m.device = r.string("device");
  const ManifestReader topology(r.object("topology"), path, "topology.");
  m.world_size = topology.count("world_size");
  m.dp = topology.count("dp");
  m.sp = topology.count("sp");
  if (m.world_size < 1 || m.world_size > 99999) topology.fail("world_size", "must lie in [1, 99999]");
  if (m.dp < 1 || m.sp < 1) topology.fail(m.dp < 1 ? "dp" : "sp", "must be >= 1");
  const json& files = r.at("files", json::value_t::array, "a list of files");
  for (size_t i = 0; i < files.size(); ++i) {
    const std::string field = "files[" + std::to_string(i) + "]";
    if (!files[i].is_object()) r.fail(field, "expected an object, got " + files[i].dump());
    const ManifestReader fr(files[i], path, field + ".");
    CheckpointFile f;
    f.name = fr.string("name");
    f.size = static_cast<uint64_t>(fr.count("size"));
    f.sha256 = fr.string("sha256");
    if (f.name.empty() || f.name.find('/') != std::string::npos || f.name == "." || f.name == "..")
      fr.fail("name", "'" + f.name + "' is not a file name inside the checkpoint folder");
    if (!is_hex_digest(f.sha256)) fr.fail("sha256", "expected 64 lower-case hex digits, got '" + f.sha256 + "'");
    m.files.push_back(std::move(f));
  }
  const auto listed = [&](const char* name) {
    return std::any_of(m.files.begin(), m.files.end(), [&](const CheckpointFile& f) { return f.name == name; });
  };
  for (int64_t rank = 0; rank < m.world_size; ++rank)
    if (!listed(checkpoint_rank_file(rank).c_str()))
      r.fail("files", "does not list the state file " + checkpoint_rank_file(rank) + " (topology.world_size = " +
                          std::to_string(m.world_size) + ")");
  return m;
}

const std::string* CheckpointManifest::config_value(const std::string& key) const {
  for (const auto& [k, v] : config)
    if (k == key) return &v;
  return nullptr;
}

std::string checkpoint_dir_name(int64_t step) {
  HYD_CHECK(step >= 0 && step <= 99999999, "checkpoint_dir_name: step ", step, " does not fit 8 digits");
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
  return buf;
}

// ---------------------------------------------------------------- writing

namespace {

// The manifest last, then the folder into place (replacing an older one of the same step).
std::string publish(const std::string& run_dir, const CheckpointManifest& manifest, const fs::path& tmp,
                         const fs::path& final_dir) {
  std::error_code ec;
  write_file(tmp / kCheckpointManifest, manifest.to_json().dump(2) + "\n");
  fsync_path(tmp / kCheckpointManifest);
  fsync_path(tmp);

  // Replace an existing folder of this step only once the new one is complete.
  const fs::path stale = final_dir.string() + ".old";
  fs::remove_all(stale, ec);
  if (fs::exists(final_dir)) {
    fs::rename(final_dir, stale, ec);
    if (ec) throw Error::at(final_dir.string(), "", "cannot move the previous checkpoint aside: " + ec.message());
  }
  fs::rename(tmp, final_dir, ec);
  if (ec) throw Error::at(final_dir.string(), "", "cannot rename " + tmp.string() + " into place: " + ec.message());
  fsync_path(run_dir);
  fs::remove_all(stale, ec);
  return final_dir.string();
}

// Fault injection for tests/parallel/test_faults.sh (trainer/stop_signal.h lists the variables):
// HYD_FAULT_KILL_IN_CHECKPOINT=N kills rank 1 (rank 0 alone) after its state file of step N is written.
void fault_point_in_checkpoint(int64_t step, int rank, int ranks) {
  static const int64_t at = [] {
    const char* v = std::getenv("HYD_FAULT_KILL_IN_CHECKPOINT");
    return v != nullptr && *v != '\0' ? std::strtoll(v, nullptr, 10) : int64_t{-1};
  }();
  if (at >= 0 && step == at && rank == (ranks > 1 ? 1 : 0)) std::raise(SIGKILL);
}

}  // namespace

std::string checkpoint_rank_file(int64_t rank) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "rank-%05lld.safetensors", static_cast<long long>(rank));
  return buf;
}

std::string write_checkpoint(const std::string& run_dir, CheckpointManifest manifest, const SafetensorsWriter& tensors,
                             const std::string& config_ini, const Communicator* world) {
  const fs::path final_dir = fs::path(run_dir) / checkpoint_dir_name(manifest.step);
  const fs::path tmp = final_dir.string() + ".tmp";
  const int rank = world ? world->rank() : 0, ranks = world ? world->size() : 1;
  std::error_code ec;
  if (rank == 0) {
    fs::remove_all(tmp, ec);  // an interrupted write of this step: never a checkpoint
    if (ec) throw Error::at(tmp.string(), "", "cannot remove a stale temporary folder: " + ec.message());
    fs::create_directories(tmp, ec);
    if (ec) throw Error::at(tmp.string(), "", "cannot create: " + ec.message());
  }
  if (ranks > 1) world->barrier();  // the folder exists

  // This rank's state file: written, fsynced, measured and hashed here; rank 0 gathers the records.
  const std::string own = checkpoint_rank_file(rank);
  tensors.write((tmp / own).string());
  fsync_path(tmp / own);
  fault_point_in_checkpoint(manifest.step, rank, ranks);
  struct Record {
    uint64_t size;
    char sha[65];
  };
  Record mine{static_cast<uint64_t>(fs::file_size(tmp / own)), {}};
  const std::string sha = sha256_file((tmp / own).string());
  std::memcpy(mine.sha, sha.c_str(), std::min<size_t>(sha.size(), 64));
  std::vector<Record> all(static_cast<size_t>(ranks));
  if (ranks > 1) {
    CHECK_MPI(MPI_Gather(&mine, sizeof(Record), MPI_BYTE, all.data(), sizeof(Record), MPI_BYTE, 0, world->handle()));
  } else {
    all[0] = mine;
  }
  std::string done;
  if (rank == 0) {
    write_file(tmp / kCheckpointConfig, config_ini);
    fsync_path(tmp / kCheckpointConfig);
    manifest.world_size = ranks;
    manifest.files.clear();
    for (int r = 0; r < ranks; ++r)
      manifest.files.push_back({checkpoint_rank_file(r), all[static_cast<size_t>(r)].size,
                                std::string(all[static_cast<size_t>(r)].sha, 64)});
    const fs::path cfg = tmp / kCheckpointConfig;
    manifest.files.push_back({kCheckpointConfig, static_cast<uint64_t>(fs::file_size(cfg)), sha256_file(cfg.string())});
    done = publish(run_dir, manifest, tmp, final_dir);
  }
  if (ranks > 1) world->barrier();  // complete (or rank 0 threw and the job ends) before anyone goes on
  return rank == 0 ? done : final_dir.string();
}

// ---------------------------------------------------------------- reading

std::string Checkpoint::manifest_path() const { return (fs::path(dir) / kCheckpointManifest).string(); }

Checkpoint open_checkpoint(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) throw Error::at(dir, "", "no such checkpoint directory");
  if (!fs::is_directory(dir, ec)) throw Error::at(dir, "", "not a directory (a checkpoint is a step-XXXXXXXX folder)");
  Checkpoint ck;
  ck.dir = dir;
  const std::string mpath = ck.manifest_path();
  std::ifstream in(mpath);
  if (!in)
    throw Error::at(mpath, "",
                    "missing: not a checkpoint (an interrupted write leaves a folder without a manifest, which is "
                    "never valid)");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    throw Error::at(mpath, "", std::string("not valid JSON: ") + e.what());
  }
  ck.manifest = CheckpointManifest::from_json(j, mpath);
  for (size_t i = 0; i < ck.manifest.files.size(); ++i) {
    const CheckpointFile& f = ck.manifest.files[i];
    const fs::path p = fs::path(dir) / f.name;
    if (!fs::is_regular_file(p, ec))
      throw Error::at(p.string(), "", "missing: " + mpath + " lists it (files[" + std::to_string(i) + "])");
    const uint64_t size = fs::file_size(p, ec);
    if (size != f.size)
      throw Error::at(p.string(), "size",
                      std::to_string(size) + " bytes, but " + mpath + " records " + std::to_string(f.size) +
                          " (the file is truncated or was modified)");
    const std::string sha = sha256_file(p.string());
    if (sha != f.sha256)
      throw Error::at(p.string(), "sha256",
                      "checksum mismatch: the file has " + sha + ", " + mpath + " records " + f.sha256 +
                          " (the file is corrupt or was modified)");
  }
  ck.tensors.open((fs::path(dir) / kCheckpointRankFile).string());
  return ck;
}

SafetensorsFile Checkpoint::open_rank(int64_t r) const {
  HYD_CHECK(r >= 0 && r < manifest.world_size, manifest_path(), ": no state file of rank ", r, " (world_size ",
            manifest.world_size, ")");
  return SafetensorsFile((fs::path(dir) / checkpoint_rank_file(r)).string());
}

std::string checkpoint_summary(const Checkpoint& ck) {
  const CheckpointManifest& m = ck.manifest;
  std::ostringstream os;
  os << "checkpoint       " << ck.dir << " (verified)\n"
     << "command          " << m.command << "\n"
     << "step             " << m.step;
  if (m.command == "distill") os << " (stage " << m.stage << " step " << m.stage_step << ")";
  os << "\n"
     << "written by       hydistill " << m.library_version << " on " << m.device << "\n"
     << "data position    " << m.data.dump() << "\n";
  if (!m.teacher.is_null()) os << "teacher          " << m.teacher.dump() << "\n";
  os << "topology         " << m.world_size << (m.world_size == 1 ? " state file" : " state files (sharded, ZeRO-1)")
     << ", written by dp " << m.dp << " x sp " << m.sp << " ranks\n";
  os << "optimizer        " << m.optimizer.dump() << "\n";
  for (const CheckpointFile& f : m.files)
    os << "file             " << f.name << "  " << f.size << " bytes  sha256 " << f.sha256 << "\n";
  os << "tensors          " << ck.tensors.names().size() << (m.world_size > 1 ? " in rank-00000's file" : "") << "\n"
     << "config           " << m.config.size() << " options:\n";
  for (const auto& [k, v] : m.config) os << "  " << k << " = " << v << "\n";
  return os.str();
}

double loop_number(const Checkpoint& ck, const char* key) {
  const auto it = ck.manifest.loop.find(key);
  if (it != ck.manifest.loop.end() && it->is_null()) return std::numeric_limits<double>::quiet_NaN();
  if (it == ck.manifest.loop.end() || !it->is_number())
    throw Error::at(ck.manifest_path(), std::string("loop.") + key, "missing or not a number");
  return it->get<double>();
}

int64_t loop_count(const Checkpoint& ck, const char* key) {
  const auto it = ck.manifest.loop.find(key);
  if (it == ck.manifest.loop.end() || !it->is_number_integer() || it->get<int64_t>() < 0)
    throw Error::at(ck.manifest_path(), std::string("loop.") + key, "missing or not a non-negative integer");
  return it->get<int64_t>();
}

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& run_dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec)) return out;
  for (const fs::directory_entry& e : fs::directory_iterator(run_dir, ec)) {
    const int64_t step = step_of_dir_name(e.path().filename().string());
    if (step < 0 || !e.is_directory(ec) || !fs::exists(e.path() / kCheckpointManifest, ec)) continue;
    out.emplace_back(step, e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> prune_checkpoints(const std::string& run_dir, int64_t keep_last, int64_t keep_every_steps) {
  HYD_CHECK(keep_last >= 1, "prune_checkpoints: keep_last must be >= 1, got ", keep_last);
  const auto all = list_checkpoints(run_dir);
  std::vector<std::string> removed;
  for (size_t i = 0; i + static_cast<size_t>(keep_last) < all.size(); ++i) {
    const auto& [step, path] = all[i];
    if (keep_every_steps > 0 && step % keep_every_steps == 0) continue;
    std::error_code ec;
    fs::remove_all(path, ec);
    if (ec) throw Error::at(path, "", "cannot remove an old checkpoint: " + ec.message());
    removed.push_back(path);
  }
  return removed;
}

// ---------------------------------------------------------------- resuming

bool option_may_change_on_resume(const std::string& key) {
  for (const char* prefix : {"run.", "log.", "checkpoint.", "eval.", "parallel."})
    if (key.rfind(prefix, 0) == 0) return true;
  return key == "device" || key == "train.resume" || key == "data.batch_size";
}

void check_resume_global_batch(const Checkpoint& ck, int64_t batch_size, int64_t dp, const std::string& source) {
  const auto number = [&](const char* key, int64_t fallback) {
    const std::string* v = ck.manifest.config_value(key);
    if (v == nullptr) return fallback;
    try {
      size_t used = 0;
      const int64_t x = std::stoll(*v, &used);
      if (used == v->size() && x >= 1) return x;
    } catch (const std::exception&) {
    }
    throw Error::at(ck.manifest_path(), std::string("config.") + key, "'" + *v + "' is not a positive integer");
  };
  const int64_t their_b = number("data.batch_size", -1), their_dp = number("parallel.dp", 1);
  if (their_b < 0) throw Error::at(ck.manifest_path(), "config.data.batch_size", "missing");
  if (their_b * their_dp != batch_size * dp)
    throw ConfigError::at(source, "data.batch_size",
                          std::to_string(batch_size) + " per rank x parallel.dp " + std::to_string(dp) + " = " +
                              std::to_string(batch_size * dp) + " sequences per micro-batch, the checkpoint " +
                              ck.manifest_path() + " was trained with " + std::to_string(their_b) + " x " +
                              std::to_string(their_dp) + " = " + std::to_string(their_b * their_dp) +
                              "; a resumed run may change how the batch is split over ranks, not its size");
}

void check_resume_config(const Checkpoint& ck, const std::vector<std::pair<std::string, std::string>>& effective,
                         const std::vector<std::pair<std::string, std::string>>& paths, const std::string& source) {
  const std::string mpath = ck.manifest_path();
  const std::map<std::string, std::string> theirs(ck.manifest.config.begin(), ck.manifest.config.end());
  const std::map<std::string, std::string> their_paths(ck.manifest.paths.begin(), ck.manifest.paths.end());
  const std::map<std::string, std::string> our_paths(paths.begin(), paths.end());
  const std::string fix = "; resume with the checkpoint's value, or start afresh (train.resume = none)";
  std::map<std::string, std::string> ours;
  for (const auto& [key, value] : effective) {
    ours[key] = value;
    if (option_may_change_on_resume(key)) continue;
    const auto it = theirs.find(key);
    if (it == theirs.end())
      throw ConfigError::at(source, key,
                            "the checkpoint " + mpath + " does not record this option (written by hydistill " +
                                ck.manifest.library_version + ")" + fix);
    if (it->second == value) continue;
    const auto tp = their_paths.find(key), op = our_paths.find(key);
    if (tp != their_paths.end() && op != our_paths.end() && tp->second == op->second) continue;
    throw ConfigError::at(
        source, key,
        "'" + value + "' differs from the checkpoint's '" + it->second + "' (" + mpath + ", config)" + fix);
  }
  for (const auto& [key, value] : theirs)
    if (!option_may_change_on_resume(key) && !ours.count(key))
      throw ConfigError::at(source, key,
                            "the checkpoint " + mpath + " sets it to '" + value + "', this run does not know it" + fix);
}

}  // namespace hyd

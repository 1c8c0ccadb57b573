#include "distill/student_checkpoint.h"

#include <filesystem>

#include "checkpoint/sha256.h"
#include "distill/student_init.h"
#include "trainer/core/error.h"
#include "trainer/train_loop.h"  // ConfigError

namespace hyd {

namespace {

namespace fs = std::filesystem;

std::string config_sha256(const std::string& dir) { return sha256_file((fs::path(dir) / "config.json").string()); }

// A string field of the manifest's teacher object, or "".
std::string teacher_field(const Checkpoint& ck, const char* key) {
  if (!ck.manifest.teacher.is_object()) return "";
  const auto it = ck.manifest.teacher.find(key);
  return it != ck.manifest.teacher.end() && it->is_string() ? it->get<std::string>() : "";
}

}  // namespace

nlohmann::json teacher_identity(const std::string& dir, const TeacherInfo& info) {
  return {{"dir", canonical_path(dir)}, {"config_sha256", config_sha256(dir)}, {"num_parameters", info.num_parameters}};
}

void check_teacher_identity(const Checkpoint& ck, const std::string& dir, const std::string& source,
                            const std::string& key) {
  const std::string recorded_dir = teacher_field(ck, "dir"), recorded_sha = teacher_field(ck, "config_sha256");
  if (recorded_dir.empty() || recorded_sha.empty())
    throw Error::at(ck.manifest_path(), "teacher", "missing or incomplete (expected dir and config_sha256)");
  if (canonical_path(dir) != recorded_dir)
    throw ConfigError::at(
        source, key,
        dir + " is not the checkpoint's teacher " + recorded_dir + " (" + ck.manifest_path() + ", teacher.dir)");
  const std::string sha = config_sha256(dir);
  if (sha != recorded_sha)
    throw ConfigError::at(source, key,
                          dir + "/config.json changed since the checkpoint was written: sha256 " + sha + ", " +
                              ck.manifest_path() + " records " + recorded_sha + " (teacher.config_sha256)");
}

StudentCheckpoint open_student_checkpoint(const std::string& dir) { return student_of(open_checkpoint(dir)); }

StudentCheckpoint student_of(Checkpoint checkpoint) {
  StudentCheckpoint out;
  out.checkpoint = std::move(checkpoint);
  const Checkpoint& ck = out.checkpoint;
  const std::string mpath = ck.manifest_path();
  if (ck.manifest.command != "distill")
    throw Error::at(mpath, "command",
                    "a `" + ck.manifest.command + "` checkpoint; a student comes from a `distill` checkpoint");
  const std::string* pattern = ck.manifest.config_value("student.pattern");
  if (!pattern) throw Error::at(mpath, "config.student.pattern", "missing");
  out.teacher_dir = teacher_field(ck, "dir");
  if (out.teacher_dir.empty()) throw Error::at(mpath, "teacher.dir", "missing");
  if (!fs::is_directory(out.teacher_dir))
    throw Error::at(mpath, "teacher.dir",
                    out.teacher_dir + ": the teacher directory is gone (its config.json and tokenizer are needed)");
  out.teacher = inspect_teacher(out.teacher_dir);
  check_teacher_identity(ck, out.teacher_dir, mpath, "teacher.dir");
  out.student = student_config_from_teacher(out.teacher.config, *pattern, KdaOptions{}, mpath);
  return out;
}

void copy_dense_weights(DenseModel& dense, HybridModel& hybrid) {
  for (const ParamInfo& p : dense.params()) {
    const std::vector<float> v = dense.get_param(p.name);
    hybrid.set_param(p.name, v.data(), static_cast<int64_t>(v.size()));
  }
}

HybridConfig teacher_hybrid_config(const ModelConfig& cfg, const std::string& source) {
  HybridConfig h;
  h.model = cfg;
  h.pattern = std::string(static_cast<size_t>(cfg.num_layers), 'T');
  h.finalize(source);
  return h;
}

}  // namespace hyd

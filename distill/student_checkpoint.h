// The student of a checkpoint written by `hydistill distill`, for `hydistill eval` and `hydistill export`:
// its configuration from the options the checkpoint records (student.pattern) and the teacher's
// config.json, its weights from the checkpoint's state file; and the teacher's identity that manifests
// record, so that a run, an evaluation or an export never pairs a student with another teacher.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "checkpoint/checkpoint.h"
#include "distill/teacher.h"
#include "trainer/hybrid_model.h"
#include "trainer/model.h"

namespace hyd {

// The manifest's `teacher` object: {"dir": canonical path, "config_sha256": of DIR/config.json,
// "num_parameters"}.
nlohmann::json teacher_identity(const std::string& dir, const TeacherInfo& info);
// The teacher in `dir` must be the checkpoint's: the same directory (canonical path) and an unchanged
// config.json. Throws ConfigError naming `source`, `key` (the option that named dir) and the
// checkpoint's manifest field.
void check_teacher_identity(const Checkpoint& ck, const std::string& dir, const std::string& source,
                            const std::string& key);

struct StudentCheckpoint {
  Checkpoint checkpoint;
  std::string teacher_dir;  // the manifest's teacher.dir
  TeacherInfo teacher;      // inspect_teacher(teacher_dir)
  HybridConfig student;     // finalized
};

// Resolves the student of a verified distill checkpoint (open_checkpoint). Errors (hyd::Error) name the
// checkpoint's manifest and field: a checkpoint of another command ('command'), no student.pattern
// ('config.student.pattern'), a teacher that is gone or changed ('teacher.dir').
StudentCheckpoint student_of(Checkpoint checkpoint);
// open_checkpoint(dir), then student_of.
StudentCheckpoint open_student_checkpoint(const std::string& dir);

// Copies every parameter of `dense` into the same-named parameter of `hybrid`: an all-T HybridModel of
// the same config is then the DenseModel, kernel for kernel (the distillation teacher).
void copy_dense_weights(DenseModel& dense, HybridModel& hybrid);

// The finalized config of an all-T HybridModel on the dense skeleton `cfg`: the teacher as a HybridModel.
HybridConfig teacher_hybrid_config(const ModelConfig& cfg, const std::string& source);

}  // namespace hyd

#include "launch/commands.h"

#include <filesystem>
#include <iostream>
#include <ostream>

#include "data/dataset.h"
#include "launch/config.h"
#include "trainer/train_loop.h"

#if __has_include("distill/teacher.h")
#include "distill/teacher.h"
#define HYD_HAVE_TEACHER_LOADER 1
#endif

namespace hyd {

namespace fs = std::filesystem;

namespace {

const char* kUsage =
    "usage: hydistill <command> [options]\n"
    "\n"
    "commands:\n"
    "  train     train a dense model (llama / qwen2 / qwen3) on an HDF5 token dataset: next-token LM\n"
    "  distill   distill a teacher into a hybrid KDA student (stage 1 alignment, stage 2 KL; one device)\n"
    "  eval      evaluate a checkpoint (not implemented yet)\n"
    "  export    export a checkpoint as a Hugging Face directory (not implemented yet)\n"
    "  inspect   summarise a dataset (.h5) or a teacher directory (config.json + *.safetensors)\n"
    "\n"
    "`hydistill <command> --help` describes a command and its options.\n";

const char* kInspectUsage =
    "usage: hydistill inspect PATH\n"
    "\n"
    "PATH is an HDF5 token dataset (data/prepare.py) or a Hugging Face model directory (config.json and\n"
    "model.safetensors or model.safetensors.index.json). The file is fully validated; every problem names the\n"
    "file and the field or tensor.\n";

bool is_help(const std::string& a) { return a == "--help" || a == "-h" || a == "help"; }

int inspect_command(const std::vector<std::string>& args, std::ostream& out) {
  if (args.size() == 1 && is_help(args[0])) {
    out << kInspectUsage;
    return 0;
  }
  if (args.size() != 1) throw ConfigError("inspect takes exactly one PATH (see `hydistill inspect --help`)");
  out << inspect_path(args[0]);
  return 0;
}

int train_command(const std::vector<std::string>& args, std::ostream& out) {
  const ParsedTrainArgs parsed = parse_train_args(args);
  if (parsed.help) {
    out << train_help();
    return 0;
  }
  run_training(parsed.config, parsed.to_ini(), out);
  return 0;
}

int distill_command(const std::vector<std::string>& args, std::ostream& out) {
  const ParsedDistillArgs parsed = parse_distill_args(args);
  if (parsed.help) {
    out << distill_help();
    return 0;
  }
  run_distillation(parsed.config, parsed.to_ini(), out);
  return 0;
}

}  // namespace

std::string inspect_path(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st)) throw ConfigError::at(path, "", "no such file or directory");
  if (fs::is_directory(st)) {
    if (fs::exists(fs::path(path) / "config.json")) {
#ifdef HYD_HAVE_TEACHER_LOADER
      std::string s = inspect_teacher(path).summary;
      if (!s.empty() && s.back() != '\n') s += '\n';
      return s;
#else
      throw Error::at(path, "", "teacher inspection is not available in this build (distill/teacher.h missing)");
#endif
    }
    if (fs::exists(fs::path(path) / "manifest.json"))
      throw ConfigError::at(path, "", "checkpoint inspection is not implemented yet");
    throw ConfigError::at(path, "",
                          "a directory without config.json (a teacher) or manifest.json (a checkpoint): nothing to "
                          "inspect");
  }
  TokenDataset data(path);
  std::string s = data.summary();
  if (!s.empty() && s.back() != '\n') s += '\n';
  return s;
}

int hydistill_main(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  try {
    if (args.empty()) {
      err << kUsage;
      return 2;
    }
    const std::string& cmd = args[0];
    const std::vector<std::string> rest(args.begin() + 1, args.end());
    if (is_help(cmd)) {
      out << kUsage << "\n" << train_help();
      return 0;
    }
    if (cmd == "train") return train_command(rest, out);
    if (cmd == "inspect") return inspect_command(rest, out);
    if (cmd == "distill") return distill_command(rest, out);
    if (cmd == "eval" || cmd == "export") {
      err << "hydistill: error: " << cmd << ": not implemented yet\n";
      return 2;
    }
    err << "hydistill: error: unknown command '" << cmd << "'\n\n" << kUsage;
    return 2;
  } catch (const ConfigError& e) {
    out.flush();
    err << "hydistill: error: " << e.what() << std::endl;
    return 2;
  } catch (const std::exception& e) {
    out.flush();
    err << "hydistill: error: " << e.what() << std::endl;
    return 1;
  }
}

}  // namespace hyd

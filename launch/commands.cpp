#include "launch/commands.h"

#include <filesystem>
#include <iostream>
#include <ostream>

#include "checkpoint/checkpoint.h"
#include "checkpoint/export.h"
#include "checkpoint/sha256.h"
#include "checkpoint/training_state.h"
#include "data/dataset.h"
#include "distill/student_checkpoint.h"
#include "launch/config.h"
#include "trainer/train_loop.h"

#ifndef HYD_PYTHON_DIR
#define HYD_PYTHON_DIR "checkpoint/python"
#endif

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
    "  eval      evaluate the student of a distill checkpoint against its teacher (loss, KL, passkey, KV cache)\n"
    "  export    write a checkpoint as a Hugging Face directory (distill: the hybrid student; train: the model)\n"
    "  inspect   summarise a dataset (.h5), a teacher directory (config.json + *.safetensors) or a checkpoint\n"
    "\n"
    "`hydistill <command> --help` describes a command and its options.\n";

const char* kInspectUsage =
    "usage: hydistill inspect PATH\n"
    "\n"
    "PATH is an HDF5 token dataset (data/prepare.py), a Hugging Face model directory (config.json and\n"
    "model.safetensors or model.safetensors.index.json) or a checkpoint (RUN_DIR/step-XXXXXXXX: manifest.json).\n"
    "It is fully validated (a checkpoint's files against their checksums); every problem names the file and the\n"
    "field or tensor.\n";

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

// A subcommand whose arguments were parsed into `parsed`: --help prints `help`, anything else runs it.
template <class Parsed, class Run>
int subcommand(const Parsed& parsed, std::string (*help)(), std::ostream& out, Run run) {
  if (parsed.help)
    out << help();
  else
    run(parsed);
  return 0;
}

// The dense model of a `train` checkpoint: its options (the checkpoint's config.ini) with the
// vocabulary and EOS the dataset gave it.
ModelConfig trained_model_config(const Checkpoint& ck) {
  const std::string ini = (fs::path(ck.dir) / kCheckpointConfig).string();
  ModelConfig mc = parse_train_args({"--config", ini}).config.model;
  auto data_int = [&](const char* key) {
    const auto it = ck.manifest.data.find(key);
    if (it == ck.manifest.data.end() || !it->is_number_integer())
      throw Error::at(ck.manifest_path(), std::string("data.") + key, "missing or not an integer");
    return it->get<int64_t>();
  };
  if (mc.vocab_size == 0) mc.vocab_size = data_int("vocab_size");
  if (mc.eos_token_id < 0) mc.eos_token_id = static_cast<int32_t>(data_int("eos_id"));
  mc.finalize(ini);
  return mc;
}

// The folder of the tokenizer a `train` checkpoint's dataset was made with: the dataset's own folder
// when its tokenizer.json hashes to the dataset's tokenizer_sha256 (data/prepare.py --train-bpe puts
// it there); empty when there is none.
std::string dataset_tokenizer_dir(const Checkpoint& ck) {
  const std::string path = ck.manifest.data.value("path", std::string()),
                    sha = ck.manifest.data.value("tokenizer_sha256", std::string());
  const fs::path tok = fs::path(path).parent_path() / "tokenizer.json";
  std::error_code ec;
  if (path.empty() || !fs::is_regular_file(tok, ec)) return "";
  return sha256_file(tok.string()) == sha ? tok.parent_path().string() : "";
}

}  // namespace

void export_checkpoint(const ExportArgs& args, std::ostream& out) {
  Checkpoint ck = open_checkpoint(args.checkpoint);
  ExportOptions opt;
  opt.out_dir = args.out;
  opt.dtype = args.dtype;
  opt.tokenizer_dir = args.tokenizer;
  opt.python_dir = HYD_PYTHON_DIR;
  HybridConfig cfg;
  std::string what;
  if (ck.manifest.command == "distill") {
    StudentCheckpoint sc = student_of(std::move(ck));
    ck = std::move(sc.checkpoint);
    cfg = sc.student;
    if (opt.tokenizer_dir.empty() && has_tokenizer_files(sc.teacher_dir)) opt.tokenizer_dir = sc.teacher_dir;
    what = "hybrid student " + layer_pattern_string(cfg.layers) + " (teacher " + sc.teacher_dir + ")";
  } else {
    cfg = teacher_hybrid_config(trained_model_config(ck), ck.manifest_path());
    opt.dense = true;
    if (opt.tokenizer_dir.empty()) opt.tokenizer_dir = dataset_tokenizer_dir(ck);
    what = cfg.model.family + " model (" + std::to_string(cfg.model.num_layers) + " layers, hidden " +
           std::to_string(cfg.model.hidden_size) + ")";
  }
  HybridModel model(cfg, Device::cpu(), /*max_tokens=*/1);
  restore_parameters(ck, model.params());
  export_hf(model, opt);
  out << "exported " << ck.dir << " (" << ck.manifest.command << ", step " << ck.manifest.step << "): " << what
      << "\n  to " << args.out << " (" << args.dtype << "; tokenizer "
      << (opt.tokenizer_dir.empty() ? std::string("none found") : opt.tokenizer_dir) << ")" << std::endl;
}

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
    if (fs::exists(fs::path(path) / kCheckpointManifest)) return checkpoint_summary(open_checkpoint(path));
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
    if (cmd == "inspect") return inspect_command(rest, out);
    if (cmd == "train")
      return subcommand(parse_train_args(rest), train_help, out,
                        [&](const ParsedTrainArgs& p) { run_training(p.config, p.effective_config(), out); });
    if (cmd == "distill")
      return subcommand(parse_distill_args(rest), distill_help, out,
                        [&](const ParsedDistillArgs& p) { run_distillation(p.config, p.effective_config(), out); });
    if (cmd == "eval")
      return subcommand(parse_eval_args(rest), eval_help, out,
                        [&](const ParsedEvalArgs& p) { run_evaluation(p.config, p.checkpoint, out); });
    if (cmd == "export")
      return subcommand(parse_export_args(rest), export_help, out,
                        [&](const ParsedExportArgs& p) { export_checkpoint(p.args, out); });
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

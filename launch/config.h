// Options of `hydistill train`: an INI config file and the command line (launch/options.h).
//
// Sections are option-name prefixes: `lr = 2e-3` under `[train]` is the option `train.lr`; keys before
// the first section are top-level options (`device`). Every option is also accepted on the command
// line as `--train.lr 2e-3` (or `--train.lr=2e-3`), and the command line wins over the file.
// Defaults are the default member values of TrainConfig and its parts (trainer/train_loop.h).
// Errors (ConfigError, exit code 2) always name the source - the config file or "command line" - and
// the key: unknown keys, missing required keys, malformed values, out-of-range values.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "distill/distill_loop.h"
#include "trainer/train_loop.h"

namespace hyd {

struct ParsedTrainArgs {
  bool help = false;        // --help was given: print train_help() and do nothing else
  std::string config_path;  // --config FILE, empty when none
  TrainConfig config;       // typed values; config.source = config_path (or "command line")
  // Every option ("section.key" -> value text) in declaration order, after defaults, the file and the
  // command line were applied: what RUN_DIR/config.ini records.
  std::vector<std::pair<std::string, std::string>> effective;

  // The effective values as an INI file that `--config` reads back to the same TrainConfig.
  std::string to_ini() const;
  EffectiveConfig effective_config() const { return {effective, to_ini()}; }
};

// args: the arguments after `train`, e.g. {"--config", "run.ini", "--train.lr", "1e-3"}.
ParsedTrainArgs parse_train_args(const std::vector<std::string>& args);

// Usage line and every option of `hydistill train` with its default, grouped by section.
std::string train_help();

// `hydistill distill`: the same grammar and precedence. Sections: top-level device, [run], [teacher],
// [student], [data], [train] (optimizer settings, student seed, max_bad_steps), [distill], [log]
// (DistillConfig, distill/distill_loop.h).
struct ParsedDistillArgs {
  bool help = false;
  std::string config_path;
  DistillConfig config;
  std::vector<std::pair<std::string, std::string>> effective;

  std::string to_ini() const;
  EffectiveConfig effective_config() const { return {effective, to_ini()}; }
};

ParsedDistillArgs parse_distill_args(const std::vector<std::string>& args);
std::string distill_help();

// `hydistill eval`: the options of `distill` (the same config file serves both) plus the top-level key
// `checkpoint` (required): the distill checkpoint whose student is evaluated.
struct ParsedEvalArgs {
  bool help = false;
  std::string config_path;
  DistillConfig config;
  std::string checkpoint;
};
ParsedEvalArgs parse_eval_args(const std::vector<std::string>& args);
std::string eval_help();

// `hydistill export`: top-level keys only (checkpoint, out, dtype, tokenizer), usually on the command line.
struct ExportArgs {
  std::string checkpoint;          // a step-XXXXXXXX folder of `train` or `distill`
  std::string out;                 // the directory to write (must not exist or be empty)
  std::string dtype = "bfloat16";  // bfloat16 | float32
  std::string tokenizer;           // tokenizer files to copy; empty = the teacher's (distill) or the dataset's (train)
};
struct ParsedExportArgs {
  bool help = false;
  ExportArgs args;
};
ParsedExportArgs parse_export_args(const std::vector<std::string>& args);
std::string export_help();

}  // namespace hyd

// The hydistill command line: subcommands train, distill, eval, export, inspect. main() is a thin
// wrapper so that tests can drive the same code.
//
// Exit codes: 0 success, 2 usage or configuration errors (ConfigError), 1 everything else. Errors are
// printed to `err` as "hydistill: error: <message>".
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

#include "launch/config.h"

namespace hyd {

// args: argv[1..] (the subcommand and its arguments).
int hydistill_main(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

// `hydistill inspect PATH`: an HDF5 dataset -> TokenDataset::summary(); a directory with config.json ->
// the teacher summary; a checkpoint (manifest.json) -> checkpoint_summary after verification. Returns
// the text; throws ConfigError for a path that is not there or not a known kind, hyd::Error for a
// malformed file.
std::string inspect_path(const std::string& path);

// `hydistill export`: a distill checkpoint -> the hybrid student (checkpoint/export.h, the teacher's
// tokenizer); a train checkpoint -> the dense model in its family's transformers layout (the dataset's
// tokenizer when it is found next to the dataset). The checkpoint is verified first; the output
// directory must not exist or be empty (export_hf). Errors name the file and the field.
void export_checkpoint(const ExportArgs& args, std::ostream& out);

}  // namespace hyd

// The hydistill command line: subcommands train, distill, inspect (and, not yet implemented, eval,
// export). main() is a thin wrapper so that tests can drive the same code.
//
// Exit codes: 0 success, 2 usage or configuration errors (ConfigError), 1 everything else. Errors are
// printed to `err` as "hydistill: error: <message>".
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

namespace hyd {

// args: argv[1..] (the subcommand and its arguments).
int hydistill_main(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

// `hydistill inspect PATH`: an HDF5 dataset -> TokenDataset::summary(); a directory with config.json ->
// the teacher summary. Returns the text; throws ConfigError for a path that is not there or not a
// known kind, hyd::Error for a malformed file.
std::string inspect_path(const std::string& path);

}  // namespace hyd

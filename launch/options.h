// Typed options from an INI config file and the command line (what `hydistill train` parses).
//
// An OptionTable binds option names ("train.lr") to fields of a config struct; a field's value when it
// is added is the option's default. parse_options() then reads, in this order of precedence:
//   1. the command line: `--KEY VALUE` or `--KEY=VALUE`, `--help` / `-h`, `--config FILE`;
//   2. the INI file named by --config, for the keys the command line did not set;
//   3. the defaults (the fields' values when added); required options have none and must be given.
//
// INI grammar (one item per line; leading and trailing whitespace is ignored everywhere):
//   [section]        later keys are `section.key`; keys before the first section are top-level. A section
//                    may itself contain dots: `type = yarn` under [model.rope_scaling] is model.rope_scaling.type.
//   key = value      the first '=' splits; the value may be empty and may contain '=', '#' and ';'.
//   # or ; comment   a whole line, or the rest of a line from a '#' or ';' that starts the value or
//                    follows whitespace (`lr = 3e-3  # peak`); `runs/a#1` keeps its '#'.
// Values are typed by their field: string, bool (true/false, 1/0, yes/no, on/off, any case), int32,
// int64, uint64 (decimal, optional leading '+', no '-' for uint64) and double (decimal or scientific,
// inf, nan).
//
// Every error is a ConfigError naming the source (the config file's path or "command line") and the
// key: an unknown key (with a "did you mean" suggestion; names are never guessed from a prefix), a
// missing required key, a malformed value (quoted, with the expected type), a key given twice in one
// source, a line that is not a key, a section or a comment, a positional argument.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <set>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "trainer/train_loop.h"  // ConfigError

namespace hyd {

inline constexpr const char* kCommandLineSource = "command line";

class OptionTable {
 public:
  using Field = std::variant<std::string*, bool*, int32_t*, int64_t*, uint64_t*, double*>;

  struct Option {
    std::string name;          // "train.lr"
    Field field;               // where parsed values go
    std::string default_text;  // the field's value when added (unused for required options)
    std::string help;
    bool required = false;
    size_t group = 0;  // index into groups()
  };

  // help_command names the command whose --help lists the options, e.g. "hydistill train"; unknown-key
  // errors point to it.
  explicit OptionTable(std::string help_command) : help_command_(std::move(help_command)) {}

  // Starts a group of options under `title` in help() (e.g. "[train]").
  void group(std::string title) { groups_.push_back(std::move(title)); }

  // An optional option whose default is *field's current value.
  template <class T>
  void add(std::string name, T* field, std::string help) {
    add_option(std::move(name), Field(field), std::move(help), false);
  }
  // A required option: no default, parse_options() fails when no source gives it.
  template <class T>
  void add_required(std::string name, T* field, std::string help) {
    add_option(std::move(name), Field(field), std::move(help), true);
  }

  const std::vector<Option>& options() const { return options_; }
  const std::vector<std::string>& groups() const { return groups_; }
  const std::string& help_command() const { return help_command_; }
  const Option* find(const std::string& name) const;

  // Parses `text` into the option's field; throws ConfigError::at(source, name, "invalid value 'TEXT'
  // (expected ...)") when it is not a valid value of the field's type.
  // `line` (> 0) is the config file line the text came from, added to the message.
  void set(const Option& option, const std::string& text, const std::string& source, int line = 0) const;
  // The field's current value as text that set() reads back to the same value (doubles: shortest form).
  static std::string text_of(const Field& field);
  // Every option with its current value, in the order they were added.
  std::vector<std::pair<std::string, std::string>> values() const;

  // The message of an unknown-key error: "unknown key [on line N] (did you mean 'X'?); `CMD --help` lists
  // every option". Only names within a small edit distance (ignoring case) are suggested.
  std::string unknown_key_message(const std::string& key, int line = 0) const;

  // Every option, grouped: "  --name TYPE (=default)   help", help text wrapped at `width` columns.
  std::string help(size_t width = 120) const;

 private:
  void add_option(std::string name, Field field, std::string help, bool required);

  std::string help_command_;
  std::vector<std::string> groups_;
  std::vector<Option> options_;
};

// One `key = value` of a source, with the line it came from (0 on the command line).
struct OptionSetting {
  std::string key;
  std::string value;
  int line = 0;
};

// The settings of an INI text in file order (keys prefixed by their section). Lines that are neither a
// setting, a section header nor a comment throw ConfigError::at(source, "", "line N: ...").
std::vector<OptionSetting> parse_ini(std::istream& in, const std::string& source);

// Writes (key, value) pairs as INI text that parse_ini() reads back to the same pairs: keys grouped
// under `[section]` by their first dot-separated part, top-level keys first. `header` lines are written
// first as `# ` comments. Every value must satisfy ini_value_representable().
std::string write_ini(const std::vector<std::pair<std::string, std::string>>& values,
                      const std::vector<std::string>& header = {});

// Whether parse_ini() reads `value` back unchanged from `key = value`: no line breaks, no leading or
// trailing whitespace, no comment marker at its start or after whitespace.
bool ini_value_representable(const std::string& value);

// The general options that parse_options() handles itself (--help, --config), for a help text.
std::string general_options_help();

struct ParsedOptions {
  bool help = false;                        // --help / -h: nothing was read beyond the command line
  std::string config_path;                  // --config FILE; empty when none
  std::set<std::string> command_line_keys;  // options the command line set (they win over the file)
  // Where the options came from, for later errors: config_path, or "command line" when there is none.
  std::string source() const { return config_path.empty() ? kCommandLineSource : config_path; }
};

// Parses `args` (the arguments after the subcommand) and the --config file into the table's fields, in
// the precedence described at the top. Throws ConfigError for the first problem found; the command line
// is checked completely before anything else (so `--help` next to a malformed option is an error, and
// `--help` next to valid ones returns before the config file is opened). A key that the command line
// sets is not read from the file (its name must still be known and not repeated there). A value on the
// command line is taken from the next argument unless that starts with "--" or is -h (negative numbers
// work; a string that starts with "--" needs --KEY=VALUE). String values given on the command line must
// be ini_value_representable(), so that write_ini() can record them.
ParsedOptions parse_options(const OptionTable& table, const std::vector<std::string>& args);

}  // namespace hyd

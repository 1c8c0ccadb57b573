#include "launch/options.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <istream>
#include <map>
#include <sstream>
#include <type_traits>

namespace hyd {

namespace {

bool is_blank(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v'; }

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && is_blank(s[b])) ++b;
  while (e > b && is_blank(s[e - 1])) --e;
  return s.substr(b, e - b);
}

bool is_comment_marker(char c) { return c == '#' || c == ';'; }

// The position where a comment starts in the value part of `key = value` (text after the '='): a
// marker at its start or right after whitespace; npos when there is none.
size_t comment_start(const std::string& v) {
  for (size_t i = 0; i < v.size(); ++i)
    if (is_comment_marker(v[i]) && (i == 0 || is_blank(v[i - 1]))) return i;
  return std::string::npos;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// ---------------------------------------------------------------- typed values

template <class T>
const char* value_name() {
  if constexpr (std::is_same_v<T, bool>) return "BOOL";
  if constexpr (std::is_same_v<T, double>) return "X";
  if constexpr (std::is_integral_v<T>) return "N";
  return "STR";
}

template <class T>
const char* expected_form() {
  if constexpr (std::is_same_v<T, bool>) return "true/false, yes/no, on/off or 1/0";
  if constexpr (std::is_same_v<T, double>) return "a number";
  if constexpr (std::is_same_v<T, uint64_t>) return "a non-negative integer";
  if constexpr (std::is_integral_v<T>) return "an integer";
  return "a string";
}

std::string to_text(const std::string& v) { return v; }
std::string to_text(bool v) { return v ? "true" : "false"; }
std::string to_text(int32_t v) { return std::to_string(v); }
std::string to_text(int64_t v) { return std::to_string(v); }
std::string to_text(uint64_t v) { return std::to_string(v); }
std::string to_text(double v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);  // shortest text that reads back to the same double
  return std::string(buf, r.ptr);
}

// Whole-string parses; false when `s` is not exactly one value of the type (no surrounding blanks).
bool parse_value(const std::string& s, std::string& out) {
  out = s;
  return true;
}

bool parse_value(const std::string& s, bool& out) {
  const std::string l = lower(s);
  if (l == "true" || l == "1" || l == "yes" || l == "on") return out = true, true;
  if (l == "false" || l == "0" || l == "no" || l == "off") return out = false, true;
  return false;
}

// Numbers: an optional single leading '+' (as strtod and friends accept), then std::from_chars, which
// must consume everything and stay in range.
template <class T>
bool parse_number(const std::string& s, T& out) {
  const char* b = s.data();
  const char* e = b + s.size();
  const bool plus = b != e && *b == '+';
  if (plus) ++b;
  if (b == e || *b == '+' || (*b == '-' && (plus || std::is_unsigned_v<T>))) return false;
  T v{};
  std::from_chars_result r;
  if constexpr (std::is_floating_point_v<T>)
    r = std::from_chars(b, e, v, std::chars_format::general);
  else
    r = std::from_chars(b, e, v, 10);
  if (r.ec != std::errc() || r.ptr != e) return false;
  out = v;
  return true;
}

bool parse_value(const std::string& s, int32_t& out) { return parse_number(s, out); }
bool parse_value(const std::string& s, int64_t& out) { return parse_number(s, out); }
bool parse_value(const std::string& s, uint64_t& out) { return parse_number(s, out); }
bool parse_value(const std::string& s, double& out) { return parse_number(s, out); }

std::string on_line(int line) { return line > 0 ? " on line " + std::to_string(line) : ""; }

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// Appends `text` wrapped to `width` columns, continuation lines indented by `indent`; the first line
// continues at column `col`.
void append_wrapped(std::string& out, const std::string& text, size_t col, size_t indent, size_t width) {
  std::istringstream words(text);
  std::string w;
  bool first = true;
  while (words >> w) {
    if (!first && col + 1 + w.size() > width) {
      out += '\n';
      out.append(indent, ' ');
      col = indent;
      first = true;
    }
    if (!first) {
      out += ' ';
      ++col;
    }
    out += w;
    col += w.size();
    first = false;
  }
}

// "  --name TYPE (=default)" or "  --name TYPE" for required options.
std::string option_synopsis(const OptionTable::Option& o) {
  std::string s =
      "  --" + o.name + " " +
      std::visit([](auto* f) { return std::string(value_name<std::remove_pointer_t<decltype(f)>>()); }, o.field);
  if (!o.required) s += " (=" + (o.default_text.empty() ? std::string("\"\"") : o.default_text) + ")";
  return s;
}

// One entry per row: the synopsis, padded to a common column, then the help text wrapped at `width`.
std::vector<std::string> render_rows(const std::vector<std::pair<std::string, std::string>>& rows, size_t width) {
  size_t col = 0;
  for (const auto& [syn, help] : rows) col = std::max(col, syn.size() + 2);
  // Very long synopses would leave no room for the help text: it then starts on the next line.
  const bool next_line = col + 30 > width;
  if (next_line) col = 8;
  std::vector<std::string> out;
  for (const auto& [syn, help] : rows) {
    std::string r = syn;
    if (next_line) r += '\n';
    r.append(next_line ? col : col - syn.size(), ' ');
    append_wrapped(r, help, col, col, width);
    out.push_back(r + "\n");
  }
  return out;
}

std::string section_of(const std::string& name) {
  const size_t dot = name.find('.');
  return dot == std::string::npos ? "" : name.substr(0, dot);
}

}  // namespace

// ---------------------------------------------------------------- OptionTable

void OptionTable::add_option(std::string name, Field field, std::string help, bool required) {
  HYD_CHECK(!name.empty() && name.find_first_of("= \t[]#;") == std::string::npos && name.front() != '-',
            "option name '", name, "' cannot be written as a config key");
  HYD_CHECK(name != "help" && name != "config", "option name '", name, "' is reserved for the command line");
  HYD_CHECK(find(name) == nullptr, "option '", name, "' added twice");
  if (groups_.empty()) groups_.emplace_back("Options");
  Option o;
  o.name = std::move(name);
  o.field = field;
  o.default_text = text_of(field);
  o.help = std::move(help);
  o.required = required;
  o.group = groups_.size() - 1;
  options_.push_back(std::move(o));
}

const OptionTable::Option* OptionTable::find(const std::string& name) const {
  for (const Option& o : options_)
    if (o.name == name) return &o;
  return nullptr;
}

void OptionTable::set(const Option& option, const std::string& text, const std::string& source, int line) const {
  std::visit(
      [&](auto* field) {
        using T = std::remove_pointer_t<decltype(field)>;
        T v{};
        if (!parse_value(text, v))
          throw ConfigError::at(
              source, option.name,
              "invalid value '" + text + "'" + on_line(line) + " (expected " + expected_form<T>() + ")");
        *field = v;
      },
      option.field);
}

std::string OptionTable::text_of(const Field& field) {
  return std::visit([](auto* f) { return to_text(*f); }, field);
}

std::vector<std::pair<std::string, std::string>> OptionTable::values() const {
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(options_.size());
  for (const Option& o : options_) out.emplace_back(o.name, text_of(o.field));
  return out;
}

std::string OptionTable::unknown_key_message(const std::string& key, int line) const {
  std::string best;
  size_t best_d = 4;  // suggest only close names
  const std::string k = lower(key);
  for (const Option& o : options_) {
    const size_t d = edit_distance(k, lower(o.name));
    if (d < best_d) best_d = d, best = o.name;
  }
  std::string msg = "unknown key" + on_line(line);
  if (!best.empty()) msg += " (did you mean '" + best + "'?)";
  return msg + "; `" + help_command_ + " --help` lists every option";
}

std::string OptionTable::help(size_t width) const {
  std::vector<std::pair<std::string, std::string>> rows;
  for (const Option& o : options_) rows.emplace_back(option_synopsis(o), o.required ? o.help + " (required)" : o.help);
  const std::vector<std::string> lines = render_rows(rows, width);  // one column for all groups
  std::string out;
  for (size_t i = 0; i < options_.size(); ++i) {
    if (i == 0 || options_[i].group != options_[i - 1].group) {
      if (i > 0) out += "\n";
      out += groups_[options_[i].group] + ":\n";
    }
    out += lines[i];
  }
  return out;
}

// ---------------------------------------------------------------- INI

std::vector<OptionSetting> parse_ini(std::istream& in, const std::string& source) {
  std::vector<OptionSetting> out;
  std::string prefix;  // "train." under [train]; empty before the first section
  std::string raw;
  int n = 0;
  while (std::getline(in, raw)) {
    ++n;
    if (n == 1 && raw.rfind("\xEF\xBB\xBF", 0) == 0) raw.erase(0, 3);  // UTF-8 byte order mark
    const std::string s = trim(raw);
    if (s.empty() || is_comment_marker(s[0])) continue;
    const std::string where = "line " + std::to_string(n) + ": ";
    if (s[0] == '[') {
      const size_t close = s.find(']');
      if (close == std::string::npos)
        throw ConfigError::at(source, "", where + "section header without a closing ']': '" + s + "'");
      const std::string rest = trim(s.substr(close + 1));
      if (!rest.empty() && !is_comment_marker(rest[0]))
        throw ConfigError::at(source, "", where + "unexpected text after the section header: '" + s + "'");
      const std::string name = trim(s.substr(1, close - 1));
      if (name.empty()) throw ConfigError::at(source, "", where + "empty section name '" + s + "'");
      prefix = name.back() == '.' ? name : name + ".";
      continue;
    }
    const size_t eq = s.find('=');
    if (eq == std::string::npos)
      throw ConfigError::at(source, "", where + "expected `key = value`, `[section]` or a comment, got '" + s + "'");
    const std::string key = trim(s.substr(0, eq));
    if (key.empty()) throw ConfigError::at(source, "", where + "a value without a key: '" + s + "'");
    std::string value = s.substr(eq + 1);
    if (const size_t c = comment_start(value); c != std::string::npos) value.erase(c);
    out.push_back({prefix + key, trim(value), n});
  }
  if (in.bad()) throw ConfigError::at(source, "", std::string("cannot read the config file: ") + std::strerror(errno));
  return out;
}

bool ini_value_representable(const std::string& value) {
  if (value.find_first_of("\r\n") != std::string::npos) return false;
  if (trim(value) != value) return false;
  return comment_start(value) == std::string::npos;
}

std::string write_ini(const std::vector<std::pair<std::string, std::string>>& values,
                      const std::vector<std::string>& header) {
  std::ostringstream os;
  for (const std::string& h : header) os << "# " << h << "\n";
  // Top-level keys first (they must come before any section), then sections in first-use order.
  std::vector<std::string> sections{""};
  std::map<std::string, std::vector<std::pair<std::string, std::string>>> by_section;
  for (const auto& [name, value] : values) {
    HYD_CHECK(ini_value_representable(value), "the value of '", name, "' cannot be written to an INI file: '", value,
              "'");
    const std::string sec = section_of(name);
    if (std::find(sections.begin(), sections.end(), sec) == sections.end()) sections.push_back(sec);
    by_section[sec].emplace_back(sec.empty() ? name : name.substr(sec.size() + 1), value);
  }
  for (const std::string& sec : sections) {
    const auto it = by_section.find(sec);
    if (it == by_section.end()) continue;
    if (!sec.empty()) os << "\n[" << sec << "]\n";
    for (const auto& [key, value] : it->second) os << key << " = " << value << "\n";
  }
  return os.str();
}

// ---------------------------------------------------------------- command line and config file

std::string general_options_help() {
  return "General:\n"
         "  -h [ --help ]         print this help\n"
         "  --config FILE         INI config file (sections = option prefixes)\n";
}

namespace {

bool is_help_token(const std::string& t) { return t == "--help" || t == "-h"; }

// "--NAME" or "--NAME=VALUE" -> NAME; empty for anything else.
std::string long_option_name(const std::string& t) {
  if (t.size() <= 2 || t.compare(0, 2, "--") != 0) return "";
  return t.substr(2, t.find('=') == std::string::npos ? std::string::npos : t.find('=') - 2);
}

}  // namespace

ParsedOptions parse_options(const OptionTable& table, const std::vector<std::string>& args) {
  ParsedOptions out;
  const std::string cl = kCommandLineSource;
  std::set<std::string> seen;  // "help", "config" and option names given so far
  auto once = [&](const std::string& key) {
    if (!seen.insert(key).second) throw ConfigError::at(cl, key, "given more than once");
  };

  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& tok = args[i];
    if (is_help_token(tok)) {
      once("help");
      out.help = true;
      continue;
    }
    const std::string name = long_option_name(tok);
    if (name.empty()) {
      if (tok.size() > 1 && tok[0] == '-' && tok != "--") {  // -x: short options other than -h do not exist
        const std::string key = tok.substr(tok.find_first_not_of('-'));
        throw ConfigError::at(cl, key, table.unknown_key_message(key));
      }
      throw ConfigError::at(cl, "", "unexpected argument '" + tok + "' (options take the form --section.key VALUE)");
    }
    const bool adjacent = name.size() + 2 < tok.size();  // --NAME=VALUE
    if (name == "help") throw ConfigError::at(cl, "help", "takes no value (--help)");
    const OptionTable::Option* opt = name == "config" ? nullptr : table.find(name);
    if (name != "config" && !opt) throw ConfigError::at(cl, name, table.unknown_key_message(name));

    std::string value;
    if (adjacent) {
      value = tok.substr(name.size() + 3);
    } else {
      // The next argument is the value unless it is an option itself (a missing value would otherwise
      // swallow the next option); values starting with "--" can be given as --NAME=VALUE.
      if (i + 1 >= args.size() || args[i + 1].rfind("--", 0) == 0 || args[i + 1] == "-h")
        throw ConfigError::at(cl, name, "a value is required (--" + name + " VALUE or --" + name + "=VALUE)");
      value = args[++i];
    }
    once(name);
    if (!opt) {
      if (value.empty()) throw ConfigError::at(cl, "config", "the config file path is empty");
      out.config_path = value;
      continue;
    }
    // Numbers and bools are recorded in their canonical form; strings as given, so they must survive
    // the INI syntax.
    if (std::holds_alternative<std::string*>(opt->field) && !ini_value_representable(value))
      throw ConfigError::at(cl, name,
                            "value '" + value +
                                "' cannot be recorded in an INI file (it has a line break, leading or trailing "
                                "whitespace, or a '#' or ';' at its start or after whitespace)");
    table.set(*opt, value, cl);
    out.command_line_keys.insert(name);
  }
  if (out.help) return out;

  std::set<std::string> from_file;
  if (!out.config_path.empty()) {
    const std::string& path = out.config_path;
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec))
      throw ConfigError::at(path, "", "cannot open the config file: it is a directory");
    std::ifstream in(path);
    if (!in) throw ConfigError::at(path, "", std::string("cannot open the config file: ") + std::strerror(errno));
    std::map<std::string, int> first_line;  // key -> the line it was first given on
    for (const OptionSetting& s : parse_ini(in, path)) {
      const OptionTable::Option* opt = table.find(s.key);
      if (!opt) throw ConfigError::at(path, s.key, table.unknown_key_message(s.key, s.line));
      if (const auto [it, fresh] = first_line.emplace(s.key, s.line); !fresh)
        throw ConfigError::at(
            path, s.key,
            "given more than once (lines " + std::to_string(it->second) + " and " + std::to_string(s.line) + ")");
      from_file.insert(s.key);
      if (out.command_line_keys.count(s.key)) continue;  // the command line wins; the file's value is not read
      table.set(*opt, s.value, path, s.line);
    }
  }

  for (const OptionTable::Option& o : table.options()) {
    if (!o.required || out.command_line_keys.count(o.name) || from_file.count(o.name)) continue;
    const std::string sec = section_of(o.name);
    const std::string key = sec.empty() ? o.name : o.name.substr(sec.size() + 1);
    throw ConfigError::at(out.source(), o.name,
                          "required key is missing (set `" + key + " = ...` " +
                              (sec.empty() ? std::string("before any [section]") : "under [" + sec + "]") +
                              " or pass --" + o.name + " VALUE)");
  }
  return out;
}

}  // namespace hyd

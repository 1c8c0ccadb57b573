#include "launch/config.h"

#include <algorithm>
#include <boost/program_options.hpp>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <typeinfo>

namespace hyd {

namespace po = boost::program_options;

namespace {

constexpr unsigned kHelpWidth = 120;
constexpr const char* kCommandLine = "command line";

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

template <class T>
const char* value_name() {
  if constexpr (std::is_same_v<T, bool>) return "BOOL";
  if constexpr (std::is_same_v<T, double>) return "X";
  if constexpr (std::is_integral_v<T>) return "N";
  return "STR";
}

template <class T>
const char* expected_form() {
  if constexpr (std::is_same_v<T, bool>) return "true or false";
  if constexpr (std::is_same_v<T, double>) return "a number";
  if constexpr (std::is_same_v<T, uint64_t>) return "a non-negative integer";
  if constexpr (std::is_integral_v<T>) return "an integer";
  return "a string";
}

std::string any_to_text(const boost::any& a) {
  if (const auto* p = boost::any_cast<std::string>(&a)) return to_text(*p);
  if (const auto* p = boost::any_cast<bool>(&a)) return to_text(*p);
  if (const auto* p = boost::any_cast<int32_t>(&a)) return to_text(*p);
  if (const auto* p = boost::any_cast<int64_t>(&a)) return to_text(*p);
  if (const auto* p = boost::any_cast<uint64_t>(&a)) return to_text(*p);
  if (const auto* p = boost::any_cast<double>(&a)) return to_text(*p);
  HYD_THROW("config: option value of unexpected type ", a.type().name());
}

struct OptionInfo {
  std::string name;      // "train.lr"
  std::string expected;  // "a number"
  bool required = false;
};

// Every option of `hydistill train`, bound to the fields of one TrainConfig (defaults = its values).
class TrainOptionTable {
 public:
  explicit TrainOptionTable(TrainConfig& c) {
    po::options_description top("Top-level keys (before any [section] in the config file)", kHelpWidth);
    add(top, "device", &c.device, "compute device: cpu | cuda | cuda:N");

    po::options_description run("[run]", kHelpWidth);
    add_required(run, "run.dir", &c.run.dir, "run directory: config.ini, metrics.jsonl (required)");
    add(run, "run.overwrite", &c.run.overwrite, "reuse a run directory that already holds metrics.jsonl");

    ModelConfig& m = c.model;
    po::options_description model("[model]", kHelpWidth);
    add(model, "model.family", &m.family, "llama | qwen2 | qwen3");
    add(model, "model.vocab_size", &m.vocab_size, "vocabulary size; 0 = the dataset's");
    add(model, "model.hidden_size", &m.hidden_size, "model width D");
    add(model, "model.intermediate_size", &m.intermediate_size, "SwiGLU hidden width F");
    add(model, "model.num_layers", &m.num_layers, "transformer blocks");
    add(model, "model.num_heads", &m.num_heads, "query heads");
    add(model, "model.num_kv_heads", &m.num_kv_heads, "key/value heads (grouped-query attention)");
    add(model, "model.head_dim", &m.head_dim, "per-head width; 0 = hidden_size / num_heads");
    add(model, "model.rms_norm_eps", &m.rms_norm_eps, "RMSNorm epsilon");
    add(model, "model.rope_theta", &m.rope_theta, "RoPE base");
    add(model, "model.max_position_embeddings", &m.max_position_embeddings, "longest position (>= data.seq_len)");
    add(model, "model.tie_word_embeddings", &m.tie_word_embeddings, "share the embedding and the LM head");
    add(model, "model.qk_norm", &m.qk_norm, "per-head RMSNorm of q and k (Qwen3)");
    add(model, "model.qkv_bias", &m.qkv_bias, "bias on the q/k/v projections (Qwen2)");
    add(model, "model.bos_token_id", &m.bos_token_id, "beginning-of-sequence token id (-1: none)");
    add(model, "model.eos_token_id", &m.eos_token_id, "end-of-sequence token id (-1: the dataset's eos_id)");
    kernels::RopeScaling& r = m.rope_scaling;
    add(model, "model.rope_scaling.type", &r.type, "default | linear | llama3 | yarn");
    add(model, "model.rope_scaling.factor", &r.factor, "context extension factor");
    add(model, "model.rope_scaling.low_freq_factor", &r.low_freq_factor, "llama3");
    add(model, "model.rope_scaling.high_freq_factor", &r.high_freq_factor, "llama3");
    add(model, "model.rope_scaling.original_max_position_embeddings", &r.original_max_position_embeddings,
        "llama3, yarn: the pre-extension context length");
    add(model, "model.rope_scaling.beta_fast", &r.beta_fast, "yarn");
    add(model, "model.rope_scaling.beta_slow", &r.beta_slow, "yarn");
    add(model, "model.rope_scaling.attention_factor", &r.attention_factor, "yarn; 0 = 0.1 ln(factor) + 1");
    add(model, "model.rope_scaling.truncate", &r.truncate, "yarn: round the correction range to whole dims");

    po::options_description data("[data]", kHelpWidth);
    add_required(data, "data.path", &c.data.path, "HDF5 token dataset (data/prepare.py) (required)");
    add(data, "data.val_fraction", &c.data.val_fraction, "fraction of documents held out for validation");
    add(data, "data.seq_len", &c.data.seq_len, "tokens per packed sequence");
    add(data, "data.batch_size", &c.data.batch_size, "sequences per micro-batch");
    add(data, "data.seed", &c.data.seed, "seed of the train/validation split and the shuffling");

    TrainOptions& t = c.train;
    po::options_description train("[train]", kHelpWidth);
    add(train, "train.steps", &t.steps, "optimizer steps");
    add(train, "train.grad_accum", &t.grad_accum, "micro-batches per optimizer step");
    add(train, "train.lr", &t.lr, "peak learning rate");
    add(train, "train.min_lr", &t.min_lr, "final learning rate (cosine, wsd)");
    add(train, "train.warmup_steps", &t.warmup_steps, "linear warmup steps");
    add(train, "train.schedule", &t.schedule, "cosine | wsd | constant");
    add(train, "train.wsd_decay_fraction", &t.wsd_decay_fraction, "wsd: fraction of the steps spent decaying");
    add(train, "train.weight_decay", &t.weight_decay, "AdamW decoupled weight decay (matrices and embeddings)");
    add(train, "train.beta1", &t.beta1, "AdamW beta1");
    add(train, "train.beta2", &t.beta2, "AdamW beta2");
    add(train, "train.eps", &t.eps, "AdamW epsilon");
    add(train, "train.grad_clip", &t.grad_clip, "max global gradient norm; 0 = no clipping");
    add(train, "train.seed", &t.seed, "seed of the parameter initialisation");
    add(train, "train.max_bad_steps", &t.max_bad_steps, "consecutive non-finite steps that stop the run");

    po::options_description log("[log]", kHelpWidth);
    add(log, "log.interval", &c.log.interval, "steps per progress line and metrics record");
    add(log, "log.eval_interval", &c.log.eval_interval, "steps between held-out evaluations; 0 = only at the end");
    add(log, "log.eval_batches", &c.log.eval_batches, "validation micro-batches per evaluation; 0 = none");

    for (const auto* g : {&top, &run, &model, &data, &train, &log}) file_options.add(*g);
  }

  po::options_description file_options{"Options (config file keys; each also as --KEY VALUE)", kHelpWidth};
  std::vector<OptionInfo> infos;

  const OptionInfo* find(const std::string& name) const {
    for (const OptionInfo& i : infos)
      if (i.name == name) return &i;
    return nullptr;
  }

 private:
  template <class T>
  void add(po::options_description& g, const char* name, T* field, const char* help) {
    g.add_options()(
        name, po::value<T>(field)->default_value(*field, quoted_default(*field))->value_name(value_name<T>()), help);
    infos.push_back({name, expected_form<T>(), false});
  }
  template <class T>
  void add_required(po::options_description& g, const char* name, T* field, const char* help) {
    g.add_options()(name, po::value<T>(field)->value_name(value_name<T>()), help);
    infos.push_back({name, expected_form<T>(), true});
  }
  template <class T>
  static std::string quoted_default(const T& v) {
    std::string s = to_text(v);
    return s.empty() ? "\"\"" : s;
  }
};

po::options_description general_options() {
  po::options_description g("General", kHelpWidth);
  g.add_options()("help,h", "print this help")("config", po::value<std::string>()->value_name("FILE"),
                                               "INI config file (sections = option prefixes)");
  return g;
}

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

std::string unknown_key_message(const TrainOptionTable& table, const std::string& key) {
  std::string best;
  size_t best_d = 4;  // suggest only close names
  for (const OptionInfo& i : table.infos) {
    const size_t d = edit_distance(key, i.name);
    if (d < best_d) best_d = d, best = i.name;
  }
  std::string msg = "unknown key";
  if (!best.empty()) msg += " (did you mean '" + best + "'?)";
  return msg + "; `hydistill train --help` lists every option";
}

std::string strip_dashes(std::string s) {
  s.erase(0, s.find_first_not_of('-'));
  return s;
}

// The text given for `key` in parsed options (for "invalid value 'X'" messages).
std::string given_value(const po::parsed_options& parsed, const std::string& key) {
  for (const po::option& o : parsed.options)
    if (o.string_key == key && !o.value.empty()) return o.value.back();
  return "";
}

// Restates a Boost.Program_options error as "SOURCE: 'KEY': what went wrong".
[[noreturn]] void rethrow_po_error(const po::error& e, const std::string& source, const TrainOptionTable& table,
                                   const po::parsed_options* parsed) {
  std::string key;
  if (const auto* en = dynamic_cast<const po::error_with_option_name*>(&e)) key = strip_dashes(en->get_option_name());
  if (dynamic_cast<const po::validation_error*>(&e) && !key.empty()) {
    const OptionInfo* info = table.find(key);
    std::string msg = "invalid value";
    if (parsed) msg += " '" + given_value(*parsed, key) + "'";
    if (info) msg += " (expected " + info->expected + ")";
    throw ConfigError::at(source, key, msg);
  }
  if (dynamic_cast<const po::multiple_occurrences*>(&e) && !key.empty())
    throw ConfigError::at(source, key, "given more than once");
  if (!key.empty()) throw ConfigError::at(source, key, e.what());
  throw ConfigError::at(source, "", e.what());
}

std::string section_of(const std::string& name) {
  const size_t dot = name.find('.');
  return dot == std::string::npos ? "" : name.substr(0, dot);
}

}  // namespace

std::string ParsedTrainArgs::to_ini() const {
  std::ostringstream os;
  os << "# Effective configuration of this run (defaults, then the config file, then the command line).\n"
        "# Re-run it with: hydistill train --config config.ini\n";
  std::string section;
  for (const auto& [name, value] : effective) {
    const std::string sec = section_of(name);
    if (sec != section) {
      os << "\n[" << sec << "]\n";
      section = sec;
    }
    os << (sec.empty() ? name : name.substr(sec.size() + 1)) << " = " << value << "\n";
  }
  return os.str();
}

ParsedTrainArgs parse_train_args(const std::vector<std::string>& args) {
  ParsedTrainArgs out;
  TrainConfig& cfg = out.config;
  TrainOptionTable table(cfg);
  po::options_description cmdline_options;
  cmdline_options.add(general_options()).add(table.file_options);

  // Command line first: po::store keeps the first value it sees, so the command line wins.
  po::variables_map vm;
  const int style = po::command_line_style::default_style & ~po::command_line_style::allow_guessing;
  po::parsed_options cl(&cmdline_options);
  try {
    cl = po::command_line_parser(args).options(cmdline_options).style(style).allow_unregistered().run();
  } catch (const po::error& e) {
    rethrow_po_error(e, kCommandLine, table, nullptr);
  }
  std::set<std::string> cmdline_keys;
  for (const po::option& o : cl.options) {
    if (o.unregistered) {
      const std::string token = o.original_tokens.empty() ? o.string_key : o.original_tokens.front();
      throw ConfigError::at(kCommandLine, strip_dashes(token), unknown_key_message(table, strip_dashes(token)));
    }
    if (o.position_key >= 0)
      throw ConfigError::at(kCommandLine, "",
                            "unexpected argument '" + (o.value.empty() ? std::string() : o.value.front()) +
                                "' (options take the form --section.key VALUE)");
    cmdline_keys.insert(o.string_key);
  }
  try {
    po::store(cl, vm);
  } catch (const po::error& e) {
    rethrow_po_error(e, kCommandLine, table, &cl);
  }
  if (vm.count("help")) {
    out.help = true;
    return out;
  }

  if (vm.count("config")) {
    out.config_path = vm["config"].as<std::string>();
    const std::string& path = out.config_path;
    std::ifstream in(path);
    if (!in) throw ConfigError::at(path, "", std::string("cannot open the config file: ") + std::strerror(errno));
    po::parsed_options file(&table.file_options);
    try {
      file = po::parse_config_file(in, table.file_options, /*allow_unregistered=*/true);
    } catch (const po::error& e) {
      rethrow_po_error(e, path, table, nullptr);
    }
    for (const po::option& o : file.options)
      if (o.unregistered) throw ConfigError::at(path, o.string_key, unknown_key_message(table, o.string_key));
    try {
      po::store(file, vm);
    } catch (const po::error& e) {
      rethrow_po_error(e, path, table, &file);
    }
  }
  const std::string source = out.config_path.empty() ? std::string(kCommandLine) : out.config_path;

  for (const OptionInfo& i : table.infos) {
    if (i.required && !vm.count(i.name)) {
      const std::string sec = section_of(i.name);
      throw ConfigError::at(source, i.name,
                            "required key is missing (set `" + i.name.substr(sec.size() + 1) + " = ...` under [" + sec +
                                "] or pass --" + i.name + " VALUE)");
    }
  }
  try {
    po::notify(vm);
  } catch (const po::error& e) {
    rethrow_po_error(e, source, table, nullptr);
  }
  cfg.source = source;

  // Range and choice checks; a bad value that came from the command line is reported as such.
  try {
    validate_train_config(cfg);
  } catch (const ConfigError& e) {
    if (!e.key().empty() && cmdline_keys.count(e.key())) throw ConfigError::at(kCommandLine, e.key(), e.message());
    throw;
  }

  for (const OptionInfo& i : table.infos) out.effective.emplace_back(i.name, any_to_text(vm[i.name].value()));
  return out;
}

std::string train_help() {
  TrainConfig defaults;
  TrainOptionTable table(defaults);
  std::ostringstream os;
  os << "usage: hydistill train --config FILE [--section.key VALUE ...]\n\n"
        "Trains a dense decoder (llama / qwen2 / qwen3) on an HDF5 token dataset with AdamW. Every option below is\n"
        "a key of the config file (`lr = 2e-3` under [train] is train.lr; `device` comes before any section) and\n"
        "is also accepted on the command line, which wins over the file. Unknown keys are errors.\n\n"
     << general_options() << "\n"
     << table.file_options;
  return os.str();
}

}  // namespace hyd

// `hydistill train` options: INI file + command line (launch/options.h), typed TrainConfig, error
// messages naming the source and the key, and the effective config written back. The second half tests
// the option system itself: the INI grammar (sections, comments, whitespace), bool spellings, number
// forms, --key=value, and the INI writer.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "launch/config.h"
#include "launch/options.h"

namespace hyd {
namespace {

// A config file in a fresh temp directory, removed with the object.
class TempIni {
 public:
  explicit TempIni(const std::string& text) {
    std::string tmpl = (std::filesystem::temp_directory_path() / "hyd_test_config.XXXXXX").string();
    dir_ = mkdtemp(tmpl.data());
    path_ = dir_ + "/run.ini";
    std::ofstream(path_) << text;
  }
  ~TempIni() { std::filesystem::remove_all(dir_); }
  const std::string& path() const { return path_; }

 private:
  std::string dir_, path_;
};

const char* kBase =
    "device = cpu\n"
    "[run]\n"
    "dir = runs/test\n"
    "[model]\n"
    "hidden_size = 256\n"
    "intermediate_size = 704\n"
    "num_layers = 4\n"
    "num_heads = 4\n"
    "num_kv_heads = 2\n"
    "tie_word_embeddings = true\n"
    "rope_scaling.type = linear\n"
    "rope_scaling.factor = 2.5\n"
    "[data]\n"
    "path = data/corpus/kjv.h5\n"
    "seq_len = 128\n"
    "batch_size = 8\n"
    "[train]\n"
    "steps = 200\n"
    "lr = 2e-3\n"
    "min_lr = 2e-4\n"
    "warmup_steps = 20\n"
    "schedule = wsd\n"
    "[log]\n"
    "interval = 5\n";

ParsedTrainArgs parse(const TempIni& ini, std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"--config", ini.path()};
  args.insert(args.end(), extra.begin(), extra.end());
  return parse_train_args(args);
}

// The message of the ConfigError that parsing throws (fails the test when none is thrown).
std::string error_of(const std::vector<std::string>& args) {
  try {
    parse_train_args(args);
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a ConfigError";
  return "";
}

void expect_names(const std::string& msg, std::initializer_list<std::string> parts) {
  for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
}

TEST(Config, FileValuesLandInTheTypedStructAndDefaultsFillTheRest) {
  TempIni ini(kBase);
  const ParsedTrainArgs p = parse(ini);
  const TrainConfig& c = p.config;
  EXPECT_FALSE(p.help);
  EXPECT_EQ(c.source, ini.path());
  EXPECT_EQ(c.device, "cpu");
  EXPECT_EQ(c.run.dir, "runs/test");
  EXPECT_FALSE(c.run.overwrite);
  EXPECT_EQ(c.model.hidden_size, 256);
  EXPECT_EQ(c.model.intermediate_size, 704);
  EXPECT_EQ(c.model.num_layers, 4);
  EXPECT_EQ(c.model.num_kv_heads, 2);
  EXPECT_TRUE(c.model.tie_word_embeddings);
  EXPECT_EQ(c.model.rope_scaling.type, "linear");
  EXPECT_DOUBLE_EQ(c.model.rope_scaling.factor, 2.5);
  EXPECT_EQ(c.model.vocab_size, 0) << "default: the dataset's";
  EXPECT_EQ(c.data.path, "data/corpus/kjv.h5");
  EXPECT_EQ(c.data.seq_len, 128);
  EXPECT_EQ(c.train.steps, 200);
  EXPECT_DOUBLE_EQ(c.train.lr, 2e-3);
  EXPECT_DOUBLE_EQ(c.train.min_lr, 2e-4);
  EXPECT_EQ(c.train.schedule, "wsd");
  EXPECT_EQ(c.log.interval, 5);
  // Untouched keys keep TrainConfig's defaults.
  const TrainConfig d;
  EXPECT_DOUBLE_EQ(c.train.beta2, d.train.beta2);
  EXPECT_DOUBLE_EQ(c.train.grad_clip, d.train.grad_clip);
  EXPECT_EQ(c.train.grad_accum, d.train.grad_accum);
  EXPECT_DOUBLE_EQ(c.model.rms_norm_eps, d.model.rms_norm_eps);
  EXPECT_EQ(c.log.eval_batches, d.log.eval_batches);
  const LrSchedule s = c.train.lr_schedule();
  EXPECT_EQ(s.kind, ScheduleKind::wsd);
  EXPECT_EQ(s.total_steps, 200);
  EXPECT_EQ(s.warmup_steps, 20);
}

TEST(Config, CommandLineWinsOverTheFile) {
  TempIni ini(kBase);
  const ParsedTrainArgs p = parse(ini, {"--train.lr", "5e-4", "--model.num_layers=6", "--run.overwrite", "true",
                                        "--device", "cuda:1", "--train.schedule", "cosine"});
  EXPECT_DOUBLE_EQ(p.config.train.lr, 5e-4);
  EXPECT_EQ(p.config.model.num_layers, 6);
  EXPECT_TRUE(p.config.run.overwrite);
  EXPECT_EQ(p.config.device, "cuda:1");
  EXPECT_EQ(p.config.train.schedule, "cosine");
  EXPECT_EQ(p.config.train.steps, 200) << "file value kept where the command line is silent";
}

TEST(Config, EverythingOnTheCommandLineWorksWithoutAFile) {
  const ParsedTrainArgs p =
      parse_train_args({"--run.dir", "r", "--data.path", "d.h5", "--train.steps", "7", "--model.hidden_size", "64",
                        "--model.intermediate_size", "128", "--model.num_layers", "1", "--model.num_heads", "2",
                        "--model.num_kv_heads", "1"});
  EXPECT_EQ(p.config.source, "command line");
  EXPECT_EQ(p.config.run.dir, "r");
  EXPECT_EQ(p.config.data.path, "d.h5");
  EXPECT_EQ(p.config.train.steps, 7);
}

TEST(Config, EffectiveIniReadsBackToTheSameValues) {
  TempIni ini(kBase);
  const ParsedTrainArgs p = parse(ini, {"--train.lr", "1.25e-3", "--data.seed", "77"});
  const std::string text = p.to_ini();
  EXPECT_NE(text.find("device = cpu\n"), std::string::npos) << text;
  EXPECT_NE(text.find("[train]\nsteps = 200\n"), std::string::npos) << text;
  EXPECT_NE(text.find("lr = 0.00125\n"), std::string::npos) << text;
  EXPECT_NE(text.find("rope_scaling.type = linear\n"), std::string::npos) << text;
  EXPECT_LT(text.find("device = cpu"), text.find("[run]")) << "top-level keys come before any section";
  TempIni again(text);
  const ParsedTrainArgs q = parse(again);
  EXPECT_EQ(q.effective, p.effective);
  EXPECT_DOUBLE_EQ(q.config.train.lr, 1.25e-3);
  EXPECT_EQ(q.config.data.seed, 77u);
  // Every option is recorded, each once.
  EXPECT_EQ(p.effective.size(), 57u);  // 55 + parallel.dp, parallel.sp
  for (size_t i = 0; i < p.effective.size(); ++i)
    for (size_t j = i + 1; j < p.effective.size(); ++j) EXPECT_NE(p.effective[i].first, p.effective[j].first);
}

TEST(Config, UnknownKeyInTheFileNamesTheFileAndTheKey) {
  TempIni ini(std::string(kBase) + "lrr = 3\n");
  const std::string msg = error_of({"--config", ini.path()});
  expect_names(msg, {ini.path(), "'log.lrr'", "unknown key"});
  TempIni ini2(std::string("[train]\nlearning_rate = 1e-3\n") + kBase);
  expect_names(error_of({"--config", ini2.path()}), {ini2.path(), "'train.learning_rate'"});
  TempIni ini3(std::string("[trian]\nsteps = 1\n") + kBase);
  expect_names(error_of({"--config", ini3.path()}), {ini3.path(), "'trian.steps'", "did you mean 'train.steps'"});
  TempIni ini4(std::string("config = other.ini\n") + kBase);  // command-line only
  expect_names(error_of({"--config", ini4.path()}), {ini4.path(), "'config'", "unknown key"});
}

TEST(Config, UnknownOptionOnTheCommandLineNamesIt) {
  TempIni ini(kBase);
  expect_names(error_of({"--config", ini.path(), "--train.learning_rate", "1"}),
               {"command line", "'train.learning_rate'", "unknown key"});
  // No prefix guessing: a truncated name is not silently taken for train.lr.
  expect_names(error_of({"--config", ini.path(), "--train.l", "1"}), {"command line", "'train.l'"});
  expect_names(error_of({"--config", ini.path(), "stray"}), {"command line", "unexpected argument 'stray'"});
}

TEST(Config, MissingRequiredKeyNamesTheKeyAndTheFile) {
  std::string text = kBase;
  text.erase(text.find("path = data/corpus/kjv.h5\n"), std::string("path = data/corpus/kjv.h5\n").size());
  TempIni ini(text);
  expect_names(error_of({"--config", ini.path()}), {ini.path(), "'data.path'", "required key is missing", "[data]"});
  // Supplying it on the command line is enough.
  EXPECT_EQ(parse(ini, {"--data.path", "x.h5"}).config.data.path, "x.h5");
  expect_names(error_of({"--data.path", "x.h5"}), {"command line", "'run.dir'", "required"});
}

TEST(Config, MalformedValuesNameTheKeyAndTheValue) {
  {
    std::string t = kBase;
    t.replace(t.find("lr = 2e-3"), 9, "lr = fast");
    TempIni ini(t);
    expect_names(error_of({"--config", ini.path()}), {ini.path(), "'train.lr'", "invalid value 'fast'", "a number"});
  }
  {
    std::string t = kBase;
    t.replace(t.find("steps = 200"), 11, "steps = 1.5");
    TempIni ini(t);
    expect_names(error_of({"--config", ini.path()}), {ini.path(), "'train.steps'", "'1.5'", "an integer"});
  }
  {
    std::string t = kBase;
    t.replace(t.find("tie_word_embeddings = true"), 26, "tie_word_embeddings = maybe");
    TempIni ini(t);
    expect_names(error_of({"--config", ini.path()}), {ini.path(), "'model.tie_word_embeddings'", "'maybe'"});
  }
  TempIni ini(kBase);
  expect_names(error_of({"--config", ini.path(), "--data.seq_len", "long"}),
               {"command line", "'data.seq_len'", "invalid value 'long'"});
  expect_names(error_of({"--config", ini.path(), "--train.lr"}), {"command line", "train.lr"});
}

TEST(Config, OutOfRangeAndUnknownChoicesNameTheSource) {
  {
    std::string t = kBase;
    t.replace(t.find("schedule = wsd"), 14, "schedule = linear");
    TempIni ini(t);
    expect_names(error_of({"--config", ini.path()}), {ini.path(), "'train.schedule'", "'linear'"});
  }
  TempIni ini(kBase);
  expect_names(error_of({"--config", ini.path(), "--train.steps", "0"}), {"command line", "'train.steps'", ">= 1"});
  expect_names(error_of({"--config", ini.path(), "--device", "tpu"}), {"command line", "'device'"});
  expect_names(error_of({"--config", ini.path(), "--data.val_fraction", "1.5"}),
               {"command line", "'data.val_fraction'"});
  expect_names(error_of({"--config", ini.path(), "--train.min_lr", "1"}), {"command line", "'train.min_lr'"});
  // The model's own checks (ModelConfig::finalize) are attributed the same way.
  expect_names(error_of({"--config", ini.path(), "--model.num_layers", "0"}), {"command line", "'model.num_layers'"});
  {
    std::string t = kBase;
    t.replace(t.find("num_layers = 4"), 14, "num_layers = 0");
    TempIni bad(t);
    expect_names(error_of({"--config", bad.path()}), {bad.path(), "'model.num_layers'"});
  }
}

TEST(Config, DuplicateKeysAndMissingFilesAreErrors) {
  TempIni ini(std::string(kBase) + "[train]\nsteps = 3\n");
  expect_names(error_of({"--config", ini.path()}), {ini.path(), "'train.steps'", "more than once"});
  expect_names(error_of({"--config", "/nonexistent/run.ini"}), {"/nonexistent/run.ini", "cannot open"});
}

TEST(Config, HelpListsEveryOptionWithItsDefault) {
  EXPECT_TRUE(parse_train_args({"--help"}).help);
  EXPECT_TRUE(parse_train_args({"--config", "/nonexistent.ini", "--help"}).help) << "help needs no valid config";
  const std::string help = train_help();
  TempIni ini(kBase);
  for (const auto& [name, value] : parse(ini).effective)
    EXPECT_NE(help.find("--" + name + " "), std::string::npos) << name << " missing from --help";
  for (const char* d : {"--train.lr X (=3e-04)", "--device STR (=cpu)", "--train.schedule STR (=cosine)",
                        "--log.interval N (=10)", "--run.overwrite BOOL (=false)", "--data.path STR "})
    EXPECT_NE(help.find(d), std::string::npos) << d << "\n" << help;
}

// ---------------------------------------------------------------- the option system (launch/options.h)

std::vector<OptionSetting> ini(const std::string& text, const std::string& source = "t.ini") {
  std::istringstream in(text);
  return parse_ini(in, source);
}

// The message of the ConfigError that parse_ini throws on `text`.
std::string ini_error_of(const std::string& text) {
  try {
    ini(text);
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a ConfigError for:\n" << text;
  return "";
}

TEST(Options, IniSectionsPrefixTheirKeys) {
  const auto s =
      ini("device = cpu\n"
          "[train]\n"
          "lr = 1e-3\n"
          "[model.rope_scaling]\n"  // a dotted section
          "type = yarn\n"
          "[ model ]\n"  // blanks inside the brackets are trimmed
          "rope_scaling.factor = 4\n"
          "[train]\n"  // a section may be reopened
          "steps = 3\n");
  ASSERT_EQ(s.size(), 5u);
  EXPECT_EQ(s[0].key, "device");
  EXPECT_EQ(s[0].value, "cpu");
  EXPECT_EQ(s[0].line, 1);
  EXPECT_EQ(s[1].key, "train.lr");
  EXPECT_EQ(s[1].value, "1e-3");
  EXPECT_EQ(s[1].line, 3);
  EXPECT_EQ(s[2].key, "model.rope_scaling.type");
  EXPECT_EQ(s[3].key, "model.rope_scaling.factor");
  EXPECT_EQ(s[3].value, "4");
  EXPECT_EQ(s[4].key, "train.steps");
  EXPECT_EQ(s[4].line, 9);
}

TEST(Options, IniCommentsAndWhitespace) {
  const auto s =
      ini("\xEF\xBB\xBF# a comment line (after a UTF-8 byte order mark)\n"
          "; another comment line\n"
          "   # indented comment\n"
          "\n"
          "   \t  \n"
          "[train]   # section with a comment\n"
          "[log];comment right after the bracket\n"
          "  interval\t=\t 5   \r\n"  // tabs, blanks and a CRLF line end
          "eval_batches = 2 # trailing comment\n"
          "eval_interval = 7 ; trailing comment\n"
          "a = runs/exp#1\n"  // '#' not after whitespace is part of the value
          "b = x;y\n"
          "c =\n"  // empty value
          "d = # only a comment\n"
          "e =#also a comment\n"
          "f = k=v = w\n"       // the first '=' splits
          "g = two  words\n");  // inner whitespace is kept
  ASSERT_EQ(s.size(), 10u);
  const std::vector<std::pair<std::string, std::string>> want = {{"log.interval", "5"},
                                                                 {"log.eval_batches", "2"},
                                                                 {"log.eval_interval", "7"},
                                                                 {"log.a", "runs/exp#1"},
                                                                 {"log.b", "x;y"},
                                                                 {"log.c", ""},
                                                                 {"log.d", ""},
                                                                 {"log.e", ""},
                                                                 {"log.f", "k=v = w"},
                                                                 {"log.g", "two  words"}};
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(s[i].key, want[i].first) << i;
    EXPECT_EQ(s[i].value, want[i].second) << i;
  }
  EXPECT_EQ(s[0].line, 8);
}

TEST(Options, IniSyntaxErrorsNameTheSourceAndTheLine) {
  expect_names(ini_error_of("[train]\nlr\n"), {"t.ini", "line 2", "'lr'", "key = value"});
  expect_names(ini_error_of("x = 1\n[train\n"), {"t.ini", "line 2", "']'"});
  expect_names(ini_error_of("[]\nx = 1\n"), {"t.ini", "line 1", "empty section name"});
  expect_names(ini_error_of("[ ]\n"), {"t.ini", "line 1", "empty section name"});
  expect_names(ini_error_of("[train] steps = 1\n"), {"t.ini", "line 1", "after the section header"});
  expect_names(ini_error_of("\n\n = 5\n"), {"t.ini", "line 3", "without a key"});
}

TEST(Options, IniValueRepresentability) {
  for (const char* v : {"", "cpu", "runs/a#1", "x;y", "a=b", "two  words", "-1", "\"quoted\""})
    EXPECT_TRUE(ini_value_representable(v)) << v;
  for (const char* v : {" lead", "trail ", "a\nb", "a\rb", "#x", ";x", "a #b", "a\t;b"})
    EXPECT_FALSE(ini_value_representable(v)) << v;
}

TEST(Options, WriteIniReadsBackToTheSamePairs) {
  const std::vector<std::pair<std::string, std::string>> values = {
      {"run.dir", "runs/exp#1"}, {"device", "cuda:0"}, {"model.rope_scaling.type", "yarn"},
      {"run.note", "a=b;c"},     {"model.family", ""}, {"top2", "x  y"},
      {"train.lr", "1e-05"}};
  const std::string text = write_ini(values, {"header line"});
  EXPECT_EQ(text.rfind("# header line\n", 0), 0u) << text;
  EXPECT_LT(text.find("top2 = x  y"), text.find("[run]")) << "top-level keys before any section:\n" << text;
  EXPECT_NE(text.find("[model]\nrope_scaling.type = yarn\n"), std::string::npos) << text;
  const auto back = ini(text);
  ASSERT_EQ(back.size(), values.size()) << text;
  for (const auto& [k, v] : values) {
    const auto it = std::find_if(back.begin(), back.end(), [&](const OptionSetting& s) { return s.key == k; });
    ASSERT_NE(it, back.end()) << k << " missing from:\n" << text;
    EXPECT_EQ(it->value, v) << k;
  }
}

// A small table of every field type, to test the option system apart from TrainConfig.
struct Fields {
  std::string name = "default name";
  std::string empty;
  bool flag = false;
  int32_t i32 = -3;
  int64_t i64 = 1LL << 40;
  uint64_t u64 = 7;
  double x = 0.25;
  std::string path;  // required
};

struct SmallTable {
  Fields f;
  OptionTable table{"tool run"};
  SmallTable() {
    table.group("Top");
    table.add("name", &f.name, "a name");
    table.group("[s]");
    table.add("s.empty", &f.empty, "empty by default");
    table.add("s.flag", &f.flag, "a switch");
    table.add("s.i32", &f.i32, "32-bit");
    table.add("s.i64", &f.i64, "64-bit");
    table.add("s.u64", &f.u64, "unsigned");
    table.add("s.x", &f.x, "a double");
    table.add_required("s.path", &f.path, "a path");
  }
};

std::string set_error_of(const std::string& key, const std::string& text) {
  SmallTable t;
  try {
    t.table.set(*t.table.find(key), text, "src");
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << key << " accepted '" << text << "'";
  return "";
}

TEST(Options, BoolSpellings) {
  SmallTable t;
  const OptionTable::Option& o = *t.table.find("s.flag");
  for (const char* v : {"true", "1", "yes", "on", "TRUE", "True", "Yes", "ON"}) {
    t.f.flag = false;
    t.table.set(o, v, "src");
    EXPECT_TRUE(t.f.flag) << v;
  }
  for (const char* v : {"false", "0", "no", "off", "FALSE", "No", "Off"}) {
    t.f.flag = true;
    t.table.set(o, v, "src");
    EXPECT_FALSE(t.f.flag) << v;
  }
  for (const char* v : {"", "maybe", "2", "truee", "y", "n", " true", "-1"})
    expect_names(set_error_of("s.flag", v), {"src", "'s.flag'", std::string("invalid value '") + v + "'", "true"});
}

TEST(Options, NumberForms) {
  SmallTable t;
  const auto set = [&](const char* key, const char* text) { t.table.set(*t.table.find(key), text, "src"); };
  set("s.i32", "+12");
  EXPECT_EQ(t.f.i32, 12);
  set("s.i32", "-2147483648");
  EXPECT_EQ(t.f.i32, INT32_MIN);
  set("s.i64", "9223372036854775807");
  EXPECT_EQ(t.f.i64, INT64_MAX);
  set("s.i64", "007");
  EXPECT_EQ(t.f.i64, 7);
  set("s.u64", "18446744073709551615");
  EXPECT_EQ(t.f.u64, UINT64_MAX);
  set("s.x", "1e-3");
  EXPECT_DOUBLE_EQ(t.f.x, 1e-3);
  set("s.x", "+.5");
  EXPECT_DOUBLE_EQ(t.f.x, 0.5);
  set("s.x", "-2E2");
  EXPECT_DOUBLE_EQ(t.f.x, -200);
  set("s.x", "7");
  EXPECT_DOUBLE_EQ(t.f.x, 7);
  for (const char* v : {"2147483648", "1.5", "1e3", "0x10", "", " 1", "1 ", "++1", "+-1", "12abc"})
    expect_names(set_error_of("s.i32", v), {"'s.i32'", std::string("'") + v + "'", "an integer"});
  for (const char* v : {"-1", "-0", "18446744073709551616", "+-1"})
    expect_names(set_error_of("s.u64", v), {"'s.u64'", std::string("'") + v + "'", "a non-negative integer"});
  for (const char* v : {"1e400", "fast", "", "1,5", "1.0.0", "0x1p3", " 1"})
    expect_names(set_error_of("s.x", v), {"'s.x'", std::string("'") + v + "'", "a number"});
}

TEST(Options, DefaultsAndHelp) {
  SmallTable t;
  const auto vals = t.table.values();
  ASSERT_EQ(vals.size(), 8u);
  EXPECT_EQ(vals[0], (std::pair<std::string, std::string>{"name", "default name"}));
  EXPECT_EQ(vals[3], (std::pair<std::string, std::string>{"s.i32", "-3"}));
  EXPECT_EQ(vals[4], (std::pair<std::string, std::string>{"s.i64", "1099511627776"}));
  EXPECT_EQ(vals[6], (std::pair<std::string, std::string>{"s.x", "0.25"}));
  const std::string help = t.table.help();
  for (const char* want :
       {"Top:\n  --name STR (=default name)", "[s]:\n", "--s.empty STR (=\"\")", "--s.flag BOOL (=false)",
        "--s.i32 N (=-3)", "--s.u64 N (=7)", "--s.x X (=0.25)", "a path (required)"})
    EXPECT_NE(help.find(want), std::string::npos) << want << "\n" << help;
  EXPECT_EQ(help.find("--s.path STR (="), std::string::npos) << "a required option has no default\n" << help;
  EXPECT_LT(help.find("Top:"), help.find("[s]:"));
  for (size_t b = 0, e; b < help.size(); b = e + 1) {
    e = help.find('\n', b);
    EXPECT_LE(e - b, 120u) << help.substr(b, e - b);
  }
}

TEST(Options, CommandLineForms) {
  SmallTable t;
  const ParsedOptions p = parse_options(
      t.table, {"--s.path=a=b", "--name", "-x-", "--s.i32", "-5", "--s.x=-1e-2", "--s.flag=on", "--s.empty="});
  EXPECT_FALSE(p.help);
  EXPECT_EQ(p.source(), "command line");
  EXPECT_EQ(t.f.path, "a=b");
  EXPECT_EQ(t.f.name, "-x-");
  EXPECT_EQ(t.f.i32, -5);
  EXPECT_DOUBLE_EQ(t.f.x, -1e-2);
  EXPECT_TRUE(t.f.flag);
  EXPECT_EQ(t.f.empty, "");
  EXPECT_EQ(p.command_line_keys, (std::set<std::string>{"s.path", "name", "s.i32", "s.x", "s.flag", "s.empty"}));
  // A string that starts with "--" is only accepted in the --key=value form.
  SmallTable u;
  parse_options(u.table, {"--s.path", "p", "--name=--odd"});
  EXPECT_EQ(u.f.name, "--odd");
}

std::string options_error_of(const std::vector<std::string>& args) {
  SmallTable t;
  try {
    parse_options(t.table, args);
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a ConfigError";
  return "";
}

TEST(Options, CommandLineErrors) {
  expect_names(options_error_of({"--s.path", "p", "--s.i32"}), {"command line", "'s.i32'", "value is required"});
  expect_names(options_error_of({"--s.path", "--s.i32", "1"}), {"command line", "'s.path'", "value is required"});
  expect_names(options_error_of({"--s.path", "-h"}), {"command line", "'s.path'", "value is required"});
  expect_names(options_error_of({"--s.path", "p", "--s.i32=1", "--s.i32", "2"}),
               {"command line", "'s.i32'", "more than once"});
  expect_names(options_error_of({"--help", "-h"}), {"command line", "'help'", "more than once"});
  expect_names(options_error_of({"--help=yes"}), {"command line", "'help'", "no value"});
  expect_names(options_error_of({"--config", "a.ini", "--config", "b.ini"}),
               {"command line", "'config'", "more than once"});
  expect_names(options_error_of({"--config"}), {"command line", "'config'", "value is required"});
  expect_names(options_error_of({"--config="}), {"command line", "'config'", "empty"});
  expect_names(options_error_of({"--s.flg", "1"}),
               {"command line", "'s.flg'", "unknown key", "did you mean 's.flag'", "`tool run --help`"});
  expect_names(options_error_of({"--S.FLAG=1"}), {"'S.FLAG'", "did you mean 's.flag'"});
  expect_names(options_error_of({"--s.fl=1"}), {"'s.fl'", "unknown key"});  // no prefix guessing
  expect_names(options_error_of({"-x"}), {"command line", "'x'", "unknown key"});
  expect_names(options_error_of({"--s.path", "p", "extra"}), {"command line", "unexpected argument 'extra'"});
  expect_names(options_error_of({"--s.path", "p", "-"}), {"command line", "unexpected argument '-'"});
  expect_names(options_error_of({"--s.path", "p", "--s.i32", "1.5"}),
               {"command line", "'s.i32'", "invalid value '1.5'"});
  expect_names(options_error_of({"--s.path", " p"}), {"command line", "'s.path'", "INI"});
  expect_names(options_error_of({"--s.path", "a #b"}), {"command line", "'s.path'", "INI"});
  expect_names(options_error_of({}), {"command line", "'s.path'", "required key is missing", "[s]"});
  // --help needs a valid command line but no required keys and no readable config file.
  SmallTable t;
  EXPECT_TRUE(parse_options(t.table, {"--config", "/nonexistent.ini", "-h"}).help);
  expect_names(options_error_of({"--s.i32", "x", "--help"}), {"'s.i32'", "invalid value 'x'"});
}

TEST(Options, FileAndCommandLineTogether) {
  TempIni file(
      "name = from file\n"
      "[s]\n"
      "path = p.h5\n"
      "i32 = 4\n"
      "flag = yes\n"
      "x = not a number\n");  // overridden on the command line: never read
  SmallTable t;
  const ParsedOptions p = parse_options(t.table, {"--config", file.path(), "--s.x", "3.5", "--name", "cli"});
  EXPECT_EQ(p.source(), file.path());
  EXPECT_EQ(p.config_path, file.path());
  EXPECT_EQ(t.f.name, "cli");
  EXPECT_EQ(t.f.path, "p.h5");
  EXPECT_EQ(t.f.i32, 4);
  EXPECT_TRUE(t.f.flag);
  EXPECT_DOUBLE_EQ(t.f.x, 3.5);
  EXPECT_EQ(t.f.u64, 7u) << "default kept";
  // Without the override the malformed value is an error naming the file, the key and the line.
  expect_names(options_error_of({"--config", file.path()}),
               {file.path(), "'s.x'", "invalid value 'not a number'", "line 6"});
  // Repeats are errors in the file even when the command line overrides the key.
  TempIni twice("[s]\npath = a\ni32 = 1\n[s]\ni32 = 2\n");
  expect_names(options_error_of({"--config", twice.path(), "--s.i32", "3"}),
               {twice.path(), "'s.i32'", "more than once", "lines 3 and 5"});
  TempIni unknown("[s]\npath = a\n\n[t]\ni32 = 1\n");
  expect_names(options_error_of({"--config", unknown.path()}),
               {unknown.path(), "'t.i32'", "unknown key on line 5", "did you mean 's.i32'"});
  TempIni reserved("help = true\n");
  expect_names(options_error_of({"--config", reserved.path()}), {reserved.path(), "'help'", "unknown key"});
  TempIni missing("name = x\n");
  expect_names(options_error_of({"--config", missing.path()}), {missing.path(), "'s.path'", "required key is missing"});
  expect_names(options_error_of({"--config", std::filesystem::temp_directory_path().string()}),
               {"cannot open", "directory"});
}

TEST(Config, TrainOptionsAcceptTheWholeIniGrammar) {
  TempIni ini(
      "# a run\n"
      "device = cpu   # top-level\n"
      "[run]\n"
      "dir = runs/exp#1\n"
      "overwrite = On\n"
      "[ model ]\n"
      "hidden_size = 256\n"
      "intermediate_size = 704\n"
      "num_layers = 4 ; four blocks\n"
      "num_heads = 4\n"
      "num_kv_heads = 2\n"
      "bos_token_id = -1\n"
      "qk_norm = yes\n"
      "[model.rope_scaling]\n"
      "type = linear\n"
      "factor = +2.5\n"
      "[data]\n"
      "\tpath\t=\tdata/corpus/kjv.h5\t\n"
      "[train]\n"
      "lr = 2E-3\n");
  const ParsedTrainArgs p = parse(ini, {"--train.steps=300", "--model.tie_word_embeddings=1"});
  const TrainConfig& c = p.config;
  EXPECT_EQ(c.device, "cpu");
  EXPECT_EQ(c.run.dir, "runs/exp#1");
  EXPECT_TRUE(c.run.overwrite);
  EXPECT_EQ(c.model.num_layers, 4);
  EXPECT_TRUE(c.model.qk_norm);
  EXPECT_TRUE(c.model.tie_word_embeddings);
  EXPECT_EQ(c.model.bos_token_id, -1);
  EXPECT_EQ(c.model.rope_scaling.type, "linear");
  EXPECT_DOUBLE_EQ(c.model.rope_scaling.factor, 2.5);
  EXPECT_EQ(c.data.path, "data/corpus/kjv.h5");
  EXPECT_DOUBLE_EQ(c.train.lr, 2e-3);
  EXPECT_EQ(c.train.steps, 300);
  // The effective config records canonical values and reads back to the same ones.
  const std::string text = p.to_ini();
  EXPECT_NE(text.find("dir = runs/exp#1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("overwrite = true\n"), std::string::npos) << text;
  EXPECT_NE(text.find("factor = 2.5\n"), std::string::npos) << text;
  TempIni again(text);
  EXPECT_EQ(parse(again).effective, p.effective);
  // A command-line value that config.ini could not record is refused up front.
  expect_names(error_of({"--config", ini.path(), "--run.dir", "runs/a #b"}), {"command line", "'run.dir'"});
  expect_names(error_of({"--config", ini.path(), "--model.bos_token_id", "3000000000"}),
               {"command line", "'model.bos_token_id'", "invalid value '3000000000'", "an integer"});
  expect_names(error_of({"--config", ini.path(), "--data.seed", "-1"}), {"command line", "'data.seed'", "'-1'"});
}

}  // namespace
}  // namespace hyd

// `hydistill train` options: INI file + command line (Boost.Program_options), typed TrainConfig,
// error messages naming the source and the key, and the effective config written back.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "launch/config.h"

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
  EXPECT_EQ(p.effective.size(), 50u);
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

}  // namespace
}  // namespace hyd

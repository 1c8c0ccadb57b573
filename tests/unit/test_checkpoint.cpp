// Checkpoints (checkpoint/checkpoint.h, training_state.h, sha256.h):
//   * SHA-256 against the FIPS 180-4 examples and sha256sum's digest of a file, across block boundaries.
//   * write_checkpoint's layout (no .tmp left, manifest listing both files with their sizes and
//     digests) and open_checkpoint's verification: a modified state file (size, then one flipped byte),
//     a missing file, broken manifest JSON, a wrong field type, an unknown format version and a
//     multi-rank topology each give an error naming the file and the field. A folder without a manifest
//     (an interrupted write) is not listed as a checkpoint.
//   * Retention: keep_last newest plus every multiple of keep_every_steps.
//   * check_resume_config: options that change the computation must agree (the error names the key,
//     both values and the manifest); run/log/checkpoint/eval options may differ; path options compare
//     canonically.
//   * Training state: a hybrid student trained 6 steps straight equals, bit for bit (parameters, moments,
//     counters), one trained 3 steps, checkpointed, restored into fresh objects and trained 3 more.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "checkpoint/sha256.h"
#include "checkpoint/training_state.h"
#include "tests/common/test_util.h"
#include "tests/common/tiny_model.h"
#include "trainer/hybrid_model.h"
#include "trainer/optimizer.h"
#include "trainer/train_loop.h"

namespace hyd {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

TEST(Sha256, KnownDigests) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // 1,000,000 x 'a', fed in pieces that straddle the 64-byte blocks.
  Sha256 s;
  const std::string piece(1000, 'a');
  for (int i = 0; i < 1000; ++i) s.update(piece.data(), piece.size());
  EXPECT_EQ(s.hex_digest(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  // Lengths around the padding boundary (55, 56, 64 bytes) agree with one-shot hashing in pieces.
  for (size_t n : {55u, 56u, 63u, 64u, 65u, 119u, 120u}) {
    const std::string msg(n, 'x');
    Sha256 split;
    split.update(msg.data(), n / 3);
    split.update(msg.data() + n / 3, n - n / 3);
    EXPECT_EQ(split.hex_digest(), sha256_hex(msg)) << n;
  }
}

TEST(Sha256, FileDigest) {
  test::TempDir tmp("hyd_sha_");
  {
    std::ofstream f(tmp.file("a.txt"), std::ios::binary);
    f << "abc";
  }
  EXPECT_EQ(sha256_file(tmp.file("a.txt")), sha256_hex("abc"));
  test::expect_error([&] { sha256_file(tmp.file("missing")); }, {"missing", "cannot open"});
}

// ---------------------------------------------------------------- writing and verifying

CheckpointManifest sample_manifest(int64_t step) {
  CheckpointManifest m;
  m.command = "train";
  m.step = m.stage_step = step;
  m.config = {{"train.lr", "0.001"}, {"data.path", "d.h5"}};
  m.paths = {{"data.path", "/abs/d.h5"}};
  m.data = {{"next_batch", step}};
  m.loop = {{"tokens", 10}, {"last_norm", nullptr}};
  m.device = "cpu";
  return m;
}

SafetensorsWriter sample_tensors() {
  SafetensorsWriter w;
  w.add_f32("param/x", {2, 2}, {1, 2, 3, 4});
  return w;
}

std::string write_sample(const std::string& run_dir, int64_t step) {
  return write_checkpoint(run_dir, sample_manifest(step), sample_tensors(), "[train]\nlr = 0.001\n");
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

TEST(Checkpoint, WriteLayoutAndVerifiedRead) {
  test::TempDir run("hyd_ckpt_");
  const std::string dir = write_sample(run.str(), 40);
  EXPECT_EQ(fs::path(dir).filename(), "step-00000040");
  EXPECT_FALSE(fs::exists(dir + ".tmp"));
  for (const char* f : {kCheckpointManifest, kCheckpointRankFile, kCheckpointConfig})
    EXPECT_TRUE(fs::is_regular_file(fs::path(dir) / f)) << f;
  const json j = read_json((fs::path(dir) / kCheckpointManifest).string());
  EXPECT_EQ(j["format"], "hydistill-checkpoint");
  EXPECT_EQ(j["library_version"], hydistill_version());
  EXPECT_EQ(j["topology"]["world_size"], 1);
  ASSERT_EQ(j["files"].size(), 2u);
  for (const json& f : j["files"]) {
    const std::string p = (fs::path(dir) / f["name"].get<std::string>()).string();
    EXPECT_EQ(f["size"].get<uint64_t>(), fs::file_size(p));
    EXPECT_EQ(f["sha256"], sha256_file(p));
  }

  const Checkpoint ck = open_checkpoint(dir);
  EXPECT_EQ(ck.manifest.step, 40);
  EXPECT_EQ(ck.manifest.command, "train");
  EXPECT_EQ(*ck.manifest.config_value("train.lr"), "0.001");
  EXPECT_EQ(ck.manifest.config_value("nope"), nullptr);
  EXPECT_EQ(ck.tensors.read_f32("param/x"), (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(loop_count(ck, "tokens"), 10);
  EXPECT_TRUE(std::isnan(loop_number(ck, "last_norm")));
  test::expect_error([&] { loop_count(ck, "missing"); }, {kCheckpointManifest, "'loop.missing'"});

  // Writing the same step again replaces it whole.
  const std::string again = write_sample(run.str(), 40);
  EXPECT_EQ(again, dir);
  EXPECT_NO_THROW(open_checkpoint(dir));
  EXPECT_FALSE(fs::exists(dir + ".old"));
}

TEST(Checkpoint, CorruptionIsNamedByFileAndField) {
  test::TempDir run("hyd_ckpt_bad_");
  const std::string dir = write_sample(run.str(), 3);
  const std::string state = (fs::path(dir) / kCheckpointRankFile).string();
  const std::string manifest = (fs::path(dir) / kCheckpointManifest).string();
  std::vector<char> bytes;
  {
    std::ifstream in(state, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  auto write_state = [&](const std::vector<char>& b) {
    std::ofstream out(state, std::ios::binary | std::ios::trunc);
    out.write(b.data(), static_cast<std::streamsize>(b.size()));
  };

  std::vector<char> flipped = bytes;
  flipped.back() ^= 0x01;
  write_state(flipped);
  test::expect_error([&] { open_checkpoint(dir); }, {state, "'sha256'", "checksum mismatch", manifest});
  std::vector<char> longer = bytes;
  longer.push_back(0);
  write_state(longer);
  test::expect_error([&] { open_checkpoint(dir); }, {state, "'size'", manifest});
  write_state(bytes);
  EXPECT_NO_THROW(open_checkpoint(dir));

  fs::remove(fs::path(dir) / kCheckpointConfig);
  test::expect_error([&] { open_checkpoint(dir); }, {kCheckpointConfig, "missing", "files[1]"});

  const json good = read_json(manifest);
  write_text(manifest, good.dump().substr(0, 40));
  test::expect_error([&] { open_checkpoint(dir); }, {manifest, "not valid JSON"});
  auto with = [&](const std::string& pointer, const json& value) {
    json j = good;
    j[json::json_pointer(pointer)] = value;
    write_text(manifest, j.dump());
  };
  with("/step", "forty");
  test::expect_error([&] { open_checkpoint(dir); }, {manifest, "'step'", "an integer"});
  with("/format_version", 99);
  test::expect_error([&] { open_checkpoint(dir); }, {manifest, "'format_version'", "99"});
  with("/topology/world_size", 8);
  test::expect_error([&] { open_checkpoint(dir); }, {manifest, "'files'", "rank-00001.safetensors", "world_size = 8"});
  with("/topology/world_size", 0);
  test::expect_error([&] { open_checkpoint(dir); }, {manifest, "'topology.world_size'"});
  with("/files/0/sha256", "xyz");
  test::expect_error([&] { open_checkpoint(dir); }, {manifest, "'files[0].sha256'"});
  with("/command", "serve");
  test::expect_error([&] { open_checkpoint(dir); }, {manifest, "'command'", "serve"});
  fs::remove(manifest);
  test::expect_error([&] { open_checkpoint(dir); }, {manifest, "missing", "not a checkpoint"});
  test::expect_error([&] { open_checkpoint(run.file("step-00000099")); }, {"step-00000099", "no such"});
}

TEST(Checkpoint, ListingIgnoresIncompleteFoldersAndPruneKeepsThePolicy) {
  test::TempDir run("hyd_ckpt_keep_");
  for (int64_t step : {10, 20, 30, 40, 50, 60}) write_sample(run.str(), step);
  fs::create_directories(run.file("step-00000070.tmp"));  // an interrupted write
  fs::create_directories(run.file("step-00000080"));      // a folder without a manifest
  fs::create_directories(run.file("notes"));
  auto steps = [&] {
    std::vector<int64_t> out;
    for (const auto& [s, p] : list_checkpoints(run.str())) out.push_back(s);
    return out;
  };
  EXPECT_EQ(steps(), (std::vector<int64_t>{10, 20, 30, 40, 50, 60}));
  // keep the 2 newest plus multiples of 20.
  const std::vector<std::string> removed = prune_checkpoints(run.str(), 2, 20);
  EXPECT_EQ(removed.size(), 2u);
  EXPECT_EQ(steps(), (std::vector<int64_t>{20, 40, 50, 60}));
  prune_checkpoints(run.str(), 1, 0);
  EXPECT_EQ(steps(), (std::vector<int64_t>{60}));
  EXPECT_THROW(prune_checkpoints(run.str(), 0, 0), Error);
}

TEST(Checkpoint, ResumeNeedsTheSameComputation) {
  test::TempDir run("hyd_ckpt_cfg_");
  CheckpointManifest m = sample_manifest(5);
  m.config = {{"train.lr", "0.001"}, {"data.path", "data/d.h5"},   {"log.interval", "10"},  {"run.dir", "runs/a"},
              {"device", "cpu"},     {"checkpoint.interval", "5"}, {"train.resume", "none"}};
  m.paths = {{"data.path", "/abs/data/d.h5"}};
  const Checkpoint ck = open_checkpoint(write_checkpoint(run.str(), m, sample_tensors(), ""));
  const std::vector<std::pair<std::string, std::string>> paths = {{"data.path", "/abs/data/d.h5"}};
  auto config = [&](const std::string& lr, const std::string& data) {
    return std::vector<std::pair<std::string, std::string>>{
        {"train.lr", lr},   {"data.path", data},      {"log.interval", "1"},          {"run.dir", "runs/b"},
        {"device", "cuda"}, {"train.resume", "auto"}, {"checkpoint.interval", "100"}, {"eval.batches", "3"}};
  };
  EXPECT_NO_THROW(check_resume_config(ck, config("0.001", "data/d.h5"), paths, "run.ini"));
  // Another spelling of the same file (the manifest records its canonical path).
  EXPECT_NO_THROW(check_resume_config(ck, config("0.001", "../x/d.h5"), paths, "run.ini"));
  test::expect_error([&] { check_resume_config(ck, config("0.002", "data/d.h5"), paths, "run.ini"); },
                     {"run.ini", "'train.lr'", "'0.002'", "'0.001'", ck.manifest_path()});
  test::expect_error(
      [&] {
        check_resume_config(ck, config("0.001", "other.h5"), {{"data.path", "/abs/other.h5"}}, "run.ini");
      },
      {"'data.path'", "other.h5"});
  auto extra = config("0.001", "data/d.h5");
  extra.emplace_back("train.steps", "10");
  test::expect_error([&] { check_resume_config(ck, extra, paths, "run.ini"); }, {"'train.steps'", "does not record"});
  auto fewer = config("0.001", "data/d.h5");
  fewer.erase(fewer.begin());
  test::expect_error([&] { check_resume_config(ck, fewer, paths, "run.ini"); }, {"'train.lr'", "does not know"});
  EXPECT_TRUE(option_may_change_on_resume("eval.passkey_data"));
  EXPECT_FALSE(option_may_change_on_resume("distill.stage2_lr"));
}

// ---------------------------------------------------------------- training state

// A randomized tiny hybrid model and its AdamW.
struct Trainee {
  HybridModel model;
  std::unique_ptr<AdamW> optimizer;
  explicit Trainee(const HybridConfig& cfg) : model(cfg, Device::cpu(), 64) {
    test::randomize_hybrid(model);
    AdamWConfig a;
    a.weight_decay = 0.1;
    optimizer = std::make_unique<AdamW>(model.params(), Device::cpu(), a);
  }
  void steps(ExecContext& ctx, const Batch& batch, int n) {
    for (int i = 0; i < n; ++i) {
      model.zero_grad();
      model.forward_backward(ctx, batch);
      optimizer->step(ctx, 1e-2);
    }
  }
};

// CheckpointTensors assembles a range from whichever pieces hold it and names what is wrong.
TEST(TrainingState, PiecesAssembleAnyRangeAndNameWhatIsMissing) {
  test::TempDir run("hyd_pieces_");
  SafetensorsWriter w;
  w.add_f32("adam_m/w[3:6]", {3}, {3, 4, 5});  // out of order on purpose
  w.add_f32("adam_m/w[0:3]", {3}, {0, 1, 2});
  w.add_f32("adam_m/gap[0:2]", {2}, {0, 1});
  w.add_f32("adam_m/gap[3:4]", {1}, {3});
  w.add_f32("param/whole", {2, 2}, {7, 8, 9, 10});
  const Checkpoint ck = open_checkpoint(write_checkpoint(run.str(), sample_manifest(1), w, ""));
  const CheckpointTensors t(ck);
  EXPECT_TRUE(t.contains("adam_m", "w"));
  EXPECT_FALSE(t.contains("adam_v", "w"));
  EXPECT_EQ(t.read("adam_m", "w", {2, 3}, 1, 4), (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(t.read("adam_m", "w", {2, 3}, 3, 3), (std::vector<float>{3, 4, 5}));
  EXPECT_EQ(t.read("param", "whole", {2, 2}, 1, 2), (std::vector<float>{8, 9}));
  test::expect_error([&] { t.read("param", "whole", {4}, 0, 4); }, {kCheckpointRankFile, "param/whole", "shape"});
  test::expect_error([&] { t.read("adam_m", "w", {7}, 0, 7); }, {"adam_m/w", "end at element 6"});
  test::expect_error([&] { t.read("adam_m", "w", {5}, 0, 5); }, {"adam_m/w[3:6]", "reaches element 6"});
  test::expect_error([&] { t.read("adam_m", "gap", {4}, 1, 3); }, {"adam_m/gap", "elements 2..4"});
  test::expect_error([&] { t.read("adam_v", "w", {6}, 0, 6); }, {kCheckpointRankFile, "adam_v/w", "missing"});

  SafetensorsWriter bad;
  bad.add_f32("adam_m/w[4:2]", {2}, {0, 1});
  const Checkpoint ck_bad = open_checkpoint(write_checkpoint(run.str(), sample_manifest(2), bad, ""));
  test::expect_error([&] { CheckpointTensors{ck_bad}; }, {"adam_m/w[4:2]", "[a:b]"});
  SafetensorsWriter wrong;
  wrong.add_f32("adam_m/w[0:3]", {2}, {0, 1});
  const Checkpoint ck_wrong = open_checkpoint(write_checkpoint(run.str(), sample_manifest(3), wrong, ""));
  test::expect_error([&] { CheckpointTensors{ck_wrong}; }, {"adam_m/w[0:3]", "holds 2 values"});
}

TEST(TrainingState, RestoredRunContinuesBitForBit) {
  const HybridConfig cfg = test::tiny_hybrid_config("KA", 2);
  test::rng().seed(7);
  const test::PackedBatch batch = test::pack_documents(test::random_documents({20, 12}, cfg.model.vocab_size));
  ExecContext ctx(Device::cpu());

  test::rng().seed(11);
  Trainee straight(cfg);
  straight.steps(ctx, batch.batch, 6);

  test::rng().seed(11);
  Trainee first(cfg);
  first.steps(ctx, batch.batch, 3);
  test::TempDir run("hyd_state_");
  CheckpointManifest m = sample_manifest(3);
  m.optimizer = optimizer_counters(*first.optimizer);
  SafetensorsWriter w;
  add_parameters(w, first.model.params());
  add_optimizer_state(w, *first.optimizer);
  const Checkpoint ck = open_checkpoint(write_checkpoint(run.str(), m, w, ""));
  EXPECT_TRUE(ck.tensors.contains("param/layers.0.A_log"));
  EXPECT_TRUE(ck.tensors.contains("adam_v/lm_head"));
  EXPECT_FALSE(ck.tensors.contains("master/lm_head")) << "the CPU's masters are its parameters";

  test::rng().seed(99);  // a different initialisation, overwritten by the checkpoint
  Trainee resumed(cfg);
  restore_parameters(ck, resumed.model.params());
  restore_optimizer_state(ck.tensors, ck.manifest.optimizer, ck.manifest_path(), *resumed.optimizer);
  EXPECT_EQ(resumed.optimizer->steps_taken(), 3);
  resumed.steps(ctx, batch.batch, 3);

  for (const ParamInfo& p : straight.model.params()) {
    EXPECT_EQ(straight.model.get_param(p.name), resumed.model.get_param(p.name)) << p.name;
  }
  for (size_t i = 0; i < straight.optimizer->params().size(); ++i) {
    EXPECT_EQ(test::DeviceBuffers::download(straight.optimizer->second_moments()[i]),
              test::DeviceBuffers::download(resumed.optimizer->second_moments()[i]));
  }

  // A model whose parameters do not match names the file and the tensor.
  Trainee other(test::tiny_hybrid_config("AA", 2));
  test::expect_error([&] { restore_parameters(ck, other.model.params()); },
                     {kCheckpointRankFile, "param/layers.0.wqkv", "missing"});
  json counters = ck.manifest.optimizer;
  counters["params"] = 1;
  test::expect_error([&] { restore_optimizer_state(ck.tensors, counters, ck.manifest_path(), *resumed.optimizer); },
                     {kCheckpointManifest, "'optimizer.params'"});
}

}  // namespace
}  // namespace hyd

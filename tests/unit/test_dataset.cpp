// TokenDataset validation and PackedSampler semantics (data/dataset.h).
//
// Every file is written here with the HDF5 C API into a per-process temp dir. The sampler tests use
// datasets whose token value equals its index in the file, so every batch can be mapped back to the
// exact file positions it covers.
#if __has_include(<hdf5.h>)
#include <hdf5.h>
#else
#include <hdf5/serial/hdf5.h>  // Debian/Ubuntu serial HDF5 (not on the default include path)
#endif
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "tests/common/test_util.h"
#include "trainer/core/error.h"

namespace hyd {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------- writing test files

struct H5Id {
  hid_t id;
  herr_t (*close)(hid_t);
  H5Id(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {
    EXPECT_GE(i, 0) << "HDF5 call failed while writing a test file";
  }
  ~H5Id() {
    if (id >= 0) close(id);
  }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
};

// What to write; the flags produce the malformed variants.
struct FileSpec {
  std::vector<int32_t> tokens;
  std::vector<int64_t> offsets;
  std::vector<uint8_t> mask;  // written when non-empty
  int64_t vocab_size = 100;
  int64_t eos_id = 0;
  std::string sha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
  bool write_tokens = true, write_offsets = true, write_vocab = true, write_eos = true, write_sha = true;
  bool tokens_as_float = false;   // float32 /tokens
  bool tokens_2d = false;         // /tokens of shape [N/2, 2]
  bool offsets_as_int32 = false;  // int32 /doc_offsets
  bool fixed_length_sha = false;  // fixed-size string instead of h5py's variable-length one
  bool sha_as_int = false;        // tokenizer_sha256 stored as an integer
};

template <class T>
void write_dataset(hid_t file, const char* name, hid_t file_type, hid_t mem_type, const std::vector<T>& v,
                   bool two_d = false) {
  hsize_t dims[2] = {v.size(), 1};
  if (two_d) dims[0] = v.size() / 2, dims[1] = 2;
  H5Id space(H5Screate_simple(two_d ? 2 : 1, dims, nullptr), H5Sclose);
  H5Id ds(H5Dcreate2(file, name, file_type, space.id, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  if (!v.empty()) { EXPECT_GE(H5Dwrite(ds.id, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), 0); }
}

void write_int_attr(hid_t file, const char* name, int64_t v) {
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id a(H5Acreate2(file, name, H5T_STD_I64LE, space.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  EXPECT_GE(H5Awrite(a.id, H5T_NATIVE_INT64, &v), 0);
}

void write_string_attr(hid_t file, const char* name, const std::string& s, bool fixed) {
  H5Id type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_cset(type.id, H5T_CSET_UTF8);
  H5Tset_size(type.id, fixed ? s.size() : H5T_VARIABLE);
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id a(H5Acreate2(file, name, type.id, space.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (fixed) {
    EXPECT_GE(H5Awrite(a.id, type.id, s.c_str()), 0);
  } else {
    const char* p = s.c_str();
    EXPECT_GE(H5Awrite(a.id, type.id, &p), 0);
  }
}

void write_file(const std::string& path, const FileSpec& s) {
  H5Id f(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
  if (s.write_tokens) {
    if (s.tokens_as_float) {
      std::vector<float> t(s.tokens.begin(), s.tokens.end());
      write_dataset(f.id, "tokens", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, t);
    } else {
      write_dataset(f.id, "tokens", H5T_STD_I32LE, H5T_NATIVE_INT32, s.tokens, s.tokens_2d);
    }
  }
  if (s.write_offsets) {
    if (s.offsets_as_int32) {
      std::vector<int32_t> o(s.offsets.begin(), s.offsets.end());
      write_dataset(f.id, "doc_offsets", H5T_STD_I32LE, H5T_NATIVE_INT32, o);
    } else {
      write_dataset(f.id, "doc_offsets", H5T_STD_I64LE, H5T_NATIVE_INT64, s.offsets);
    }
  }
  if (!s.mask.empty()) write_dataset(f.id, "loss_mask", H5T_STD_U8LE, H5T_NATIVE_UINT8, s.mask);
  if (s.write_vocab) write_int_attr(f.id, "vocab_size", s.vocab_size);
  if (s.write_eos) write_int_attr(f.id, "eos_id", s.eos_id);
  if (s.write_sha) {
    if (s.sha_as_int) {
      write_int_attr(f.id, "tokenizer_sha256", 42);
    } else {
      write_string_attr(f.id, "tokenizer_sha256", s.sha, s.fixed_length_sha);
    }
  }
}

class DatasetTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() /
           ("hyd_test_dataset_" + std::to_string(getpid()) + "_" + std::to_string(test::rng()() % 1000000));
    fs::create_directories(dir_);
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  static std::string file(const std::string& name) { return (dir_ / name).string(); }
  static std::string write(const std::string& name, const FileSpec& s) {
    const std::string p = file(name);
    write_file(p, s);
    return p;
  }
  static fs::path dir_;
};
fs::path DatasetTest::dir_;

// Three documents: [1 2 0] [0] [5 5 5 0], vocab 10, eos 0.
FileSpec small_spec() {
  FileSpec s;
  s.tokens = {1, 2, 0, 0, 5, 5, 5, 0};
  s.offsets = {0, 3, 4, 8};
  s.vocab_size = 10;
  s.eos_id = 0;
  return s;
}

// Opening `path` must throw a hyd::Error naming the file and `item` (and `detail` when given).
void expect_open_error(const std::string& path, const std::string& item, const std::string& detail = "") {
  SCOPED_TRACE("expected an error naming '" + item + "' for " + path);
  std::vector<std::string> needles = {path, item};
  if (!detail.empty()) needles.push_back(detail);
  test::expect_error([&] { TokenDataset d(path); }, needles);
}

// ---------------------------------------------------------------- TokenDataset

TEST_F(DatasetTest, ValidFileOpensWithSummary) {
  const std::string p = write("small.h5", small_spec());
  TokenDataset d(p);
  const DatasetInfo& i = d.info();
  EXPECT_EQ(i.path, p);
  EXPECT_EQ(i.num_tokens, 8);
  EXPECT_EQ(i.num_docs, 3);
  EXPECT_EQ(i.vocab_size, 10);
  EXPECT_EQ(i.eos_id, 0);
  EXPECT_EQ(i.tokenizer_sha256, small_spec().sha);
  EXPECT_FALSE(i.has_loss_mask);
  EXPECT_TRUE(d.loss_mask().empty());
  EXPECT_EQ(d.tokens(), small_spec().tokens);
  EXPECT_EQ(d.doc_offsets(), small_spec().offsets);

  // counts: 0 x3, 1 x1, 2 x1, 5 x3 of 8.
  const double h = -(2 * 0.375 * std::log(0.375) + 2 * 0.125 * std::log(0.125));
  EXPECT_NEAR(d.unigram_entropy(), h, 1e-12);

  const std::string s = d.summary();
  for (const std::string& want :
       {p, std::string("mean length 2.7"), std::string("max 4"), std::string("loss mask        no"),
        small_spec().sha, std::string("vocab size       10"), std::string("eos id           0")}) {
    EXPECT_NE(s.find(want), std::string::npos) << "summary lacks '" << want << "':\n" << s;
  }
  char ent[128];
  std::snprintf(ent, sizeof(ent), "%.4f nats/token (%.4f bits/token)", h, h / std::log(2.0));
  EXPECT_NE(s.find(ent), std::string::npos) << s;
  EXPECT_NE(s.find("tokens           8\n"), std::string::npos) << s;
  EXPECT_NE(s.find("documents        3 "), std::string::npos) << s;
}

TEST_F(DatasetTest, FixedLengthShaAndLossMaskAreRead) {
  FileSpec s = small_spec();
  s.fixed_length_sha = true;
  s.mask = {1, 1, 0, 1, 0, 1, 1, 1};
  TokenDataset d(write("fixed_sha_mask.h5", s));
  EXPECT_EQ(d.info().tokenizer_sha256, s.sha);
  EXPECT_TRUE(d.info().has_loss_mask);
  EXPECT_EQ(d.loss_mask(), s.mask);
  EXPECT_NE(d.summary().find("loss mask        yes"), std::string::npos);
}

TEST_F(DatasetTest, MalformedFilesNameFileAndItem) {
  struct Variant {
    std::string name, item, detail;
    void (*mutate)(FileSpec&);
  };
  const std::vector<Variant> variants = {
      {"no_tokens", "/tokens", "missing", [](FileSpec& s) { s.write_tokens = false; }},
      {"no_offsets", "/doc_offsets", "missing", [](FileSpec& s) { s.write_offsets = false; }},
      {"float_tokens", "/tokens", "int32", [](FileSpec& s) { s.tokens_as_float = true; }},
      {"rank2_tokens", "/tokens", "rank", [](FileSpec& s) { s.tokens_2d = true; }},
      {"int32_offsets", "/doc_offsets", "int64", [](FileSpec& s) { s.offsets_as_int32 = true; }},
      {"offsets_not_0", "/doc_offsets", "start at 0", [](FileSpec& s) { s.offsets = {1, 3, 4, 8}; }},
      {"offsets_not_N", "/doc_offsets", "end at", [](FileSpec& s) { s.offsets = {0, 3, 4, 7}; }},
      {"offsets_decreasing", "/doc_offsets", "decreasing", [](FileSpec& s) { s.offsets = {0, 5, 4, 8}; }},
      {"offsets_single", "/doc_offsets", "at least 2", [](FileSpec& s) { s.offsets = {0}; }},
      {"token_ge_vocab", "/tokens", "index 5", [](FileSpec& s) { s.tokens[5] = 10; }},
      {"token_negative", "/tokens", "index 1", [](FileSpec& s) { s.tokens[1] = -3; }},
      {"no_vocab", "vocab_size", "missing", [](FileSpec& s) { s.write_vocab = false; }},
      {"no_eos", "eos_id", "missing", [](FileSpec& s) { s.write_eos = false; }},
      {"no_sha", "tokenizer_sha256", "missing", [](FileSpec& s) { s.write_sha = false; }},
      {"int_sha", "tokenizer_sha256", "string", [](FileSpec& s) { s.sha_as_int = true; }},
      {"eos_ge_vocab", "eos_id", "", [](FileSpec& s) { s.eos_id = 10; }},
      {"vocab_zero", "vocab_size", "", [](FileSpec& s) { s.vocab_size = 0; }},
      {"mask_short", "/loss_mask", "length", [](FileSpec& s) { s.mask = {1, 1, 1}; }},
      {"mask_not_01", "/loss_mask", "index 2", [](FileSpec& s) { s.mask = {1, 1, 7, 1, 1, 1, 1, 1}; }},
  };
  for (const Variant& v : variants) {
    FileSpec s = small_spec();
    v.mutate(s);
    expect_open_error(write(v.name + ".h5", s), v.item, v.detail);
  }
}

TEST_F(DatasetTest, MissingAndNonHdf5FilesNameThePath) {
  const std::string missing = file("does_not_exist.h5");
  expect_open_error(missing, missing, "does not exist");
  const std::string text = file("not_hdf5.h5");
  std::ofstream(text) << "this is not an HDF5 file\n";
  expect_open_error(text, text, "not an HDF5 file");
  expect_open_error(dir_.string(), dir_.string(), "directory");
}

TEST_F(DatasetTest, EmptyDocumentsAreAllowedAndSkippedBySampler) {
  FileSpec s;
  s.tokens = {3, 4, 5, 6};
  s.offsets = {0, 0, 2, 2, 4, 4};
  s.vocab_size = 7;
  TokenDataset d(write("empty_docs.h5", s));
  EXPECT_EQ(d.info().num_docs, 5);
  PackedSampler sp(d, Split::train, 0.0, 2, 1, 1);
  EXPECT_EQ(sp.num_docs(), 2);
  EXPECT_EQ(sp.tokens_per_epoch(), 4);
  for (int64_t step = 0; step < 4; ++step) {
    HostBatch b = sp.batch(step);
    ASSERT_EQ(b.cu_seqlens, (std::vector<int32_t>{0, 2}));
    EXPECT_EQ(b.tokens[1], b.tokens[0] + 1);
    EXPECT_EQ(b.targets, (std::vector<int32_t>{b.tokens[1], -1}));
  }
}

// ---------------------------------------------------------------- PackedSampler

// A dataset whose token at file index i is i (vocab = N), with random document lengths mixing
// length-1 documents, short ones and ones longer than `seq_len`; the total is a multiple of seq_len
// when `round_to` > 0. Optionally a random loss mask.
FileSpec identity_spec(int num_docs, int64_t seq_len, bool round_to_seq, bool with_mask) {
  FileSpec s;
  auto& r = test::rng();
  s.offsets = {0};
  for (int d = 0; d < num_docs; ++d) {
    int64_t len;
    switch (r() % 4) {
      case 0: len = 1; break;
      case 1: len = 2 + static_cast<int64_t>(r() % 8); break;
      case 2: len = seq_len + 1 + static_cast<int64_t>(r() % (3 * seq_len)); break;  // longer than T
      default: len = 1 + static_cast<int64_t>(r() % seq_len); break;
    }
    s.offsets.push_back(s.offsets.back() + len);
  }
  if (round_to_seq) {
    const int64_t pad = (seq_len - s.offsets.back() % seq_len) % seq_len;
    s.offsets.push_back(s.offsets.back() + pad + seq_len);  // one more document, making N % T == 0
  }
  const int64_t n = s.offsets.back();
  s.tokens.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) s.tokens[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  s.vocab_size = n;
  s.eos_id = 0;
  if (with_mask) {
    s.mask.resize(static_cast<size_t>(n));
    for (auto& m : s.mask) m = static_cast<uint8_t>(r() % 3 != 0);
  }
  return s;
}

// Document of file index i.
int64_t doc_of(const std::vector<int64_t>& off, int64_t i) {
  return static_cast<int64_t>(std::upper_bound(off.begin(), off.end(), i) - off.begin()) - 1;
}

// Checks every structural invariant of a batch from an identity dataset.
void check_batch(const TokenDataset& d, const HostBatch& b, int64_t B, int64_t T) {
  const auto& off = d.doc_offsets();
  const auto& mask = d.loss_mask();
  const auto N = static_cast<size_t>(B * T);
  ASSERT_EQ(b.tokens.size(), N);
  ASSERT_EQ(b.targets.size(), N);
  ASSERT_EQ(b.positions.size(), N);
  ASSERT_GE(b.cu_seqlens.size(), 2u);
  ASSERT_EQ(b.num_docs, static_cast<int64_t>(b.cu_seqlens.size()) - 1);
  EXPECT_EQ(b.cu_seqlens.front(), 0);
  EXPECT_EQ(b.cu_seqlens.back(), static_cast<int32_t>(N));
  std::set<int32_t> bounds(b.cu_seqlens.begin(), b.cu_seqlens.end());
  for (int64_t s = 0; s <= B; ++s) EXPECT_TRUE(bounds.count(static_cast<int32_t>(s * T))) << "sequence boundary " << s;
  int64_t targets = 0;
  for (int64_t p = 0; p < b.num_docs; ++p) {
    const int32_t lo = b.cu_seqlens[static_cast<size_t>(p)], hi = b.cu_seqlens[static_cast<size_t>(p) + 1];
    ASSERT_LT(lo, hi) << "empty piece " << p;
    ASSERT_EQ(lo / T, (hi - 1) / T) << "piece " << p << " crosses a sequence boundary";
    const int64_t first = b.tokens[static_cast<size_t>(lo)];
    const int64_t doc = doc_of(off, first);
    const int64_t last = b.tokens[static_cast<size_t>(hi) - 1];
    ASSERT_EQ(doc_of(off, last), doc) << "piece " << p << " spans two documents";
    // Cut only at sequence boundaries: a piece starts at its document's start unless it starts a
    // sequence, and ends at its document's end unless it ends a sequence.
    if (lo % T != 0) { EXPECT_EQ(first, off[static_cast<size_t>(doc)]) << "piece " << p; }
    if (hi % T != 0) { EXPECT_EQ(last + 1, off[static_cast<size_t>(doc) + 1]) << "piece " << p; }
    for (int32_t k = lo; k < hi; ++k) {
      const auto ku = static_cast<size_t>(k);
      ASSERT_EQ(b.tokens[ku], first + (k - lo)) << "piece " << p << " is not a contiguous run of its document";
      EXPECT_EQ(b.positions[ku], k - lo);
      int32_t want = -1;
      if (k + 1 < hi && (mask.empty() || mask[static_cast<size_t>(b.tokens[ku]) + 1])) want = b.tokens[ku + 1];
      EXPECT_EQ(b.targets[ku], want) << "target at " << k;
      targets += b.targets[ku] >= 0;
    }
  }
  EXPECT_EQ(b.num_targets, targets);
}

TEST_F(DatasetTest, SamplerIsDeterministicAndPure) {
  const int64_t T = 16, B = 3;
  TokenDataset d(write("det.h5", identity_spec(200, T, false, false)));
  PackedSampler a(d, Split::train, 0.1, T, B, 1234);
  PackedSampler b(d, Split::train, 0.1, T, B, 1234);
  PackedSampler other_seed(d, Split::train, 0.1, T, B, 1235);
  const HostBatch a7 = a.batch(7);
  a.batch(123);  // touch another epoch in between: the result must not depend on history
  for (int64_t step : {7, 0, 500, 7}) {
    const HostBatch x = a.batch(step), y = b.batch(step);
    EXPECT_EQ(x.tokens, y.tokens) << step;
    EXPECT_EQ(x.targets, y.targets) << step;
    EXPECT_EQ(x.positions, y.positions) << step;
    EXPECT_EQ(x.cu_seqlens, y.cu_seqlens) << step;
    EXPECT_EQ(x.num_targets, y.num_targets) << step;
  }
  EXPECT_EQ(a.batch(7).tokens, a7.tokens);
  EXPECT_NE(other_seed.batch(7).tokens, a7.tokens);
  EXPECT_NE(a.batch(8).tokens, a7.tokens);
}

TEST_F(DatasetTest, DataParallelRanksGetDisjointInterleavedSequences) {
  const int64_t T = 16, B = 2;
  const int dp = 4;
  TokenDataset d(write("dp.h5", identity_spec(300, T, false, false)));
  PackedSampler single(d, Split::train, 0.0, T, B, 99);
  for (int64_t step : {0, 1, 5}) {
    std::set<int32_t> seen;
    for (int r = 0; r < dp; ++r) {
      PackedSampler ranked(d, Split::train, 0.0, T, B, 99, r, dp);
      const HostBatch x = ranked.batch(step);
      check_batch(d, x, B, T);
      // rank r at step s holds global sequences (s*dp + r)*B + b: the single-rank step s*dp + r.
      EXPECT_EQ(x.tokens, single.batch(step * dp + r).tokens) << "rank " << r << " step " << step;
      for (int32_t t : x.tokens) EXPECT_TRUE(seen.insert(t).second) << "token " << t << " on two ranks";
    }
  }
}

TEST_F(DatasetTest, BatchInvariantsOnRandomDocuments) {
  for (int64_t T : {1, 7, 16}) {
    for (bool with_mask : {false, true}) {
      const int64_t B = 3;
      TokenDataset d(write("inv.h5", identity_spec(150, T, false, with_mask)));
      PackedSampler sp(d, Split::train, 0.2, T, B, 7);
      const int64_t seqs = sp.tokens_per_epoch() / T;
      // Steps at the start, across the first epoch boundary (B does not divide seqs in general) and
      // far out.
      for (int64_t step : {int64_t(0), int64_t(1), seqs / B, seqs / B + 1, 3 * seqs}) {
        SCOPED_TRACE("T=" + std::to_string(T) + " mask=" + std::to_string(with_mask) + " step=" + std::to_string(step));
        check_batch(d, sp.batch(step), B, T);
      }
    }
  }
}

TEST_F(DatasetTest, LengthOneDocumentsHaveNoTargets) {
  FileSpec s;
  s.tokens = {0, 1, 2, 3, 4, 5};
  s.offsets = {0, 1, 2, 3, 4, 5, 6};
  s.vocab_size = 6;
  TokenDataset d(write("ones.h5", s));
  PackedSampler sp(d, Split::train, 0.0, 3, 2, 5);
  const HostBatch b = sp.batch(0);
  EXPECT_EQ(b.cu_seqlens, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(b.targets, (std::vector<int32_t>(6, -1)));
  EXPECT_EQ(b.positions, (std::vector<int32_t>(6, 0)));
  EXPECT_EQ(b.num_targets, 0);
  std::set<int32_t> tokens(b.tokens.begin(), b.tokens.end());
  EXPECT_EQ(tokens.size(), 6u);  // one epoch = one batch: every document once
}

TEST_F(DatasetTest, LossMaskZeroOnTargetGivesMinusOne) {
  FileSpec s;
  s.tokens = {0, 1, 2, 3, 4, 5, 6, 7};
  s.offsets = {0, 8};
  s.mask = {1, 1, 0, 1, 0, 0, 1, 1};
  s.vocab_size = 8;
  TokenDataset d(write("mask.h5", s));
  PackedSampler sp(d, Split::train, 0.0, 8, 1, 3);
  const HostBatch b = sp.batch(0);
  EXPECT_EQ(b.tokens, s.tokens);
  EXPECT_EQ(b.targets, (std::vector<int32_t>{1, -1, 3, -1, -1, 6, 7, -1}));
  EXPECT_EQ(b.num_targets, 4);
}

TEST_F(DatasetTest, TrainAndValidationDocumentsAreDisjoint) {
  const int64_t T = 8;
  FileSpec s = identity_spec(400, T, false, false);
  TokenDataset d(write("split.h5", s));
  PackedSampler train(d, Split::train, 0.25, T, 4, 11);
  PackedSampler val(d, Split::validation, 0.25, T, 4, 11);
  EXPECT_EQ(train.num_docs() + val.num_docs(), 400);
  EXPECT_EQ(train.tokens_per_epoch() + val.tokens_per_epoch(), d.info().num_tokens);
  EXPECT_GT(val.num_docs(), 400 / 10);  // ~100 expected; a broken hash would give 0 or all
  EXPECT_LT(val.num_docs(), 400 / 2);
  auto docs_of = [&](const PackedSampler& sp) {
    std::set<int64_t> docs;
    const int64_t steps = (sp.tokens_per_epoch() / T + 3) / 4;
    for (int64_t step = 0; step < steps; ++step) {
      for (int32_t t : sp.batch(step).tokens) docs.insert(doc_of(d.doc_offsets(), t));
    }
    return docs;
  };
  const std::set<int64_t> a = docs_of(train), v = docs_of(val);
  for (int64_t doc : v) EXPECT_FALSE(a.count(doc)) << "document " << doc << " in both splits";
  // Every train document is seen except those wholly inside the dropped tail (< T tokens).
  EXPECT_GE(static_cast<int64_t>(a.size()), train.num_docs() - T);
  // Same seed, different sampler instance: same split.
  PackedSampler val2(d, Split::validation, 0.25, T, 4, 11);
  EXPECT_EQ(val2.num_docs(), val.num_docs());
}

TEST_F(DatasetTest, EpochCoversEveryTokenExactlyOnce) {
  const int64_t T = 16;
  FileSpec s = identity_spec(120, T, true, false);
  TokenDataset d(write("cover.h5", s));
  const int64_t n = d.info().num_tokens;
  ASSERT_EQ(n % T, 0);
  PackedSampler sp(d, Split::train, 0.0, T, 1, 77);
  ASSERT_EQ(sp.tokens_per_epoch(), n);
  const int64_t seqs = n / T;
  std::vector<int32_t> first_order, second_order;
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::vector<int> count(static_cast<size_t>(n), 0);
    for (int64_t step = epoch * seqs; step < (epoch + 1) * seqs; ++step) {
      const HostBatch b = sp.batch(step);
      check_batch(d, b, 1, T);
      for (int32_t t : b.tokens) ++count[static_cast<size_t>(t)];
      auto& order = epoch == 0 ? first_order : second_order;
      order.insert(order.end(), b.tokens.begin(), b.tokens.end());
    }
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(count[static_cast<size_t>(i)], 1) << "token " << i << " epoch " << epoch;
  }
  EXPECT_NE(first_order, second_order) << "epochs must be shuffled differently";
  std::vector<int32_t> identity(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) identity[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  EXPECT_NE(first_order, identity) << "documents must be shuffled";

  // Same check with batches of 4 sequences on 2 ranks: the epoch's sequences g = (step*2 + r)*4 + b
  // are spread over ranks; sequences with g >= seqs belong to the next epoch and are not counted.
  std::vector<int> count(static_cast<size_t>(n), 0);
  for (int r = 0; r < 2; ++r) {
    PackedSampler rs(d, Split::train, 0.0, T, 4, 77, r, 2);
    for (int64_t step = 0; step * 8 < seqs; ++step) {
      const HostBatch b = rs.batch(step);
      for (int64_t bi = 0; bi < 4; ++bi) {
        if ((step * 2 + r) * 4 + bi >= seqs) continue;
        for (int64_t k = bi * T; k < (bi + 1) * T; ++k) ++count[static_cast<size_t>(b.tokens[static_cast<size_t>(k)])];
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(count[static_cast<size_t>(i)], 1) << "token " << i << " (2 ranks)";
}

TEST_F(DatasetTest, PartialLastSequenceIsDroppedButNothingRepeats) {
  const int64_t T = 16;
  TokenDataset d(write("tail.h5", identity_spec(90, T, false, false)));
  PackedSampler sp(d, Split::train, 0.0, T, 1, 5);
  const int64_t n = d.info().num_tokens, seqs = n / T;
  std::vector<int> count(static_cast<size_t>(n), 0);
  for (int64_t step = 0; step < seqs; ++step)
    for (int32_t t : sp.batch(step).tokens) ++count[static_cast<size_t>(t)];
  int64_t covered = 0;
  for (int c : count) {
    ASSERT_LE(c, 1);
    covered += c;
  }
  EXPECT_EQ(covered, seqs * T);
  EXPECT_LT(n - covered, T);
}

TEST_F(DatasetTest, EmptyOrTooSmallSplitIsAClearError) {
  const std::string p = write("small_split.h5", small_spec());
  TokenDataset d(p);
  auto expect_split_error = [&](Split split, double frac, int64_t T, const std::string& what) {
    test::expect_error([&] { PackedSampler sp(d, split, frac, T, 1, 1); }, {p, what});
  };
  expect_split_error(Split::validation, 0.0, 2, "validation split");
  expect_split_error(Split::train, 1.0, 2, "train split");
  expect_split_error(Split::train, 0.0, 100, "fewer than one sequence");
  EXPECT_THROW(PackedSampler(d, Split::train, 0.0, 2, 1, 1, 2, 2), Error);  // dp_rank >= dp_size
  EXPECT_THROW(PackedSampler(d, Split::train, 0.0, 0, 1, 1), Error);        // seq_len 0
}

}  // namespace
}  // namespace hyd

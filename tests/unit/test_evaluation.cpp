// distill/evaluation.h: KV-cache sizes of known configs and passkey accuracy with fake models.
//
// The passkey datasets are written here with the HDF5 C API (the layout of data/make_passkey.py:
// one document per prompt, /loss_mask on the answer tokens, /doc_lengths_target per document).
#if __has_include(<hdf5.h>)
#include <hdf5.h>
#else
#include <hdf5/serial/hdf5.h>  // Debian/Ubuntu serial HDF5 (not on the default include path)
#endif
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "distill/evaluation.h"
#include "tests/common/test_util.h"
#include "trainer/core/error.h"

namespace hyd {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------- KV-cache bytes

ModelConfig llama8b_like() {
  ModelConfig c;
  c.vocab_size = 128256;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_layers = 32;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  return c;
}

TEST(KvCacheBytes, DenseLlamaLike) {
  const KvCacheBytes kv = kv_cache_bytes_per_token(llama8b_like());
  EXPECT_EQ(kv.per_token, 131072);  // 2 * 32 * 8 * 128 * 2 B
  EXPECT_EQ(kv.cached_layers, 32);
  EXPECT_EQ(kv.state_layers, 0);
  EXPECT_EQ(kv.state_per_sequence, 0);
  EXPECT_EQ(kv.conv_state_per_sequence, 0);
  EXPECT_EQ(kv.bytes_for(8192, 2), 2LL * 8192 * 131072);
  EXPECT_EQ(kv_cache_bytes_per_token(llama8b_like(), 4).per_token, 262144);  // fp32 cache

  ModelConfig unresolved = llama8b_like();
  unresolved.head_dim = 0;  // hidden / heads = 128
  EXPECT_EQ(kv_cache_bytes_per_token(unresolved).per_token, 131072);

  ModelConfig bad = llama8b_like();
  bad.num_kv_heads = 0;
  EXPECT_THROW(kv_cache_bytes_per_token(bad), Error);
  EXPECT_THROW(kv_cache_bytes_per_token(llama8b_like(), 0), Error);
}

HybridConfig hybrid_llama_like(const std::string& pattern) {
  HybridConfig h;
  h.model = llama8b_like();
  h.pattern = pattern;
  h.kda.hidden = 4096;
  h.kda.heads = 32;
  h.kda.v_heads = 32;
  h.kda.dk = 128;
  h.kda.dv = 128;
  h.kda.conv_size = 4;
  return h;
}

TEST(KvCacheBytes, HybridKKKA) {
  const KvCacheBytes kv = kv_cache_bytes_per_token(hybrid_llama_like("KKKA"));
  EXPECT_EQ(kv.cached_layers, 8);
  EXPECT_EQ(kv.state_layers, 24);
  EXPECT_EQ(kv.per_token, 131072 / 4);
  EXPECT_EQ(kv.state_per_sequence, 24LL * 32 * 128 * 128 * 4);  // 24 layers of fp32 [HV, dk, dv]
  EXPECT_EQ(kv.conv_state_per_sequence, 24LL * 3 * (3 * 32 * 128) * 2);
  EXPECT_EQ(kv.bytes_for(1000), 1000LL * 32768 + kv.state_per_sequence + kv.conv_state_per_sequence);

  // A finalized config's explicit layer list wins over the pattern string.
  HybridConfig explicit_layers = hybrid_llama_like("KKKA");
  explicit_layers.layers.assign(32, MixerKind::teacher_attention);
  explicit_layers.layers[0] = MixerKind::kda;
  const KvCacheBytes e = kv_cache_bytes_per_token(explicit_layers);
  EXPECT_EQ(e.cached_layers, 31);
  EXPECT_EQ(e.state_layers, 1);
  EXPECT_EQ(e.per_token, 31LL * 4096);
  EXPECT_EQ(e.state_per_sequence, 32LL * 128 * 128 * 4);
}

TEST(KvCacheBytes, HybridAllAttentionEqualsDenseAndAllKdaHasNoCache) {
  EXPECT_EQ(kv_cache_bytes_per_token(hybrid_llama_like("T")).per_token, 131072);
  EXPECT_EQ(kv_cache_bytes_per_token(hybrid_llama_like("A")).per_token, 131072);
  const KvCacheBytes k = kv_cache_bytes_per_token(hybrid_llama_like("K"));
  EXPECT_EQ(k.per_token, 0);
  EXPECT_EQ(k.cached_layers, 0);
  EXPECT_EQ(k.state_layers, 32);
  EXPECT_EQ(k.bytes_for(1), k.bytes_for(100000));  // constant in the context length
  EXPECT_THROW(kv_cache_bytes_per_token(hybrid_llama_like("KXA")), Error);
}

// ---------------------------------------------------------------- passkey datasets

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

template <class T>
void write_vector(hid_t file, const char* name, hid_t file_type, hid_t mem_type, const std::vector<T>& v) {
  hsize_t dims[1] = {v.size()};
  H5Id space(H5Screate_simple(1, dims, nullptr), H5Sclose);
  H5Id ds(H5Dcreate2(file, name, file_type, space.id, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  if (!v.empty()) {
    EXPECT_GE(H5Dwrite(ds.id, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), 0);
  }
}

void write_int_attr(hid_t file, const char* name, int64_t v) {
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id a(H5Acreate2(file, name, H5T_STD_I64LE, space.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  EXPECT_GE(H5Awrite(a.id, H5T_NATIVE_INT64, &v), 0);
}

void write_string_attr(hid_t file, const char* name, const std::string& s) {
  H5Id type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.id, s.size());
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id a(H5Acreate2(file, name, type.id, space.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  EXPECT_GE(H5Awrite(a.id, type.id, s.c_str()), 0);
}

constexpr int64_t kVocab = 50;
constexpr int32_t kEos = 0;

// One synthetic prompt: filler tokens in [10, 50), the answer (tokens in [1, 10)) at the end, EOS.
struct Prompt {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> mask;
  int64_t nominal = 0;
};

Prompt make_prompt(int64_t nominal, int64_t answer_len) {
  Prompt p;
  p.nominal = nominal;
  const int64_t filler = nominal - answer_len - 1;
  p.tokens = test::randint(static_cast<size_t>(filler), 10, kVocab);
  p.mask.assign(p.tokens.size(), 0);
  for (int32_t t : test::randint(static_cast<size_t>(answer_len), 1, 10)) {
    p.tokens.push_back(t);
    p.mask.push_back(1);
  }
  p.tokens.push_back(kEos);
  p.mask.push_back(0);
  return p;
}

class PasskeyFile {
 public:
  PasskeyFile(const std::vector<Prompt>& prompts, bool write_mask = true, bool write_nominal = true) {
    static int counter = 0;
    dir_ = fs::temp_directory_path() / ("hyd_test_evaluation_" + std::to_string(getpid()));
    fs::create_directories(dir_);
    path_ = (dir_ / ("passkey_" + std::to_string(counter++) + ".h5")).string();
    std::vector<int32_t> tokens;
    std::vector<uint8_t> mask;
    std::vector<int64_t> offsets{0}, nominal;
    for (const Prompt& p : prompts) {
      tokens.insert(tokens.end(), p.tokens.begin(), p.tokens.end());
      mask.insert(mask.end(), p.mask.begin(), p.mask.end());
      offsets.push_back(static_cast<int64_t>(tokens.size()));
      nominal.push_back(p.nominal);
    }
    H5Id file(H5Fcreate(path_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
    write_vector(file.id, "tokens", H5T_STD_I32LE, H5T_NATIVE_INT32, tokens);
    write_vector(file.id, "doc_offsets", H5T_STD_I64LE, H5T_NATIVE_INT64, offsets);
    if (write_mask) write_vector(file.id, "loss_mask", H5T_STD_U8LE, H5T_NATIVE_UINT8, mask);
    if (write_nominal) write_vector(file.id, "doc_lengths_target", H5T_STD_I64LE, H5T_NATIVE_INT64, nominal);
    write_int_attr(file.id, "vocab_size", kVocab);
    write_int_attr(file.id, "eos_id", kEos);
    write_string_attr(file.id, "tokenizer_sha256", std::string(64, 'a'));
  }
  ~PasskeyFile() {
    std::error_code ec;
    fs::remove(path_, ec);
    fs::remove(dir_, ec);  // only once the last file is gone
  }
  const std::string& path() const { return path_; }

 private:
  fs::path dir_;
  std::string path_;
};

// Logits [len, V] whose argmax at row i is `predict(i)` (the token predicted for position i + 1),
// with random values elsewhere below the maximum.
std::vector<float> logits_predicting(const std::vector<int32_t>& doc, const std::function<int32_t(size_t)>& predict) {
  const size_t V = kVocab;
  std::vector<float> out = test::randn(doc.size() * V, 0.5f);
  for (size_t i = 0; i < doc.size(); ++i) out[i * V + static_cast<size_t>(predict(i))] = 10.0f;
  return out;
}

// Prompts of nominal lengths {32, 64, 128}, 5 each, answers of 1 to 3 tokens.
std::vector<Prompt> mixed_prompts() {
  std::vector<Prompt> prompts;
  for (int64_t length : {128, 32, 64}) {
    for (int i = 0; i < 5; ++i) prompts.push_back(make_prompt(length, 1 + i % 3));
  }
  return prompts;
}

// The answer at every position (a perfect teacher-forced model).
std::vector<float> oracle(const std::vector<int32_t>& doc) {
  return logits_predicting(doc, [&](size_t i) { return i + 1 < doc.size() ? doc[i + 1] : kEos; });
}

TEST(PasskeyAccuracy, AlwaysRightIsFullAccuracyGroupedBySortedLength) {
  PasskeyFile file(mixed_prompts());
  TokenDataset data(file.path());
  int calls = 0;
  const auto results = passkey_accuracy(
      [&](const std::vector<int32_t>& doc) {
        ++calls;
        return oracle(doc);
      },
      data);
  EXPECT_EQ(calls, 15);
  ASSERT_EQ(results.size(), 3u);
  const int64_t lengths[3] = {32, 64, 128};
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(results[i].length, lengths[i]);
    EXPECT_EQ(results[i].total, 5);
    EXPECT_EQ(results[i].correct, 5);
    EXPECT_DOUBLE_EQ(results[i].accuracy(), 1.0);
  }
}

TEST(PasskeyAccuracy, NeverRightIsZero) {
  PasskeyFile file(mixed_prompts());
  TokenDataset data(file.path());
  // Predicts a filler token everywhere: never an answer token (answers are in [1, 10)).
  const auto results = passkey_accuracy(
      [&](const std::vector<int32_t>& doc) { return logits_predicting(doc, [](size_t) { return 42; }); }, data);
  ASSERT_EQ(results.size(), 3u);
  for (const auto& r : results) {
    EXPECT_EQ(r.total, 5);
    EXPECT_EQ(r.correct, 0);
    EXPECT_DOUBLE_EQ(r.accuracy(), 0.0);
  }
}

TEST(PasskeyAccuracy, RightOnlyForShortPrompts) {
  PasskeyFile file(mixed_prompts());
  TokenDataset data(file.path());
  const auto results = passkey_accuracy(
      [&](const std::vector<int32_t>& doc) {
        if (doc.size() <= 64) return oracle(doc);
        return logits_predicting(doc, [](size_t) { return 42; });
      },
      data);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results[0].length, 32);
  EXPECT_EQ(results[0].correct, 5);
  EXPECT_EQ(results[1].length, 64);
  EXPECT_EQ(results[1].correct, 5);
  EXPECT_EQ(results[2].length, 128);
  EXPECT_EQ(results[2].correct, 0);
}

TEST(PasskeyAccuracy, EveryAnswerTokenMustMatch) {
  // Three-token answers; the model gets all but the last answer token right: wrong. Getting the
  // answer right but a filler token wrong is still right (only answer positions count).
  std::vector<Prompt> prompts;
  for (int i = 0; i < 4; ++i) prompts.push_back(make_prompt(40, 3));
  PasskeyFile file(prompts);
  TokenDataset data(file.path());
  const auto last_wrong = passkey_accuracy(
      [&](const std::vector<int32_t>& doc) {
        return logits_predicting(doc, [&](size_t i) {
          if (i + 2 == doc.size() - 1) return 42;  // row predicting the last answer token
          return i + 1 < doc.size() ? doc[i + 1] : kEos;
        });
      },
      data);
  ASSERT_EQ(last_wrong.size(), 1u);
  EXPECT_EQ(last_wrong[0].total, 4);
  EXPECT_EQ(last_wrong[0].correct, 0);

  const auto filler_wrong = passkey_accuracy(
      [&](const std::vector<int32_t>& doc) {
        return logits_predicting(doc, [&](size_t i) {
          if (i + 4 < doc.size() - 1) return 42;  // every row before the answer's first predictor
          return i + 1 < doc.size() ? doc[i + 1] : kEos;
        });
      },
      data);
  EXPECT_EQ(filler_wrong[0].correct, 4);

  // NaN in an answer row never counts as right.
  const auto nan_row = passkey_accuracy(
      [&](const std::vector<int32_t>& doc) {
        std::vector<float> l = oracle(doc);
        l[(doc.size() - 3) * kVocab + 7] = std::numeric_limits<float>::quiet_NaN();
        return l;
      },
      data);
  EXPECT_EQ(nan_row[0].correct, 0);
}

TEST(PasskeyAccuracy, WithoutNominalLengthsGroupsByDocumentLength) {
  std::vector<Prompt> prompts{make_prompt(20, 2), make_prompt(20, 1), make_prompt(30, 2)};
  prompts[1].nominal = 999;  // not written
  PasskeyFile file(prompts, /*write_mask=*/true, /*write_nominal=*/false);
  TokenDataset data(file.path());
  const auto results = passkey_accuracy(oracle, data);
  ASSERT_EQ(results.size(), 2u);
  EXPECT_EQ(results[0].length, 20);
  EXPECT_EQ(results[0].total, 2);
  EXPECT_EQ(results[1].length, 30);
  EXPECT_EQ(results[1].total, 1);
}

TEST(PasskeyAccuracy, Errors) {
  {
    PasskeyFile file(mixed_prompts(), /*write_mask=*/false);
    TokenDataset data(file.path());
    try {
      passkey_accuracy(oracle, data);
      FAIL() << "no /loss_mask accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("/loss_mask"), std::string::npos) << e.what();
    }
  }
  {
    PasskeyFile file(mixed_prompts());
    TokenDataset data(file.path());
    // Logits of a wrong size.
    EXPECT_THROW(
        passkey_accuracy([](const std::vector<int32_t>& doc) { return std::vector<float>(doc.size() + 1); }, data),
        Error);
    EXPECT_THROW(passkey_accuracy([](const std::vector<int32_t>&) { return std::vector<float>(); }, data), Error);
  }
  {
    std::vector<Prompt> prompts{make_prompt(20, 2)};
    std::fill(prompts[0].mask.begin(), prompts[0].mask.end(), 0);
    PasskeyFile file(prompts);
    TokenDataset data(file.path());
    EXPECT_THROW(passkey_accuracy(oracle, data), Error);  // no answers anywhere
  }
}

}  // namespace
}  // namespace hyd

// HDF5 token datasets (serial HDF5 C API) and the deterministic packed-batch sampler.
//
// Reading: every hid_t lives in an H5Handle (closed on scope exit). HDF5's own error stack printing is
// silenced around probing calls (H5E_BEGIN_TRY) and every failure is turned into a hyd::Error naming
// the file and the dataset or attribute.
//
// Sampling (a pure function of seed, step, dp_rank):
//   split:  document d belongs to validation iff u(seed, d) < val_fraction, u uniform in [0, 1) from a
//           hash; empty documents belong to neither split.
//   epoch:  order_e = a permutation of the split's documents from a PRNG seeded by (seed, e); the
//           epoch's token stream is the documents concatenated in that order; S = floor(tokens / T)
//           sequences per epoch (the last partial sequence of each epoch is dropped).
//   seq:    global sequence g = (step * dp_size + dp_rank) * B + b covers stream tokens
//           [s*T, (s+1)*T) of epoch g / S, s = g % S.
#include "data/dataset.h"

#include <hdf5.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <mutex>
#include <numeric>
#include <sstream>

#include "trainer/core/error.h"

namespace hyd {
namespace {

// ---------------------------------------------------------------- HDF5 RAII

using H5Closer = herr_t (*)(hid_t);

class H5Handle {
 public:
  H5Handle() = default;
  H5Handle(hid_t id, H5Closer closer) : id_(id), closer_(closer) {}
  ~H5Handle() { reset(); }
  H5Handle(const H5Handle&) = delete;
  H5Handle& operator=(const H5Handle&) = delete;
  H5Handle(H5Handle&& o) noexcept : id_(o.id_), closer_(o.closer_) { o.id_ = H5I_INVALID_HID; }
  H5Handle& operator=(H5Handle&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      closer_ = o.closer_;
      o.id_ = H5I_INVALID_HID;
    }
    return *this;
  }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  void reset() {
    if (id_ >= 0 && closer_) closer_(id_);
    id_ = H5I_INVALID_HID;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  H5Closer closer_ = nullptr;
};

// Describes an HDF5 datatype for error messages ("int32", "float64", "string", ...).
std::string type_name(hid_t type) {
  switch (H5Tget_class(type)) {
    case H5T_INTEGER: {
      const bool is_signed = H5Tget_sign(type) == H5T_SGN_2;
      return std::string(is_signed ? "int" : "uint") + std::to_string(8 * H5Tget_size(type));
    }
    case H5T_FLOAT: return "float" + std::to_string(8 * H5Tget_size(type));
    case H5T_STRING: return "string";
    case H5T_ENUM: return "enum (e.g. a numpy bool array)";
    case H5T_COMPOUND: return "compound";
    default: return "an unsupported HDF5 type";
  }
}

bool is_integer(hid_t type, size_t bytes, bool is_signed) {
  return H5Tget_class(type) == H5T_INTEGER && H5Tget_size(type) == bytes &&
         (H5Tget_sign(type) == H5T_SGN_2) == is_signed;
}

// An open HDF5 file being validated; every error names `path` and the item.
class H5Reader {
 public:
  explicit H5Reader(const std::string& path) : path_(path) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) throw Error::at(path, "", "dataset file does not exist");
    if (std::filesystem::is_directory(path, ec)) throw Error::at(path, "", "is a directory, expected an HDF5 file");
    if (std::FILE* f = std::fopen(path.c_str(), "rb")) {
      std::fclose(f);
    } else {
      throw Error::at(path, "", "cannot be opened for reading (permissions?)");
    }
    htri_t is_h5 = -1;
    H5E_BEGIN_TRY {
#if H5_VERSION_GE(1, 12, 0)
      is_h5 = H5Fis_accessible(path.c_str(), H5P_DEFAULT);
#else
      is_h5 = H5Fis_hdf5(path.c_str());
#endif
    }
    H5E_END_TRY;
    if (is_h5 <= 0) throw Error::at(path, "", "not an HDF5 file (make datasets with data/prepare.py)");
    hid_t f = H5I_INVALID_HID;
    H5E_BEGIN_TRY { f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT); }
    H5E_END_TRY;
    if (f < 0) throw Error::at(path, "", "HDF5 could not open the file (truncated or corrupt?)");
    file_ = H5Handle(f, H5Fclose);
  }

  bool has_dataset(const char* name) const {
    htri_t exists = -1;
    H5E_BEGIN_TRY { exists = H5Lexists(file_.get(), name, H5P_DEFAULT); }
    H5E_END_TRY;
    if (exists <= 0) return false;
    hid_t o = H5I_INVALID_HID;
    H5E_BEGIN_TRY { o = H5Oopen(file_.get(), name, H5P_DEFAULT); }
    H5E_END_TRY;
    if (o < 0) return false;
    H5Handle obj(o, H5Oclose);
    return H5Iget_type(obj.get()) == H5I_DATASET;
  }

  // Reads a rank-1 dataset whose element type satisfies is_integer(bytes, is_signed) as `mem_type`.
  template <class T>
  std::vector<T> read_vector(const char* name, hid_t mem_type, const char* expected) const {
    if (!has_dataset(name)) throw Error::at(path_, name, "missing dataset (expected " + std::string(expected) + ")");
    hid_t d = H5I_INVALID_HID;
    H5E_BEGIN_TRY { d = H5Dopen2(file_.get(), name, H5P_DEFAULT); }
    H5E_END_TRY;
    if (d < 0) throw Error::at(path_, name, "cannot open dataset");
    H5Handle ds(d, H5Dclose);
    H5Handle type(H5Dget_type(ds.get()), H5Tclose);
    H5Handle space(H5Dget_space(ds.get()), H5Sclose);
    if (!type.valid() || !space.valid()) throw Error::at(path_, name, "cannot read the dataset's type or shape");
    if (!is_integer(type.get(), sizeof(T), std::numeric_limits<T>::is_signed)) {
      throw Error::at(path_, name, "wrong dtype: expected " + std::string(expected) + ", got " + type_name(type.get()));
    }
    const int rank = H5Sget_simple_extent_ndims(space.get());
    if (rank != 1) {
      throw Error::at(path_, name,
                      "wrong rank: expected a 1-D array (" + std::string(expected) + "), got rank " +
                          std::to_string(rank));
    }
    hsize_t n = 0;
    H5Sget_simple_extent_dims(space.get(), &n, nullptr);
    std::vector<T> out(n);
    if (n > 0) {
      herr_t st = -1;
      H5E_BEGIN_TRY { st = H5Dread(ds.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()); }
      H5E_END_TRY;
      if (st < 0) throw Error::at(path_, name, "read failed (corrupt file?)");
    }
    return out;
  }

  H5Handle open_attribute(const char* name, const char* expected) const {
    htri_t exists = -1;
    H5E_BEGIN_TRY { exists = H5Aexists(file_.get(), name); }
    H5E_END_TRY;
    if (exists <= 0) throw Error::at(path_, name, "missing root attribute (expected " + std::string(expected) + ")");
    hid_t a = H5I_INVALID_HID;
    H5E_BEGIN_TRY { a = H5Aopen(file_.get(), name, H5P_DEFAULT); }
    H5E_END_TRY;
    if (a < 0) throw Error::at(path_, name, "cannot open attribute");
    return H5Handle(a, H5Aclose);
  }

  // An integer attribute holding exactly one value (scalar or a 1-element array).
  int64_t read_int_attribute(const char* name) const {
    H5Handle attr = open_attribute(name, "an integer");
    H5Handle type(H5Aget_type(attr.get()), H5Tclose);
    H5Handle space(H5Aget_space(attr.get()), H5Sclose);
    if (H5Tget_class(type.get()) != H5T_INTEGER) {
      throw Error::at(path_, name, "wrong type: expected an integer, got " + type_name(type.get()));
    }
    if (H5Sget_simple_extent_npoints(space.get()) != 1) throw Error::at(path_, name, "expected a single value");
    int64_t v = 0;
    if (H5Aread(attr.get(), H5T_NATIVE_INT64, &v) < 0) throw Error::at(path_, name, "read failed");
    return v;
  }

  // A string attribute (fixed or variable length, as h5py writes Python str).
  std::string read_string_attribute(const char* name) const {
    H5Handle attr = open_attribute(name, "a string");
    H5Handle type(H5Aget_type(attr.get()), H5Tclose);
    H5Handle space(H5Aget_space(attr.get()), H5Sclose);
    if (H5Tget_class(type.get()) != H5T_STRING) {
      throw Error::at(path_, name, "wrong type: expected a string, got " + type_name(type.get()));
    }
    if (H5Sget_simple_extent_npoints(space.get()) != 1) throw Error::at(path_, name, "expected a single string");
    H5Handle mem(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_cset(mem.get(), H5Tget_cset(type.get()));
    if (H5Tis_variable_str(type.get()) > 0) {
      H5Tset_size(mem.get(), H5T_VARIABLE);
      char* s = nullptr;
      if (H5Aread(attr.get(), mem.get(), &s) < 0) throw Error::at(path_, name, "read failed");
      std::string out = s ? s : "";
      if (s) H5free_memory(s);
      return out;
    }
    const size_t size = H5Tget_size(type.get());
    H5Tset_size(mem.get(), size + 1);  // room for the terminator HDF5 writes for NULLTERM strings
    std::string buf(size + 1, '\0');
    if (H5Aread(attr.get(), mem.get(), buf.data()) < 0) throw Error::at(path_, name, "read failed");
    buf.resize(std::char_traits<char>::length(buf.c_str()));
    return buf;
  }

 private:
  std::string path_;
  H5Handle file_;
};

// ---------------------------------------------------------------- deterministic randomness

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Counter-based generator: stream of splitmix64(key + i * golden). Defined here (not std::
// distributions) so that batches are identical across compilers and standard libraries.
class StreamRng {
 public:
  explicit StreamRng(uint64_t key) : state_(splitmix64(key)) {}
  uint64_t next() {
    state_ += 0x9e3779b97f4a7c15ULL;
    return splitmix64(state_);
  }
  // Uniform in [0, bound), bound > 0, without modulo bias.
  uint64_t below(uint64_t bound) {
    const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % bound;
    uint64_t r = next();
    while (r >= limit) r = next();
    return r % bound;
  }

 private:
  uint64_t state_;
};

constexpr uint64_t kSplitSalt = 0x5350'4c49'5421'0001ULL;  // distinct streams for split and epochs
constexpr uint64_t kEpochSalt = 0x4550'4f43'4821'0002ULL;

double split_uniform(uint64_t seed, int64_t doc) {
  const uint64_t h = splitmix64(splitmix64(seed ^ kSplitSalt) ^ static_cast<uint64_t>(doc));
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

std::string with_commas(int64_t v) {
  const std::string digits = std::to_string(v < 0 ? -v : v);
  std::string out = v < 0 ? "-" : "";
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out.push_back(',');
    out.push_back(digits[i]);
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------- TokenDataset

struct TokenDataset::Impl {
  DatasetInfo info;
  std::vector<int32_t> tokens;
  std::vector<int64_t> doc_offsets;
  std::vector<uint8_t> loss_mask;
};

TokenDataset::TokenDataset(const std::string& path) : impl_(std::make_unique<Impl>()) {
  H5Reader r(path);
  Impl& m = *impl_;
  m.info.path = path;

  m.info.vocab_size = r.read_int_attribute("vocab_size");
  if (m.info.vocab_size <= 0 || m.info.vocab_size > std::numeric_limits<int32_t>::max()) {
    throw Error::at(path, "vocab_size", "must be in [1, 2^31), got " + std::to_string(m.info.vocab_size));
  }
  const int64_t eos = r.read_int_attribute("eos_id");
  if (eos < 0 || eos >= m.info.vocab_size) {
    throw Error::at(path, "eos_id",
                    "must be in [0, vocab_size=" + std::to_string(m.info.vocab_size) + "), got " + std::to_string(eos));
  }
  m.info.eos_id = static_cast<int32_t>(eos);
  m.info.tokenizer_sha256 = r.read_string_attribute("tokenizer_sha256");

  m.tokens = r.read_vector<int32_t>("/tokens", H5T_NATIVE_INT32, "int32 [N]");
  m.doc_offsets = r.read_vector<int64_t>("/doc_offsets", H5T_NATIVE_INT64, "int64 [D+1]");
  const auto n = static_cast<int64_t>(m.tokens.size());
  if (n == 0) throw Error::at(path, "/tokens", "is empty");
  const auto& off = m.doc_offsets;
  if (off.size() < 2) {
    throw Error::at(path, "/doc_offsets", "needs at least 2 entries (one document), got " + std::to_string(off.size()));
  }
  if (off.front() != 0) throw Error::at(path, "/doc_offsets", "must start at 0, got " + std::to_string(off.front()));
  if (off.back() != n) {
    throw Error::at(path, "/doc_offsets",
                    "must end at the number of tokens N=" + std::to_string(n) + ", got " + std::to_string(off.back()));
  }
  for (size_t d = 1; d < off.size(); ++d) {
    if (off[d] < off[d - 1]) {
      throw Error::at(path, "/doc_offsets",
                      "decreasing at index " + std::to_string(d) + ": " + std::to_string(off[d]) + " < " +
                          std::to_string(off[d - 1]));
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = m.tokens[static_cast<size_t>(i)];
    if (t < 0 || t >= m.info.vocab_size) {
      throw Error::at(path, "/tokens",
                      "token " + std::to_string(t) + " at index " + std::to_string(i) + " is outside [0, vocab_size=" +
                          std::to_string(m.info.vocab_size) + ")");
    }
  }
  if (r.has_dataset("/loss_mask")) {
    m.loss_mask = r.read_vector<uint8_t>("/loss_mask", H5T_NATIVE_UINT8, "uint8 [N]");
    if (static_cast<int64_t>(m.loss_mask.size()) != n) {
      throw Error::at(path, "/loss_mask",
                      "length " + std::to_string(m.loss_mask.size()) + " differs from /tokens length " +
                          std::to_string(n));
    }
    for (size_t i = 0; i < m.loss_mask.size(); ++i) {
      if (m.loss_mask[i] > 1) {
        throw Error::at(path, "/loss_mask",
                        "value " + std::to_string(m.loss_mask[i]) + " at index " + std::to_string(i) +
                            " is not 0 or 1");
      }
    }
    m.info.has_loss_mask = true;
  }
  m.info.num_tokens = n;
  m.info.num_docs = static_cast<int64_t>(off.size()) - 1;
}

TokenDataset::~TokenDataset() = default;

const DatasetInfo& TokenDataset::info() const { return impl_->info; }
const std::vector<int32_t>& TokenDataset::tokens() const { return impl_->tokens; }
const std::vector<int64_t>& TokenDataset::doc_offsets() const { return impl_->doc_offsets; }
const std::vector<uint8_t>& TokenDataset::loss_mask() const { return impl_->loss_mask; }

double TokenDataset::unigram_entropy() const {
  std::vector<int64_t> counts(static_cast<size_t>(impl_->info.vocab_size), 0);
  for (int32_t t : impl_->tokens) ++counts[static_cast<size_t>(t)];
  const double n = static_cast<double>(impl_->tokens.size());
  double h = 0.0;
  for (int64_t c : counts) {
    if (c > 0) {
      const double p = static_cast<double>(c) / n;
      h -= p * std::log(p);
    }
  }
  return h;
}

std::string TokenDataset::summary() const {
  const DatasetInfo& i = impl_->info;
  const auto& off = impl_->doc_offsets;
  int64_t max_len = 0;
  for (size_t d = 1; d < off.size(); ++d) max_len = std::max(max_len, off[d] - off[d - 1]);
  const double mean_len = static_cast<double>(i.num_tokens) / static_cast<double>(i.num_docs);
  const double h = unigram_entropy();
  char buf[512];
  std::ostringstream os;
  os << "dataset          " << i.path << "\n";
  os << "tokens           " << with_commas(i.num_tokens) << "\n";
  std::snprintf(buf, sizeof(buf), "%.1f", mean_len);
  os << "documents        " << with_commas(i.num_docs) << " (mean length " << buf << ", max " << with_commas(max_len)
     << ")\n";
  os << "vocab size       " << i.vocab_size << "\n";
  os << "eos id           " << i.eos_id << "\n";
  os << "tokenizer sha256 " << (i.tokenizer_sha256.empty() ? "(none)" : i.tokenizer_sha256) << "\n";
  os << "loss mask        " << (i.has_loss_mask ? "yes" : "no") << "\n";
  std::snprintf(buf, sizeof(buf), "%.4f nats/token (%.4f bits/token)", h, h / std::log(2.0));
  os << "unigram entropy  " << buf << "\n";
  return os.str();
}

// ---------------------------------------------------------------- PackedSampler

namespace {
// One epoch's document order and the prefix sums of the permuted lengths (cum[i] = stream offset of
// order[i]; cum.back() = tokens in the split).
struct EpochLayout {
  int64_t epoch = -1;
  std::vector<int64_t> order;
  std::vector<int64_t> cum;
};
}  // namespace

struct PackedSampler::Impl {
  const TokenDataset* data = nullptr;
  int64_t seq_len = 0;
  int64_t batch_size = 0;
  uint64_t seed = 0;
  int dp_rank = 0;
  int dp_size = 1;
  std::vector<int64_t> docs;  // the split's non-empty documents, ascending
  int64_t split_tokens = 0;
  int64_t seqs_per_epoch = 0;

  // Cache of the last epoch touched (batches are built from consecutive steps, so at most two epochs
  // are live at an epoch boundary). Shared between copies of the sampler, hence the lock.
  mutable std::mutex cache_mutex;
  mutable std::shared_ptr<const EpochLayout> cached;

  std::shared_ptr<const EpochLayout> layout(int64_t epoch) const {
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      if (cached && cached->epoch == epoch) return cached;
    }
    auto l = std::make_shared<EpochLayout>();
    l->epoch = epoch;
    l->order = docs;
    StreamRng rng(splitmix64(seed ^ kEpochSalt) ^ splitmix64(static_cast<uint64_t>(epoch)));
    for (size_t i = l->order.size(); i > 1; --i) {  // Fisher-Yates
      const auto j = static_cast<size_t>(rng.below(i));
      std::swap(l->order[i - 1], l->order[j]);
    }
    const auto& off = data->doc_offsets();
    l->cum.resize(l->order.size() + 1);
    l->cum[0] = 0;
    for (size_t i = 0; i < l->order.size(); ++i) {
      const auto d = static_cast<size_t>(l->order[i]);
      l->cum[i + 1] = l->cum[i] + (off[d + 1] - off[d]);
    }
    std::lock_guard<std::mutex> lock(cache_mutex);
    cached = l;
    return l;
  }
};

PackedSampler::PackedSampler(const TokenDataset& data, Split split, double val_fraction, int64_t seq_len,
                             int64_t batch_size, uint64_t seed, int dp_rank, int dp_size) {
  const std::string& path = data.info().path;
  HYD_CHECK(seq_len >= 1, "seq_len must be >= 1, got ", seq_len);
  HYD_CHECK(batch_size >= 1, "batch_size must be >= 1, got ", batch_size);
  HYD_CHECK(dp_size >= 1 && dp_rank >= 0 && dp_rank < dp_size, "dp_rank ", dp_rank, " outside [0, dp_size=", dp_size,
            ")");
  HYD_CHECK(val_fraction >= 0.0 && val_fraction <= 1.0, "val_fraction must be in [0, 1], got ", val_fraction);
  HYD_CHECK(seq_len * batch_size <= std::numeric_limits<int32_t>::max(), "batch of ", batch_size, " x ", seq_len,
            " tokens does not fit int32 cu_seqlens");

  auto m = std::make_shared<Impl>();
  m->data = &data;
  m->seq_len = seq_len;
  m->batch_size = batch_size;
  m->seed = seed;
  m->dp_rank = dp_rank;
  m->dp_size = dp_size;
  const auto& off = data.doc_offsets();
  const int64_t num_docs = static_cast<int64_t>(off.size()) - 1;
  const bool want_val = split == Split::validation;
  for (int64_t d = 0; d < num_docs; ++d) {
    const int64_t len = off[static_cast<size_t>(d) + 1] - off[static_cast<size_t>(d)];
    if (len == 0) continue;
    if ((split_uniform(seed, d) < val_fraction) == want_val) {
      m->docs.push_back(d);
      m->split_tokens += len;
    }
  }
  const char* split_name = want_val ? "validation" : "train";
  std::ostringstream frac;
  frac << val_fraction;
  if (m->docs.empty()) {
    throw Error::at(path, std::string(split_name) + " split",
                    "is empty: no document of " + std::to_string(num_docs) + " falls in it with val_fraction=" +
                        frac.str() + " (seed " + std::to_string(seed) + ")");
  }
  m->seqs_per_epoch = m->split_tokens / seq_len;
  if (m->seqs_per_epoch == 0) {
    throw Error::at(path, std::string(split_name) + " split",
                    "has " + std::to_string(m->split_tokens) + " tokens, fewer than one sequence of seq_len=" +
                        std::to_string(seq_len));
  }
  impl_ = std::move(m);
}

HostBatch PackedSampler::batch(int64_t step) const {
  HYD_CHECK(step >= 0, "step must be >= 0, got ", step);
  const Impl& m = *impl_;
  const int64_t T = m.seq_len;
  const int64_t B = m.batch_size;
  const auto& tokens = m.data->tokens();
  const auto& off = m.data->doc_offsets();
  const auto& mask = m.data->loss_mask();

  HostBatch out;
  out.tokens.resize(static_cast<size_t>(B * T));
  out.targets.resize(static_cast<size_t>(B * T));
  out.positions.resize(static_cast<size_t>(B * T));
  out.cu_seqlens.push_back(0);

  std::shared_ptr<const EpochLayout> layout;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t g = (step * m.dp_size + m.dp_rank) * B + b;
    const int64_t epoch = g / m.seqs_per_epoch;
    const int64_t begin = (g % m.seqs_per_epoch) * T;
    const int64_t end = begin + T;
    if (!layout || layout->epoch != epoch) layout = m.layout(epoch);
    const auto& cum = layout->cum;
    // Index in the epoch order of the document holding stream token `begin`.
    auto i = static_cast<size_t>(std::upper_bound(cum.begin(), cum.end(), begin) - cum.begin()) - 1;
    int64_t pos = begin;
    while (pos < end) {
      const auto d = static_cast<size_t>(layout->order[i]);
      const int64_t piece_end = std::min(end, cum[i + 1]);
      const int64_t len = piece_end - pos;
      const int64_t src = off[d] + (pos - cum[i]);  // file index of the piece's first token
      const int64_t dst = b * T + (pos - begin);    // batch index of the piece's first token
      for (int64_t j = 0; j < len; ++j) {
        const auto o = static_cast<size_t>(dst + j);
        const auto s = static_cast<size_t>(src + j);
        out.tokens[o] = tokens[s];
        out.positions[o] = static_cast<int32_t>(j);
        int32_t target = -1;
        if (j + 1 < len && (mask.empty() || mask[s + 1] != 0)) target = tokens[s + 1];
        out.targets[o] = target;
        out.num_targets += target >= 0;
      }
      out.cu_seqlens.push_back(static_cast<int32_t>(dst + len));
      ++out.num_docs;
      pos = piece_end;
      ++i;
    }
  }
  return out;
}

int64_t PackedSampler::tokens_per_epoch() const { return impl_->split_tokens; }
int64_t PackedSampler::num_docs() const { return static_cast<int64_t>(impl_->docs.size()); }

}  // namespace hyd

#include "distill/evaluation.h"

#if __has_include(<hdf5.h>)
#include <hdf5.h>
#else
#include <hdf5/serial/hdf5.h>  // Debian/Ubuntu serial HDF5 (not on the default include path)
#endif

#include <cmath>
#include <map>
#include <string>

#include "trainer/core/error.h"

namespace hyd {
namespace {

constexpr const char* kNominalLengths = "/doc_lengths_target";

// One HDF5 id, closed on scope exit.
class H5Owned {
 public:
  H5Owned(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~H5Owned() {
    if (id_ >= 0) close_(id_);
  }
  H5Owned(const H5Owned&) = delete;
  H5Owned& operator=(const H5Owned&) = delete;
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

// /doc_lengths_target of the dataset's file: [D] integers; empty when the file has none.
std::vector<int64_t> read_nominal_lengths(const std::string& path, int64_t num_docs) {
  hid_t f = H5I_INVALID_HID;
  H5E_BEGIN_TRY { f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT); }
  H5E_END_TRY;
  if (f < 0) throw Error::at(path, "", "HDF5 could not open the file");
  H5Owned file(f, H5Fclose);
  htri_t exists = -1;
  H5E_BEGIN_TRY { exists = H5Lexists(file.get(), kNominalLengths, H5P_DEFAULT); }
  H5E_END_TRY;
  if (exists <= 0) return {};
  hid_t d = H5I_INVALID_HID;
  H5E_BEGIN_TRY { d = H5Dopen2(file.get(), kNominalLengths, H5P_DEFAULT); }
  H5E_END_TRY;
  if (d < 0) throw Error::at(path, kNominalLengths, "not a dataset");
  H5Owned ds(d, H5Dclose);
  H5Owned type(H5Dget_type(ds.get()), H5Tclose);
  H5Owned space(H5Dget_space(ds.get()), H5Sclose);
  if (!type.valid() || !space.valid()) throw Error::at(path, kNominalLengths, "cannot read the type or shape");
  if (H5Tget_class(type.get()) != H5T_INTEGER) throw Error::at(path, kNominalLengths, "wrong dtype: expected int64");
  if (H5Sget_simple_extent_ndims(space.get()) != 1) throw Error::at(path, kNominalLengths, "expected a 1-D array");
  hsize_t n = 0;
  H5Sget_simple_extent_dims(space.get(), &n, nullptr);
  if (static_cast<int64_t>(n) != num_docs) {
    throw Error::at(path, kNominalLengths,
                    "has " + std::to_string(n) + " entries, the file has " + std::to_string(num_docs) + " documents");
  }
  std::vector<int64_t> out(n);
  if (n > 0) {
    herr_t st = -1;
    H5E_BEGIN_TRY { st = H5Dread(ds.get(), H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()); }
    H5E_END_TRY;
    if (st < 0) throw Error::at(path, kNominalLengths, "read failed");
  }
  return out;
}

// Index of the largest value of row[0, V); -1 when the row holds a NaN (never counts as correct).
int64_t argmax_row(const float* row, int64_t V) {
  int64_t best = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (std::isnan(row[v])) return -1;
    if (row[v] > row[best]) best = v;
  }
  return best;
}

int64_t resolved_head_dim(const ModelConfig& cfg) {
  if (cfg.head_dim > 0) return cfg.head_dim;
  HYD_CHECK(cfg.num_heads > 0 && cfg.hidden_size > 0, "kv_cache_bytes_per_token: num_heads and hidden_size must be",
            " positive to resolve head_dim, got ", cfg.num_heads, " and ", cfg.hidden_size);
  return cfg.hidden_size / cfg.num_heads;
}

// Per-token K/V bytes of one attention layer.
int64_t attention_layer_bytes(const ModelConfig& cfg, int64_t bytes_per_element) {
  HYD_CHECK(bytes_per_element > 0, "kv_cache_bytes_per_token: bytes_per_element must be positive, got ",
            bytes_per_element);
  HYD_CHECK(cfg.num_kv_heads > 0, "kv_cache_bytes_per_token: num_kv_heads must be positive, got ", cfg.num_kv_heads);
  const int64_t head_dim = resolved_head_dim(cfg);
  HYD_CHECK(head_dim > 0, "kv_cache_bytes_per_token: head_dim must be positive, got ", head_dim);
  return 2 * cfg.num_kv_heads * head_dim * bytes_per_element;
}

}  // namespace

std::vector<PasskeyResult> passkey_accuracy(const DocumentLogitsFn& logits_fn, const TokenDataset& data) {
  const DatasetInfo& info = data.info();
  const auto& mask = data.loss_mask();
  if (mask.empty()) {
    throw Error::at(info.path, "/loss_mask",
                    "missing: passkey data marks its answers with /loss_mask "
                    "(make it with data/make_passkey.py)");
  }
  HYD_CHECK(logits_fn, "passkey_accuracy: no logits function");
  const auto& tokens = data.tokens();
  const auto& offsets = data.doc_offsets();
  const int64_t num_docs = static_cast<int64_t>(offsets.size()) - 1;
  const std::vector<int64_t> nominal = read_nominal_lengths(info.path, num_docs);

  std::map<int64_t, PasskeyResult> by_length;
  for (int64_t d = 0; d < num_docs; ++d) {
    const int64_t begin = offsets[d], end = offsets[d + 1];
    std::vector<int64_t> answer;  // positions inside the document
    for (int64_t p = 0; p < end - begin; ++p) {
      if (mask[begin + p]) answer.push_back(p);
    }
    if (answer.empty()) continue;
    if (answer.front() == 0) {
      throw Error::at(info.path, "/loss_mask",
                      "document " + std::to_string(d) + " marks its first token as an answer (nothing predicts it)");
    }
    const int64_t len = end - begin;
    const std::vector<int32_t> doc(tokens.begin() + begin, tokens.begin() + end);
    const std::vector<float> logits = logits_fn(doc);
    if (logits.empty() || logits.size() % static_cast<size_t>(len) != 0) {
      HYD_THROW("passkey_accuracy: the logits function returned ", logits.size(), " values for a document of ", len,
                " tokens (", info.path, " document ", d, "); expected [len, V]");
    }
    const int64_t V = static_cast<int64_t>(logits.size()) / len;
    bool correct = true;
    for (int64_t p : answer) {
      if (argmax_row(logits.data() + (p - 1) * V, V) != doc[p]) {
        correct = false;
        break;
      }
    }
    const int64_t length = nominal.empty() ? len : nominal[d];
    PasskeyResult& r = by_length[length];
    r.length = length;
    r.total += 1;
    r.correct += correct ? 1 : 0;
  }
  if (by_length.empty()) {
    throw Error::at(info.path, "/loss_mask", "no document has answer tokens (loss_mask is 0 everywhere)");
  }
  std::vector<PasskeyResult> out;
  out.reserve(by_length.size());
  for (const auto& [length, r] : by_length) out.push_back(r);
  return out;
}

KvCacheBytes kv_cache_bytes_per_token(const ModelConfig& cfg, int64_t bytes_per_element) {
  HYD_CHECK(cfg.num_layers > 0, "kv_cache_bytes_per_token: num_layers must be positive, got ", cfg.num_layers);
  KvCacheBytes out;
  out.cached_layers = cfg.num_layers;
  out.per_token = cfg.num_layers * attention_layer_bytes(cfg, bytes_per_element);
  return out;
}

KvCacheBytes kv_cache_bytes_per_token(const HybridConfig& cfg, int64_t bytes_per_element) {
  const ModelConfig& m = cfg.model;
  HYD_CHECK(m.num_layers > 0, "kv_cache_bytes_per_token: num_layers must be positive, got ", m.num_layers);
  const std::vector<MixerKind> layers =
      cfg.layers.empty() ? parse_layer_pattern(cfg.pattern, m.num_layers, "kv_cache_bytes_per_token") : cfg.layers;
  HYD_CHECK(static_cast<int64_t>(layers.size()) == m.num_layers, "kv_cache_bytes_per_token: ", layers.size(),
            " mixers for ", m.num_layers, " layers");
  KvCacheBytes out;
  for (MixerKind kind : layers) {
    if (kind == MixerKind::kda) {
      out.state_layers += 1;
    } else {
      out.cached_layers += 1;
    }
  }
  if (out.cached_layers > 0) out.per_token = out.cached_layers * attention_layer_bytes(m, bytes_per_element);
  if (out.state_layers > 0) {
    const KdaConfig& k = cfg.kda;
    HYD_CHECK(k.heads > 0 && k.v_heads > 0 && k.dk > 0 && k.dv > 0 && k.conv_size >= 1,
              "kv_cache_bytes_per_token: KDA dims must be positive (heads ", k.heads, ", v_heads ", k.v_heads, ", dk ",
              k.dk, ", dv ", k.dv, ", conv_size ", k.conv_size, ")");
    HYD_CHECK(bytes_per_element > 0, "kv_cache_bytes_per_token: bytes_per_element must be positive, got ",
              bytes_per_element);
    const int64_t state_values = k.v_heads * k.dk * k.dv;  // S [HV, dk, dv], fp32
    const int64_t conv_values = (k.conv_size - 1) * (2 * k.key_dim() + k.value_dim());
    out.state_per_sequence = out.state_layers * state_values * static_cast<int64_t>(sizeof(float));
    out.conv_state_per_sequence = out.state_layers * conv_values * bytes_per_element;
  }
  return out;
}

}  // namespace hyd

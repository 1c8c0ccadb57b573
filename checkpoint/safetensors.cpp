#include "checkpoint/safetensors.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "trainer/core/dtype.h"
#include "trainer/core/error.h"

namespace hyd {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; big-endian hosts unsupported");

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The spec caps the header at 100 MB; a larger length means a corrupt or foreign file.
constexpr uint64_t kMaxHeaderBytes = uint64_t(100) << 20;

struct DTypeRow {
  SafetensorsDType t;
  const char* name;
  size_t size;
};
constexpr DTypeRow kDTypes[] = {
    {SafetensorsDType::BOOL, "BOOL", 1}, {SafetensorsDType::U8, "U8", 1},   {SafetensorsDType::I8, "I8", 1},
    {SafetensorsDType::I16, "I16", 2},   {SafetensorsDType::U16, "U16", 2}, {SafetensorsDType::F16, "F16", 2},
    {SafetensorsDType::BF16, "BF16", 2}, {SafetensorsDType::I32, "I32", 4}, {SafetensorsDType::U32, "U32", 4},
    {SafetensorsDType::F32, "F32", 4},   {SafetensorsDType::F64, "F64", 8}, {SafetensorsDType::I64, "I64", 8},
    {SafetensorsDType::U64, "U64", 8},
};

// IEEE half -> float, exact (every half is representable as a float).
float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {
    // Subnormal half: value = mant * 2^-24; normalise into a float.
    int shift = 0;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      ++shift;
    }
    mant &= 0x3ffu;
    bits = sign | (static_cast<uint32_t>(113 - shift) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <class T>
T load_le(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// numel with overflow detection; returns false on overflow.
bool checked_numel(const std::vector<int64_t>& shape, uint64_t* out) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d != 0 && n > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(d)) return false;
    n *= static_cast<uint64_t>(d);
  }
  *out = n;
  return true;
}

// Reads a non-negative JSON integer (json stores it as unsigned or non-negative signed).
bool json_u64(const json& j, uint64_t* out) {
  if (j.is_number_unsigned()) {
    *out = j.get<uint64_t>();
    return true;
  }
  if (j.is_number_integer() && j.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(j.get<int64_t>());
    return true;
  }
  return false;
}

}  // namespace

const char* safetensors_dtype_name(SafetensorsDType t) {
  for (const auto& r : kDTypes)
    if (r.t == t) return r.name;
  return "?";
}

size_t safetensors_dtype_size(SafetensorsDType t) {
  for (const auto& r : kDTypes)
    if (r.t == t) return r.size;
  return 0;
}

bool parse_safetensors_dtype(const std::string& name, SafetensorsDType* out) {
  for (const auto& r : kDTypes) {
    if (name == r.name) {
      *out = r.t;
      return true;
    }
  }
  return false;
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

int64_t SafetensorsTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string SafetensorsTensorInfo::shape_str() const { return shape_to_string(shape); }

// ------------------------------------------------------------------------------------------------ reader

SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

void SafetensorsFile::open(const std::string& path) {
  path_ = path;
  tensors_.clear();
  metadata_.clear();
  stream_.reset();

  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw Error::at(path, "", "no such file (expected a safetensors file)");
  file_size_ = fs::file_size(path, ec);
  if (ec) throw Error::at(path, "", "cannot get the file size: " + ec.message());
  auto in = std::make_unique<std::ifstream>(path, std::ios::binary);
  if (!*in) throw Error::at(path, "", "cannot open for reading");
  if (file_size_ < 8) {
    throw Error::at(
        path, "",
        "file too short for a safetensors header (" + std::to_string(file_size_) + " bytes, need at least 8)");
  }
  char len_bytes[8];
  in->read(len_bytes, 8);
  if (!*in) throw Error::at(path, "", "cannot read the 8-byte header length");
  const uint64_t header_len = load_le<uint64_t>(len_bytes);
  if (header_len > file_size_ - 8) {
    throw Error::at(path, "",
                    "header length " + std::to_string(header_len) + " is beyond the file size (" +
                        std::to_string(file_size_) + " bytes): truncated or not a safetensors file");
  }
  if (header_len > kMaxHeaderBytes) {
    throw Error::at(path, "", "header length " + std::to_string(header_len) + " exceeds the 100 MB limit");
  }
  std::string header(header_len, '\0');
  in->read(header.data(), static_cast<std::streamsize>(header_len));
  if (!*in) throw Error::at(path, "", "cannot read the JSON header");
  data_start_ = 8 + header_len;
  const uint64_t buffer_size = file_size_ - data_start_;

  // Duplicate top-level keys are silently merged by the JSON parser: catch them with the callback.
  std::string duplicate;
  std::set<std::string> seen;
  auto on_event = [&](int depth, json::parse_event_t ev, json& parsed) {
    if (ev == json::parse_event_t::key && depth == 1) {
      const std::string k = parsed.get<std::string>();
      if (!seen.insert(k).second && duplicate.empty()) duplicate = k;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(header, on_event);
  } catch (const json::parse_error& e) {
    throw Error::at(path, "", std::string("malformed JSON header: ") + e.what());
  }
  if (!duplicate.empty()) throw Error::at(path, duplicate, "tensor name appears twice in the header");
  if (!j.is_object()) throw Error::at(path, "", "JSON header is not an object");

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) throw Error::at(path, name, "metadata must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) throw Error::at(path, "__metadata__." + m.key(), "metadata values must be strings");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object()) throw Error::at(path, name, "tensor entry is not an object");
    SafetensorsTensorInfo t;
    t.name = name;
    auto dt = v.find("dtype");
    if (dt == v.end() || !dt->is_string()) throw Error::at(path, name, "missing or non-string 'dtype'");
    if (!parse_safetensors_dtype(dt->get<std::string>(), &t.dtype)) {
      throw Error::at(path, name, "unknown dtype '" + dt->get<std::string>() + "'");
    }
    auto sh = v.find("shape");
    if (sh == v.end() || !sh->is_array()) throw Error::at(path, name, "missing or non-array 'shape'");
    for (const json& d : *sh) {
      uint64_t u;
      if (!json_u64(d, &u) || u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        throw Error::at(path, name, "shape entries must be non-negative integers, got " + sh->dump());
      }
      t.shape.push_back(static_cast<int64_t>(u));
    }
    auto off = v.find("data_offsets");
    if (off == v.end() || !off->is_array() || off->size() != 2 || !json_u64((*off)[0], &t.begin) ||
        !json_u64((*off)[1], &t.end)) {
      throw Error::at(path, name, "'data_offsets' must be [begin, end] of non-negative integers");
    }
    if (t.end < t.begin) throw Error::at(path, name, "data_offsets end < begin: " + off->dump());
    uint64_t numel;
    if (!checked_numel(t.shape, &numel) ||
        numel > std::numeric_limits<uint64_t>::max() / safetensors_dtype_size(t.dtype)) {
      throw Error::at(path, name, "shape " + shape_to_string(t.shape) + " overflows");
    }
    const uint64_t expect = numel * safetensors_dtype_size(t.dtype);
    if (t.end - t.begin != expect) {
      throw Error::at(path, name,
                      "data_offsets " + off->dump() + " span " + std::to_string(t.end - t.begin) + " bytes but shape " +
                          shape_to_string(t.shape) + " of " + safetensors_dtype_name(t.dtype) + " needs " +
                          std::to_string(expect));
    }
    if (t.end > buffer_size) {
      throw Error::at(path, name,
                      "data_offsets " + off->dump() + " run past the end of the data buffer (" +
                          std::to_string(buffer_size) + " bytes): the file is truncated");
    }
    tensors_.emplace(name, std::move(t));
  }

  // The buffer must be tiled exactly: no overlaps, no holes, nothing after the last tensor.
  std::vector<const SafetensorsTensorInfo*> order;
  for (const auto& [n, t] : tensors_) order.push_back(&t);
  std::sort(order.begin(), order.end(),
            [](auto* a, auto* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
  uint64_t pos = 0;
  const SafetensorsTensorInfo* prev = nullptr;
  for (const auto* t : order) {
    if (t->begin < pos) {
      throw Error::at(path, t->name,
                      "data overlaps tensor '" + prev->name + "' (bytes " + std::to_string(t->begin) + " < " +
                          std::to_string(pos) + ")");
    }
    if (t->begin > pos) {
      throw Error::at(
          path, t->name,
          "hole of " + std::to_string(t->begin - pos) + " unindexed bytes in the data buffer before this tensor");
    }
    pos = t->end;
    prev = t;
  }
  if (pos != buffer_size) {
    throw Error::at(path, "",
                    std::to_string(buffer_size - pos) + " bytes after the last tensor are not described by the header");
  }
  stream_ = std::move(in);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<const SafetensorsTensorInfo*> order;
  for (const auto& [n, t] : tensors_) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  std::vector<std::string> out;
  for (const auto* t : order) out.push_back(t->name);
  return out;
}

const SafetensorsTensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error::at(path_, name, "no such tensor in the file");
  return it->second;
}

void SafetensorsFile::read_range(const SafetensorsTensorInfo& t, char* dst) const {
  HYD_CHECK(stream_, "safetensors file not open");
  const uint64_t n = t.end - t.begin;
  if (n == 0) return;
  stream_->clear();
  stream_->seekg(static_cast<std::streamoff>(data_start_ + t.begin));
  stream_->read(dst, static_cast<std::streamsize>(n));
  if (!*stream_) throw Error::at(path_, t.name, "read failed (file changed or truncated since it was opened?)");
}

std::vector<char> SafetensorsFile::read_bytes(const std::string& name) const {
  const auto& t = info(name);
  std::vector<char> out(t.end - t.begin);
  read_range(t, out.data());
  return out;
}

std::vector<float> SafetensorsFile::read_f32(const std::string& name) const {
  const auto& t = info(name);
  const size_t n = static_cast<size_t>(t.numel());
  std::vector<float> out(n);
  switch (t.dtype) {
    case SafetensorsDType::F32:
      read_range(t, reinterpret_cast<char*>(out.data()));
      return out;
    case SafetensorsDType::BF16:
    case SafetensorsDType::F16:
    case SafetensorsDType::F64:
      break;
    default:
      throw Error::at(path_, name,
                      std::string("dtype ") + safetensors_dtype_name(t.dtype) +
                          " cannot be read as floating point (F32, F64, F16, BF16 can)");
  }
  std::vector<char> raw(t.end - t.begin);
  read_range(t, raw.data());
  const char* p = raw.data();
  if (t.dtype == SafetensorsDType::BF16) {
    for (size_t i = 0; i < n; ++i) out[i] = bf16_to_float(bf16{load_le<uint16_t>(p + 2 * i)});
  } else if (t.dtype == SafetensorsDType::F16) {
    for (size_t i = 0; i < n; ++i) out[i] = half_to_float(load_le<uint16_t>(p + 2 * i));
  } else {
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(load_le<double>(p + 8 * i));
  }
  return out;
}

std::vector<int64_t> SafetensorsFile::read_i64(const std::string& name) const {
  const auto& t = info(name);
  const size_t n = static_cast<size_t>(t.numel());
  std::vector<char> raw(t.end - t.begin);
  read_range(t, raw.data());
  const char* p = raw.data();
  std::vector<int64_t> out(n);
  for (size_t i = 0; i < n; ++i) {
    switch (t.dtype) {
      case SafetensorsDType::BOOL:
      case SafetensorsDType::U8:
        out[i] = load_le<uint8_t>(p + i);
        break;
      case SafetensorsDType::I8:
        out[i] = load_le<int8_t>(p + i);
        break;
      case SafetensorsDType::I16:
        out[i] = load_le<int16_t>(p + 2 * i);
        break;
      case SafetensorsDType::U16:
        out[i] = load_le<uint16_t>(p + 2 * i);
        break;
      case SafetensorsDType::I32:
        out[i] = load_le<int32_t>(p + 4 * i);
        break;
      case SafetensorsDType::U32:
        out[i] = load_le<uint32_t>(p + 4 * i);
        break;
      case SafetensorsDType::I64:
        out[i] = load_le<int64_t>(p + 8 * i);
        break;
      case SafetensorsDType::U64: {
        const uint64_t u = load_le<uint64_t>(p + 8 * i);
        if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
          throw Error::at(path_, name, "U64 value " + std::to_string(u) + " does not fit in i64");
        }
        out[i] = static_cast<int64_t>(u);
        break;
      }
      default:
        throw Error::at(path_, name,
                        std::string("dtype ") + safetensors_dtype_name(t.dtype) + " cannot be read as integers");
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------ index

std::vector<std::string> SafetensorsIndex::files() const {
  std::set<std::string> s;
  for (const auto& [n, f] : weight_map) s.insert(f);
  return {s.begin(), s.end()};
}

SafetensorsIndex read_safetensors_index(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error::at(path, "", "cannot open the safetensors index");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::parse_error& e) {
    throw Error::at(path, "", std::string("malformed JSON: ") + e.what());
  }
  if (!j.is_object()) throw Error::at(path, "", "index is not a JSON object");
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object()) throw Error::at(path, "weight_map", "missing or not an object");
  SafetensorsIndex idx;
  idx.path = path;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it.value().is_string()) throw Error::at(path, "weight_map." + it.key(), "file name must be a string");
    const std::string f = it.value().get<std::string>();
    if (f.empty() || f.find('/') != std::string::npos || f == "..") {
      throw Error::at(path, "weight_map." + it.key(), "file name '" + f + "' must be a plain file in the same folder");
    }
    idx.weight_map[it.key()] = f;
  }
  if (idx.weight_map.empty()) throw Error::at(path, "weight_map", "lists no tensors");
  return idx;
}

// ------------------------------------------------------------------------------------------------ checkpoint

void SafetensorsCheckpoint::open_dir(const std::string& dir) {
  files_.clear();
  owner_.clear();
  const fs::path d(dir);
  const fs::path single = d / "model.safetensors";
  const fs::path index = d / "model.safetensors.index.json";
  std::error_code ec;
  if (fs::exists(index, ec)) {
    sharded_ = true;
    source_ = index.string();
    const SafetensorsIndex idx = read_safetensors_index(source_);
    std::map<std::string, size_t> file_pos;
    for (const auto& f : idx.files()) {
      const fs::path p = d / f;
      if (!fs::exists(p, ec)) throw Error::at(source_, f, "shard listed in weight_map does not exist: " + p.string());
      file_pos[f] = files_.size();
      files_.emplace_back(p.string());
    }
    // A tensor lives in exactly one shard, and the index must name that shard.
    for (size_t k = 0; k < files_.size(); ++k) {
      for (const auto& name : files_[k].names()) {
        auto [it, fresh] = owner_.emplace(name, k);
        if (!fresh) throw Error::at(files_[k].path(), name, "tensor also stored in " + files_[it->second].path());
      }
    }
    for (const auto& [name, f] : idx.weight_map) {
      const size_t k = file_pos.at(f);
      if (!files_[k].contains(name)) {
        throw Error::at(files_[k].path(), name, "tensor listed in " + source_ + " is not in this shard");
      }
    }
  } else if (fs::exists(single, ec)) {
    sharded_ = false;
    source_ = single.string();
    files_.emplace_back(source_);
    for (const auto& name : files_[0].names()) owner_[name] = 0;
  } else {
    throw Error::at(dir, "", "no model.safetensors or model.safetensors.index.json in this folder");
  }
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [n, k] : owner_) out.push_back(n);
  return out;
}

const SafetensorsFile& SafetensorsCheckpoint::file_for(const std::string& name) const {
  auto it = owner_.find(name);
  if (it == owner_.end()) throw Error::at(source_, name, "no such tensor in the checkpoint");
  return files_[it->second];
}

const SafetensorsTensorInfo& SafetensorsCheckpoint::info(const std::string& name) const {
  return file_for(name).info(name);
}
const std::string& SafetensorsCheckpoint::file_of(const std::string& name) const { return file_for(name).path(); }
std::vector<float> SafetensorsCheckpoint::read_f32(const std::string& name) const {
  return file_for(name).read_f32(name);
}
std::vector<std::string> SafetensorsCheckpoint::files() const {
  std::vector<std::string> out;
  for (const auto& f : files_) out.push_back(f.path());
  return out;
}

// ------------------------------------------------------------------------------------------------ writer

void SafetensorsWriter::add(const std::string& name, SafetensorsDType dtype, const std::vector<int64_t>& shape,
                            const void* bytes, size_t nbytes) {
  if (name.empty() || name == "__metadata__") throw Error::at("safetensors writer", name, "invalid tensor name");
  for (const auto& e : entries_) {
    if (e.name == name) throw Error::at("safetensors writer", name, "tensor added twice");
  }
  uint64_t numel;
  if (!checked_numel(shape, &numel) || numel * safetensors_dtype_size(dtype) != nbytes) {
    throw Error::at("safetensors writer", name,
                    "shape " + shape_to_string(shape) + " of " + safetensors_dtype_name(dtype) + " does not match " +
                        std::to_string(nbytes) + " bytes");
  }
  Entry e{name, dtype, shape, std::vector<char>(nbytes)};
  if (nbytes) std::memcpy(e.bytes.data(), bytes, nbytes);
  entries_.push_back(std::move(e));
}

void SafetensorsWriter::add_f32(const std::string& name, const std::vector<int64_t>& shape,
                                const std::vector<float>& values) {
  add(name, SafetensorsDType::F32, shape, values.data(), values.size() * 4);
}

void SafetensorsWriter::add_bf16(const std::string& name, const std::vector<int64_t>& shape,
                                 const std::vector<float>& values) {
  std::vector<uint16_t> b(values.size());
  for (size_t i = 0; i < values.size(); ++i) b[i] = float_to_bf16(values[i]).bits;
  add(name, SafetensorsDType::BF16, shape, b.data(), b.size() * 2);
}

void SafetensorsWriter::add_i64(const std::string& name, const std::vector<int64_t>& shape,
                                const std::vector<int64_t>& values) {
  add(name, SafetensorsDType::I64, shape, values.data(), values.size() * 8);
}

void SafetensorsWriter::add_i32(const std::string& name, const std::vector<int64_t>& shape,
                                const std::vector<int32_t>& values) {
  add(name, SafetensorsDType::I32, shape, values.data(), values.size() * 4);
}

void SafetensorsWriter::write(const std::string& path) const {
  json header = json::object();
  uint64_t offset = 0;
  for (const auto& e : entries_) {
    header[e.name] = {{"dtype", safetensors_dtype_name(e.dtype)},
                      {"shape", e.shape},
                      {"data_offsets", {offset, offset + e.bytes.size()}}};
    offset += e.bytes.size();
  }
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::string text = header.dump();
  // Pad with spaces (valid JSON whitespace) so the data buffer starts 8-byte aligned.
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t len = text.size();

  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error::at(tmp, "", "cannot open for writing");
    char len_bytes[8];
    std::memcpy(len_bytes, &len, 8);
    out.write(len_bytes, 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& e : entries_) out.write(e.bytes.data(), static_cast<std::streamsize>(e.bytes.size()));
    out.flush();
    if (!out) {
      out.close();
      std::error_code ec;
      fs::remove(tmp, ec);
      throw Error::at(tmp, "", "write failed (disk full?)");
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw Error::at(path, "", "cannot rename the finished file into place: " + ec.message());
  }
}

}  // namespace hyd

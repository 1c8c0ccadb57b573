// safetensors files: reader (single file and sharded index) and writer.
//
// Layout of a file:
//   [8 bytes]  N, little-endian u64: length of the JSON header
//   [N bytes]  JSON {"NAME": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//                    "__metadata__": {"key": "value"}}  (optional metadata, string -> string)
//   [rest]     data buffer; offsets are relative to its start, [begin, end) bytes, little-endian,
//              row-major. The buffer is fully covered by the tensors, without overlaps or holes.
// Everything is validated when a file is opened (a truncated file fails there, not at the first read);
// errors are hyd::Error::at(file, tensor, message).
#pragma once

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace hyd {

// The dtypes of the safetensors spec we know the size of. Reading into f32 supports F32, F64, F16 and
// BF16; reading into i64 supports the signed and unsigned integer types.
enum class SafetensorsDType : uint8_t { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

const char* safetensors_dtype_name(SafetensorsDType t);  // "F32", ...
size_t safetensors_dtype_size(SafetensorsDType t);
// Returns false for a name that is not one of the dtypes above.
bool parse_safetensors_dtype(const std::string& name, SafetensorsDType* out);
// A shape as the safetensors errors write it: "[4, 128]" ("[]" for a scalar).
std::string shape_to_string(const std::vector<int64_t>& shape);

struct SafetensorsTensorInfo {
  std::string name;
  SafetensorsDType dtype = SafetensorsDType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data buffer
  uint64_t end = 0;
  int64_t numel() const;
  std::string shape_str() const;  // "[4, 128]"
};

class SafetensorsFile {
 public:
  SafetensorsFile() = default;
  explicit SafetensorsFile(const std::string& path) { open(path); }
  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  ~SafetensorsFile();

  // Reads and validates the header; the data stays on disk until read.
  void open(const std::string& path);
  bool is_open() const { return stream_ != nullptr; }
  const std::string& path() const { return path_; }

  std::vector<std::string> names() const;  // in the order of their data offsets
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const SafetensorsTensorInfo& info(const std::string& name) const;  // throws naming file and tensor
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_size() const { return file_size_; }

  // Converted to f32 from F32, F64, F16 or BF16.
  std::vector<float> read_f32(const std::string& name) const;
  // Converted to i64 from any integer type or BOOL.
  std::vector<int64_t> read_i64(const std::string& name) const;
  // The raw little-endian bytes.
  std::vector<char> read_bytes(const std::string& name) const;

 private:
  void read_range(const SafetensorsTensorInfo& t, char* dst) const;
  std::string path_;
  uint64_t file_size_ = 0;
  uint64_t data_start_ = 0;  // 8 + header length
  std::map<std::string, SafetensorsTensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
  std::unique_ptr<std::ifstream> stream_;
};

// model.safetensors.index.json: {"metadata": {...}, "weight_map": {"NAME": "model-00001-of-00002.safetensors"}}
struct SafetensorsIndex {
  std::string path;
  std::map<std::string, std::string> weight_map;  // tensor name -> file name relative to the index's folder
  std::vector<std::string> files() const;         // distinct file names, sorted
};
SafetensorsIndex read_safetensors_index(const std::string& path);

// The tensors of a checkpoint folder: `model.safetensors`, or the shards listed by
// `model.safetensors.index.json` (every listed tensor must be in the shard the index names; a tensor
// may live in one shard only).
class SafetensorsCheckpoint {
 public:
  void open_dir(const std::string& dir);
  bool sharded() const { return sharded_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return owner_.count(name) != 0; }
  const SafetensorsTensorInfo& info(const std::string& name) const;
  const std::string& file_of(const std::string& name) const;  // path of the file holding the tensor
  std::vector<float> read_f32(const std::string& name) const;
  std::vector<std::string> files() const;  // paths, in shard order
  // The single file, or the index, whichever describes the folder (for error messages).
  const std::string& source() const { return source_; }

 private:
  const SafetensorsFile& file_for(const std::string& name) const;
  std::string source_;
  bool sharded_ = false;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> owner_;  // tensor name -> index into files_
};

// Collects tensors and writes one safetensors file: header padded with spaces so that the data
// buffer starts at a multiple of 8 bytes, tensors laid out in the order they were added. Written to
// PATH.tmp and renamed, so a failed write leaves no partial file under PATH.
class SafetensorsWriter {
 public:
  void add(const std::string& name, SafetensorsDType dtype, const std::vector<int64_t>& shape, const void* bytes,
           size_t nbytes);
  void add_f32(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& values);
  // Rounds each value to bf16 (nearest even).
  void add_bf16(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& values);
  void add_i64(const std::string& name, const std::vector<int64_t>& shape, const std::vector<int64_t>& values);
  void add_i32(const std::string& name, const std::vector<int64_t>& shape, const std::vector<int32_t>& values);
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  size_t size() const { return entries_.size(); }
  void write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    SafetensorsDType dtype;
    std::vector<int64_t> shape;
    std::vector<char> bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace hyd

// SHA-256 (FIPS 180-4) of byte strings and files: the checksums of checkpoint manifests
// (checkpoint/checkpoint.h). Hex digests are lower case, as `sha256sum` prints them.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace hyd {

// Incremental hashing: update() any number of times, then hex_digest() once.
class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  // Finishes the hash (padding and length) and returns the 64 hex digits; the object is spent.
  std::string hex_digest();

 private:
  void compress(const uint8_t* block);
  std::array<uint32_t, 8> h_;
  std::array<uint8_t, 64> block_{};
  size_t block_used_ = 0;
  uint64_t total_bytes_ = 0;
};

std::string sha256_hex(const std::string& bytes);
// Reads the whole file; throws hyd::Error naming it when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace hyd

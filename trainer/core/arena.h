// Arena: one contiguous allocation on one device, handed out by a bump pointer.
//
// The trainer keeps one arena per kind of memory (parameters, gradients, optimizer state,
// activations, scratch), so that sizes are computable from the config and the activation and
// scratch arenas can be reset every step without returning memory to the allocator.
#pragma once

#include <string>
#include <vector>

#include "trainer/core/tensor.h"

namespace hyd {

class Arena {
 public:
  Arena() = default;
  Arena(std::string name, Device device, size_t capacity_bytes);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  Arena(Arena&& o) noexcept;
  Arena& operator=(Arena&& o) noexcept;

  // Zero-initialised is not promised: call zero() or fill the tensor.
  Tensor alloc(std::initializer_list<int64_t> dims, DType dtype);
  void reset() { used_ = 0; }
  void zero();  // memset the whole used range to 0

  size_t used() const { return used_; }
  size_t capacity() const { return capacity_; }
  size_t peak() const { return peak_; }
  Device device() const { return device_; }
  const std::string& name() const { return name_; }

 private:
  void release();
  std::string name_;
  Device device_{};
  char* base_ = nullptr;
  size_t capacity_ = 0;
  size_t used_ = 0;
  size_t peak_ = 0;
};

// Plain memory helpers that work for either device (cudaMemcpy / memcpy). On CUDA they synchronise
// the device first, so they are ordered after every op launched on any stream.
void copy_tensor(const Tensor& dst, const Tensor& src);  // same dtype and numel
void zero_tensor(const Tensor& t);
bool cuda_available();  // a usable CUDA device is present (false in CPU-only builds)
int cuda_device_count();  // visible CUDA devices (0 in CPU-only builds or without a driver)

// Owning host buffer with a Tensor view, for tests and loaders.
struct HostTensor {
  std::vector<char> storage;
  Tensor t;
  HostTensor() = default;
  HostTensor(std::initializer_list<int64_t> dims, DType dtype);
  template <class T>
  T* ptr() const { return t.ptr<T>(); }
};

}  // namespace hyd

// Tensor: a typed, shaped view of memory owned elsewhere (an Arena or a caller's buffer).
#pragma once

#include <array>
#include <initializer_list>
#include <string>

#include "trainer/core/dtype.h"
#include "trainer/core/error.h"

namespace hyd {

constexpr int kMaxDims = 4;

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device{};
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};

  Tensor() = default;
  Tensor(void* p, DType t, Device d, std::initializer_list<int64_t> dims);

  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  int64_t size(int i) const;  // negative i counts from the end
  bool empty() const { return data == nullptr; }
  std::string shape_str() const;  // "[4, 128]"

  template <class T>
  T* ptr() const {
    HYD_CHECK(dtype == dtype_of<T>(), "tensor of dtype ", dtype_name(dtype), " accessed as ", dtype_name(dtype_of<T>()));
    return static_cast<T*>(data);
  }
  // Same memory, new shape with the same number of elements.
  Tensor view(std::initializer_list<int64_t> dims) const;
  // Rows [begin, end) along dimension 0.
  Tensor slice0(int64_t begin, int64_t end) const;
};

// Argument validation at an op's boundary: throws hyd::Error naming the op and the argument.
void expect_shape(const Tensor& t, std::initializer_list<int64_t> dims, const char* op, const char* arg);
void expect_dtype(const Tensor& t, DType d, const char* op, const char* arg);
void expect_same_device(const Tensor& a, const Tensor& b, const char* op);

}  // namespace hyd

// Helpers for op tests: random inputs, device round trips with dtype conversion, error norms.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"

namespace hyd::test {

// Skip the current test when no CUDA device is present (the gpu label also skips whole binaries).
#define HYD_REQUIRE_GPU()                                            \
  do {                                                               \
    if (!::hyd::cuda_available()) GTEST_SKIP() << "no CUDA device";  \
  } while (0)

// Fresh random numbers for every run (seeded from std::random_device) unless HYD_TEST_SEED is set;
// the seed is printed so a failure can be replayed.
std::mt19937_64& rng();
std::vector<float> randn(size_t n, float stddev = 1.0f, float mean = 0.0f);
std::vector<double> randn_f64(size_t n, double stddev = 1.0, double mean = 0.0);
std::vector<int32_t> randint(size_t n, int32_t lo, int32_t hi);  // [lo, hi)

// Round each value through bf16 (what a bf16 tensor would hold).
std::vector<float> round_bf16(const std::vector<float>& x);

// ||out - ref|| / ||ref|| (ref norm floored at 1e-30). Returns +inf if out holds a NaN/Inf.
double rel_err(const std::vector<float>& out, const std::vector<float>& ref);
double rel_err(const std::vector<double>& out, const std::vector<double>& ref);

// Device tensors for tests: an arena plus conversions from/to host f32 vectors.
class DeviceBuffers {
 public:
  explicit DeviceBuffers(Device d, size_t bytes = size_t(256) << 20) : arena_("test", d, bytes) {}
  // Uploads `host` converted to `dtype` (f32, bf16, i32 from float values).
  Tensor upload(const std::vector<float>& host, std::initializer_list<int64_t> dims, DType dtype);
  Tensor upload_i32(const std::vector<int32_t>& host, std::initializer_list<int64_t> dims);
  // Allocates and fills with NaN (floating) / 0x7f7f7f7f (int) so that unwritten outputs are caught.
  Tensor poisoned(std::initializer_list<int64_t> dims, DType dtype);
  Tensor zeros(std::initializer_list<int64_t> dims, DType dtype);
  // Downloads and converts to f32.
  static std::vector<float> download(const Tensor& t);
  Arena& arena() { return arena_; }

 private:
  Arena arena_;
};

// True when every value is finite (catches poisoned, unwritten outputs).
bool all_finite(const std::vector<float>& v);

}  // namespace hyd::test

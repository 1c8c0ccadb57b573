// Helpers for op tests: random inputs, device round trips with dtype conversion, error norms, CPU
// tensor views over host vectors, finite differences, expected errors, temporary folders.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/layer_moe.h"

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

// bf16-representable weights for a host MoE layer compared against CUDA: router N(0, 4 / D) (the choice
// depends on x), selection bias N(0, 0.05^2), every other matrix N(0, 1 / fan_in), from draw(n, sd) (n
// numbers of standard deviation sd, rounded to bf16 by the caller's draw); then the bias entries of bias_set
// (expert, value). w's dtype f32 or f64.
void randomize_moe_weights(MoeLayerWeights& w, const std::function<std::vector<float>(size_t, float)>& draw,
                           const std::vector<std::pair<int64_t, float>>& bias_set = {});

// A device copy of a host MoE layer (f32 CPU weights): bf16 weights, zero f32 gradients (present for every
// weight), the f32 selection bias when the config uses it; the given GEMM implementation; memory from buf.
MoeLayer device_moe_layer(const MoeLayer& host, DeviceBuffers& buf, kernels::MoeGemm gemm);

// True when every value is finite (catches poisoned, unwritten outputs).
bool all_finite(const std::vector<float>& v);

// Element-wise conversions between the f32 vectors the dispatchers see and the f64 references.
std::vector<float> to_f32(const std::vector<double>& v);
std::vector<double> to_f64(const std::vector<float>& v);

// CPU tensor views of host vectors (no copy: the vector must outlive the view).
Tensor cpu_f32(std::vector<float>& v, std::initializer_list<int64_t> dims);
Tensor cpu_f32(std::vector<float>& v);  // 1-D over the whole vector
Tensor cpu_bf16(std::vector<bf16>& v, std::initializer_list<int64_t> dims);
Tensor cpu_i32(std::vector<int32_t>& v, std::initializer_list<int64_t> dims);

// Central differences of `loss` (which reads `param`) with respect to every entry of `param`:
//   g[i] = (loss(param[i] + h) - loss(param[i] - h)) / 2h,
// each entry restored to its value before the next one is perturbed.
std::vector<double> central_differences(std::vector<double>& param, double h, const std::function<double()>& loss);

// `f` must throw a hyd::Error whose message contains every one of `needles` (a test failure otherwise;
// other exceptions propagate). HYD_SHOW_ERRORS=1 prints each message, to review the wording.
void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles);
// The message names the offending argument (or value).
inline void expect_error_mentioning(const std::function<void()>& f, const std::string& needle) {
  expect_error(f, {needle});
}
// The message names the op and the offending argument.
inline void expect_error_naming(const std::function<void()>& f, const std::string& op, const std::string& arg) {
  expect_error(f, {op, arg});
}

// DeviceBuffers and copy_tensor use cudaMemcpy on the legacy default stream, which does not order
// with an ExecContext's non-blocking stream: tests synchronise the whole device around the op under
// test. A no-op in builds without CUDA.
void device_sync();

// A fresh folder under the system temp dir (name: prefix + random digits), removed with its contents
// at the end of the scope.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix);
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string str() const { return path_.string(); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// An environment variable (a switch read by the code under test) put back as it was found at the end of the scope:
// set to its old value, or unset if it had none.
class ScopedEnv {
 public:
  explicit ScopedEnv(const char* name);
  ~ScopedEnv();
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
  void set(const char* value) const;  // for the rest of the scope, or until set again

 private:
  std::string name_, value_;
  bool had_;
};

}  // namespace hyd::test

// Error type and check macros.
//
// hyd::Error is thrown at boundaries (config, data files, checkpoints, teacher weights, op arguments)
// and always names what was wrong: the file, the field or the tensor. The CHECK_* macros wrap every
// CUDA / cuBLAS / NCCL / MPI call below those boundaries and report the call site.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace hyd {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
  // "FILE: field 'FIELD': MESSAGE" - the form every user-facing error takes.
  static Error at(const std::string& file, const std::string& field, const std::string& message) {
    std::string s = file;
    if (!field.empty()) s += (s.empty() ? "" : ": ") + std::string("'") + field + "'";
    return Error(s.empty() ? message : s + ": " + message);
  }
};

namespace detail {
[[noreturn]] void throw_check_failure(const char* expr, const char* file, int line, const std::string& msg);
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace hyd

// Internal invariant / argument check: throws hyd::Error naming the call site and the message.
#define HYD_CHECK(cond, ...)                                                                   \
  do {                                                                                         \
    if (!(cond)) ::hyd::detail::throw_check_failure(#cond, __FILE__, __LINE__,                 \
                                                    ::hyd::detail::concat("" __VA_OPT__(, ) __VA_ARGS__)); \
  } while (0)

#define HYD_THROW(...) throw ::hyd::Error(::hyd::detail::concat(__VA_ARGS__))

#ifdef HYD_WITH_CUDA
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
namespace hyd::detail {
[[noreturn]] void throw_cuda_error(cudaError_t e, const char* expr, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t e, const char* expr, const char* file, int line);
}  // namespace hyd::detail
#define CHECK_CUDA(expr)                                                                     \
  do {                                                                                       \
    cudaError_t hyd_e_ = (expr);                                                             \
    if (hyd_e_ != cudaSuccess) ::hyd::detail::throw_cuda_error(hyd_e_, #expr, __FILE__, __LINE__); \
  } while (0)
#define CHECK_CUBLAS(expr)                                                                     \
  do {                                                                                         \
    cublasStatus_t hyd_s_ = (expr);                                                            \
    if (hyd_s_ != CUBLAS_STATUS_SUCCESS) ::hyd::detail::throw_cublas_error(hyd_s_, #expr, __FILE__, __LINE__); \
  } while (0)
// After a kernel launch: reports launch-configuration errors at the launch site.
#define CHECK_LAUNCH() CHECK_CUDA(cudaGetLastError())
#endif

// NCCL and MPI checks are defined in parallel/ (they need those headers); declared here by name so
// every layer uses one spelling: CHECK_NCCL(expr), CHECK_MPI(expr).

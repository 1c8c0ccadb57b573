// CHECK_MPI and CHECK_NCCL: wrap every MPI and NCCL call; a failure throws hyd::Error with the
// library's own error text, the call and its site. (CHECK_CUDA / CHECK_CUBLAS live in
// trainer/core/error.h.)
#pragma once

#include <mpi.h>

#include "trainer/core/error.h"

namespace hyd::detail {
[[noreturn]] void throw_mpi_error(int code, const char* expr, const char* file, int line);
}  // namespace hyd::detail

#define CHECK_MPI(expr)                                                                    \
  do {                                                                                     \
    int hyd_mpi_rc_ = (expr);                                                              \
    if (hyd_mpi_rc_ != MPI_SUCCESS) ::hyd::detail::throw_mpi_error(hyd_mpi_rc_, #expr, __FILE__, __LINE__); \
  } while (0)

#ifdef HYD_WITH_CUDA
#include <nccl.h>
namespace hyd::detail {
[[noreturn]] void throw_nccl_error(ncclResult_t r, const char* expr, const char* file, int line);
}  // namespace hyd::detail
#define CHECK_NCCL(expr)                                                                    \
  do {                                                                                      \
    ncclResult_t hyd_nccl_rc_ = (expr);                                                     \
    if (hyd_nccl_rc_ != ncclSuccess) ::hyd::detail::throw_nccl_error(hyd_nccl_rc_, #expr, __FILE__, __LINE__); \
  } while (0)
#endif

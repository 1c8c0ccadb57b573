// The check macros turn a library's failure code into a hyd::Error that names the call and the
// library's own description of the error.
#include <gtest/gtest.h>

#include <string>

#include "parallel/checks.h"
#include "trainer/core/error.h"

namespace hyd {
namespace {

std::string error_text(void (*f)()) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

int failing_mpi_call() { return MPI_ERR_COUNT; }

TEST(Checks, HydCheckNamesTheMessageAndSite) {
  const std::string msg = error_text([] { HYD_CHECK(1 + 1 == 3, "arithmetic is off by ", 1); });
  EXPECT_NE(msg.find("arithmetic is off by 1"), std::string::npos) << msg;
  EXPECT_NE(msg.find("test_checks.cpp"), std::string::npos) << msg;
}

TEST(Checks, ErrorAtNamesFileAndField) {
  const Error e = Error::at("run.ini", "train.lr", "must be positive");
  EXPECT_STREQ(e.what(), "run.ini: 'train.lr': must be positive");
}

TEST(Checks, MpiFailureBecomesError) {
  EXPECT_NO_THROW(CHECK_MPI(MPI_SUCCESS));
  const std::string msg = error_text([] { CHECK_MPI(failing_mpi_call()); });
  EXPECT_NE(msg.find("MPI error"), std::string::npos) << msg;
  EXPECT_NE(msg.find("failing_mpi_call()"), std::string::npos) << msg;
}

#ifdef HYD_WITH_CUDA
TEST(Checks, CudaNcclAndCublasFailuresBecomeErrors) {
  const std::string cuda = error_text([] { CHECK_CUDA(cudaErrorInvalidValue); });
  EXPECT_NE(cuda.find("cudaErrorInvalidValue"), std::string::npos) << cuda;
  const std::string nccl = error_text([] { CHECK_NCCL(ncclInvalidArgument); });
  EXPECT_NE(nccl.find("NCCL error"), std::string::npos) << nccl;
  EXPECT_NE(nccl.find("ncclInvalidArgument"), std::string::npos) << nccl;
  const std::string cublas = error_text([] { CHECK_CUBLAS(CUBLAS_STATUS_INVALID_VALUE); });
  EXPECT_NE(cublas.find("CUBLAS_STATUS_INVALID_VALUE"), std::string::npos) << cublas;
}
#endif

}  // namespace
}  // namespace hyd

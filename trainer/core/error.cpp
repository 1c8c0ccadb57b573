#include "trainer/core/error.h"

namespace hyd::detail {

void throw_check_failure(const char* expr, const char* file, int line, const std::string& msg) {
  std::ostringstream os;
  os << (msg.empty() ? std::string("check failed: ") + expr : msg) << " [" << file << ":" << line << "]";
  throw Error(os.str());
}

#ifdef HYD_WITH_CUDA
void throw_cuda_error(cudaError_t e, const char* expr, const char* file, int line) {
  std::ostringstream os;
  os << "CUDA error " << cudaGetErrorName(e) << " (" << cudaGetErrorString(e) << ") in " << expr << " [" << file
     << ":" << line << "]";
  throw Error(os.str());
}
void throw_cublas_error(cublasStatus_t e, const char* expr, const char* file, int line) {
  std::ostringstream os;
  os << "cuBLAS error " << cublasGetStatusName(e) << " in " << expr << " [" << file << ":" << line << "]";
  throw Error(os.str());
}
#endif

}  // namespace hyd::detail

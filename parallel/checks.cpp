#include "parallel/checks.h"

#include <sstream>

namespace hyd::detail {

void throw_mpi_error(int code, const char* expr, const char* file, int line) {
  // MPI_Error_string is only legal between MPI_Init and MPI_Finalize; MPI_Initialized/Finalized
  // may be called at any time.
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0, initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized && MPI_Error_string(code, text, &len) != MPI_SUCCESS) len = 0;
  std::ostringstream os;
  os << "MPI error " << code << " (" << (len > 0 ? std::string(text, len) : std::string("unknown")) << ") in " << expr
     << " [" << file << ":" << line << "]";
  throw Error(os.str());
}

#ifdef HYD_WITH_CUDA
void throw_nccl_error(ncclResult_t r, const char* expr, const char* file, int line) {
  std::ostringstream os;
  os << "NCCL error " << static_cast<int>(r) << " (" << ncclGetErrorString(r) << ") in " << expr << " [" << file
     << ":" << line << "]";
  throw Error(os.str());
}
#endif

}  // namespace hyd::detail

#include "trainer/core/exec_context.h"

#include <cstdint>

#include "trainer/core/error.h"

#ifdef HYD_WITH_CUDA
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>
#endif

namespace hyd {

ExecContext::ExecContext(Device device) : device_(device) {
  if (device.is_cpu()) return;
#ifdef HYD_WITH_CUDA
  CHECK_CUDA(cudaSetDevice(device.index));
  cudaStream_t s;
  CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  stream_ = s;
  cublasHandle_t h;
  CHECK_CUBLAS(cublasCreate(&h));
  CHECK_CUBLAS(cublasSetStream(h, s));
  cublas_ = h;
  cublasLtHandle_t lt;
  CHECK_CUBLAS(cublasLtCreate(&lt));
  cublaslt_ = lt;
  workspace_bytes_ = size_t(32) << 20;
  CHECK_CUDA(cudaMalloc(&workspace_, workspace_bytes_));
  CHECK_CUBLAS(cublasSetWorkspace(h, workspace_, workspace_bytes_));
  cudaEvent_t ev;
  CHECK_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  event_ = ev;
  // Stream-ordered scratch (cudaMallocAsync, e.g. the KDA kernels') stays mapped across synchronisations:
  // with the default release threshold 0 every synchronize hands the pool's memory back to the driver
  // and the next allocation maps it again, which is slow when a loop synchronises often (sequence
  // parallelism synchronises around every collective).
  cudaMemPool_t pool;
  CHECK_CUDA(cudaDeviceGetDefaultMemPool(&pool, device.index));
  uint64_t keep = UINT64_MAX;
  CHECK_CUDA(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
#else
  HYD_THROW("device ", device.str(), " requested but this build has no CUDA support (configure with -DHYD_CUDA=ON)");
#endif
}

ExecContext::~ExecContext() {
#ifdef HYD_WITH_CUDA
  if (cublaslt_) cublasLtDestroy(static_cast<cublasLtHandle_t>(cublaslt_));
  if (cublas_) cublasDestroy(static_cast<cublasHandle_t>(cublas_));
  if (workspace_) cudaFree(workspace_);
  if (event_) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
  if (stream_) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
#endif
}

void ExecContext::wait_for(const ExecContext& other) const {
#ifdef HYD_WITH_CUDA
  if (!stream_ || !other.stream_) return;
  HYD_CHECK(device_ == other.device_, "ExecContext::wait_for: contexts on ", device_.str(), " and ",
            other.device_.str());
  CHECK_CUDA(cudaEventRecord(static_cast<cudaEvent_t>(other.event_), static_cast<cudaStream_t>(other.stream_)));
  CHECK_CUDA(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream_), static_cast<cudaEvent_t>(other.event_), 0));
#else
  (void)other;
#endif
}

void ExecContext::synchronize() const {
#ifdef HYD_WITH_CUDA
  if (stream_) CHECK_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)));
#endif
}

#ifdef HYD_WITH_CUDA
NvtxRange::NvtxRange(const char* name) { nvtxRangePushA(name); }
NvtxRange::~NvtxRange() { nvtxRangePop(); }
#else
NvtxRange::NvtxRange(const char*) {}
NvtxRange::~NvtxRange() {}
#endif

}  // namespace hyd

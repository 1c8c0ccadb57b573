// ExecContext: where an op runs. For CUDA: the device, the stream and the cuBLAS handles; for the
// CPU: nothing but the device. Ops dispatch on their tensors' device and take the stream from here.
#pragma once

#include <memory>

#include "trainer/core/dtype.h"

namespace hyd {

class ExecContext {
 public:
  explicit ExecContext(Device device);
  ~ExecContext();
  ExecContext(const ExecContext&) = delete;
  ExecContext& operator=(const ExecContext&) = delete;

  Device device() const { return device_; }
  // Opaque handles so that headers stay free of CUDA includes; .cu/.cpp files cast them back
  // (cudaStream_t, cublasHandle_t, cublasLtHandle_t).
  void* stream() const { return stream_; }
  void* cublas() const { return cublas_; }
  void* cublaslt() const { return cublaslt_; }
  // cuBLASLt / GEMM workspace on the device (32 MiB), nullptr on the CPU.
  void* workspace() const { return workspace_; }
  size_t workspace_bytes() const { return workspace_bytes_; }
  void synchronize() const;
  // Work queued on this context after the call waits for the work queued on `other` before it (an event
  // recorded on other's stream, waited for on this one); no host synchronisation. A no-op on the CPU.
  void wait_for(const ExecContext& other) const;

 private:
  Device device_;
  void* stream_ = nullptr;
  void* cublas_ = nullptr;
  void* cublaslt_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  void* event_ = nullptr;  // recorded by others' wait_for(*this)
};

// NVTX range for Nsight Systems; a no-op in CPU-only builds. Name every layer's forward and backward.
class NvtxRange {
 public:
  explicit NvtxRange(const char* name);
  ~NvtxRange();
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace hyd

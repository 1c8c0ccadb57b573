#include "trainer/core/arena.h"

#include <cstdlib>
#include <cstring>
#include <utility>

namespace hyd {

namespace {
constexpr size_t kAlign = 256;  // enough for vector loads and cuBLAS
size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
}  // namespace

Arena::Arena(std::string name, Device device, size_t capacity_bytes)
    : name_(std::move(name)), device_(device), capacity_(round_up(capacity_bytes)) {
  if (capacity_ == 0) return;
  if (device_.is_cpu()) {
    base_ = static_cast<char*>(std::aligned_alloc(kAlign, capacity_));
    if (!base_) HYD_THROW("arena '", name_, "': cannot allocate ", capacity_, " bytes of host memory");
  } else {
#ifdef HYD_WITH_CUDA
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, capacity_);
    if (e != cudaSuccess)
      HYD_THROW("arena '", name_, "': cannot allocate ", capacity_, " bytes on ", device_.str(), ": ",
                cudaGetErrorString(e));
    base_ = static_cast<char*>(p);
#else
    HYD_THROW("arena '", name_, "': this build has no CUDA support (configure with -DHYD_CUDA=ON)");
#endif
  }
}

void Arena::release() {
  if (!base_) return;
  if (device_.is_cpu()) {
    std::free(base_);
  } else {
#ifdef HYD_WITH_CUDA
    cudaFree(base_);
#endif
  }
  base_ = nullptr;
}

Arena::~Arena() { release(); }

Arena::Arena(Arena&& o) noexcept { *this = std::move(o); }

Arena& Arena::operator=(Arena&& o) noexcept {
  if (this != &o) {
    release();
    name_ = std::move(o.name_);
    device_ = o.device_;
    base_ = std::exchange(o.base_, nullptr);
    capacity_ = std::exchange(o.capacity_, 0);
    used_ = std::exchange(o.used_, 0);
    peak_ = std::exchange(o.peak_, 0);
  }
  return *this;
}

Tensor Arena::alloc(std::initializer_list<int64_t> dims, DType dtype) {
  Tensor t(nullptr, dtype, device_, dims);
  const size_t n = round_up(t.nbytes());
  if (used_ + n > capacity_)
    HYD_THROW("arena '", name_, "' on ", device_.str(), " is full: need ", n, " more bytes, ", capacity_ - used_,
              " of ", capacity_, " left");
  t.data = base_ + used_;
  used_ += n;
  if (used_ > peak_) peak_ = used_;
  return t;
}

void Arena::zero() {
  if (used_ == 0) return;
  zero_tensor(Tensor(base_, DType::u8, device_, {static_cast<int64_t>(used_)}));
}

void copy_tensor(const Tensor& dst, const Tensor& src) {
  HYD_CHECK(dst.dtype == src.dtype && dst.numel() == src.numel(), "copy_tensor: ", dtype_name(src.dtype),
            src.shape_str(), " into ", dtype_name(dst.dtype), dst.shape_str());
  if (src.nbytes() == 0) return;
  if (dst.device.is_cpu() && src.device.is_cpu()) {
    std::memcpy(dst.data, src.data, src.nbytes());
    return;
  }
#ifdef HYD_WITH_CUDA
  // Ops run on non-blocking streams, which the legacy-stream cudaMemcpy is not ordered with: finish all
  // device work first, and again after the copy, because a copy from pageable host memory returns once
  // the data is staged, before it has reached the device (a kernel launched next on another stream could
  // read the old contents). These copies are for setup, uploads and read-backs, not the hot path.
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaMemcpy(dst.data, src.data, src.nbytes(), cudaMemcpyDefault));
  if (!dst.device.is_cpu()) CHECK_CUDA(cudaDeviceSynchronize());
#else
  HYD_THROW("copy_tensor: CUDA tensor in a CPU-only build");
#endif
}

void zero_tensor(const Tensor& t) {
  if (t.nbytes() == 0) return;
  if (t.device.is_cpu()) {
    std::memset(t.data, 0, t.nbytes());
    return;
  }
#ifdef HYD_WITH_CUDA
  // Ordered against the ops' non-blocking streams by synchronising the device on both sides.
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaMemset(t.data, 0, t.nbytes()));
  CHECK_CUDA(cudaDeviceSynchronize());
#else
  HYD_THROW("zero_tensor: CUDA tensor in a CPU-only build");
#endif
}

int cuda_device_count() {
#ifdef HYD_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

bool cuda_available() { return cuda_device_count() > 0; }

HostTensor::HostTensor(std::initializer_list<int64_t> dims, DType dtype) {
  t = Tensor(nullptr, dtype, Device::cpu(), dims);
  storage.resize(t.nbytes() + 64);
  t.data = storage.data();
}

}  // namespace hyd

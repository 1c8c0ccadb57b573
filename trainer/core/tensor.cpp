#include "trainer/core/tensor.h"

#include <sstream>

namespace hyd {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
    case DType::u8: return "u8";
    case DType::f64: return "f64";
  }
  return "?";
}

Device parse_device(const std::string& s) {
  if (s == "cpu") return Device::cpu();
  if (s == "cuda") return Device::cuda(0);
  if (s.rfind("cuda:", 0) == 0) {
    try {
      return Device::cuda(std::stoi(s.substr(5)));
    } catch (const std::exception&) {
    }
  }
  throw Error("unknown device '" + s + "' (expected cpu, cuda or cuda:N)");
}

Tensor::Tensor(void* p, DType t, Device d, std::initializer_list<int64_t> dims) : data(p), dtype(t), device(d) {
  HYD_CHECK(dims.size() <= kMaxDims, "tensor rank ", dims.size(), " exceeds ", kMaxDims);
  for (int64_t v : dims) {
    HYD_CHECK(v >= 0, "negative tensor dimension");
    shape[ndim++] = v;
  }
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

int64_t Tensor::size(int i) const {
  if (i < 0) i += ndim;
  HYD_CHECK(i >= 0 && i < ndim, "dimension ", i, " out of range for rank ", ndim);
  return shape[i];
}

std::string Tensor::shape_str() const {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

Tensor Tensor::view(std::initializer_list<int64_t> dims) const {
  Tensor t(data, dtype, device, dims);
  HYD_CHECK(t.numel() == numel(), "view ", t.shape_str(), " does not match ", shape_str());
  return t;
}

Tensor Tensor::slice0(int64_t begin, int64_t end) const {
  HYD_CHECK(ndim >= 1 && begin >= 0 && begin <= end && end <= shape[0], "slice [", begin, ", ", end, ") of ", shape_str());
  Tensor t = *this;
  t.shape[0] = end - begin;
  const int64_t row = shape[0] ? numel() / shape[0] : 0;
  t.data = static_cast<char*>(data) + begin * row * static_cast<int64_t>(dtype_size(dtype));
  return t;
}

void expect_shape(const Tensor& t, std::initializer_list<int64_t> dims, const char* op, const char* arg) {
  bool ok = static_cast<int>(dims.size()) == t.ndim;
  int i = 0;
  for (int64_t v : dims) {
    if (ok && v >= 0 && t.shape[i] != v) ok = false;  // -1 = any size
    ++i;
  }
  if (!ok) {
    std::ostringstream os;
    os << op << ": argument '" << arg << "' has shape " << t.shape_str() << ", expected [";
    i = 0;
    for (int64_t v : dims) os << (i++ ? ", " : "") << (v < 0 ? std::string("*") : std::to_string(v));
    os << "]";
    throw Error(os.str());
  }
}

void expect_dtype(const Tensor& t, DType d, const char* op, const char* arg) {
  if (t.dtype != d)
    throw Error(std::string(op) + ": argument '" + arg + "' has dtype " + dtype_name(t.dtype) + ", expected " +
                dtype_name(d));
}

void expect_same_device(const Tensor& a, const Tensor& b, const char* op) {
  if (!(a.device == b.device))
    throw Error(std::string(op) + ": tensors on different devices (" + a.device.str() + " and " + b.device.str() + ")");
}

}  // namespace hyd

#include "tests/common/test_util.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#ifdef HYD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace hyd::test {

std::mt19937_64& rng() {
  static std::mt19937_64 g = [] {
    uint64_t seed;
    if (const char* s = std::getenv("HYD_TEST_SEED")) {
      seed = std::strtoull(s, nullptr, 10);
    } else {
      seed = (uint64_t(std::random_device{}()) << 32) ^ std::random_device{}();
    }
    std::printf("[hyd test] random seed %llu (set HYD_TEST_SEED to replay)\n", static_cast<unsigned long long>(seed));
    return std::mt19937_64(seed);
  }();
  return g;
}

std::vector<float> randn(size_t n, float stddev, float mean) {
  std::normal_distribution<float> d(mean, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng());
  return v;
}

std::vector<double> randn_f64(size_t n, double stddev, double mean) {
  std::normal_distribution<double> d(mean, stddev);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng());
  return v;
}

std::vector<int32_t> randint(size_t n, int32_t lo, int32_t hi) {
  std::uniform_int_distribution<int32_t> d(lo, hi - 1);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = d(rng());
  return v;
}

std::vector<float> round_bf16(const std::vector<float>& x) {
  std::vector<float> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = bf16_to_float(float_to_bf16(x[i]));
  return r;
}

template <class T>
static double rel_err_impl(const std::vector<T>& out, const std::vector<T>& ref) {
  if (out.size() != ref.size()) return std::numeric_limits<double>::infinity();
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(static_cast<double>(out[i]))) return std::numeric_limits<double>::infinity();
    const double d = double(out[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}
double rel_err(const std::vector<float>& out, const std::vector<float>& ref) { return rel_err_impl(out, ref); }
double rel_err(const std::vector<double>& out, const std::vector<double>& ref) { return rel_err_impl(out, ref); }

bool all_finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

Tensor DeviceBuffers::upload(const std::vector<float>& host, std::initializer_list<int64_t> dims, DType dtype) {
  Tensor t = arena_.alloc(dims, dtype);
  HYD_CHECK(static_cast<int64_t>(host.size()) == t.numel(), "upload: ", host.size(), " values for ", t.shape_str());
  HostTensor h(dims, dtype);
  for (size_t i = 0; i < host.size(); ++i) {
    switch (dtype) {
      case DType::f32: h.ptr<float>()[i] = host[i]; break;
      case DType::bf16: h.ptr<bf16>()[i] = float_to_bf16(host[i]); break;
      case DType::i32: h.ptr<int32_t>()[i] = static_cast<int32_t>(host[i]); break;
      default: HYD_THROW("upload: unsupported dtype ", dtype_name(dtype));
    }
  }
  copy_tensor(t, h.t);
  return t;
}

Tensor DeviceBuffers::upload_i32(const std::vector<int32_t>& host, std::initializer_list<int64_t> dims) {
  Tensor t = arena_.alloc(dims, DType::i32);
  HYD_CHECK(static_cast<int64_t>(host.size()) == t.numel(), "upload_i32: size mismatch");
  HostTensor h(dims, DType::i32);
  std::memcpy(h.t.data, host.data(), host.size() * 4);
  copy_tensor(t, h.t);
  return t;
}

Tensor DeviceBuffers::poisoned(std::initializer_list<int64_t> dims, DType dtype) {
  Tensor t = arena_.alloc(dims, dtype);
  HostTensor h(dims, dtype);
  if (dtype == DType::f32) {
    for (int64_t i = 0; i < t.numel(); ++i) h.ptr<float>()[i] = std::numeric_limits<float>::quiet_NaN();
  } else if (dtype == DType::bf16) {
    for (int64_t i = 0; i < t.numel(); ++i) h.ptr<bf16>()[i] = bf16{0x7fc0};
  } else {
    std::memset(h.t.data, 0x7f, h.t.nbytes());
  }
  copy_tensor(t, h.t);
  return t;
}

void randomize_moe_weights(MoeLayerWeights& w, const std::function<std::vector<float>(size_t, float)>& draw,
                           const std::vector<std::pair<int64_t, float>>& bias_set) {
  const float D = static_cast<float>(w.layer().cfg.hidden);
  for (const MoeLayerWeights::Param& p : w.params()) {
    const float sd = p.name == "mlp.gate.weight"                    ? 2.f / std::sqrt(D)
                     : p.name == "mlp.gate.e_score_correction_bias" ? 0.05f
                                                                    : 1.f / std::sqrt(float(p.shape.back()));
    const std::vector<float> v = draw(static_cast<size_t>(p.value.numel()), sd);
    w.set_param(p.name, std::vector<double>(v.begin(), v.end()));
  }
  if (bias_set.empty()) return;
  std::vector<double> b = w.get_param("mlp.gate.e_score_correction_bias");
  for (const auto& [e, v] : bias_set) b[e] = v;
  w.set_param("mlp.gate.e_score_correction_bias", b);
}

MoeLayer device_moe_layer(const MoeLayer& host, DeviceBuffers& buf, kernels::MoeGemm gemm) {
  auto weight = [&](const WeightRef& h) {
    WeightRef d;
    if (h.value.empty()) return d;
    const std::vector<float> v(h.value.ptr<float>(), h.value.ptr<float>() + h.value.numel());
    d.value = buf.upload(v, {h.value.numel()}, DType::bf16);
    d.value.ndim = h.value.ndim;
    d.value.shape = h.value.shape;
    d.grad = buf.zeros({h.value.numel()}, DType::f32);
    d.grad.ndim = h.value.ndim;
    d.grad.shape = h.value.shape;
    return d;
  };
  MoeLayer G;
  G.cfg = host.cfg;
  G.gemm = gemm;
  G.router = weight(host.router);
  G.gate_up = weight(host.gate_up);
  G.down = weight(host.down);
  G.shared_gate_up = weight(host.shared_gate_up);
  G.shared_down = weight(host.shared_down);
  if (host.cfg.use_selection_bias) {
    const int64_t E = host.cfg.num_experts;
    const std::vector<float> b(host.selection_bias.ptr<float>(), host.selection_bias.ptr<float>() + E);
    G.selection_bias = buf.upload(b, {E}, DType::f32);
  }
  return G;
}

Tensor DeviceBuffers::zeros(std::initializer_list<int64_t> dims, DType dtype) {
  Tensor t = arena_.alloc(dims, dtype);
  zero_tensor(t);
  return t;
}

std::vector<float> DeviceBuffers::download(const Tensor& t) {
  HostTensor h({t.numel()}, t.dtype);
  copy_tensor(h.t, t.view({t.numel()}));
  std::vector<float> out(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) {
    switch (t.dtype) {
      case DType::f32: out[i] = h.ptr<float>()[i]; break;
      case DType::bf16: out[i] = bf16_to_float(h.ptr<bf16>()[i]); break;
      case DType::i32: out[i] = static_cast<float>(h.ptr<int32_t>()[i]); break;
      default: HYD_THROW("download: unsupported dtype ", dtype_name(t.dtype));
    }
  }
  return out;
}

std::vector<float> to_f32(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }
std::vector<double> to_f64(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

Tensor cpu_f32(std::vector<float>& v, std::initializer_list<int64_t> dims) {
  return Tensor(v.data(), DType::f32, Device::cpu(), dims);
}
Tensor cpu_f32(std::vector<float>& v) { return Tensor(v.data(), DType::f32, Device::cpu(), {int64_t(v.size())}); }
Tensor cpu_bf16(std::vector<bf16>& v, std::initializer_list<int64_t> dims) {
  return Tensor(v.data(), DType::bf16, Device::cpu(), dims);
}
Tensor cpu_i32(std::vector<int32_t>& v, std::initializer_list<int64_t> dims) {
  return Tensor(v.data(), DType::i32, Device::cpu(), dims);
}

std::vector<double> central_differences(std::vector<double>& param, double h, const std::function<double()>& loss) {
  std::vector<double> g(param.size());
  for (size_t i = 0; i < param.size(); ++i) {
    const double keep = param[i];
    param[i] = keep + h;
    const double lp = loss();
    param[i] = keep - h;
    const double lm = loss();
    param[i] = keep;
    g[i] = (lp - lm) / (2 * h);
  }
  return g;
}

void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    std::string expected;
    for (const auto& n : needles) expected += (expected.empty() ? "'" : ", '") + n + "'";
    ADD_FAILURE() << "no hyd::Error thrown; expected one containing " << expected;
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (std::getenv("HYD_SHOW_ERRORS")) std::printf("error: %s\n", msg.c_str());
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
  }
}

void device_sync() {
#ifdef HYD_WITH_CUDA
  CHECK_CUDA(cudaDeviceSynchronize());
#endif
}

TempDir::TempDir(const std::string& prefix) {
  std::random_device rd;
  path_ = std::filesystem::temp_directory_path() / (prefix + std::to_string(rd()) + std::to_string(rd()));
  std::filesystem::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

ScopedEnv::ScopedEnv(const char* name) : name_(name) {
  const char* e = std::getenv(name);
  had_ = e != nullptr;
  value_ = had_ ? e : "";
}
ScopedEnv::~ScopedEnv() {
  if (had_)
    ::setenv(name_.c_str(), value_.c_str(), 1);
  else
    ::unsetenv(name_.c_str());
}
void ScopedEnv::set(const char* value) const { ::setenv(name_.c_str(), value, 1); }

}  // namespace hyd::test

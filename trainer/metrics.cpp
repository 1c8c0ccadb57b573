#include "trainer/metrics.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>

#include <cstdlib>
#include <string>

#include "trainer/core/dtype.h"
#include "trainer/core/error.h"

#ifdef HYD_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace hyd {

double device_peak_flops(const Device& device) {
  if (const char* env = std::getenv("HYD_PEAK_TFLOPS")) {
    const double tf = std::atof(env);
    if (tf > 0) return tf * 1e12;
  }
  if (!device.is_cuda()) return 0;
#ifdef HYD_WITH_CUDA
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device.index) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  const std::string name = prop.name;
  const bool pcie = name.find("PCIe") != std::string::npos;
  if (name.find("H100") != std::string::npos) return pcie ? 756e12 : 989e12;
  if (name.find("H200") != std::string::npos || name.find("GH200") != std::string::npos) return 989e12;
  if (name.find("A100") != std::string::npos) return 312e12;
#endif
  return 0;
}

std::string format_number(const char* printf_format, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, printf_format, x);
  return buf;
}

std::string format_megabytes(size_t bytes) { return format_number("%.1f MB", static_cast<double>(bytes) / 1e6); }

double estimate_eta(double seconds_so_far, int64_t done, int64_t total) {
  if (done <= 0 || done >= total) return 0;
  return seconds_so_far / static_cast<double>(done) * static_cast<double>(total - done);
}

std::string StepMetrics::line() const {
  char buf[256];
  std::snprintf(buf, sizeof buf, "step %lld/%lld | loss %.3f | lr %.1e | gnorm %.2f | %s tok/s | mem %.0f MB | eta %s",
                static_cast<long long>(step), static_cast<long long>(total_steps), loss, lr, grad_norm,
                format_count(tokens_per_s).c_str(), static_cast<double>(memory_bytes) / 1e6,
                format_duration(eta_s).c_str());
  std::string s = buf;
  if (mfu >= 0) {
    char m[32];
    std::snprintf(m, sizeof m, " | mfu %.1f%%", 100.0 * mfu);
    s.insert(s.find(" | mem "), m);
  }
  if (skipped_steps > 0) s += " | skipped " + std::to_string(skipped_steps);
  return s;
}

nlohmann::json StepMetrics::json() const {
  nlohmann::json j;
  j["step"] = step;
  j["loss"] = loss;
  j["lr"] = lr;
  j["grad_norm"] = grad_norm;
  j["tokens_per_s"] = tokens_per_s;
  j["tokens"] = tokens;
  j["elapsed_s"] = elapsed_s;
  j["memory_bytes"] = memory_bytes;
  j["skipped_steps"] = skipped_steps;
  j["eta_s"] = eta_s;
  if (mfu >= 0) j["mfu"] = mfu;
  return j;
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<long long>(std::llround(seconds));
  char buf[64];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", s / 3600, (s / 60) % 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%lld:%02lld", s / 60, s % 60);
  return buf;
}

std::string format_count(double x) {
  char buf[64];
  if (!std::isfinite(x)) return "?";
  if (x >= 1e9)
    std::snprintf(buf, sizeof buf, "%.2fG", x / 1e9);
  else if (x >= 1e6)
    std::snprintf(buf, sizeof buf, "%.2fM", x / 1e6);
  else if (x >= 1e3)
    std::snprintf(buf, sizeof buf, "%.1fk", x / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.0f", x);
  return buf;
}

MetricsWriter::MetricsWriter(const std::string& path, bool truncate) : path_(path) {
  out_.open(path, truncate ? std::ios::out | std::ios::trunc : std::ios::out | std::ios::app);
  if (!out_) throw Error::at(path, "", std::string("cannot open for writing: ") + std::strerror(errno));
}

void MetricsWriter::write(const nlohmann::json& record) {
  // NaN/Inf are not JSON: nlohmann writes them as null, which readers handle.
  out_ << record.dump() << '\n';
  out_.flush();
  if (!out_) throw Error::at(path_, "", "write failed");
}

}  // namespace hyd

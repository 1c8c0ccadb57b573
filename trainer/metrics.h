// Training metrics: the human progress line on stdout and the machine-readable metrics.jsonl.
//
//   step 120/200 | loss 3.412 | lr 2.9e-04 | gnorm 0.83 | 41.2k tok/s | mfu 38.1% | mem 210 MB | eta 0:35
//   {"step":120,"loss":3.412,"lr":0.00029,"grad_norm":0.83,"tokens_per_s":41200.0,"tokens":...,"elapsed_s":...}
#pragma once

#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "trainer/core/dtype.h"

namespace hyd {

struct StepMetrics {
  int64_t step = 0;  // optimizer steps done (1-based in the printout)
  int64_t total_steps = 0;
  double loss = 0;  // mean training loss over the log interval
  double lr = 0;
  double grad_norm = 0;       // global norm before clipping, last step of the interval
  double tokens_per_s = 0;    // over the log interval
  int64_t tokens = 0;         // tokens trained on so far
  double elapsed_s = 0;       // since the first step started
  size_t memory_bytes = 0;    // parameters, gradients, activations, optimizer state, batch buffers
  int64_t skipped_steps = 0;  // steps whose update was skipped (non-finite loss or gradient) so far
  double eta_s = 0;           // estimated seconds to the end
  double mfu = -1;            // model FLOPs utilisation in [0, 1]; < 0 when the device's peak is unknown

  std::string line() const;
  nlohmann::json json() const;
};

// Dense bf16 tensor-core peak of a device in FLOP/s, for MFU: HYD_PEAK_TFLOPS overrides; known
// NVIDIA data-centre GPUs by name (H100/H200 SXM 989 TFLOP/s, H100 PCIe 756, A100 312); 0 when
// unknown (CPUs included), in which case MFU is not reported.
double device_peak_flops(const Device& device);

// Seconds left for the remaining steps at the average pace of the `done` steps so far.
double estimate_eta(double seconds_so_far, int64_t done, int64_t total);
// "0:35", "12:03", "1:02:03" (h:mm:ss from one hour on).
std::string format_duration(double seconds);
// One number through a printf format ("%.3g", "%.2e", ...).
std::string format_number(const char* printf_format, double x);
// "166.1 MB" (decimal megabytes).
std::string format_megabytes(size_t bytes);
// "950", "41.2k", "1.35M" (per-second rates, counts).
std::string format_count(double x);

// Appends one JSON object per line to a file and flushes it, so the file is complete after a crash.
class MetricsWriter {
 public:
  MetricsWriter() = default;
  // truncate: start a new file; otherwise append. Throws hyd::Error naming the file.
  MetricsWriter(const std::string& path, bool truncate);
  void write(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream out_;
};

}  // namespace hyd

// bench/gemm: the matrix products of a step, replayed one shape at a time, to see what cuBLAS's own choice costs
// against the best of the algorithms cuBLASLt offers for the same shape.
//
//   HYD_GEMM_LOG=/tmp/gemm.log ./build/bench_e2e --mode distill --steps 1 --warmup 0   (one step's shapes)
//   ./build/bench_gemm /tmp/gemm.log [--algos 16] [--reps 20] [--extra "gemm 0 1 16384 3072 1024 0 0"]...
//
// The log (kernels/cuda/matmul.cu, HYD_GEMM_LOG) has one line per call: "gemm ta tb m n k beta c_f32" (row-major
// C[m, n] = beta C + op(A)[m, k] op(B)[k, n], bf16 operands, f32 accumulation, C in f32 or bf16) or "residual m n k"
// (y = x w^T + residual by cuBLASLt). Each distinct shape is timed with CUDA events (mean of --reps after 3
// untimed runs, caches warm, random operands):
//   ours    what kernels/cuda/matmul.cu runs: cublasGemmEx with CUBLAS_GEMM_DEFAULT (gemm lines), or the
//           cuBLASLt heuristic's first algorithm (residual lines), with the context's 32 MiB workspace;
//   best    the fastest of the first --algos algorithms cuBLASLt's heuristic returns for the same operation.
// Prints one row per shape (calls per log, time per call, TFLOP/s) sorted by the shape's total time, then the
// totals over every logged call: how much of the step's GEMM time a per-shape algorithm choice could save.
// --extra adds a shape that is not in the log (counted once), to price a change (e.g. fused projections).
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) throw std::runtime_error(std::string(what) + ": cuBLAS status " + std::to_string(s));
}

struct Shape {
  bool residual = false;
  int ta = 0, tb = 1;
  long long m = 0, n = 0, k = 0;
  float beta = 0.f;
  int c_f32 = 0;
  bool operator<(const Shape& o) const {
    return std::tie(residual, ta, tb, m, n, k, beta, c_f32) <
           std::tie(o.residual, o.ta, o.tb, o.m, o.n, o.k, o.beta, o.c_f32);
  }
  std::string name() const {
    char buf[128];
    if (residual)
      std::snprintf(buf, sizeof buf, "residual %lldx%lldx%lld", m, n, k);
    else
      std::snprintf(buf, sizeof buf, "%s%s %lldx%lldx%lld b%g %s", ta ? "T" : "N", tb ? "T" : "N", m, n, k, beta,
                    c_f32 ? "f32" : "bf16");
    return buf;
  }
};

bool parse(const std::string& line, Shape& s) {
  std::istringstream in(line);
  std::string kind;
  in >> kind;
  if (kind == "gemm") {
    in >> s.ta >> s.tb >> s.m >> s.n >> s.k >> s.beta >> s.c_f32;
  } else if (kind == "residual") {
    s.residual = true;
    s.ta = 0;
    s.tb = 1;
    s.beta = 1.f;
    in >> s.m >> s.n >> s.k;
  } else {
    return false;
  }
  return !in.fail() && s.m > 0 && s.n > 0 && s.k > 0;
}

// Random bf16 values in [-0.5, 0.5) from a fixed hash of the index, made on the host and copied.
void fill(void* dst, size_t n, unsigned seed) {
  std::vector<uint16_t> h(n);
  for (size_t i = 0; i < n; ++i) {
    unsigned x = static_cast<unsigned>(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    const float f = static_cast<float>(x & 0xffff) / 65536.f - 0.5f;
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    h[i] = static_cast<uint16_t>(bits >> 16);
  }
  check(cudaMemcpy(dst, h.data(), n * 2, cudaMemcpyHostToDevice), "copy operand");
}

struct Timer {
  cudaEvent_t a, b;
  Timer() {
    check(cudaEventCreate(&a), "event");
    check(cudaEventCreate(&b), "event");
  }
  ~Timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  template <class F>
  double mean_us(F&& f, int reps, cudaStream_t st) {
    for (int i = 0; i < 3; ++i) f();
    check(cudaEventRecord(a, st), "record");
    for (int i = 0; i < reps; ++i) f();
    check(cudaEventRecord(b, st), "record");
    check(cudaEventSynchronize(b), "sync");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "elapsed");
    return 1e3 * ms / reps;
  }
};

struct Result {
  double ours_us = 0, best_us = 0;
  int algos = 0, best_index = -1;
};

Result time_shape(const Shape& s, cublasHandle_t h, cublasLtHandle_t lt, cudaStream_t st, void* ws, size_t ws_bytes,
                  int max_algos, int reps) {
  const size_t a_n = size_t(s.m) * s.k, b_n = size_t(s.k) * s.n, c_n = size_t(s.m) * s.n;
  void *a = nullptr, *b = nullptr, *res = nullptr;
  void* c = nullptr;
  check(cudaMalloc(&a, a_n * 2), "malloc a");
  check(cudaMalloc(&b, b_n * 2), "malloc b");
  check(cudaMalloc(&c, c_n * (s.c_f32 ? 4 : 2)), "malloc c");
  check(cudaMalloc(&res, c_n * 2), "malloc residual");
  fill(a, a_n, 1u);
  fill(b, b_n, 2u);
  fill(res, c_n, 3u);
  check(cudaMemsetAsync(c, 0, c_n * (s.c_f32 ? 4 : 2), st), "memset");
  const float alpha = 1.f, beta = s.beta;
  // Column-major view (as matmul.cu): C^T[n, m] = op(B)^T op(A)^T; the stored row-major [r, c] is column-major [c, r].
  const cublasOperation_t op_first = s.tb ? CUBLAS_OP_T : CUBLAS_OP_N, op_second = s.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int ldb = static_cast<int>(s.tb ? s.k : s.n), lda = static_cast<int>(s.ta ? s.m : s.k);
  const int ldc = static_cast<int>(s.n);
  const cudaDataType_t ct = s.c_f32 ? CUDA_R_32F : CUDA_R_16BF;

  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  check(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
  check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)), "transa");
  check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)), "transb");
  // First operand = row-major B; second = row-major A.
  check(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, s.tb ? s.k : s.n, s.tb ? s.n : s.k, ldb), "layout a");
  check(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, s.ta ? s.m : s.k, s.ta ? s.k : s.m, lda), "layout b");
  check(cublasLtMatrixLayoutCreate(&lc, ct, s.n, s.m, ldc), "layout c");
  cublasLtMatmulPreference_t pref = nullptr;
  check(cublasLtMatmulPreferenceCreate(&pref), "pref");
  const uint64_t wsb = ws_bytes;
  check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof(wsb)), "ws");
  std::vector<cublasLtMatmulHeuristicResult_t> heur(static_cast<size_t>(max_algos));
  int found = 0;
  if (cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, max_algos, heur.data(), &found) !=
      CUBLAS_STATUS_SUCCESS)
    found = 0;
  const void* c_in = s.residual ? static_cast<const void*>(res) : c;
  auto run_lt = [&](int i) {
    check(cublasLtMatmul(lt, op, &alpha, b, la, a, lb, &beta, c_in, lc, c, lc, &heur[i].algo, ws, ws_bytes, st),
          "cublasLtMatmul");
  };

  Timer timer;
  Result r;
  r.algos = found;
  if (s.residual) {
    if (found == 0) throw std::runtime_error("no cuBLASLt algorithm for " + s.name());
    r.ours_us = timer.mean_us([&] { run_lt(0); }, reps, st);
  } else {
    r.ours_us = timer.mean_us(
        [&] {
          check(cublasGemmEx(h, op_first, op_second, static_cast<int>(s.n), static_cast<int>(s.m),
                             static_cast<int>(s.k), &alpha, b, CUDA_R_16BF, ldb, a, CUDA_R_16BF, lda, &beta, c, ct, ldc,
                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                "cublasGemmEx");
        },
        reps, st);
  }
  r.best_us = r.ours_us;
  for (int i = 0; i < found; ++i) {
    const double t = timer.mean_us([&] { run_lt(i); }, reps, st);
    if (t < r.best_us) {
      r.best_us = t;
      r.best_index = i;
    }
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatmulDescDestroy(op);
  check(cudaFree(a), "free");
  check(cudaFree(b), "free");
  check(cudaFree(c), "free");
  check(cudaFree(res), "free");
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2) {
      std::fprintf(stderr,
                   "usage: bench_gemm LOG [--algos N] [--reps N] [--extra \"gemm ta tb m n k beta c_f32\"]...\n");
      return 2;
    }
    int max_algos = 16, reps = 20;
    std::map<Shape, long> count;
    std::vector<Shape> order;
    auto add = [&](const Shape& s) {
      if (count[s]++ == 0) order.push_back(s);
    };
    for (int i = 2; i < argc; ++i) {
      const std::string arg = argv[i];
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + arg);
      if (arg == "--algos") {
        max_algos = std::max(1, std::atoi(argv[++i]));
      } else if (arg == "--reps") {
        reps = std::max(1, std::atoi(argv[++i]));
      } else if (arg == "--extra") {
        Shape s;
        if (!parse(argv[++i], s)) throw std::runtime_error(std::string("--extra: cannot parse \"") + argv[i] + "\"");
        add(s);
      } else {
        throw std::runtime_error("unknown option " + arg);
      }
    }
    std::ifstream in(argv[1]);
    if (!in) throw std::runtime_error(std::string("cannot open ") + argv[1]);
    std::string line;
    long lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (line.empty()) continue;
      Shape s;
      if (!parse(line, s))
        throw std::runtime_error(std::string(argv[1]) + ":" + std::to_string(lineno) + ": cannot parse \"" + line +
                                 "\"");
      add(s);
    }
    if (order.empty()) throw std::runtime_error(std::string(argv[1]) + ": no products logged");

    cublasHandle_t h = nullptr;
    cublasLtHandle_t lt = nullptr;
    cudaStream_t st = nullptr;
    void* ws = nullptr;
    const size_t ws_bytes = size_t(32) << 20;
    check(cudaStreamCreate(&st), "stream");
    check(cublasCreate(&h), "cublasCreate");
    check(cublasLtCreate(&lt), "cublasLtCreate");
    check(cudaMalloc(&ws, ws_bytes), "workspace");
    check(cublasSetStream(h, st), "setStream");
    check(cublasSetWorkspace(h, ws, ws_bytes), "setWorkspace");

    struct Row {
      Shape s;
      long calls;
      Result r;
    };
    std::vector<Row> rows;
    for (const Shape& s : order) rows.push_back({s, count[s], time_shape(s, h, lt, st, ws, ws_bytes, max_algos, reps)});
    std::sort(rows.begin(), rows.end(),
              [](const Row& x, const Row& y) { return x.calls * x.r.ours_us > y.calls * y.r.ours_us; });
    std::printf("%-36s %6s %10s %7s %10s %7s %6s %5s %10s\n", "shape (m x n x k)", "calls", "ours us", "TF/s",
                "best us", "TF/s", "gain", "algo", "total ms");
    double tot_ours = 0, tot_best = 0, flops = 0;
    for (const Row& row : rows) {
      const double f = 2.0 * row.s.m * row.s.n * row.s.k;
      std::printf("%-36s %6ld %10.1f %7.0f %10.1f %7.0f %5.2fx %2d/%-2d %10.3f\n", row.s.name().c_str(), row.calls,
                  row.r.ours_us, f / row.r.ours_us * 1e-6, row.r.best_us, f / row.r.best_us * 1e-6,
                  row.r.ours_us / row.r.best_us, row.r.best_index, row.r.algos, row.calls * row.r.ours_us * 1e-3);
      tot_ours += row.calls * row.r.ours_us;
      tot_best += row.calls * row.r.best_us;
      flops += row.calls * f;
    }
    std::printf(
        "gemm_total calls=%ld ours_ms=%.3f best_ms=%.3f ours_tflops=%.0f best_tflops=%.0f\n",
        [&] {
          long n = 0;
          for (const Row& row : rows) n += row.calls;
          return n;
        }(),
        tot_ours * 1e-3, tot_best * 1e-3, flops / tot_ours * 1e-6, flops / tot_best * 1e-6);
    cudaFree(ws);
    cublasLtDestroy(lt);
    cublasDestroy(h);
    cudaStreamDestroy(st);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gemm: %s\n", e.what());
    return 1;
  }
}

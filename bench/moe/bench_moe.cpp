// Times HyDistill's MoE FFN layer (trainer/layer_moe.h: MoeLayer::forward / backward, dropless top-k
// routing, sorted dispatch, grouped SwiGLU experts) on CUDA with bf16 activations, on the shape of
// issue 7, and prints one line per run; bench/moe/run.sh puts it beside bench/moe/torch_moe.py (the
// same layer in PyTorch: argsort dispatch + torch._grouped_mm) measured in the same call.
// Expert parallelism: under `mpirun -np P` (one GPU per rank) every rank holds N tokens of its own (weak
// scaling: the tokens per GPU stay) and the routed experts run over EP = P (MoeExpertParallel over NCCL);
// the weights are the same on every rank. Rank 0 prints the line with ep=P, the slowest rank's medians,
// the rows the busiest rank's experts received and the bytes each rank sent per forward+backward;
// bench/moe/run_ep.sh runs P = 1, 2, 4 and prints the efficiency table.
//
// Usage: bench_moe [--tokens N] [--hidden D] [--experts E] [--top_k k] [--ffn F] [--shared S]
//                  [--shared_ffn F_s] [--score softmax|sigmoid] [--norm_topk 0|1] [--iters I] [--warmup W]
// Defaults (issue 7, qwen3_moe-like): N 16384, D 2048, E 64, k 8, F 1408, softmax router, norm_topk_prob,
// no shared expert (F_s defaults to F), 20 timed iterations after 3 warm-ups. The variant of run.sh:
// --score sigmoid --shared 1.
//
// Weights as the models hold them on CUDA (trainer/model.cpp): values bf16 (router included; the layer
// computes its logits in f32), gradients f32 (accumulated into, never zeroed: the timing does not care).
// Values: router, experts ~ N(0, 0.02), x and dout ~ N(0, 1), from a counter hash (element i a pure
// function of (seed, i)), so with D = 2048 the router logits have a standard deviation near 0.9 and the
// load is uneven the way a young router's is; the per-expert load of the timed input is printed.
//
// FLOPs (useful work, multiply-adds counted as 2; padding or skipped experts not counted):
//   experts fwd  = 2 * N*k * D * 3F        (gate_up: 2F outputs, down: F inputs, for each of the N k pairs)
//   router fwd   = 2 * N * D * E
//   shared fwd   = 2 * N * S * D * 3F_s
//   fwd = experts + router + shared;  fwd+bwd = 3 * fwd  (backward: input and weight gradient GEMMs, 2x fwd)
// Times: the median over the timed iterations, each bracketed by its own pair of CUDA events on the
// layer's stream (back to back; the host synchronises only where the layer does: with a cuBLAS GEMM
// implementation, once per forward for the per-expert row counts).
// Expert GEMMs: HYD_MOE_GEMM = grouped | loop | wmma (kernels/moe.h MoeGemm; unset: loop), printed as
// gemm=...; gemm_dw= says how the weight gradients ran (grouped may fall back to the loop there when
// cuBLAS refuses an f32 output for cublasGemmGroupedBatchedEx). bench/moe/run.sh runs one line per
// implementation with MOE_GEMMS="grouped loop wmma".
// Peak memory: peak_mib = what the bench allocates (weights, gradients, x / out / dout / din, the saved
// tensors, the high-water mark of the backward scratch arena) + the high-water mark of the stream-ordered
// pool the kernels take their temporaries from; device_mib = the drop of cudaMemGetInfo's free memory
// from before the first allocation to after the last timed step (arena capacities, pool, cuBLAS
// workspaces: an upper bound).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/moe.h"
#include "parallel/comm.h"
#include "parallel/nccl_comm.h"
#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/layer_common.h"
#include "trainer/layer_moe.h"

using namespace hyd;

namespace {

struct Options {
  int64_t tokens = 16384, hidden = 2048, experts = 64, top_k = 8, ffn = 1408;
  int64_t shared = 0, shared_ffn = 0;  // shared_ffn 0: the routed experts' F
  std::string score = "softmax";
  int64_t norm_topk = 1;  // 0 | 1
  int64_t iters = 20, warmup = 3;
};

[[noreturn]] void usage(const std::string& why, int code = 2) {
  std::fprintf(code == 0 ? stdout : stderr,
               "bench_moe: %s\nusage: bench_moe [--tokens N] [--hidden D] [--experts E] [--top_k k] [--ffn F] "
               "[--shared S] [--shared_ffn F_s] [--score softmax|sigmoid] [--norm_topk 0|1] [--iters I] "
               "[--warmup W]\n",
               why.c_str());
  std::exit(code);
}

Options parse(int argc, char** argv) {
  Options o;
  const std::pair<const char*, int64_t*> integers[] = {
      {"--tokens", &o.tokens}, {"--hidden", &o.hidden}, {"--experts", &o.experts},       {"--top_k", &o.top_k},
      {"--ffn", &o.ffn},       {"--shared", &o.shared}, {"--shared_ffn", &o.shared_ffn}, {"--norm_topk", &o.norm_topk},
      {"--iters", &o.iters},   {"--warmup", &o.warmup}};
  for (int i = 1; i < argc; i += 2) {
    const std::string key = argv[i];
    if (key == "-h" || key == "--help") usage("the MoE FFN layer, forward and forward+backward on CUDA", 0);
    if (i + 1 >= argc) usage("option " + key + " needs a value");
    const char* v = argv[i + 1];
    auto integer = [&] {
      char* end = nullptr;
      const long long x = std::strtoll(v, &end, 10);
      if (end == v || *end != '\0' || x < 0) usage("option " + key + ": '" + v + "' is not a non-negative integer");
      return static_cast<int64_t>(x);
    };
    if (key == "--score") {
      o.score = v;
      continue;
    }
    const auto it =
        std::find_if(std::begin(integers), std::end(integers), [&](const auto& p) { return key == p.first; });
    if (it == std::end(integers)) usage("unknown option " + key);
    *it->second = integer();
  }
  if (o.tokens == 0) usage("--tokens must be positive");
  if (o.shared_ffn == 0) o.shared_ffn = o.ffn;
  o.iters = std::max<int64_t>(1, o.iters);
  return o;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// t (bf16 or f32, on the device) <- std * N(0, 1): Box-Muller on the two 32-bit halves of a hash of
// (seed, element index). Generated on the host in chunks, split over threads, uploaded chunk by chunk.
void fill_normal(const Tensor& t, float stddev, uint64_t seed) {
  HYD_CHECK(t.dtype == DType::bf16 || t.dtype == DType::f32, "fill_normal: bf16 or f32, got ", dtype_name(t.dtype));
  const size_t n = static_cast<size_t>(t.numel()), es = dtype_size(t.dtype);
  const size_t chunk = std::min<size_t>(n, size_t(1) << 26);
  std::vector<char> host(chunk * es);
  const unsigned workers = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  for (size_t base = 0; base < n; base += chunk) {
    const size_t len = std::min(chunk, n - base);
    std::vector<std::thread> pool;
    for (unsigned w = 0; w < workers; ++w) {
      pool.emplace_back([&, w] {
        for (size_t i = len * w / workers, end = len * (w + 1) / workers; i < end; ++i) {
          const uint64_t h = splitmix64(seed * 0x100000001b3ull + base + i);
          const double u1 = (double(h >> 32) + 0.5) / 4294967296.0, u2 = double(h & 0xffffffffu) / 4294967296.0;
          const float z =
              stddev * static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
          if (t.dtype == DType::bf16)
            reinterpret_cast<bf16*>(host.data())[i] = float_to_bf16(z);
          else
            reinterpret_cast<float*>(host.data())[i] = z;
        }
      });
    }
    for (auto& th : pool) th.join();
    CHECK_CUDA(cudaMemcpy(static_cast<char*>(t.data) + base * es, host.data(), len * es, cudaMemcpyHostToDevice));
  }
}

int current_device() {
  int d = 0;
  CHECK_CUDA(cudaGetDevice(&d));
  return d;
}

size_t pool_high_water() {
  cudaMemPool_t pool;
  CHECK_CUDA(cudaDeviceGetDefaultMemPool(&pool, current_device()));
  uint64_t v = 0;
  CHECK_CUDA(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &v));
  return v;
}

void reset_pool() {
  cudaMemPool_t pool;
  CHECK_CUDA(cudaDeviceGetDefaultMemPool(&pool, current_device()));
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaMemPoolTrimTo(pool, 0));
  uint64_t zero = 0;
  CHECK_CUDA(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &zero));
}

size_t device_used() {
  size_t free_b = 0, total_b = 0;
  CHECK_CUDA(cudaMemGetInfo(&free_b, &total_b));
  return total_b - free_b;
}

// The layer's parameters and their gradients (values bf16, gradients f32, as in the models' flat
// buffers), laid out by either an ArenaSizer (to size the arenas) or the arenas themselves.
template <class Alloc>
void alloc_weights(MoeLayer& L, Alloc& values, Alloc& grads) {
  const MoeConfig& c = L.cfg;
  const int64_t E = c.num_experts, D = c.hidden, F = c.expert_ffn, S = c.num_shared_experts, Fs = c.shared_ffn;
  auto weight = [&](WeightRef& w, std::initializer_list<int64_t> dims) {
    w.value = values.alloc(dims, DType::bf16);
    w.grad = grads.alloc(dims, DType::f32);
  };
  weight(L.router, {E, D});
  weight(L.gate_up, {E, 2 * F, D});
  weight(L.down, {E, D, F});
  if (S > 0) {
    weight(L.shared_gate_up, {S, 2 * Fs, D});
    weight(L.shared_down, {S, D, Fs});
  }
}

std::vector<int64_t> expert_load(const MoeRouting& r) {
  if (r.counts.device.is_cpu()) return r.counts_host();
  std::vector<int32_t> c(static_cast<size_t>(r.num_experts));
  CHECK_CUDA(cudaMemcpy(c.data(), r.counts.data, c.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
  return {c.begin(), c.end()};
}

void run(const Options& o, const Communicator& world) {
  MoeConfig cfg;
  cfg.hidden = o.hidden;
  cfg.num_experts = o.experts;
  cfg.top_k = o.top_k;
  cfg.expert_ffn = o.ffn;
  cfg.num_shared_experts = o.shared;
  cfg.shared_ffn = o.shared > 0 ? o.shared_ffn : 0;
  cfg.score_func = o.score;
  cfg.norm_topk_prob = o.norm_topk != 0;
  cfg.validate("bench_moe (command line)");
  const int64_t N = o.tokens, D = cfg.hidden;
  const DType act = DType::bf16;
  const Device dev = Device::cuda(current_device());
  const int P = world.size();
  std::unique_ptr<MoeExpertParallel> ep;
  if (P > 1) ep = std::make_unique<MoeExpertParallel>(world, dev);

  reset_pool();
  const size_t used_before = device_used();
  ExecContext ctx(dev);
  MoeLayer L;
  L.cfg = cfg;

  // Size every arena from the layer's own allocation functions, then allocate exactly that.
  ArenaSizer value_size, grad_size, saved_size, scratch_size;
  alloc_weights(L, value_size, grad_size);
  L.alloc_saved(saved_size, N, act);
  L.alloc_scratch(scratch_size, N, act);
  const size_t io_bytes =
      4 * ((size_t(N) * D * dtype_size(act) + ArenaSizer::kAlign - 1) / ArenaSizer::kAlign) * ArenaSizer::kAlign;
  Arena values("moe.values", dev, value_size.used()), grads("moe.grads", dev, grad_size.used()),
      io("moe.io", dev, io_bytes), saved_arena("moe.saved", dev, saved_size.used()),
      scratch("moe.scratch", dev, scratch_size.used() + (size_t(64) << 20));
  alloc_weights(L, values, grads);
  grads.zero();
  fill_normal(L.router.value, 0.02f, 1);
  fill_normal(L.gate_up.value, 0.02f, 2);
  fill_normal(L.down.value, 0.02f, 3);
  if (cfg.num_shared_experts > 0) {
    fill_normal(L.shared_gate_up.value, 0.02f, 4);
    fill_normal(L.shared_down.value, 0.02f, 5);
  }
  const Tensor x = io.alloc({N, D}, act), out = io.alloc({N, D}, act), dout = io.alloc({N, D}, act),
               din = io.alloc({N, D}, act);
  fill_normal(x, 1.0f, 6 + 100 * static_cast<uint64_t>(world.rank()));  // every rank its own tokens
  fill_normal(dout, 1.0f, 7 + 100 * static_cast<uint64_t>(world.rank()));
  MoeLayer::Saved saved = L.alloc_saved(saved_arena, N, act);

  auto fwd = [&] { L.forward(ctx, x, out, saved, ep.get()); };
  auto fwdbwd = [&] {
    L.forward(ctx, x, out, saved, ep.get());
    scratch.reset();
    L.backward(ctx, saved, dout, din, scratch, 1.0, ep.get());
  };
  cudaStream_t s = static_cast<cudaStream_t>(ctx.stream());
  std::vector<cudaEvent_t> ev(static_cast<size_t>(o.iters) + 1);
  for (auto& e : ev) CHECK_CUDA(cudaEventCreate(&e));
  auto median_ms = [&](auto&& f) {
    for (int64_t i = 0; i < o.warmup; ++i) f();
    CHECK_CUDA(cudaStreamSynchronize(s));
    CHECK_CUDA(cudaEventRecord(ev[0], s));
    for (int64_t i = 0; i < o.iters; ++i) {
      f();
      CHECK_CUDA(cudaEventRecord(ev[i + 1], s));
    }
    CHECK_CUDA(cudaEventSynchronize(ev.back()));
    std::vector<float> ms(static_cast<size_t>(o.iters));
    for (int64_t i = 0; i < o.iters; ++i) CHECK_CUDA(cudaEventElapsedTime(&ms[i], ev[i], ev[i + 1]));
    std::sort(ms.begin(), ms.end());
    const size_t m = ms.size() / 2;
    return ms.size() % 2 ? ms[m] : 0.5f * (ms[m - 1] + ms[m]);
  };
  float f_ms = median_ms(fwd);
  const uint64_t sent0 = ep ? ep->device_bytes_sent() : 0;
  float fb_ms = median_ms(fwdbwd);
  CHECK_CUDA(cudaDeviceSynchronize());
  const double sent_per_step =
      ep ? double(ep->device_bytes_sent() - sent0) / double(o.iters + o.warmup) : 0.0;  // per forward+backward
  // The slowest rank's medians, the busiest rank's received rows.
  std::vector<double> worst = {f_ms, fb_ms, ep ? double(ep->last_received_rows(L)) : double(N * cfg.top_k)};
  world.all_reduce(std::span<double>(worst), ReduceOp::kMax);
  f_ms = static_cast<float>(worst[0]);
  fb_ms = static_cast<float>(worst[1]);
  const std::vector<int64_t> load = expert_load(saved.routing);  // the input is the same every iteration
  const size_t peak =
      values.used() + grads.used() + io.used() + saved_arena.used() + scratch.peak() + pool_high_water();
  const double device_bytes = double(device_used()) - double(used_before);
  for (auto& e : ev) CHECK_CUDA(cudaEventDestroy(e));

  const double nk = double(N) * double(cfg.top_k);
  const double fwd_flops = 2.0 * nk * double(D) * 3.0 * double(cfg.expert_ffn) +
                           2.0 * double(N) * double(D) * double(cfg.num_experts) +
                           2.0 * double(N) * double(cfg.num_shared_experts) * double(D) * 3.0 * double(cfg.shared_ffn);
  const auto [lo, hi] = std::minmax_element(load.begin(), load.end());
  const char* gemm = kernels::moe_gemm_name(L.gemm);
  const char* gemm_dw = L.gemm == kernels::MoeGemm::grouped || L.gemm == kernels::MoeGemm::automatic
                            ? kernels::moe_grouped_dw_path()
                            : gemm;
  if (world.rank() != 0) return;
  std::printf(
      "hydistill tokens=%lld hidden=%lld experts=%lld top_k=%lld ffn=%lld shared=%lld score=%s gemm=%s gemm_dw=%s "
      "fwd_ms=%.3f fwdbwd_ms=%.3f fwd_tflops=%.1f fwdbwd_tflops=%.1f peak_mib=%.0f device_mib=%.0f load_min=%lld "
      "load_max=%lld ep=%d max_rows=%.0f sent_mib=%.1f\n",
      (long long)N, (long long)D, (long long)cfg.num_experts, (long long)cfg.top_k, (long long)cfg.expert_ffn,
      (long long)cfg.num_shared_experts, cfg.score_func.c_str(), gemm, gemm_dw, f_ms, fb_ms, fwd_flops / (f_ms * 1e9),
      3.0 * fwd_flops / (fb_ms * 1e9), double(peak) / double(1 << 20), device_bytes / double(1 << 20), (long long)*lo,
      (long long)*hi, P, worst[2], sent_per_step / double(1 << 20));
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  MpiRuntime mpi(&argc, &argv);
  const Options o = parse(argc, argv);
  return run_or_abort([&] {
    const Communicator world = Communicator::world();
    if (world.size() > 1) bind_local_gpu(mpi);
    run(o, world);
    return 0;
  });
}

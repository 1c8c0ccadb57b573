// Times HyDistill's FlashAttention-style CUDA kernels (kernels/flash_attention.h, run by
// kernels::attention_forward / _backward for d = 128, as the models call them) on the shapes of
// issue 4 and prints one line per shape; bench/attention/run.sh puts it beside PyTorch's
// scaled_dot_product_attention measured in the same call.
// Usage: bench_attention [B T]...   (default: 8 4096  2 16384  1 32768), H=16 (query and kv heads),
// d=128, causal; the B sequences are B documents of one packed batch (cu_seqlens 0, T, 2T, ...).
// Inputs: q, k, v, dout ~ approximately N(0, 1) from a counter hash (Irwin-Hall sum of four
// uniforms; fast enough on the host for the largest shape), scale d^-1/2.
// FLOPs (causal): fwd 2 B H T^2 d, fwd+bwd 3.5 times that.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "kernels/attention.h"
#include "kernels/flash_attention.h"
#include "trainer/core/arena.h"

using namespace hyd;

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Approximately standard normal bf16 values, element i a pure function of (seed, i); split over threads.
std::vector<bf16> hash_normal(size_t n, uint64_t seed) {
  std::vector<bf16> out(n);
  const unsigned workers = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (unsigned w = 0; w < workers; ++w) {
    pool.emplace_back([&, w] {
      const size_t begin = n * w / workers, end = n * (w + 1) / workers;
      for (size_t i = begin; i < end; ++i) {
        const uint64_t h = splitmix64(seed * 0x100000001b3ull + i);
        const float s = float(h & 0xffff) + float((h >> 16) & 0xffff) + float((h >> 32) & 0xffff) + float(h >> 48);
        out[i] = float_to_bf16((s / 65536.f - 2.f) * 1.7320508f);  // sum of 4 U(0,1): mean 2, variance 1/3
      }
    });
  }
  for (auto& t : pool) t.join();
  return out;
}

template <class T>
Tensor upload(Arena& a, const std::vector<T>& host, std::initializer_list<int64_t> dims, DType dt) {
  Tensor t = a.alloc(dims, dt);
  CHECK_CUDA(cudaMemcpy(t.data, host.data(), t.nbytes(), cudaMemcpyHostToDevice));
  return t;
}

void run(int64_t B, int64_t T) {
  const int64_t H = 16, d = 128, N = B * T;
  std::vector<int32_t> cu(B + 1);
  for (int64_t b = 0; b <= B; ++b) cu[b] = static_cast<int32_t>(b * T);
  const size_t elems = size_t(N) * H * d;
  Arena a("bench", Device::cuda(0), 8 * elems * 2 + size_t(N) * H * 4 + (size_t(64) << 20));
  ExecContext ctx(Device::cuda(0));
  const Tensor tq = upload(a, hash_normal(elems, 1), {N, H, d}, DType::bf16),
               tk = upload(a, hash_normal(elems, 2), {N, H, d}, DType::bf16),
               tv = upload(a, hash_normal(elems, 3), {N, H, d}, DType::bf16),
               tdo = upload(a, hash_normal(elems, 4), {N, H, d}, DType::bf16),
               tcu = upload(a, cu, {B + 1}, DType::i32);
  const Tensor o = a.alloc({N, H, d}, DType::bf16), lse = a.alloc({N, H}, DType::f32),
               dq = a.alloc({N, H, d}, DType::bf16), dk = a.alloc({N, H, d}, DType::bf16),
               dv = a.alloc({N, H, d}, DType::bf16);
  const float scale = 1.f / std::sqrt(float(d));
  HYD_CHECK(kernels::flash_attention_supported(d, DType::bf16), "bench_attention: d = ", d,
            " would not run the flash kernels");
  auto fwd = [&] { kernels::attention_forward(ctx, tq, tk, tv, tcu, T, o, lse, scale); };
  auto bwd = [&] { kernels::attention_backward(ctx, tdo, tq, tk, tv, o, lse, tcu, T, dq, dk, dv, scale); };
  cudaStream_t s = static_cast<cudaStream_t>(ctx.stream());
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  auto time_ms = [&](auto&& f, int iters) {
    f();  // warm-up
    CHECK_CUDA(cudaStreamSynchronize(s));
    CHECK_CUDA(cudaEventRecord(e0, s));
    for (int i = 0; i < iters; ++i) f();
    CHECK_CUDA(cudaEventRecord(e1, s));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    return ms / iters;
  };
  const int iters = 10;
  const float f_ms = time_ms(fwd, iters);
  const float fb_ms = time_ms([&] { fwd(); bwd(); }, iters);
  const double fwd_flops = 2.0 * double(B) * H * double(T) * double(T) * d;
  std::printf("hydistill B=%lld T=%lld H=%lld d=%lld fwd_ms=%.3f fwdbwd_ms=%.3f fwd_tflops=%.1f fwdbwd_tflops=%.1f\n",
              (long long)B, (long long)T, (long long)H, (long long)d, f_ms, fb_ms, fwd_flops / (f_ms * 1e9),
              3.5 * fwd_flops / (fb_ms * 1e9));
  std::fflush(stdout);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::vector<std::pair<int64_t, int64_t>> shapes;
    for (int i = 1; i + 1 < argc; i += 2) shapes.emplace_back(std::atoll(argv[i]), std::atoll(argv[i + 1]));
    if (shapes.empty()) shapes = {{8, 4096}, {2, 16384}, {1, 32768}};
    for (auto [B, T] : shapes) run(B, T);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_attention: %s\n", e.what());
    return 1;
  }
  return 0;
}

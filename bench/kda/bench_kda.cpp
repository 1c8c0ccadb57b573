// Times HyDistill's CUDA KDA core (kernels::kda_forward / kda_backward) on the shapes of issue 3
// and prints one line per shape; bench/kda/run.sh puts it beside FLA's chunk_kda measured in the
// same call. Usage: bench_kda [B T]...   (default: 8 4096  2 16384  1 32768  1 131072), H=16 (BENCH_KDA_HEADS=N:
// N), dk=dv=128.
// BENCH_KDA_LASP=1 also times LASP-2's pieces per shape: the sequential state pass from a state (the re-run) and
// the parallel correction's transition and correction kernels, forward and backward (docs/parallel.md); the
// incoming state (and outgoing adjoint) of the first document only, the others start from zero, as on a rank.
// Inputs: q, k unit-norm per head (q scaled by dk^-1/2, as the layer feeds them), v ~ N(0,1), g in
// [-0.5, -0.01] (log-decay), beta in (0, 1); the B sequences are B documents of one packed batch.
// Peak memory = the inputs, outputs and gradients we allocate + the high-water mark of the stream-
// ordered pool the kernels take their scratch from: the pool's reserved bytes (peak_gib, saving_peak_gib: what it
// held from the device, its free blocks included) and its allocated bytes (saving_alloc_gib: the measure of FLA's
// torch.cuda.max_memory_allocated, bench/kda/fla_kda.py's peak_gib).
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kernels/kda.h"
#include "trainer/core/arena.h"

using namespace hyd;

namespace {

std::vector<bf16> unit_rows(int64_t rows, int64_t d, float scale, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<bf16> out(rows * d);
  std::vector<float> row(d);
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0;
    for (int64_t i = 0; i < d; ++i) s += double(row[i] = n(g)) * row[i];
    const float inv = scale / static_cast<float>(std::sqrt(s));
    for (int64_t i = 0; i < d; ++i) out[r * d + i] = float_to_bf16(row[i] * inv);
  }
  return out;
}

template <class T>
Tensor upload(Arena& a, const std::vector<T>& host, std::initializer_list<int64_t> dims, DType dt) {
  Tensor t = a.alloc(dims, dt);
  CHECK_CUDA(cudaMemcpy(t.data, host.data(), t.nbytes(), cudaMemcpyHostToDevice));
  return t;
}

// The default pool's high-water mark: reserved (cudaMemPoolAttrReservedMemHigh) or allocated (UsedMemHigh) bytes.
size_t pool_high_water(cudaMemPoolAttr which = cudaMemPoolAttrReservedMemHigh) {
  cudaMemPool_t pool;
  CHECK_CUDA(cudaDeviceGetDefaultMemPool(&pool, 0));
  uint64_t v = 0;
  CHECK_CUDA(cudaMemPoolGetAttribute(pool, which, &v));
  return v;
}

void reset_pool() {
  cudaMemPool_t pool;
  CHECK_CUDA(cudaDeviceGetDefaultMemPool(&pool, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaMemPoolTrimTo(pool, 0));
  uint64_t zero = 0;
  CHECK_CUDA(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &zero));
  CHECK_CUDA(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero));
}

void run(int64_t B, int64_t T) {
  const char* heads = std::getenv("BENCH_KDA_HEADS");  // (issue 3's shapes: 16; the issue-9 student's: 8)
  const int64_t H = heads != nullptr && std::atoi(heads) > 0 ? std::atoi(heads) : 16, dk = 128, dv = 128, N = B * T;
  std::mt19937_64 rng(B * 1000003 + T);
  std::uniform_real_distribution<float> ug(-0.5f, -0.01f), ub(0.02f, 0.98f);
  std::normal_distribution<float> nv(0.f, 1.f);
  const auto q = unit_rows(N * H, dk, 1.0f / std::sqrt(float(dk)), 1), k = unit_rows(N * H, dk, 1.0f, 2);
  std::vector<bf16> v(N * H * dv), dout(N * H * dv);
  for (auto& x : v) x = float_to_bf16(nv(rng));
  for (auto& x : dout) x = float_to_bf16(nv(rng));
  std::vector<float> g(N * H * dk), beta(N * H);
  for (auto& x : g) x = ug(rng);
  for (auto& x : beta) x = ub(rng);
  std::vector<int32_t> cu(B + 1);
  for (int64_t b = 0; b <= B; ++b) cu[b] = static_cast<int32_t>(b * T);

  const size_t act = size_t(N) * H * (2 * dk + 2 * dv) * 2 + size_t(N) * H * (dk + 1) * 4;  // q k v o + g beta
  const size_t grads = size_t(N) * H * (2 * dk + dv) * 2 + size_t(N) * H * (dk + 1) * 4 + size_t(N) * H * dv * 2;
  Arena a("bench", Device::cuda(0), act + grads + (size_t(64) << 20));
  ExecContext ctx(Device::cuda(0));
  const Tensor tq = upload(a, q, {N, H, dk}, DType::bf16), tk = upload(a, k, {N, H, dk}, DType::bf16),
               tv = upload(a, v, {N, H, dv}, DType::bf16), tg = upload(a, g, {N, H, dk}, DType::f32),
               tb = upload(a, beta, {N, H}, DType::f32), tcu = upload(a, cu, {B + 1}, DType::i32),
               tdo = upload(a, dout, {N, H, dv}, DType::bf16);
  const Tensor o = a.alloc({N, H, dv}, DType::bf16), dq = a.alloc({N, H, dk}, DType::bf16),
               dkk = a.alloc({N, H, dk}, DType::bf16), dvv = a.alloc({N, H, dv}, DType::bf16),
               dg = a.alloc({N, H, dk}, DType::f32), db = a.alloc({N, H}, DType::f32);
  const Tensor none{};
  auto fwd = [&] { kernels::kda_forward(ctx, tq, tk, tv, tg, tb, tcu, none, o, none); };
  auto bwd = [&] { kernels::kda_backward(ctx, tq, tk, tv, tg, tb, tcu, none, tdo, none, dq, dkk, dvv, dg, db, none); };
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
  const int iters = N >= 65536 ? 3 : 10;
  reset_pool();
  const float f_ms = time_ms(fwd, iters);
  const float fb_ms = time_ms([&] { fwd(); bwd(); }, iters);
  const double peak_gib = double(a.used() + pool_high_water()) / double(1ull << 30);
  // The saving forward and the saved backward (kernels/kda.h kda_forward_saving / kda_backward_saved): the
  // backward skips the prep and the state pass; `saved` (the forward's kept work) counts in its peak.
  const int64_t saved_floats = kernels::kda_saved_floats(tk, tv, tcu);
  Arena keep("bench saved", Device::cuda(0), size_t(saved_floats) * 4 + 256);
  const Tensor saved = keep.alloc({saved_floats}, DType::f32);
  auto fwd_s = [&] { kernels::kda_forward_saving(ctx, tq, tk, tv, tg, tb, tcu, none, o, none, saved); };
  auto bwd_s = [&] {
    kernels::kda_backward_saved(ctx, tq, tk, tv, tg, tb, tcu, tdo, none, dq, dkk, dvv, dg, db, none, saved);
  };
  reset_pool();
  const float fs_ms = time_ms(fwd_s, iters);
  const float fbs_ms = time_ms(
      [&] {
        fwd_s();
        bwd_s();
      },
      iters);
  const double peak_s_gib = double(a.used() + keep.used() + pool_high_water()) / double(1ull << 30);
  const double alloc_s_gib =
      double(a.used() + keep.used() + pool_high_water(cudaMemPoolAttrUsedMemHigh)) / double(1ull << 30);
  std::printf(
      "hydistill B=%lld T=%lld H=%lld d=%lld fwd_ms=%.3f fwdbwd_ms=%.3f peak_gib=%.2f saving_fwd_ms=%.3f "
      "saving_fwdbwd_ms=%.3f saving_peak_gib=%.2f saving_alloc_gib=%.2f saving_windows=%d\n",
      (long long)B, (long long)T, (long long)H, (long long)dk, f_ms, fb_ms, peak_gib, fs_ms, fbs_ms, peak_s_gib,
      alloc_s_gib, kernels::kda_saving_windows(tk, tv, tcu));
  std::fflush(stdout);
  if (const char* e = std::getenv("BENCH_KDA_LASP"); e != nullptr && e[0] == '1') {
    // LASP-2's pieces on this shape (docs/parallel.md, one rank with an incoming state and an outgoing adjoint):
    // the sequential pass from a state (what the re-run costs) against the parallel correction's kernels.
    const int64_t D = B;
    std::vector<float> eye_h(size_t(D * H * dk * dk), 0.f), st_h(size_t(D * H * dk * dv));
    for (int64_t m = 0; m < D * H; ++m)
      for (int64_t i = 0; i < dk; ++i) eye_h[(m * dk + i) * dk + i] = 1.f;
    for (size_t i = 0; i < size_t(H * dk * dv); ++i)
      st_h[i] = 0.05f * nv(rng);  // the first document only, as a
                                  // rank's continuing one
    Arena lasp("bench lasp", Device::cuda(0),
               size_t(kernels::kda_saving_u_floats(tk, tv, tcu) + kernels::kda_transitions_floats(tk, tv, tcu) +
                      kernels::kda_backward_workspace_floats(tk, tv, tcu)) *
                       4 +
                   (eye_h.size() + st_h.size() + size_t(D * H * dk * dk)) * 4 + 4096);
    const Tensor u = lasp.alloc({kernels::kda_saving_u_floats(tk, tv, tcu)}, DType::f32);
    const Tensor P = lasp.alloc({kernels::kda_transitions_floats(tk, tv, tcu)}, DType::f32);
    const Tensor ws = lasp.alloc({kernels::kda_backward_workspace_floats(tk, tv, tcu)}, DType::f32);
    const Tensor eye = upload(lasp, eye_h, {D, H, dk, dk}, DType::f32),
                 sin = upload(lasp, st_h, {D, H, dk, dv}, DType::f32);
    const Tensor M = lasp.alloc({D, H, dk, dk}, DType::f32);
    kernels::kda_forward_saving_prepare(ctx, tq, tk, tv, tg, tb, tcu, saved, u);
    const float pass_ms =
        time_ms([&] { kernels::kda_forward_saving_pass(ctx, tk, tv, tcu, sin, o, none, saved, u); }, iters);
    const float trans_ms =
        time_ms([&] { kernels::kda_forward_saving_transition(ctx, tk, tv, tcu, eye, M, saved, P); }, iters);
    const float corr_ms =
        time_ms([&] { kernels::kda_forward_saving_correct(ctx, tk, tv, tcu, sin, P, o, saved); }, iters);
    const float rev_ms =
        time_ms([&] { kernels::kda_backward_saved_reverse(ctx, tk, tv, tcu, tdo, sin, none, saved, ws); }, iters);
    const float btrans_ms =
        time_ms([&] { kernels::kda_backward_saved_transition(ctx, tk, tv, tcu, eye, saved, P); }, iters);
    const float bcorr_ms =
        time_ms([&] { kernels::kda_backward_saved_correct(ctx, tk, tv, tcu, sin, P, saved, ws); }, iters);
    const float fin_ms = time_ms(
        [&] { kernels::kda_backward_saved_finish(ctx, tq, tk, tv, tg, tb, tcu, tdo, dq, dkk, dvv, dg, db, saved, ws); },
        iters);
    // The forward before the exchange on a rank with an incoming state (prep, zero-state pass, transition pass):
    // in one call pipelined over the saving forward's windows, and with one window (the passes side by side after
    // the whole prep, as without HYD_SP_WINDOWS).
    auto before_exchange = [&] {
      kernels::kda_forward_saving_lasp(ctx, tq, tk, tv, tg, tb, tcu, o, none, saved, u, eye, M, P);
    };
    const float pre_win_ms = time_ms(before_exchange, iters);
    const char* forced = std::getenv("HYD_KDA_WINDOWS");
    const std::string keep_forced = forced != nullptr ? forced : "";
    setenv("HYD_KDA_WINDOWS", "1", 1);
    const float pre_one_ms = time_ms(before_exchange, iters);
    if (forced != nullptr)
      setenv("HYD_KDA_WINDOWS", keep_forced.c_str(), 1);
    else
      unsetenv("HYD_KDA_WINDOWS");
    std::printf(
        "lasp B=%lld T=%lld H=%lld fwd: pass_from_state_ms=%.3f transition_ms=%.3f correct_ms=%.3f "
        "before_exchange_windows_ms=%.3f before_exchange_one_window_ms=%.3f | bwd: "
        "reverse_ms=%.3f transition_ms=%.3f correct_ms=%.3f finish_ms=%.3f\n",
        (long long)B, (long long)T, (long long)H, pass_ms, trans_ms, corr_ms, pre_win_ms, pre_one_ms, rev_ms, btrans_ms,
        bcorr_ms, fin_ms);
    std::fflush(stdout);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::vector<std::pair<int64_t, int64_t>> shapes;
    for (int i = 1; i + 1 < argc; i += 2) shapes.emplace_back(std::atoll(argv[i]), std::atoll(argv[i + 1]));
    if (shapes.empty()) shapes = {{8, 4096}, {2, 16384}, {1, 32768}, {1, 131072}};
    for (auto [B, T] : shapes) run(B, T);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_kda: %s\n", e.what());
    return 1;
  }
  return 0;
}

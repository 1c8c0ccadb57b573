// bench/scaling: tokens/s of the hybrid student's training step (forward + backward; with --optimizer 1 also
// the ZeRO-1 exchange and the AdamW update) under sequence and data parallelism, one GPU per rank, launched
// by bench/scaling/run.sh with mpirun.
//
//   mpirun -np W bench_scaling --sp S --tokens-per-gpu T [--layers 12] [--pattern KKKA] [--steps 6]
//          [--warmup 2] [--docs 1] [--optimizer 0|1]
//
// Model: the student of issue 9 (hidden 1024, 8 attention heads of 128 (NoPE layers), KDA 8 heads,
// dk = dv = 128, SwiGLU 2816, vocab 32000), random weights. W / S data-parallel groups each run one
// sequence of S * T tokens (cut into --docs equal documents) split over their S ranks. With --optimizer 1
// the step ends as `hydistill train`'s does: ZeRO-1 over all W ranks (trainer/zero1.h: reduce-scatter of the
// f32 gradients, AdamW on this rank's shard, all-gather of the bf16 parameters; one AdamW over everything
// when W = 1); without it the gradients are not reduced (the SP layers alone are timed).
// Prints one line per run: step time (median), tokens/s in all and per GPU, the SP collectives' time
// share and bytes per step by kind, and per KDA / attention layer; the ZeRO-1 exchange's time (measured
// between device synchronisations) and bytes per step; the model FLOPs per token of the whole sequence
// (hybrid_train_flops_per_token) and the TFLOP/s each GPU achieves with them.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "parallel/checks.h"
#include "parallel/comm.h"
#include "parallel/grid.h"
#include "parallel/sequence_parallel.h"
#include "trainer/batch_upload.h"
#include "trainer/hybrid_model.h"
#include "trainer/lasp.h"
#include "trainer/optimizer.h"
#include "trainer/zero1.h"

using namespace hyd;

namespace {

struct Args {
  int sp = 1;
  int64_t tokens_per_gpu = 16384;
  int64_t layers = 12;
  std::string pattern = "KKKA";
  int steps = 6, warmup = 2;
  int64_t docs = 1;
  bool optimizer = false;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) HYD_THROW("bench_scaling: ", k, " needs a value");
      return argv[++i];
    };
    if (k == "--sp")
      a.sp = std::stoi(next());
    else if (k == "--tokens-per-gpu")
      a.tokens_per_gpu = std::stoll(next());
    else if (k == "--layers")
      a.layers = std::stoll(next());
    else if (k == "--pattern")
      a.pattern = next();
    else if (k == "--steps")
      a.steps = std::stoi(next());
    else if (k == "--warmup")
      a.warmup = std::stoi(next());
    else if (k == "--docs")
      a.docs = std::stoll(next());
    else if (k == "--optimizer")
      a.optimizer = std::stoi(next()) != 0;
    else
      HYD_THROW("bench_scaling: unknown argument ", k);
  }
  return a;
}

HostBatch one_sequence(int64_t T, int64_t docs, int64_t vocab, uint64_t seed) {
  HostBatch hb;
  uint64_t x = seed;
  hb.cu_seqlens.push_back(0);
  const int64_t len = T / docs;
  for (int64_t d = 0; d < docs; ++d) {
    const int64_t n = d + 1 < docs ? len : T - len * (docs - 1);
    const auto start = static_cast<int32_t>(hb.tokens.size());
    for (int64_t i = 0; i < n; ++i) {
      x = x * 6364136223846793005ULL + 1442695040888963407ULL;
      hb.tokens.push_back(static_cast<int32_t>((x >> 33) % static_cast<uint64_t>(vocab)));
      hb.positions.push_back(static_cast<int32_t>(i));
    }
    for (int64_t i = 0; i < n; ++i) hb.targets.push_back(i + 1 < n ? hb.tokens[start + i + 1] : -1);
    hb.cu_seqlens.push_back(static_cast<int32_t>(start + n));
  }
  hb.num_docs = docs;
  for (int32_t t : hb.targets) hb.num_targets += t >= 0;
  return hb;
}

int run(int argc, char** argv, const MpiRuntime& mpi) {
  const Args a = parse(argc, argv);
  Communicator world = Communicator::world();
  const int W = world.size();
  if (a.sp < 1 || W % a.sp != 0) HYD_THROW("bench_scaling: --sp ", a.sp, " does not divide the world size ", W);
  int gpus = 0;
  CHECK_CUDA(cudaGetDeviceCount(&gpus));
  if (gpus < mpi.local_size()) HYD_THROW("bench_scaling: ", mpi.local_size(), " ranks on this node, ", gpus, " GPUs");
  const Device dev = Device::cuda(mpi.local_rank());
  CHECK_CUDA(cudaSetDevice(dev.index));
  ProcessGrid grid(world, W / a.sp, a.sp);

  HybridConfig cfg;
  cfg.model.family = "llama";
  cfg.model.vocab_size = 32000;
  cfg.model.hidden_size = 1024;
  cfg.model.intermediate_size = 2816;
  cfg.model.num_layers = a.layers;
  cfg.model.num_heads = 8;
  cfg.model.num_kv_heads = 8;
  cfg.model.head_dim = 128;
  cfg.model.max_position_embeddings = std::max<int64_t>(4096, a.tokens_per_gpu * a.sp);
  cfg.kda.heads = 8;
  cfg.kda.v_heads = 8;
  cfg.kda.dk = 128;
  cfg.kda.dv = 128;
  cfg.pattern = a.pattern;
  cfg.finalize("bench_scaling");

  const int64_t T = a.tokens_per_gpu * a.sp, n_local = a.tokens_per_gpu;
  HybridModel model(cfg, dev, n_local);
  model.init_random(7);
  ExecContext ctx(dev);
  SequenceParallel sp(grid.sp_group(), dev);
  BatchUploader up(dev, n_local);
  HostBatch local = one_sequence(T, a.docs, cfg.model.vocab_size, 1000 + grid.dp_rank());
  const Batch b = upload_sp_batch(ctx, up, &sp, 1, T, local);

  std::optional<Zero1> zero;
  std::optional<AdamW> opt;
  if (a.optimizer) {
    if (W > 1) zero.emplace(world, model.params(), model.flat_params(), model.flat_grads());
    opt.emplace(zero ? zero->shard_params() : model.params(), dev, AdamWConfig{});
    if (zero) opt->set_sum_squares_reduction([&](double ss) { return zero->all_reduce_sum(ss); });
  }
  const auto since = [](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  };
  std::vector<double> times;
  // The ZeRO-1 exchange time (Zero1 times itself, between device synchronisations) from the first timed step.
  if (zero) zero->set_timing(true);
  double zero_mark = 0;
  for (int s = 0; s < a.warmup + a.steps; ++s) {
    if (s == a.warmup) {
      sp.reset_traffic();
      lasp_profile_reset();
      zero_mark = zero ? zero->seconds() : 0.0;
    }
    world.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    model.zero_grad();
    model.forward_backward(ctx, b, 1.0f);
    if (opt) {
      if (zero) zero->reduce_gradients(ctx);
      opt->step(ctx, 1e-5);
      if (zero) zero->gather_parameters(ctx);
    }
    ctx.synchronize();
    const double dt = since(t0);
    std::vector<double> worst{dt};
    world.all_reduce(std::span<double>(worst), ReduceOp::kMax);
    if (s >= a.warmup) times.push_back(worst[0]);
  }
  std::sort(times.begin(), times.end());
  const double step = times[times.size() / 2];
  const double zero_s = zero ? zero->seconds() - zero_mark : 0.0;
  int64_t k_layers = 0, a_layers = 0;
  for (int64_t l = 0; l < cfg.model.num_layers; ++l) (model.layer_kind(l) == MixerKind::kda ? k_layers : a_layers)++;
  const auto per = [&](SpTraffic k) { return sp.traffic(k); };
  const double comm_s =
      (per(SpTraffic::kda_state).seconds + per(SpTraffic::conv_halo).seconds + per(SpTraffic::attention_kv).seconds) /
      a.steps;
  // Model FLOPs per token over the whole sequence of S x T tokens (attention's grow with it): tflops_per_gpu is
  // the work a GPU does per second, which the weak-scaling table compares besides tokens/s (bench/scaling/run.sh).
  const double flops_per_token = hybrid_train_flops_per_token(model, cfg, T);
  if (world.rank() == 0) {
    const double tok = static_cast<double>(n_local) * W / step;
    std::printf(
        "scaling gpus=%d sp=%d dp=%d tokens_per_gpu=%lld T=%lld docs=%lld pattern=%s layers=%lld step_ms=%.2f "
        "tokens_per_s=%.0f per_gpu=%.0f comm_share=%.3f kda_bytes_per_layer=%lld halo_bytes_per_layer=%lld "
        "attn_bytes_per_layer=%lld mem_gib=%.2f optimizer=%d zero1_ms=%.2f zero1_bytes=%lld sp_queued=%d "
        "flops_per_token=%.4e tflops_per_gpu=%.1f\n",
        W, a.sp, W / a.sp, static_cast<long long>(n_local), static_cast<long long>(T), static_cast<long long>(a.docs),
        layer_pattern_string(cfg.layers).c_str(), static_cast<long long>(cfg.model.num_layers), step * 1e3, tok,
        tok / W, comm_s / step,
        static_cast<long long>(k_layers ? per(SpTraffic::kda_state).bytes / a.steps / k_layers : 0),
        static_cast<long long>(k_layers ? per(SpTraffic::conv_halo).bytes / a.steps / k_layers : 0),
        static_cast<long long>(a_layers ? per(SpTraffic::attention_kv).bytes / a.steps / a_layers : 0),
        static_cast<double>(model.memory_bytes() + (opt ? opt->memory_bytes() : 0) +
                            (zero ? zero->memory_bytes() : 0)) /
            (1 << 30),
        a.optimizer ? 1 : 0, zero_s / a.steps * 1e3,
        static_cast<long long>(zero ? zero->shard_numel() * W * 4 + zero->shard_numel() * 2 : 0),
        a.sp > 1 && sp.queued() ? 1 : 0, flops_per_token, tok / W * flops_per_token / 1e12);
  }
  if (lasp_profile_on()) {
    // Per step, summed over layers, for every rank of the first SP group in order (the middle ranks run LASP-2's
    // B and M passes both, the first and the last one each).
    const std::string rep = lasp_profile_report(a.steps);
    for (int r = 0; r < a.sp; ++r) {
      if (world.rank() == r) std::printf("profile rank %d (ms per step): %s\n", r, rep.c_str());
      std::fflush(stdout);
      world.barrier();
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  MpiRuntime mpi(&argc, &argv);
  return run_or_abort([&] { return run(argc, argv, mpi); });
}

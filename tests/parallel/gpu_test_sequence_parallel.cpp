// Sequence parallelism on GPUs (label gpu_parallel, mpirun with one GPU per rank): the hybrid student on
// CUDA (bf16) run as SP = P slices equals the whole batch on one GPU, loss and every gradient, on the
// document plan of the CPU test (documents across one or several slice boundaries, short documents, a
// boundary-aligned end). Both GPU results are also compared with the fp32 CPU model: SP must be as close
// to it as the single-GPU run is (bf16 rounding differs between the two GPU runs, so the bound is the
// single-GPU run's own error, at least 1e-2). Skips (77) when fewer GPUs than ranks are visible.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "parallel/checks.h"
#include "parallel/comm.h"
#include "parallel/sequence_parallel.h"
#include "tests/common/tiny_model.h"
#include "tests/parallel/gpu_rank_main.h"
#include "tests/parallel/sp_test_util.h"
#include "trainer/batch_upload.h"
#include "trainer/hybrid_model.h"
#include "trainer/lasp.h"

namespace hyd {
namespace {

int g_gpu = 0;  // this rank's GPU (its node-local rank)

HybridConfig gpu_config(const std::string& pattern) {
  HybridConfig c = test::tiny_hybrid_config(pattern, static_cast<int64_t>(pattern.size()), "llama");
  c.model.vocab_size = 97;
  c.model.hidden_size = 128;
  c.model.intermediate_size = 256;
  c.model.num_heads = 2;
  c.model.num_kv_heads = 1;
  c.model.head_dim = 64;
  c.model.max_position_embeddings = 4096;
  c.kda.hidden = 0;
  c.kda.heads = 2;
  c.kda.v_heads = 2;
  c.kda.dk = 64;
  c.kda.dv = 64;
  c.finalize("gpu sequence-parallel test");
  return c;
}

struct Result {
  double loss = 0;
  std::vector<float> grad;  // every parameter's gradient, concatenated
};

Result run(HybridModel& m, ExecContext& ctx, const HostBatch& hb, const SequenceParallel* sp, double share,
           int64_t max_tokens) {
  BatchUploader up(m.device(), max_tokens);
  Batch b = up.upload(ctx, hb);
  b.sp = sp;
  m.zero_grad();
  Result r;
  r.loss = m.forward_backward(ctx, b, static_cast<float>(share)) * share;
  ctx.synchronize();
  for (const ParamInfo& p : m.params()) {
    const std::vector<float> g = m.get_grad(p.name);
    r.grad.insert(r.grad.end(), g.begin(), g.end());
  }
  return r;
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

void check(const std::string& pattern, int32_t slice) {
  Communicator world = Communicator::world();
  const int P = world.size(), r = world.rank();
  const HybridConfig cfg = gpu_config(pattern);
  const int64_t T = static_cast<int64_t>(P) * slice, rows = 2;
  const HostBatch global = test::make_global(T, test::doc_plan(P, slice), cfg.model.vocab_size, 77);

  // Same weights everywhere: the CPU model's (fixed seed), copied into the GPU model by name.
  HybridModel cpu(cfg, Device::cpu(), rows * T);
  cpu.init_random(1234, 0.1f);
  HybridModel gpu(cfg, Device::cuda(g_gpu), rows * T);
  for (const ParamInfo& p : cpu.params()) {
    const std::vector<float> v = cpu.get_param(p.name);
    gpu.set_param(p.name, v.data(), static_cast<int64_t>(v.size()));
  }
  ExecContext cctx(Device::cpu()), gctx(Device::cuda(g_gpu));
  const Result ref = run(cpu, cctx, global, nullptr, 1.0, rows * T);
  const Result whole = run(gpu, gctx, global, nullptr, 1.0, rows * T);

  SequenceParallel sp(world, Device::cuda(g_gpu));
  SpLayout layout;
  const HostBatch local = slice_batch_for_sp(global, rows, T, r, P, layout);
  sp.set_layout(layout);
  const double share = static_cast<double>(local.num_targets) / static_cast<double>(global.num_targets);
  Result part = run(gpu, gctx, local, &sp, share, rows * T);
  std::vector<double> loss{part.loss};
  world.all_reduce(std::span<double>(loss), ReduceOp::kSum);
  part.loss = loss[0];
  world.all_reduce(std::span<float>(part.grad), ReduceOp::kSum);

  // The defaults on CUDA: balanced LASP-2H work (even slices) and queued NCCL collectives; HYD_SP_ATTN_BALANCE=0
  // and HYD_SP_ASYNC=0 turn them off (the .np2_contiguous_sync test).
  const auto env_is_0 = [](const char* name) {
    const char* v = std::getenv(name);
    return v != nullptr && std::string(v) == "0";
  };
  EXPECT_EQ(sp.layout().balanced, P > 1 && slice % 2 == 0 && !env_is_0("HYD_SP_ATTN_BALANCE"));
  EXPECT_EQ(sp.queued(), !env_is_0("HYD_SP_ASYNC"));
  const double kv_seconds = sp.traffic(SpTraffic::attention_kv).seconds;
  if (sp.queued()) {
    EXPECT_EQ(kv_seconds, 0.0) << "queued collectives report no time";
  } else if (P > 1) {
    EXPECT_GT(kv_seconds, 0.0) << "synchronised collectives are timed";
  }
  const double e_whole = rel(whole.grad, ref.grad), e_sp = rel(part.grad, ref.grad),
               e_pair = rel(part.grad, whole.grad);
  if (r == 0)
    std::printf(
        "SP %d %s slice %d (%s, %s): loss cpu %.6f, 1 gpu %.6f, SP %.6f | gradient rel. err vs cpu: 1 gpu %.3g, SP "
        "%.3g; "
        "SP vs 1 gpu %.3g | KDA state bytes %lld, halo %lld, attention K/V %lld\n",
        P, pattern.c_str(), slice, sp.layout().balanced ? "balanced" : "contiguous",
        sp.queued() ? "queued" : "synchronised", ref.loss, whole.loss, part.loss, e_whole, e_sp, e_pair,
        static_cast<long long>(sp.traffic(SpTraffic::kda_state).bytes),
        static_cast<long long>(sp.traffic(SpTraffic::conv_halo).bytes),
        static_cast<long long>(sp.traffic(SpTraffic::attention_kv).bytes));
  EXPECT_NEAR(part.loss, whole.loss, 2e-3 * std::abs(whole.loss)) << pattern;
  EXPECT_NEAR(part.loss, ref.loss, 5e-3 * std::abs(ref.loss)) << pattern;
  EXPECT_LT(e_sp, std::max(1e-2, 1.5 * e_whole)) << pattern;
  EXPECT_TRUE(std::isfinite(e_sp));
}

TEST(GpuSequenceParallel, ExchangeMovesBlocksInListOrder) {
  Communicator world = Communicator::world();
  SequenceParallel sp(world, Device::cuda(g_gpu));
  test::check_exchange(sp, ExecContext(Device::cuda(g_gpu)));
}

TEST(GpuSequenceParallel, HybridMatchesTheWholeBatch) {
  check("KAKT", 128);
  check("KKKA", 64);
}

}  // namespace
}  // namespace hyd

int main(int argc, char** argv) { return hyd::test::gpu_rank_test_main(argc, argv, hyd::g_gpu); }

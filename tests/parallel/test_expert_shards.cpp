// Expert-sharded storage of a HybridModel (HybridConfig::expert_shards, docs/parallel.md), under mpirun -np 2
// and -np 4 on the CPU: a KA student of a tiny dots1 skeleton (layer 1 MoE: 4 sigmoid-routed experts, top 2,
// a shared expert, a selection bias) built twice on every rank, once holding every expert and once only its
// E / P, with the same weights; each rank runs forward + backward on its own tokens under one expert-parallel
// group of all ranks. Loss, every replicated parameter's gradient and the local experts' gradients agree bit
// for bit; the local experts sit after every other parameter (the ZeRO-1 expert region); a sharded model
// refuses to run its experts without the group, and bad shard settings are refused naming the field.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "parallel/comm.h"
#include "tests/common/test_util.h"
#include "tests/common/tiny_model.h"
#include "trainer/hybrid_model.h"
#include "trainer/layer_moe.h"
#include "trainer/optimizer.h"
#include "trainer/zero1.h"

namespace hyd {
namespace {

HybridConfig dots1_student() {
  HybridConfig cfg = test::tiny_hybrid_config("KA", 2, "qwen3");
  cfg.model = test::tiny_dots1_config(2);
  return cfg;
}

bool is_expert(const std::string& name) { return name.ends_with(".mlp.gate_up") || name.ends_with(".mlp.down"); }

TEST(ExpertShards, ShardedHybridModelEqualsTheFullOneUnderExpertParallelism) {
  Communicator world = Communicator::world();
  const int P = world.size(), r = world.rank();
  HybridConfig full_cfg = dots1_student();
  full_cfg.finalize("test");
  HybridConfig shard_cfg = full_cfg;
  shard_cfg.expert_shards = P;
  shard_cfg.expert_shard = r;
  shard_cfg.finalize("test");
  const int64_t El = full_cfg.model.num_experts / P;
  HybridModel full(full_cfg, Device::cpu(), 64), sharded(shard_cfg, Device::cpu(), 64);
  std::mt19937_64 gen(7);  // the same weights on every rank
  test::randomize_hybrid(full, &gen);
  ASSERT_EQ(full.params().size(), sharded.params().size());
  const int64_t region = sharded.expert_region_offset();
  EXPECT_EQ(full.expert_region_offset(), full.flat_params().numel());
  for (const ParamInfo& p : sharded.params()) {
    std::vector<float> v = full.get_param(p.name);
    if (is_expert(p.name)) {
      EXPECT_GE(p.offset, region) << p.name;
      EXPECT_EQ(p.shape[0], El) << p.name;
      const int64_t per = p.numel / El;
      v = std::vector<float>(v.begin() + r * El * per, v.begin() + (r + 1) * El * per);
    } else {
      EXPECT_LE(p.offset + p.numel, region) << p.name;
    }
    sharded.set_param(p.name, v.data(), static_cast<int64_t>(v.size()));
  }

  // This rank's tokens (different on every rank).
  std::mt19937_64 tok(100 + r);
  std::vector<std::vector<int32_t>> docs = {std::vector<int32_t>(9), std::vector<int32_t>(14)};
  for (auto& d : docs)
    for (int32_t& t : d) t = static_cast<int32_t>(tok() % static_cast<uint64_t>(full_cfg.model.vocab_size));
  test::PackedBatch hb = test::pack_documents(docs);
  MoeExpertParallel ep(world);
  Batch batch = hb.batch;
  batch.ep = &ep;
  ExecContext ctx(Device::cpu());
  full.zero_grad();
  sharded.zero_grad();
  const double loss_full = full.forward_backward(ctx, batch), loss_sharded = sharded.forward_backward(ctx, batch);
  EXPECT_EQ(loss_sharded, loss_full);
  for (const ParamInfo& p : sharded.params()) {
    std::vector<float> want = full.get_grad(p.name);
    if (is_expert(p.name)) {
      const int64_t per = p.numel / El;
      want = std::vector<float>(want.begin() + r * El * per, want.begin() + (r + 1) * El * per);
    }
    EXPECT_EQ(sharded.get_grad(p.name), want) << p.name << " on rank " << r;
  }
  // Without the expert-parallel group the sharded model cannot run its experts.
  test::expect_error_mentioning([&] { sharded.forward_loss(ctx, hb.batch); }, "expected all 4");
}

TEST(ExpertShards, BadShardSettingsAreRefused) {
  HybridConfig cfg = dots1_student();
  cfg.expert_shards = 3;
  test::expect_error_mentioning([&] { cfg.finalize("student"); }, "expert_shards");
  cfg.expert_shards = 2;
  cfg.expert_shard = 2;
  test::expect_error_mentioning([&] { cfg.finalize("student"); }, "expert_shard");
  HybridConfig dense = test::tiny_hybrid_config("KA", 2, "qwen3");
  dense.expert_shards = 2;
  test::expect_error_mentioning([&] { dense.finalize("student"); }, "no experts");
}

// Steps 1 + 2 of docs/parallel.md's plan together: training with expert parallelism over groups of 2 ranks
// (EP rank = world rank % 2) where every rank stores every expert (today's hydistill distill: ZeRO-1 over all
// ranks) and where each stores only its experts with ZeRO-1's expert region over the ranks of the same EP
// index: after three AdamW steps on every rank's own tokens the losses and the weights agree (to f32
// rounding: the sums run in other orders), replicated parameters and each rank's experts alike.
TEST(ExpertShards, TrainingWithShardedExpertsEqualsReplicatedExperts) {
  Communicator world = Communicator::world();
  const int P = world.size(), r = world.rank(), ep_size = 2;
  ASSERT_EQ(P % ep_size, 0);
  Communicator ep_group = world.split(r / ep_size, r % ep_size);
  Communicator replicas = world.split(r % ep_size, r / ep_size);
  HybridConfig full_cfg = dots1_student();
  full_cfg.finalize("test");
  HybridConfig shard_cfg = full_cfg;
  shard_cfg.expert_shards = ep_size;
  shard_cfg.expert_shard = r % ep_size;
  shard_cfg.finalize("test");
  const int64_t El = full_cfg.model.num_experts / ep_size, e0 = (r % ep_size) * El;
  HybridModel full(full_cfg, Device::cpu(), 64), sharded(shard_cfg, Device::cpu(), 64);
  std::mt19937_64 gen(11);
  test::randomize_hybrid(full, &gen);
  auto local_rows = [&](const ParamInfo& p, const std::vector<float>& v) {
    const int64_t per = p.numel / El;
    return std::vector<float>(v.begin() + e0 * per, v.begin() + (e0 + El) * per);
  };
  for (const ParamInfo& p : sharded.params()) {
    std::vector<float> v = full.get_param(p.name);
    if (is_expert(p.name)) v = local_rows(p, v);
    sharded.set_param(p.name, v.data(), static_cast<int64_t>(v.size()));
  }
  Zero1 zero_full(world, full.params(), full.flat_params(), full.flat_grads());
  const Zero1::ExpertRegion region{sharded.expert_region_offset(), &replicas};
  Zero1 zero_sharded(world, sharded.params(), sharded.flat_params(), sharded.flat_grads(), &region);
  AdamWConfig ac;
  AdamW opt_full(zero_full.shard_params(), Device::cpu(), ac),
      opt_sharded(zero_sharded.shard_params(), Device::cpu(), ac);
  opt_full.set_sum_squares_reduction([&](double ss) { return zero_full.all_reduce_sum(ss); });
  opt_sharded.set_sum_squares_reduction([&](double ss) { return zero_sharded.all_reduce_sum(ss); });
  MoeExpertParallel ep(ep_group);
  ExecContext ctx(Device::cpu());
  for (int step = 0; step < 3; ++step) {
    std::mt19937_64 tok(1000 * step + r);
    std::vector<std::vector<int32_t>> docs = {std::vector<int32_t>(11), std::vector<int32_t>(6)};
    for (auto& d : docs)
      for (int32_t& t : d) t = static_cast<int32_t>(tok() % static_cast<uint64_t>(full_cfg.model.vocab_size));
    test::PackedBatch hb = test::pack_documents(docs);
    Batch batch = hb.batch;
    batch.ep = &ep;
    double losses[2];
    int i = 0;
    for (auto [model, zero, opt] : {std::tuple<HybridModel*, Zero1*, AdamW*>{&full, &zero_full, &opt_full},
                                    std::tuple<HybridModel*, Zero1*, AdamW*>{&sharded, &zero_sharded, &opt_sharded}}) {
      model->zero_grad();
      losses[i++] = model->forward_backward(ctx, batch, 1.0f / static_cast<float>(P));
      zero->reduce_gradients(ctx);
      opt->step(ctx, 1e-2);
      zero->gather_parameters(ctx);
    }
    EXPECT_NEAR(losses[1], losses[0], 1e-6 * std::abs(losses[0])) << "step " << step;
  }
  for (const ParamInfo& p : sharded.params()) {
    std::vector<float> want = full.get_param(p.name);
    if (is_expert(p.name)) want = local_rows(p, want);
    EXPECT_LT(test::rel_err(sharded.get_param(p.name), want), 1e-6) << p.name << " on rank " << r;
    const std::vector<float> start = [&] {
      HybridModel fresh(full_cfg, Device::cpu(), 8);
      std::mt19937_64 g2(11);
      test::randomize_hybrid(fresh, &g2);
      std::vector<float> v = fresh.get_param(p.name);
      return is_expert(p.name) ? local_rows(p, v) : v;
    }();
    if (!p.name.ends_with("e_score_correction_bias")) {
      EXPECT_GT(test::rel_err(sharded.get_param(p.name), start), 0.0) << p.name << " did not train";
    }
  }
}

}  // namespace
}  // namespace hyd

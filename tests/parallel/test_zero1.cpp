// ZeRO-1 with an expert region (trainer/zero1.h) under mpirun -np 2 and -np 4, on the CPU: a synthetic flat
// model whose first 26 elements are replicated on every rank and whose last 13 hold "local experts" that
// differ between the two expert-parallel indices (rank % 2) and are replicated over the ranks of one index.
// After reduce_gradients, an SGD step on the shard pieces and gather_parameters, every rank holds
//   replicated part: v - lr * (sum of every rank's gradient),
//   expert part:     v - lr * (sum of the gradients of the ranks with the same EP index),
// and the all-reduced sum of squares of the shards is that of those summed gradients, each element once.
// Without the region the same model is one region over all ranks (the pre-existing behaviour).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "parallel/comm.h"
#include "tests/common/test_util.h"
#include "trainer/zero1.h"

namespace hyd {
namespace {

constexpr int kEp = 2;
constexpr int64_t kDense = 26, kExpert = 13, kP = kDense + kExpert;
constexpr float kLr = 0.5f;

std::vector<ParamInfo> params_of(std::vector<float>& values, std::vector<float>& grads) {
  struct Spec {
    const char* name;
    std::vector<int64_t> shape;
  };
  // Replicated: a [7, 3], b [5]; experts: e [2, 5], f [3].
  const std::vector<Spec> specs = {{"a", {7, 3}}, {"b", {5}}, {"e", {2, 5}}, {"f", {3}}};
  std::vector<ParamInfo> out;
  int64_t offset = 0;
  for (const Spec& s : specs) {
    ParamInfo p;
    p.name = s.name;
    p.shape = s.shape;
    p.numel = 1;
    for (int64_t d : s.shape) p.numel *= d;
    p.offset = offset;
    p.value = Tensor(values.data() + offset, DType::f32, Device::cpu(), {p.numel});
    p.grad = Tensor(grads.data() + offset, DType::f32, Device::cpu(), {p.numel});
    offset += p.numel;
    out.push_back(p);
  }
  return out;
}

float value0(int ep_index, int64_t i) { return i < kDense ? 0.1f * i : 10.f * (ep_index + 1) + 0.01f * i; }
float grad_of(int rank, int64_t i) { return 0.001f * static_cast<float>((rank + 1) * (i + 1)); }

TEST(Zero1Experts, ExpertRegionIsReducedOverItsReplicasOnly) {
  Communicator world = Communicator::world();
  const int P = world.size(), r = world.rank(), ep_index = r % kEp;
  ASSERT_EQ(P % kEp, 0);
  Communicator replicas = world.split(/*color=*/ep_index, /*key=*/r / kEp);
  ASSERT_EQ(replicas.size(), P / kEp);

  std::vector<float> values(kP), grads(kP);
  for (int64_t i = 0; i < kP; ++i) {
    values[i] = value0(ep_index, i);
    grads[i] = grad_of(r, i);
  }
  std::vector<ParamInfo> params = params_of(values, grads);
  const Zero1::ExpertRegion experts{kDense, &replicas};
  Zero1 zero(world, params, test::cpu_f32(values, {kP}), test::cpu_f32(grads, {kP}), &experts);
  ExecContext ctx(Device::cpu());
  zero.reduce_gradients(ctx);
  double ss = 0;
  for (const ParamInfo& q : zero.shard_params()) {
    float* v = q.value.ptr<float>();
    const float* g = q.grad.ptr<float>();
    for (int64_t i = 0; i < q.numel; ++i) {
      v[i] -= kLr * g[i];
      ss += double(g[i]) * g[i];
    }
  }
  ss = zero.all_reduce_sum(ss);
  zero.gather_parameters(ctx);

  double ss_ref = 0;
  for (int64_t i = 0; i < kP; ++i) {
    if (i < kDense) {
      float sum = 0;
      for (int q = 0; q < P; ++q) sum += grad_of(q, i);
      EXPECT_NEAR(values[i], value0(ep_index, i) - kLr * sum, 1e-6) << "replicated element " << i;
      ss_ref += double(sum) * sum;
    } else {
      float sum = 0;
      for (int q = ep_index; q < P; q += kEp) sum += grad_of(q, i);
      EXPECT_NEAR(values[i], value0(ep_index, i) - kLr * sum, 1e-5) << "expert element " << i;
      for (int e = 0; e < kEp; ++e) {  // both EP indices' experts, each summed over its replicas
        float s = 0;
        for (int q = e; q < P; q += kEp) s += grad_of(q, i);
        ss_ref += double(s) * s;
      }
    }
  }
  EXPECT_NEAR(ss, ss_ref, 1e-6 * ss_ref);  // f32 sums in another order
  for (int64_t i = 0; i < kP; ++i) EXPECT_EQ(grads[i], grad_of(r, i)) << "the model's gradients are not modified";
  // Shard names: pieces of whole parameters, in elements of the parameter.
  for (const ParamInfo& q : zero.shard_params()) EXPECT_NE(q.name.find('['), std::string::npos) << q.name;
}

TEST(Zero1Experts, WithoutARegionEveryElementIsReducedOverAllRanks) {
  Communicator world = Communicator::world();
  const int P = world.size(), r = world.rank();
  std::vector<float> values(kP), grads(kP);
  for (int64_t i = 0; i < kP; ++i) {
    values[i] = value0(0, i);
    grads[i] = grad_of(r, i);
  }
  std::vector<ParamInfo> params = params_of(values, grads);
  Zero1 zero(world, params, test::cpu_f32(values, {kP}), test::cpu_f32(grads, {kP}));
  ExecContext ctx(Device::cpu());
  zero.reduce_gradients(ctx);
  for (const ParamInfo& q : zero.shard_params()) {
    float* v = q.value.ptr<float>();
    const float* g = q.grad.ptr<float>();
    for (int64_t i = 0; i < q.numel; ++i) v[i] -= kLr * g[i];
  }
  zero.gather_parameters(ctx);
  for (int64_t i = 0; i < kP; ++i) {
    float sum = 0;
    for (int q = 0; q < P; ++q) sum += grad_of(q, i);
    EXPECT_NEAR(values[i], value0(0, i) - kLr * sum, 1e-5) << i;
  }
  EXPECT_EQ(zero.shard_numel(), (kP + P - 1) / P);
}

TEST(Zero1Experts, AParameterAcrossTheRegionStartIsRefused) {
  Communicator world = Communicator::world();
  Communicator replicas = world.split(world.rank() % kEp, world.rank() / kEp);
  std::vector<float> values(kP, 0.f), grads(kP, 0.f);
  std::vector<ParamInfo> params = params_of(values, grads);
  const Zero1::ExpertRegion inside_b{kDense - 2, &replicas};  // b is [21, 26)
  test::expect_error_mentioning(
      [&] { Zero1 z(world, params, test::cpu_f32(values, {kP}), test::cpu_f32(grads, {kP}), &inside_b); }, "straddles");
}

}  // namespace
}  // namespace hyd

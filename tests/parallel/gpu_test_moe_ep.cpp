// Expert parallelism on GPUs (label gpu_parallel, mpirun with one GPU per rank; trainer/layer_moe.h
// MoeExpertParallel over NCCL): the MoE layer on CUDA with EP = P, every rank holding n tokens of its own,
// equals the same layer on one GPU over all P n tokens (computed on every rank). Compared: each rank's
// outputs and input gradients against its rows of the reference, the router and shared-expert gradients
// summed over the ranks, every routed expert's gradient (present on its owner only: the sum over ranks),
// and the rows the experts received (summed over ranks = P n k). Cases: softmax + norm_topk_prob with a
// shared expert (each GEMM implementation: cuBLAS loop, cuBLAS grouped, WMMA); sigmoid + route scale +
// two shared experts with E = 16, k = 4; and a selection bias that sends every token to expert 5 (one rank
// receives P n rows, more than its own n k: the buffers of the MoeExpertParallel; the others receive none).
// Also the block exchange itself (NcclCommunicator::all_to_all_blocks) on scattered blocks incl. empty ones,
// and a MoeExpertParallel made for the CPU refused by a CUDA layer.
// Tokens are redrawn until every token's k-th / (k+1)-th selection margin (CPU f32) exceeds 1e-3, so that
// both GPU runs route like the CPU (asserted: each rank's experts receive the rows the CPU routing gives
// them). Tolerances (bf16): out 1e-2, gradients 2e-2,
// router 5e-2 (as tests/gpu/test_gpu_moe.cpp against the CPU; here both sides are GPU runs whose expert
// GEMMs see other row groupings). Skips (77) when fewer GPUs than ranks are visible.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "parallel/checks.h"
#include "parallel/comm.h"
#include "parallel/nccl_comm.h"
#include "tests/common/test_util.h"
#include "tests/parallel/gpu_rank_main.h"
#include "trainer/core/arena.h"
#include "trainer/layer_moe.h"

namespace hyd {
namespace {

using test::DeviceBuffers;
using test::rel_err;

int g_gpu = 0;  // this rank's GPU (its node-local rank)

// The same numbers on every rank (a fixed seed, not the test harness's per-process one).
std::vector<float> normal(size_t n, float sd, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.f, sd);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return test::round_bf16(v);
}

struct Case {
  const char* name;
  MoeConfig cfg;
  int64_t n;  // tokens per rank
  std::vector<std::pair<int64_t, float>> bias_set = {};
};

MoeConfig config(int64_t D, int64_t E, int64_t K, int64_t F, int64_t S, bool sigmoid, bool norm, float scale,
                 bool bias) {
  MoeConfig c;
  c.hidden = D;
  c.num_experts = E;
  c.top_k = K;
  c.expert_ffn = F;
  c.num_shared_experts = S;
  c.shared_ffn = S > 0 ? 40 : 0;
  c.score_func = sigmoid ? "sigmoid" : "softmax";
  c.norm_topk_prob = norm;
  c.route_scale = scale;
  c.use_selection_bias = bias;
  return c;
}

// min over tokens of sel(k-th) - sel((k+1)-th) of the CPU f32 layer on x [N, D]; its rows per expert.
double selection_margin(const MoeLayer& L, const std::vector<float>& x, int64_t N, std::vector<int64_t>& load) {
  const MoeConfig& c = L.cfg;
  ExecContext ctx(Device::cpu());
  Arena act("act", Device::cpu(), size_t(64) << 20);
  MoeLayer::Saved s = L.alloc_saved(act, N, DType::f32);
  std::vector<float> xin = x, out(x.size());
  L.forward(ctx, test::cpu_f32(xin, {N, c.hidden}), test::cpu_f32(out, {N, c.hidden}), s);
  load = s.routing.counts_host();
  if (c.top_k == c.num_experts) return INFINITY;
  const int64_t E = c.num_experts;
  double margin = INFINITY;
  std::vector<double> sel(static_cast<size_t>(E));
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t e = 0; e < E; ++e)
      sel[e] = s.scores.ptr<float>()[t * E + e] + (c.use_selection_bias ? L.selection_bias.ptr<float>()[e] : 0.f);
    std::sort(sel.begin(), sel.end(), std::greater<double>());
    margin = std::min(margin, sel[c.top_k - 1] - sel[c.top_k]);
  }
  return margin;
}

struct GpuRun {
  std::vector<float> out, dx, router, gate_up, down, shared_gate_up, shared_down;
  int64_t received = 0;
};

// Forward + backward of the host layer's weights on the GPU over x [N, D] with output gradient dout.
GpuRun run_gpu(const MoeLayer& H, kernels::MoeGemm gemm, const std::vector<float>& x, const std::vector<float>& dout,
               int64_t N, const MoeExpertParallel* ep) {
  const MoeConfig& c = H.cfg;
  const int64_t D = c.hidden;
  const Device dev = Device::cuda(g_gpu);
  DeviceBuffers buf(dev);
  MoeLayer G = test::device_moe_layer(H, buf, gemm);
  ExecContext ctx(dev);
  ArenaSizer saved_size, scratch_size;
  G.alloc_saved(saved_size, N, DType::bf16);
  G.alloc_scratch(scratch_size, N, DType::bf16);
  Arena act("act", dev, saved_size.used()), scr("scratch", dev, scratch_size.used());
  MoeLayer::Saved s = G.alloc_saved(act, N, DType::bf16);
  const Tensor x_d = buf.upload(x, {N, D}, DType::bf16), out_d = buf.poisoned({N, D}, DType::bf16);
  const Tensor dout_d = buf.upload(dout, {N, D}, DType::bf16), dx_d = buf.poisoned({N, D}, DType::bf16);
  test::device_sync();
  G.forward(ctx, x_d, out_d, s, ep);
  G.backward(ctx, s, dout_d, dx_d, scr, 1.0, ep);
  ctx.synchronize();
  GpuRun r;
  r.out = DeviceBuffers::download(out_d);
  r.dx = DeviceBuffers::download(dx_d);
  r.router = DeviceBuffers::download(G.router.grad);
  r.gate_up = DeviceBuffers::download(G.gate_up.grad);
  r.down = DeviceBuffers::download(G.down.grad);
  if (c.num_shared_experts > 0) {
    r.shared_gate_up = DeviceBuffers::download(G.shared_gate_up.grad);
    r.shared_down = DeviceBuffers::download(G.shared_down.grad);
  }
  r.received = ep ? ep->last_received_rows(G) : N * c.top_k;
  return r;
}

std::vector<float> summed(const Communicator& w, std::vector<float> v) {
  w.all_reduce(std::span<float>(v), ReduceOp::kSum);
  return v;
}

void check(const Case& k, const std::vector<kernels::MoeGemm>& gemms) {
  SCOPED_TRACE(k.name);
  const Communicator world = Communicator::world();
  const int P = world.size(), rank = world.rank();
  const MoeConfig& c = k.cfg;
  const int64_t n = k.n, N = n * P, D = c.hidden;
  MoeLayerWeights w(c, Device::cpu(), DType::f32);
  uint64_t seed = 11;
  test::randomize_moe_weights(w, [&](size_t n, float sd) { return normal(n, sd, seed++); }, k.bias_set);
  const MoeLayer& H = w.layer();
  std::vector<float> x;
  std::vector<int64_t> load;
  for (int attempt = 0; attempt < 200 && x.empty(); ++attempt) {
    x = normal(static_cast<size_t>(N * D), 1.f, 1000 + attempt);
    if (selection_margin(H, x, N, load) < 1e-3) x.clear();
  }
  const int64_t El = c.num_experts / P;
  int64_t mine = 0;  // rows this rank's experts must receive
  for (int64_t e = rank * El; e < (rank + 1) * El; ++e) mine += load[e];
  ASSERT_FALSE(x.empty()) << "no input with a clear routing margin";
  const std::vector<float> dout = normal(static_cast<size_t>(N * D), 1.f, 999);
  const std::vector<float> x_mine(x.begin() + rank * n * D, x.begin() + (rank + 1) * n * D),
      dout_mine(dout.begin() + rank * n * D, dout.begin() + (rank + 1) * n * D);
  MoeExpertParallel ep(world, Device::cuda(g_gpu));
  for (const kernels::MoeGemm gemm : gemms) {
    SCOPED_TRACE(kernels::moe_gemm_name(gemm));
    const GpuRun ref = run_gpu(H, gemm, x, dout, N, nullptr);
    const GpuRun par = run_gpu(H, gemm, x_mine, dout_mine, n, &ep);
    auto rows = [&](const std::vector<float>& v) {
      return std::vector<float>(v.begin() + rank * n * D, v.begin() + (rank + 1) * n * D);
    };
    const double e_out = rel_err(par.out, rows(ref.out)), e_dx = rel_err(par.dx, rows(ref.dx));
    const double e_router = rel_err(summed(world, par.router), ref.router);
    const double e_gu = rel_err(summed(world, par.gate_up), ref.gate_up);
    const double e_down = rel_err(summed(world, par.down), ref.down);
    std::vector<double> received = {static_cast<double>(par.received)};
    world.all_reduce(std::span<double>(received), ReduceOp::kSum);
    if (rank == 0)
      std::printf(
          "  %s gemm %s: rows received %lld (rank 0: %lld); rel out %.2e dx %.2e router %.2e gate_up %.2e "
          "down %.2e\n",
          k.name, kernels::moe_gemm_name(gemm), static_cast<long long>(received[0]),
          static_cast<long long>(par.received), e_out, e_dx, e_router, e_gu, e_down);
    EXPECT_EQ(static_cast<int64_t>(received[0]), N * c.top_k) << "rows received over the group";
    EXPECT_EQ(par.received, mine) << "rows received by rank " << rank << "'s experts";
    EXPECT_TRUE(test::all_finite(par.out) && test::all_finite(par.dx)) << "unwritten outputs";
    EXPECT_LT(e_out, 1e-2) << "out";
    EXPECT_LT(e_dx, 2e-2) << "dx";
    EXPECT_LT(e_router, 5e-2) << "router grad";
    EXPECT_LT(e_gu, 2e-2) << "experts gate_up grad";
    EXPECT_LT(e_down, 2e-2) << "experts down grad";
    // A routed expert's gradient lives on its owner only: zero on every other rank.
    const int64_t per = 2 * c.expert_ffn * D;
    for (int64_t e = 0; e < c.num_experts; ++e) {
      if (e / El == rank) continue;
      EXPECT_TRUE(std::all_of(par.gate_up.begin() + e * per, par.gate_up.begin() + (e + 1) * per,
                              [](float v) { return v == 0.f; }))
          << "expert " << e << " has a gradient on rank " << rank;
    }
    if (c.num_shared_experts > 0) {
      EXPECT_LT(rel_err(summed(world, par.shared_gate_up), ref.shared_gate_up), 2e-2) << "shared gate_up grad";
      EXPECT_LT(rel_err(summed(world, par.shared_down), ref.shared_down), 2e-2) << "shared down grad";
    }
  }
}

TEST(GpuMoeEp, SoftmaxWithSharedExpertEveryGemm) {
  check({"softmax E8 k2 norm + 1 shared", config(64, 8, 2, 48, 1, false, true, 1.f, false), 40},
        {kernels::MoeGemm::loop, kernels::MoeGemm::grouped, kernels::MoeGemm::wmma});
}

TEST(GpuMoeEp, SigmoidScaledTwoSharedExperts) {
  check({"sigmoid E16 k4 scale 2.5 + 2 shared", config(64, 16, 4, 32, 2, true, true, 2.5f, false), 56},
        {kernels::MoeGemm::loop});
}

TEST(GpuMoeEp, EveryTokenToOneExpert) {
  // One rank's experts receive all P n rows (> its n k = n: the MoeExpertParallel's own buffers).
  check({"sigmoid + bias, every token to expert 5, E8 k1",
         config(64, 8, 1, 48, 0, true, false, 1.f, true),
         40,
         {{5, 2.f}}},
        {kernels::MoeGemm::loop, kernels::MoeGemm::wmma});
}

TEST(GpuMoeEp, CpuContextOnCudaLayerIsRefused) {
  // A MoeExpertParallel made for the CPU has no NCCL communicator: a CUDA layer refuses it, naming both.
  const Communicator world = Communicator::world();
  const MoeExpertParallel cpu_ep(world, Device::cpu());
  const MoeConfig c = config(64, 8, 2, 48, 0, false, true, 1.f, false);
  MoeLayerWeights w(c, Device::cpu(), DType::f32);
  w.init_random(3);
  const std::vector<float> x = normal(static_cast<size_t>(4 * c.hidden), 1.f, 5);
  try {
    run_gpu(w.layer(), kernels::MoeGemm::loop, x, x, 4, &cpu_ep);
    ADD_FAILURE() << "no error for a CPU MoeExpertParallel on a CUDA layer";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("made for the CPU"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("MoeLayer::forward"), std::string::npos) << e.what();
  }
}

TEST(GpuMoeEp, BlockExchangeScatters) {
  // Rank r sends to every rank q the blocks i = 0..3 of (q + 1) * i + r elements (block 0 empty), from
  // consecutive places of its input; the receiver places them in reverse block order.
  const Communicator world = Communicator::world();
  const int P = world.size(), r = world.rank();
  NcclCommunicator nccl(world);
  std::vector<CommBlock> sends, recvs;
  std::vector<float> in;
  for (int q = 0; q < P; ++q)
    for (int i = 0; i < 4; ++i) {
      const int64_t len = (q + 1) * i + r;
      sends.push_back({q, static_cast<int64_t>(in.size()), len});
      for (int64_t j = 0; j < len; ++j) in.push_back(static_cast<float>(1000 * r + 100 * q + 10 * i + j));
    }
  // From source s, block i has (r + 1) * i + s elements; lay them out last block first, source by source.
  std::vector<float> expect;
  int64_t at = 0;
  for (int s = 0; s < P; ++s) {
    std::vector<std::pair<int64_t, int64_t>> place(4);
    for (int i = 3; i >= 0; --i) {
      const int64_t len = (r + 1) * i + s;
      place[i] = {at, len};
      at += len;
    }
    for (int i = 0; i < 4; ++i) recvs.push_back({s, place[i].first, place[i].second});
  }
  expect.assign(static_cast<size_t>(at), 0.f);
  for (const CommBlock& b : recvs) {
    const int i = static_cast<int>(&b - recvs.data()) % 4;
    for (int64_t j = 0; j < b.count; ++j)
      expect[b.offset + j] = static_cast<float>(1000 * b.peer + 100 * r + 10 * i + j);
  }
  DeviceBuffers buf(Device::cuda(g_gpu));
  const Tensor in_d = buf.upload(in, {static_cast<int64_t>(in.size())}, DType::f32);
  const Tensor out_d = buf.poisoned({at}, DType::f32);
  test::device_sync();
  nccl.all_to_all_blocks<float>({in_d.ptr<float>(), in.size()}, sends, {out_d.ptr<float>(), static_cast<size_t>(at)},
                                recvs, nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(DeviceBuffers::download(out_d), expect);
  EXPECT_EQ(nccl.counters().bytes, in.size() * sizeof(float));
  // A block outside the buffer is refused, naming it.
  std::vector<CommBlock> bad = {{0, static_cast<int64_t>(in.size()) - 1, 2}};
  try {
    nccl.all_to_all_blocks<float>({in_d.ptr<float>(), in.size()}, bad, {out_d.ptr<float>(), static_cast<size_t>(at)},
                                  {}, nullptr);
    ADD_FAILURE() << "no error for a block outside the buffer";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sends block 0"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace hyd

int main(int argc, char** argv) { return hyd::test::gpu_rank_test_main(argc, argv, hyd::g_gpu); }

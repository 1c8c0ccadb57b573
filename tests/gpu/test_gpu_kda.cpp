// CUDA KDA core (kernels/cuda/kda.cu) against the CPU reference (kernels/cpu/kda.cpp: the token-by-
// token recurrence, its exact backward and the transition) on the same bf16-rounded inputs.
// Inputs are fresh random numbers every run (HYD_TEST_SEED replays): q, k unit-norm per head (q
// scaled by dk^-1/2, as the layer feeds them), log-decay g mixed per element (near 0, moderate,
// down to -20) or all near 0 or all strong, beta mixed (near 0, near 1, uniform); documents of
// lengths 1, 63, 64, 65, 200 and 1000 in one packed batch; GQA with HV = 2H; with and without
// initial state / final-state gradient. Outputs are poisoned (NaN) before every run.
// Tolerances (rel_err = ||out - ref|| / ||ref||, measured values are printed): bf16 outputs o, dq,
// dk, dv < 1e-2 (rounded once from fp32: ~1.7e-3 measured); fp32 outputs final state, dg, dbeta,
// dinitial_state, M, B of the version-1 kernels (fp32 arithmetic throughout; dk = 32 here, and the
// transition) < 2e-3 (kF32Tol). The tensor-core kernels (kernels/cuda/kda_mma.cu, dk and dv 64/128)
// accumulate in fp32 from bf16 operands (w, kg, qg, Aqk as KDA.md allows; fp32 operands split into
// two bf16 terms): every output is held to the bf16 I/O tolerance 1e-2 there (the fp32 ones measured
// 1e-6 to 3.5e-3 on an H200).
//
// KdaChunkEmulation runs the very same block programs (kernels/cuda/kda_chunk.cuh) serially on the
// host, shared memory and scratch filled with NaN, threads of a phase in both orders, so the kernels'
// indexing and barriers are checked on machines without a GPU too (run the binary directly: under
// ctest the gpu label skips it there).
#include <gtest/gtest.h>
#ifdef HYD_WITH_CUDA
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/kda_chunk.cuh"
#include "kernels/cuda/kda_mma.h"
#include "kernels/elementwise.h"
#include "kernels/kda.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::all_finite;
using test::DeviceBuffers;
using test::randn;
using test::rel_err;
using test::rng;
using test::round_bf16;

constexpr double kBf16Tol = 1e-2;
// fp32 outputs: measured up to ~4e-4 (dg with all gates in [-20, -5]: the chunk form works with
// cumulative sums |G| ~ 1e3 whose differences lose fp32 digits, and dg is a sum of cancelling
// terms there); 1e-6 .. 1e-5 otherwise.
constexpr double kF32Tol = 2e-3;

enum class Gates { mixed, near_zero, strong };

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng()); }

struct Problem {
  KdaDims s;
  std::vector<int32_t> cu;
  // q, k, v, dout bf16-rounded; init / dfinal empty when absent.
  std::vector<float> q, k, v, g, beta, init, dout, dfinal;
  int64_t state_size() const { return s.num_docs * s.hv * s.dk * s.dv; }
};

Problem make_problem(const std::vector<int32_t>& lengths, int64_t h, int64_t hv, int64_t dk, int64_t dv, bool initial,
                     Gates gates) {
  Problem p;
  p.cu = {0};
  for (int32_t len : lengths) p.cu.push_back(p.cu.back() + len);
  p.s = KdaDims{p.cu.back(), static_cast<int64_t>(lengths.size()), h, hv, dk, dv};
  const int64_t n = p.s.n;
  p.q = randn(n * h * dk);
  p.k = randn(n * h * dk);
  for (int64_t row = 0; row < n * h; ++row) {
    double nq = 0, nk = 0;
    for (int64_t i = 0; i < dk; ++i) {
      nq += double(p.q[row * dk + i]) * p.q[row * dk + i];
      nk += double(p.k[row * dk + i]) * p.k[row * dk + i];
    }
    for (int64_t i = 0; i < dk; ++i) {
      p.q[row * dk + i] = static_cast<float>(p.q[row * dk + i] / std::sqrt(nq * static_cast<double>(dk)));
      p.k[row * dk + i] = static_cast<float>(p.k[row * dk + i] / std::sqrt(nk));
    }
  }
  p.q = round_bf16(p.q);
  p.k = round_bf16(p.k);
  p.v = round_bf16(randn(n * hv * dv));
  p.dout = round_bf16(randn(n * hv * dv));
  p.g.resize(n * hv * dk);
  for (float& x : p.g) {
    const int kind = gates == Gates::near_zero ? 0 : gates == Gates::strong ? 2 : static_cast<int>(uniform(0, 3));
    x = kind == 0 ? -uniform(0, 1e-3f) : kind == 1 ? -uniform(0, 2) : -uniform(5, 20);
  }
  p.beta.resize(n * hv);
  for (float& b : p.beta) {
    const int kind = static_cast<int>(uniform(0, 3));
    b = kind == 0 ? uniform(0, 1e-3f) : kind == 1 ? 1 - uniform(0, 1e-3f) : uniform(0, 1);
  }
  if (initial) {
    p.init = randn(p.state_size(), 0.5f);
    p.dfinal = randn(p.state_size(), 0.5f);
  }
  return p;
}

std::string describe(const Problem& p, const char* gates, bool initial) {
  return "H=" + std::to_string(p.s.h) + " HV=" + std::to_string(p.s.hv) + " dk=" + std::to_string(p.s.dk) +
         " dv=" + std::to_string(p.s.dv) + " N=" + std::to_string(p.s.n) + " gates=" + gates +
         (initial ? " with initial state" : " no initial state");
}

// Every output of forward, backward and transition, as f32.
struct Outputs {
  std::vector<float> o, fin, dq, dk, dv, dg, dbeta, dinit, M, B;
};

const float* opt(const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); }

Outputs reference(const Problem& p) {
  const KdaDims& s = p.s;
  const int64_t n = s.n;
  Outputs r;
  r.o.assign(n * s.hv * s.dv, NAN);
  r.fin.assign(p.state_size(), NAN);
  r.dq.assign(n * s.h * s.dk, NAN);
  r.dk.assign(n * s.h * s.dk, NAN);
  r.dv.assign(n * s.hv * s.dv, NAN);
  r.dg.assign(n * s.hv * s.dk, NAN);
  r.dbeta.assign(n * s.hv, NAN);
  r.dinit.assign(p.state_size(), NAN);
  r.M.assign(s.num_docs * s.hv * s.dk * s.dk, NAN);
  r.B.assign(p.state_size(), NAN);
  cpu::kda_recurrent_forward<float>(s, p.q.data(), p.k.data(), p.v.data(), p.g.data(), p.beta.data(), p.cu.data(),
                                    opt(p.init), r.o.data(), r.fin.data());
  cpu::kda_recurrent_backward<float>(s, p.q.data(), p.k.data(), p.v.data(), p.g.data(), p.beta.data(), p.cu.data(),
                                     opt(p.init), p.dout.data(), opt(p.dfinal), r.dq.data(), r.dk.data(), r.dv.data(),
                                     r.dg.data(), r.dbeta.data(), r.dinit.data());
  cpu::kda_transition<float>(s, p.k.data(), p.v.data(), p.g.data(), p.beta.data(), p.cu.data(), r.M.data(), r.B.data());
  return r;
}

double norm(const std::vector<float>& x) {
  double s = 0;
  for (float v : x) s += double(v) * v;
  return std::sqrt(s);
}

// rel_err = ||out - ref|| / max(||ref||, floor). The floor only matters where the exact gradient is
// zero (e.g. dg of documents of length <= 1 with no initial state: the decay never touches a
// non-zero state), where fp32 cancellation in the chunked form leaves ~1e-8 of noise that a plain
// relative error would blow up to 1e+22.
void expect_close(const std::vector<float>& out, const std::vector<float>& ref, double tol, const std::string& what,
                  double floor = 0) {
  ASSERT_EQ(out.size(), ref.size()) << what;
  double num = 0;
  for (size_t i = 0; i < out.size(); ++i) num += (double(out[i]) - ref[i]) * (double(out[i]) - ref[i]);
  const double e = all_finite(out) ? std::sqrt(num) / std::max({norm(ref), floor, 1e-30}) : INFINITY;
  std::printf("  %-24s rel_err %.3g (tol %.0e)\n", what.c_str(), e, tol);
  EXPECT_LT(e, tol) << what << ": rel_err " << e;
  EXPECT_TRUE(all_finite(out)) << what << " holds NaN/Inf";
}

// tensor_cores: the outputs come from kernels/cuda/kda_mma.cu (see the tolerances above).
void compare(const Outputs& out, const Outputs& ref, bool tensor_cores) {
  // Scale for the zero-gradient floor: 1e-6 of the size of the q/k/v gradients.
  const double floor = 1e-6 * (norm(ref.dq) + norm(ref.dk) + norm(ref.dv));
  const double f32_tol = tensor_cores ? kBf16Tol : kF32Tol;
  expect_close(out.o, ref.o, kBf16Tol, "o (bf16)");
  expect_close(out.fin, ref.fin, f32_tol, "final_state (f32)");
  expect_close(out.dq, ref.dq, kBf16Tol, "dq (bf16)");
  expect_close(out.dk, ref.dk, kBf16Tol, "dk (bf16)");
  expect_close(out.dv, ref.dv, kBf16Tol, "dv (bf16)");
  expect_close(out.dg, ref.dg, f32_tol, "dg (f32)", floor);
  expect_close(out.dbeta, ref.dbeta, f32_tol, "dbeta (f32)");
  expect_close(out.dinit, ref.dinit, f32_tol, "dinitial_state (f32)");
  expect_close(out.M, ref.M, kF32Tol, "transition M (f32)");
  expect_close(out.B, ref.B, kF32Tol, "transition B (f32)");
}

// ---------------------------------------------------------------- host emulation of the kernels

std::vector<bf16> to_bf16(const std::vector<float>& x) {
  std::vector<bf16> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = float_to_bf16(x[i]);
  return r;
}
std::vector<float> from_bf16(const std::vector<bf16>& x) {
  std::vector<float> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = bf16_to_float(x[i]);
  return r;
}

// Scratch of one pass on the host, NaN-filled so that reading an unwritten element shows.
struct HostScratch {
  std::vector<float> mem;
  kda_chunk::Scratch sc;
  HostScratch(const KdaDims& s, kda_chunk::Pass pass) {
    mem.assign(kda_chunk::carve_scratch(nullptr, s, pass, sc), NAN);
    kda_chunk::carve_scratch(mem.data(), s, pass, sc);
  }
};

Outputs emulate(const Problem& p, bool reverse_threads) {
  const KdaDims& s = p.s;
  const int64_t n = s.n;
  const bf16 nan_bf16 = float_to_bf16(NAN);
  const std::vector<bf16> q = to_bf16(p.q), k = to_bf16(p.k), v = to_bf16(p.v), dout = to_bf16(p.dout);
  std::vector<bf16> o(n * s.hv * s.dv, nan_bf16), dq(n * s.h * s.dk, nan_bf16), dk(n * s.h * s.dk, nan_bf16),
      dv(n * s.hv * s.dv, nan_bf16);
  Outputs r;
  r.fin.assign(p.state_size(), NAN);
  r.dg.assign(n * s.hv * s.dk, NAN);
  r.dbeta.assign(n * s.hv, NAN);
  r.dinit.assign(p.state_size(), NAN);
  r.M.assign(s.num_docs * s.hv * s.dk * s.dk, NAN);
  r.B.assign(p.state_size(), NAN);
  kda_chunk::HostLauncher launcher;
  launcher.reverse_threads = reverse_threads;
  {
    HostScratch hs(s, kda_chunk::Pass::forward);
    kda_chunk::run_forward(launcher, s, q.data(), k.data(), v.data(), p.g.data(), p.beta.data(), p.cu.data(),
                           opt(p.init), o.data(), r.fin.data(), hs.sc);
  }
  {
    HostScratch hs(s, kda_chunk::Pass::backward);
    kda_chunk::run_backward(launcher, s, q.data(), k.data(), v.data(), p.g.data(), p.beta.data(), p.cu.data(),
                            opt(p.init), dout.data(), opt(p.dfinal), dq.data(), dk.data(), dv.data(), r.dg.data(),
                            r.dbeta.data(), r.dinit.data(), hs.sc);
  }
  {
    HostScratch hs(s, kda_chunk::Pass::transition);
    kda_chunk::run_transition(launcher, s, k.data(), v.data(), p.g.data(), p.beta.data(), p.cu.data(), r.M.data(),
                              r.B.data(), hs.sc);
  }
  EXPECT_EQ(launcher.overflow_blocks, 0) << "a block program wrote past its shared memory";
  r.o = from_bf16(o);
  r.dq = from_bf16(dq);
  r.dk = from_bf16(dk);
  r.dv = from_bf16(dv);
  return r;
}

struct Case {
  std::vector<int32_t> lengths;
  int64_t h, hv, dk, dv;
  bool initial;
  Gates gates;
  const char* gates_name;
};

TEST(KdaChunkEmulation, KernelProgramsOnHostMatchCpuReference) {
  // Small shapes (the emulation is serial); every template dk, dv not a power of two, an empty document.
  const std::vector<Case> cases = {
      {{1, 63, 64, 65, 200}, 1, 2, 32, 32, true, Gates::mixed, "mixed"},
      {{0, 1, 130, 64}, 2, 2, 64, 32, false, Gates::strong, "strong"},
      {{65, 1}, 1, 1, 128, 96, true, Gates::near_zero, "near_zero"},
  };
  for (const Case& c : cases) {
    const Problem p = make_problem(c.lengths, c.h, c.hv, c.dk, c.dv, c.initial, c.gates);
    const std::string what = describe(p, c.gates_name, c.initial);
    SCOPED_TRACE(what);
    const Outputs ref = reference(p);
    for (bool reverse : {false, true}) {
      std::printf("emulation %s, threads %s\n", what.c_str(), reverse ? "last to first" : "first to last");
      compare(emulate(p, reverse), ref, false);
    }
  }
}

// ---------------------------------------------------------------- CUDA

Outputs on_gpu(const Problem& p) {
  const KdaDims& s = p.s;
  const int64_t n = s.n, D = s.num_docs;
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0), size_t(256) << 20);
  const Tensor q = buf.upload(p.q, {n, s.h, s.dk}, DType::bf16), k = buf.upload(p.k, {n, s.h, s.dk}, DType::bf16),
               v = buf.upload(p.v, {n, s.hv, s.dv}, DType::bf16), g = buf.upload(p.g, {n, s.hv, s.dk}, DType::f32),
               beta = buf.upload(p.beta, {n, s.hv}, DType::f32), cu = buf.upload_i32(p.cu, {D + 1}),
               dout = buf.upload(p.dout, {n, s.hv, s.dv}, DType::bf16);
  const Tensor init = p.init.empty() ? Tensor{} : buf.upload(p.init, {D, s.hv, s.dk, s.dv}, DType::f32);
  const Tensor dfinal = p.dfinal.empty() ? Tensor{} : buf.upload(p.dfinal, {D, s.hv, s.dk, s.dv}, DType::f32);
  const Tensor o = buf.poisoned({n, s.hv, s.dv}, DType::bf16), fin = buf.poisoned({D, s.hv, s.dk, s.dv}, DType::f32);
  const Tensor dq = buf.poisoned({n, s.h, s.dk}, DType::bf16), dk = buf.poisoned({n, s.h, s.dk}, DType::bf16),
               dv = buf.poisoned({n, s.hv, s.dv}, DType::bf16), dg = buf.poisoned({n, s.hv, s.dk}, DType::f32),
               dbeta = buf.poisoned({n, s.hv}, DType::f32), dinit = buf.poisoned({D, s.hv, s.dk, s.dv}, DType::f32);
  const Tensor M = buf.poisoned({D, s.hv, s.dk, s.dk}, DType::f32), B = buf.poisoned({D, s.hv, s.dk, s.dv}, DType::f32);
  test::device_sync();
  kda_forward(ctx, q, k, v, g, beta, cu, init, o, fin);
  kda_backward(ctx, q, k, v, g, beta, cu, init, dout, dfinal, dq, dk, dv, dg, dbeta, dinit);
  kda_transition(ctx, k, v, g, beta, cu, M, B);
  ctx.synchronize();
  Outputs r;
  r.o = DeviceBuffers::download(o);
  r.fin = DeviceBuffers::download(fin);
  r.dq = DeviceBuffers::download(dq);
  r.dk = DeviceBuffers::download(dk);
  r.dv = DeviceBuffers::download(dv);
  r.dg = DeviceBuffers::download(dg);
  r.dbeta = DeviceBuffers::download(dbeta);
  r.dinit = DeviceBuffers::download(dinit);
  r.M = DeviceBuffers::download(M);
  r.B = DeviceBuffers::download(B);
  return r;
}

TEST(GpuKda, ForwardBackwardTransitionMatchCpu) {
  HYD_REQUIRE_GPU();
  const std::vector<int32_t> docs = {1, 63, 64, 65, 200, 1000};
  const std::vector<Case> cases = {
      {docs, 2, 2, 64, 64, true, Gates::mixed, "mixed"},
      {docs, 1, 2, 64, 64, false, Gates::mixed, "mixed"},
      {docs, 1, 2, 128, 128, true, Gates::near_zero, "near_zero"},
      {docs, 2, 2, 128, 128, false, Gates::strong, "strong"},
      {docs, 2, 4, 128, 128, true, Gates::mixed, "mixed"},
      {docs, 1, 1, 128, 64, true, Gates::mixed, "mixed"},
      {docs, 1, 2, 32, 128, false, Gates::mixed, "mixed"},
  };
  for (const Case& c : cases) {
    const Problem p = make_problem(c.lengths, c.h, c.hv, c.dk, c.dv, c.initial, c.gates);
    const std::string what = describe(p, c.gates_name, c.initial);
    SCOPED_TRACE(what);
    std::printf("cuda %s\n", what.c_str());
    compare(on_gpu(p), reference(p), cuda::kda_mma::supports(p.s));
  }
}

// The state passes run in two versions by grid size (kda_mma.cu, passes_stg): one operand buffer at two blocks per
// SM while the pass's blocks (documents x value heads x dv / 32) fit the GPU at two per SM, else two buffers at one.
// The cases above are small (the first version); these have more blocks than twice the SMs, so the second runs here
// (the version B8xT4096 H16 takes), forward, backward and transition.
TEST(GpuKda, ManyDocumentsTakeTheTwoBufferStatePasses) {
  HYD_REQUIRE_GPU();
  int sms = 0;
#ifdef HYD_WITH_CUDA  // (CPU-only builds skip above)
  ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
#endif
  const int64_t h = 2, hv = 4, tiles = 128 / 32;
  const int64_t docs = (2 * sms) / (hv * tiles) + 2;
  ASSERT_GT(docs * hv * tiles, 2 * int64_t{sms});
  const std::vector<int32_t> cycle = {1, 63, 64, 65, 130};
  std::vector<int32_t> lengths;
  for (int64_t d = 0; d < docs; ++d) lengths.push_back(cycle[static_cast<size_t>(d) % cycle.size()]);
  for (bool initial : {true, false}) {
    const Problem p = make_problem(lengths, h, hv, 128, 128, initial, Gates::mixed);
    const std::string what = describe(p, "mixed", initial) + ", " + std::to_string(docs) + " documents";
    SCOPED_TRACE(what);
    std::printf("cuda %s (%lld state-pass blocks, %d SMs)\n", what.c_str(), static_cast<long long>(docs * hv * tiles),
                sms);
    compare(on_gpu(p), reference(p), true);
  }
}

// Twelve one-token documents around the empty one: the relative errors are norms over every token and value
// head, and with the three tokens this test had, dbeta's six values (sums of dv products with cancellation)
// missed the bf16 tolerance about once in twenty runs (seed 11187813620866019502: 1.7e-2 against 1e-2,
// deterministic on replay; the case's typical error is 3e-3).
TEST(GpuKda, LengthOneAndEmptyDocumentsGiveNoNaN) {
  HYD_REQUIRE_GPU();
  for (bool initial : {false, true}) {
    const Problem p = make_problem({1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, 1, 2, 64, 64, initial, Gates::mixed);
    const std::string what = describe(p, "mixed", initial);
    SCOPED_TRACE(what);
    std::printf("cuda %s\n", what.c_str());
    const Outputs out = on_gpu(p), ref = reference(p);
    compare(out, ref, cuda::kda_mma::supports(p.s));
    // The empty document (index 2): final state = initial state (or 0), M = I, B = 0, dinit = dfinal.
    const int64_t st = p.s.hv * p.s.dk * p.s.dv, mt = p.s.hv * p.s.dk * p.s.dk;
    for (int64_t e = 0; e < st; ++e) {
      ASSERT_EQ(out.fin[2 * st + e], initial ? p.init[2 * st + e] : 0.f);
      ASSERT_EQ(out.B[2 * st + e], 0.f);
      ASSERT_EQ(out.dinit[2 * st + e], initial ? p.dfinal[2 * st + e] : 0.f);
    }
    for (int64_t e = 0; e < mt; ++e) {
      const int64_t i = (e / p.s.dk) % p.s.dk, j = e % p.s.dk;
      ASSERT_EQ(out.M[2 * mt + e], i == j ? 1.f : 0.f);
    }
  }
}

// The split forward of LASP-2 (kda_forward_prepare once, kda_forward_pass per initial state) runs the same
// kernels as kda_forward: every pass equals the whole forward bit for bit, with and without an initial
// state and outputs; the zero-value pass from an identity state equals kda_forward with zero values of dk
// columns (the transition M); kda_backward_initial_adjoint equals kda_backward's dinitial_state without a
// final-state gradient. Workspace and outputs poisoned first.
// A problem's inputs on the device: q, k, v bf16; g, beta, the initial state f32; cu_seqlens i32.
struct Inputs {
  Tensor q, k, v, g, beta, cu, init;
};
Inputs upload_inputs(DeviceBuffers& buf, const Problem& p) {
  const KdaDims& s = p.s;
  const int64_t n = s.n, D = s.num_docs;
  return Inputs{buf.upload(p.q, {n, s.h, s.dk}, DType::bf16),
                buf.upload(p.k, {n, s.h, s.dk}, DType::bf16),
                buf.upload(p.v, {n, s.hv, s.dv}, DType::bf16),
                buf.upload(p.g, {n, s.hv, s.dk}, DType::f32),
                buf.upload(p.beta, {n, s.hv}, DType::f32),
                buf.upload_i32(p.cu, {D + 1}),
                buf.upload(p.init, {D, s.hv, s.dk, s.dv}, DType::f32)};
}

// Runs body(p, ctx, buf, inputs) for the split / saving kernels' cases: documents of 1..1000 tokens and an
// empty one, an initial state and a final-state gradient, GQA and both head sizes.
template <class F>
void for_split_cases(F&& body) {
  struct Case {
    int64_t h, hv, dk, dv;
  };
  for (const Case& c : {Case{1, 2, 128, 128}, Case{2, 2, 64, 64}, Case{1, 1, 128, 64}}) {
    const Problem p = make_problem({1, 63, 64, 0, 65, 200, 1000}, c.h, c.hv, c.dk, c.dv, true, Gates::mixed);
    SCOPED_TRACE(describe(p, "mixed", true));
    ExecContext ctx(Device::cuda(0));
    DeviceBuffers buf(Device::cuda(0), size_t(512) << 20);
    const Inputs in = upload_inputs(buf, p);
    ASSERT_TRUE(kda_split_forward_supported(in.k, in.v));
    body(p, ctx, buf, in);
  }
}

TEST(GpuKda, SplitForwardEqualsTheWholeForward) {
  HYD_REQUIRE_GPU();
  for_split_cases([](const Problem& p, const ExecContext& ctx, DeviceBuffers& buf, const Inputs& in) {
    const KdaDims& s = p.s;
    const int64_t n = s.n, D = s.num_docs;
    const Tensor &q = in.q, &k = in.k, &v = in.v, &g = in.g, &beta = in.beta, &cu = in.cu, &init = in.init;
    auto out = [&] { return buf.poisoned({n, s.hv, s.dv}, DType::bf16); };
    auto state = [&](int64_t cols) { return buf.poisoned({D, s.hv, s.dk, cols}, DType::f32); };
    const Tensor o_ref = out(), fin_ref = state(s.dv), o0_ref = out(), fin0_ref = state(s.dv);
    kda_forward(ctx, q, k, v, g, beta, cu, init, o_ref, fin_ref);
    kda_forward(ctx, q, k, v, g, beta, cu, Tensor{}, o0_ref, fin0_ref);
    // M: zero values of dk columns from an identity state.
    std::vector<float> eye_h(static_cast<size_t>(D * s.hv * s.dk * s.dk), 0.f);
    for (int64_t m = 0; m < D * s.hv; ++m)
      for (int64_t i = 0; i < s.dk; ++i) eye_h[(m * s.dk + i) * s.dk + i] = 1.f;
    const Tensor eye = buf.upload(eye_h, {D, s.hv, s.dk, s.dk}, DType::f32);
    const Tensor zero_v = buf.zeros({n, s.hv, s.dk}, DType::bf16), m_ref = state(s.dk);
    kda_forward(ctx, q, k, zero_v, g, beta, cu, eye, buf.poisoned({n, s.hv, s.dk}, DType::bf16), m_ref);

    const Tensor ws = buf.poisoned({kda_forward_workspace_floats(k, v, cu, true)}, DType::f32);
    kda_forward_prepare(ctx, q, k, v, g, beta, cu, ws, true);
    const Tensor o1 = out(), fin1 = state(s.dv), fin2 = state(s.dv), o3 = out(), fin3 = state(s.dv), m1 = state(s.dk);
    kda_forward_pass(ctx, k, v, cu, ws, eye, Tensor{}, m1, true);
    kda_forward_pass(ctx, k, v, cu, ws, init, o1, fin1, false);
    kda_forward_pass(ctx, k, v, cu, ws, init, Tensor{}, fin2, false);
    kda_forward_pass(ctx, k, v, cu, ws, Tensor{}, o3, fin3, false);
    ctx.synchronize();
    auto same = [](const Tensor& a, const Tensor& b, const char* what) {
      const std::vector<float> x = DeviceBuffers::download(a), y = DeviceBuffers::download(b);
      EXPECT_TRUE(all_finite(x)) << what;
      EXPECT_EQ(x, y) << what << " differs from the whole forward";
    };
    same(o1, o_ref, "o (initial state)");
    same(fin1, fin_ref, "final state (initial state)");
    same(fin2, fin_ref, "final state (no outputs)");
    same(o3, o0_ref, "o (zero state)");
    same(fin3, fin0_ref, "final state (zero state)");
    same(m1, m_ref, "M (zero values from the identity)");
    // LASP-2's L: the initial-state adjoint with no final-state gradient, alone, equals the whole backward's.
    const Tensor dout = buf.upload(p.dout, {n, s.hv, s.dv}, DType::bf16), l_ref = state(s.dv), l1 = state(s.dv);
    kda_backward(ctx, q, k, v, g, beta, cu, init, dout, Tensor{}, buf.poisoned({n, s.h, s.dk}, DType::bf16),
                 buf.poisoned({n, s.h, s.dk}, DType::bf16), out(), buf.poisoned({n, s.hv, s.dk}, DType::f32),
                 buf.poisoned({n, s.hv}, DType::f32), l_ref);
    kda_backward_initial_adjoint(ctx, q, k, v, g, beta, cu, dout, l1);
    ctx.synchronize();
    same(l1, l_ref, "dinitial_state without dfinal_state (L)");
    test::expect_error_mentioning([&] { kda_forward_pass(ctx, k, v, cu, ws, eye, out(), m1, true); }, "'o'");
    const Tensor small = buf.poisoned({16}, DType::f32);
    test::expect_error_mentioning([&] { kda_forward_prepare(ctx, q, k, v, g, beta, cu, small, false); }, "workspace");
  });
}

// The saving forward and the saved backward (kernels/kda.h kda_forward_saving / kda_backward_saved) give the
// recomputing pair's outputs and gradients bit for bit: documents of 1..1000 tokens, an empty one, an initial
// state and a final-state gradient, GQA and both head sizes.
TEST(GpuKda, SavedBackwardEqualsTheRecomputingOne) {
  HYD_REQUIRE_GPU();
  for_split_cases([](const Problem& p, const ExecContext& ctx, DeviceBuffers& buf, const Inputs& in) {
    const KdaDims& s = p.s;
    const int64_t n = s.n, D = s.num_docs;
    const Tensor &q = in.q, &k = in.k, &v = in.v, &g = in.g, &beta = in.beta, &cu = in.cu, &init = in.init;
    const Tensor dout = buf.upload(p.dout, {n, s.hv, s.dv}, DType::bf16);
    const Tensor dfin = buf.upload(p.dfinal, {D, s.hv, s.dk, s.dv}, DType::f32);
    struct Grads {
      Tensor o, fin, dq, dk, dv, dg, dbeta, dinit;
    };
    auto grads = [&] {
      return Grads{buf.poisoned({n, s.hv, s.dv}, DType::bf16), buf.poisoned({D, s.hv, s.dk, s.dv}, DType::f32),
                   buf.poisoned({n, s.h, s.dk}, DType::bf16),  buf.poisoned({n, s.h, s.dk}, DType::bf16),
                   buf.poisoned({n, s.hv, s.dv}, DType::bf16), buf.poisoned({n, s.hv, s.dk}, DType::f32),
                   buf.poisoned({n, s.hv}, DType::f32),        buf.poisoned({D, s.hv, s.dk, s.dv}, DType::f32)};
    };
    const Grads ref = grads(), got = grads();
    kda_forward(ctx, q, k, v, g, beta, cu, init, ref.o, ref.fin);
    kda_backward(ctx, q, k, v, g, beta, cu, init, dout, dfin, ref.dq, ref.dk, ref.dv, ref.dg, ref.dbeta, ref.dinit);
    const Tensor saved = buf.poisoned({kda_saved_floats(k, v, cu)}, DType::f32);
    kda_forward_saving(ctx, q, k, v, g, beta, cu, init, got.o, got.fin, saved);
    kda_backward_saved(ctx, q, k, v, g, beta, cu, dout, dfin, got.dq, got.dk, got.dv, got.dg, got.dbeta, got.dinit,
                       saved);
    ctx.synchronize();
    auto same = [](const Tensor& a, const Tensor& b, const char* what) {
      const std::vector<float> x = DeviceBuffers::download(a), y = DeviceBuffers::download(b);
      EXPECT_TRUE(all_finite(x)) << what;
      EXPECT_EQ(x, y) << what << " differs from the recomputing forward / backward";
    };
    same(got.o, ref.o, "o");
    same(got.fin, ref.fin, "final state");
    same(got.dq, ref.dq, "dq");
    same(got.dk, ref.dk, "dk");
    same(got.dv, ref.dv, "dv");
    same(got.dg, ref.dg, "dg");
    same(got.dbeta, ref.dbeta, "dbeta");
    same(got.dinit, ref.dinit, "dinitial_state");
    // The saving forward in two steps (prep, then the state pass after unrelated work) and the saved backward.
    const Grads two = grads();
    const Tensor saved2 = buf.poisoned({kda_saved_floats(k, v, cu)}, DType::f32);
    const Tensor u = buf.poisoned({kda_saving_u_floats(k, v, cu)}, DType::f32);
    kda_forward_saving_prepare(ctx, q, k, v, g, beta, cu, saved2, u);
    fill(ctx, buf.poisoned({1024}, DType::f32), 0.0f);  // unrelated work in between
    kda_forward_saving_pass(ctx, k, v, cu, init, two.o, two.fin, saved2, u);
    kda_backward_saved(ctx, q, k, v, g, beta, cu, dout, dfin, two.dq, two.dk, two.dv, two.dg, two.dbeta, two.dinit,
                       saved2);
    ctx.synchronize();
    same(two.o, ref.o, "o (prepare + pass)");
    same(two.fin, ref.fin, "final state (prepare + pass)");
    same(two.dq, ref.dq, "dq (prepare + pass)");
    same(two.dk, ref.dk, "dk (prepare + pass)");
    same(two.dv, ref.dv, "dv (prepare + pass)");
    same(two.dg, ref.dg, "dg (prepare + pass)");
    same(two.dbeta, ref.dbeta, "dbeta (prepare + pass)");
    same(two.dinit, ref.dinit, "dinitial_state (prepare + pass)");
    // LASP-2's B and M passes over the saving prep: B (no outputs) is the final state from a zero state, M the
    // transition from identities with zero values; both as the whole forward's.
    {
      std::vector<float> eye_h(static_cast<size_t>(D * s.hv * s.dk * s.dk), 0.f);
      for (int64_t m = 0; m < D * s.hv; ++m)
        for (int64_t i = 0; i < s.dk; ++i) eye_h[(m * s.dk + i) * s.dk + i] = 1.f;
      const Tensor eye = buf.upload(eye_h, {D, s.hv, s.dk, s.dk}, DType::f32);
      const Tensor zero_v = buf.zeros({n, s.hv, s.dk}, DType::bf16);
      const Tensor m_ref = buf.poisoned({D, s.hv, s.dk, s.dk}, DType::f32),
                   b_ref = buf.poisoned({D, s.hv, s.dk, s.dv}, DType::f32);
      kda_forward(ctx, q, k, zero_v, g, beta, cu, eye, buf.poisoned({n, s.hv, s.dk}, DType::bf16), m_ref);
      kda_forward(ctx, q, k, v, g, beta, cu, Tensor{}, buf.poisoned({n, s.hv, s.dv}, DType::bf16), b_ref);
      const Tensor m1 = buf.poisoned({D, s.hv, s.dk, s.dk}, DType::f32),
                   b1 = buf.poisoned({D, s.hv, s.dk, s.dv}, DType::f32);
      kda_forward_saving_prepare(ctx, q, k, v, g, beta, cu, saved2, u);
      kda_forward_saving_transition(ctx, k, v, cu, eye, m1, saved2);
      kda_forward_saving_pass(ctx, k, v, cu, Tensor{}, Tensor{}, b1, saved2, u);
      ctx.synchronize();
      same(m1, m_ref, "M (transition over the saving prep)");
      same(b1, b_ref, "B (zero-state pass over the saving prep, no outputs)");
    }
    const Tensor small = buf.poisoned({16}, DType::f32);
    test::expect_error_mentioning([&] { kda_forward_saving(ctx, q, k, v, g, beta, cu, init, got.o, got.fin, small); },
                                  "saved");
    test::expect_error_mentioning([&] { kda_forward_saving_prepare(ctx, q, k, v, g, beta, cu, saved2, small); }, "'u'");
  });
}

// The windowed tests' problems (mixed gates, with an initial state): one long document cut unevenly by windows, shorter
// ones at dk = dv = 64 and at dk 128 / dv 64, and a packed batch of documents of 0..1000 tokens.
template <class F>
void for_window_cases(F&& body) {
  struct Case {
    int64_t h, hv, dk, dv;
    std::vector<int32_t> lengths;
  };
  for (const Case& c : {Case{2, 2, 128, 128, {64 * 23 + 17}}, Case{1, 2, 64, 64, {64 * 9}}, Case{1, 1, 128, 64, {130}},
                        Case{2, 2, 128, 128, {1, 63, 64, 0, 65, 200, 1000}}}) {
    const Problem p = make_problem(c.lengths, c.h, c.hv, c.dk, c.dv, true, Gates::mixed);
    SCOPED_TRACE(describe(p, "mixed", true));
    ExecContext ctx(Device::cuda(0));
    DeviceBuffers buf(Device::cuda(0), size_t(256) << 20);
    const Inputs in = upload_inputs(buf, p);
    body(p, ctx, buf, in);
  }
}

// kda_forward_saving / kda_backward_saved in windows of consecutive chunks (the prep of one window beside the state
// pass over the one before; the products of one beside the reverse pass over the one after), carrying the state of
// a document cut by a window edge in f32, and with the state passes 64 columns wide (16 warps) instead of 32. Every
// result equals the unwindowed 32-column run's bit for bit: one long document and a packed batch (documents of
// 0..1000 tokens, cut anywhere), window counts that divide the chunks unevenly or leave windows empty, with and
// without the initial / final states and their gradients. Outputs poisoned first.
TEST(GpuKda, PipelinedWindowsAndWidePassesEqualTheWholePasses) {
  HYD_REQUIRE_GPU();
  const test::ScopedEnv windows_env("HYD_KDA_WINDOWS"), width_env("HYD_KDA_PASS_BV");  // put back at the end
  for_window_cases([&](const Problem& p, const ExecContext& ctx, DeviceBuffers& buf, const Inputs& in) {
    const KdaDims& s = p.s;
    const int64_t n = s.n, D = s.num_docs;
    const Tensor dout = buf.upload(p.dout, {n, s.hv, s.dv}, DType::bf16);
    const Tensor dfin = buf.upload(p.dfinal, {D, s.hv, s.dk, s.dv}, DType::f32);
    const Tensor saved = buf.poisoned({kda_saved_floats(in.k, in.v, in.cu)}, DType::f32);
    // Every output of the saving forward and the saved backward (with_states: initial state and final-state
    // gradient given, final state and initial-state gradient asked for).
    auto run = [&](const char* windows, const char* width, bool with_states) {
      windows_env.set(windows);
      width_env.set(width);
      const int64_t chunks = kda_chunk::max_chunks(s);  // a window count is capped by the chunks and by 16
      EXPECT_EQ(kda_saving_windows(in.k, in.v, in.cu),
                std::clamp<int64_t>(std::atoi(windows), 1, std::min<int64_t>(16, chunks)))
          << windows;
      std::vector<Tensor> t = {buf.poisoned({n, s.hv, s.dv}, DType::bf16), buf.poisoned({n, s.h, s.dk}, DType::bf16),
                               buf.poisoned({n, s.h, s.dk}, DType::bf16),  buf.poisoned({n, s.hv, s.dv}, DType::bf16),
                               buf.poisoned({n, s.hv, s.dk}, DType::f32),  buf.poisoned({n, s.hv}, DType::f32)};
      const Tensor fin = with_states ? buf.poisoned({D, s.hv, s.dk, s.dv}, DType::f32) : Tensor{};
      const Tensor dinit = with_states ? buf.poisoned({D, s.hv, s.dk, s.dv}, DType::f32) : Tensor{};
      kda_forward_saving(ctx, in.q, in.k, in.v, in.g, in.beta, in.cu, with_states ? in.init : Tensor{}, t[0], fin,
                         saved);
      kda_backward_saved(ctx, in.q, in.k, in.v, in.g, in.beta, in.cu, dout, with_states ? dfin : Tensor{}, t[1], t[2],
                         t[3], t[4], t[5], dinit, saved);
      if (with_states) {
        t.push_back(fin);
        t.push_back(dinit);
      }
      ctx.synchronize();
      std::vector<std::vector<float>> out;
      for (const Tensor& x : t) out.push_back(DeviceBuffers::download(x));
      return out;
    };
    const char* names[] = {"o", "dq", "dk", "dv", "dg", "dbeta", "final state", "dinitial_state"};
    const std::pair<const char*, const char*> layouts[] = {{"2", "32"},  {"3", "32"}, {"5", "32"},
                                                           {"16", "32"}, {"1", "64"}, {"3", "64"}};
    for (bool with_states : {true, false}) {
      const std::vector<std::vector<float>> ref = run("1", "32", with_states);
      for (const auto& x : ref) EXPECT_TRUE(all_finite(x));
      for (const auto& [windows, width] : layouts) {
        const std::vector<std::vector<float>> got = run(windows, width, with_states);
        ASSERT_EQ(got.size(), ref.size());
        for (size_t i = 0; i < got.size(); ++i)
          EXPECT_EQ(got[i], ref[i]) << names[i] << " with " << windows << " windows of " << width << "-column passes"
                                    << (with_states ? "" : ", no states") << " differs from one 32-column window";
      }
    }
  });
}

// LASP-2's forward before the exchange in one call (kda_forward_saving_lasp: the prep of one window beside the
// zero-state pass and the transition pass over the one before) equals the three calls one after the other bit for
// bit: o, the final state B, the transition pass's final state M and every chunk's P_c, and everything kept in
// `saved` (compared as bits, poisoned alike first). Windows forced (HYD_KDA_WINDOWS), 1 = the passes side by side
// after the whole prep; with several documents the identities sit at every document, as where every row's first
// document continues.
TEST(GpuKda, LaspForwardInWindowsEqualsTheSteps) {
  HYD_REQUIRE_GPU();
  const test::ScopedEnv windows_env("HYD_KDA_WINDOWS");  // put back at the end
  for_window_cases([&](const Problem& p, const ExecContext& ctx, DeviceBuffers& buf, const Inputs& in) {
    const KdaDims& s = p.s;
    const int64_t n = s.n, D = s.num_docs;
    std::vector<float> eye_h(static_cast<size_t>(D * s.hv * s.dk * s.dk), 0.f);
    for (int64_t m = 0; m < D * s.hv; ++m)
      for (int64_t i = 0; i < s.dk; ++i) eye_h[(m * s.dk + i) * s.dk + i] = 1.f;
    const Tensor eye = buf.upload(eye_h, {D, s.hv, s.dk, s.dk}, DType::f32);
    // o, B, M, P, saved
    auto outputs = [&] {
      return std::vector<Tensor>{buf.poisoned({n, s.hv, s.dv}, DType::bf16),
                                 buf.poisoned({D, s.hv, s.dk, s.dv}, DType::f32),
                                 buf.poisoned({D, s.hv, s.dk, s.dk}, DType::f32),
                                 buf.poisoned({kda_transitions_floats(in.k, in.v, in.cu)}, DType::f32),
                                 buf.poisoned({kda_saved_floats(in.k, in.v, in.cu)}, DType::f32)};
    };
    auto bits = [](const Tensor& t) {
      std::vector<uint8_t> h(static_cast<size_t>(t.nbytes()));
      copy_tensor(Tensor(h.data(), t.dtype, Device::cpu(), {t.numel()}), t.view({t.numel()}));
      return h;
    };
    const Tensor u = buf.poisoned({kda_saving_u_floats(in.k, in.v, in.cu)}, DType::f32);
    windows_env.set("1");
    const std::vector<Tensor> ref = outputs();
    kda_forward_saving_prepare(ctx, in.q, in.k, in.v, in.g, in.beta, in.cu, ref[4], u);
    kda_forward_saving_transition(ctx, in.k, in.v, in.cu, eye, ref[2], ref[4], ref[3]);
    kda_forward_saving_pass(ctx, in.k, in.v, in.cu, Tensor{}, ref[0], ref[1], ref[4], u);
    ctx.synchronize();
    std::vector<std::vector<uint8_t>> want;
    for (const Tensor& t : ref) want.push_back(bits(t));
    EXPECT_TRUE(all_finite(DeviceBuffers::download(ref[0])));
    EXPECT_TRUE(all_finite(DeviceBuffers::download(ref[2])));
    const char* names[] = {"o", "final state B", "transition M", "transitions P_c", "saved"};
    for (const char* windows : {"1", "2", "4", "16"}) {
      windows_env.set(windows);
      const std::vector<Tensor> got = outputs();
      const Tensor u2 = buf.poisoned({kda_saving_u_floats(in.k, in.v, in.cu)}, DType::f32);
      kda_forward_saving_lasp(ctx, in.q, in.k, in.v, in.g, in.beta, in.cu, got[0], got[1], got[4], u2, eye, got[2],
                              got[3]);
      ctx.synchronize();
      for (size_t i = 0; i < got.size(); ++i)
        EXPECT_TRUE(bits(got[i]) == want[i]) << names[i] << " with " << windows << " windows differs from the steps";
    }
    const Tensor small = buf.poisoned({16}, DType::f32);
    const std::vector<Tensor> bad = outputs();
    test::expect_error_mentioning(
        [&] {
          kda_forward_saving_lasp(ctx, in.q, in.k, in.v, in.g, in.beta, in.cu, bad[0], bad[1], bad[4], u, eye, bad[2],
                                  small);
        },
        "transitions");
    test::expect_error_mentioning(
        [&] {
          kda_forward_saving_lasp(ctx, in.q, in.k, in.v, in.g, in.beta, in.cu, bad[0], bad[1], bad[4], u, small, bad[2],
                                  bad[3]);
        },
        "eye");
  });
}

// LASP-2's parallel correction (kda_forward_saving_correct): the zero-state pass, the transition pass from
// identities keeping every chunk's P_c, then the correction by the initial state give the pass from that state
// to rounding: o, and through the saved backward (which reads the kept states and v_new) every gradient, within
// the bf16 tolerance. Document 2's initial state is zero: its outputs stay those of the zero-state pass bit for
// bit (the correction skips it). The backward's mirror below.
TEST(GpuKda, ParallelCorrectionEqualsThePassFromTheState) {
  HYD_REQUIRE_GPU();
  for_split_cases([](const Problem& p, const ExecContext& ctx, DeviceBuffers& buf, const Inputs& in) {
    const KdaDims& s = p.s;
    const int64_t n = s.n, D = s.num_docs, mb = s.dk * s.dv;
    const Tensor &q = in.q, &k = in.k, &v = in.v, &g = in.g, &beta = in.beta, &cu = in.cu;
    std::vector<float> init_h = p.init;
    std::fill(init_h.begin() + 2 * s.hv * mb, init_h.begin() + 3 * s.hv * mb, 0.f);
    const Tensor init = buf.upload(init_h, {D, s.hv, s.dk, s.dv}, DType::f32);
    const Tensor dout = buf.upload(p.dout, {n, s.hv, s.dv}, DType::bf16);
    const Tensor dfin = buf.upload(p.dfinal, {D, s.hv, s.dk, s.dv}, DType::f32);
    struct Run {
      Tensor o, dq, dk, dv, dg, dbeta, dinit, saved;
    };
    auto run = [&] {
      return Run{
          buf.poisoned({n, s.hv, s.dv}, DType::bf16),      buf.poisoned({n, s.h, s.dk}, DType::bf16),
          buf.poisoned({n, s.h, s.dk}, DType::bf16),       buf.poisoned({n, s.hv, s.dv}, DType::bf16),
          buf.poisoned({n, s.hv, s.dk}, DType::f32),       buf.poisoned({n, s.hv}, DType::f32),
          buf.poisoned({D, s.hv, s.dk, s.dv}, DType::f32), buf.poisoned({kda_saved_floats(k, v, cu)}, DType::f32)};
    };
    auto backward = [&](const Run& r) {
      kda_backward_saved(ctx, q, k, v, g, beta, cu, dout, dfin, r.dq, r.dk, r.dv, r.dg, r.dbeta, r.dinit, r.saved);
    };
    const Run ref = run(), got = run();
    const Tensor u = buf.poisoned({kda_saving_u_floats(k, v, cu)}, DType::f32);
    kda_forward_saving_prepare(ctx, q, k, v, g, beta, cu, ref.saved, u);
    kda_forward_saving_pass(ctx, k, v, cu, init, ref.o, Tensor{}, ref.saved, u);
    backward(ref);
    const Tensor o_zero = buf.poisoned({n, s.hv, s.dv}, DType::bf16);
    kda_forward_saving_pass(ctx, k, v, cu, Tensor{}, o_zero, Tensor{}, ref.saved, u);  // (ref.saved is done with)
    std::vector<float> eye_h(static_cast<size_t>(D * s.hv * s.dk * s.dk), 0.f);
    for (int64_t m = 0; m < D * s.hv; ++m)
      for (int64_t i = 0; i < s.dk; ++i) eye_h[(m * s.dk + i) * s.dk + i] = 1.f;
    const Tensor eye = buf.upload(eye_h, {D, s.hv, s.dk, s.dk}, DType::f32);
    const Tensor P = buf.poisoned({kda_transitions_floats(k, v, cu)}, DType::f32);
    const Tensor M = buf.poisoned({D, s.hv, s.dk, s.dk}, DType::f32);
    kda_forward_saving_prepare(ctx, q, k, v, g, beta, cu, got.saved, u);
    kda_forward_saving_transition(ctx, k, v, cu, eye, M, got.saved, P);
    kda_forward_saving_pass(ctx, k, v, cu, Tensor{}, got.o, Tensor{}, got.saved, u);
    kda_forward_saving_correct(ctx, k, v, cu, init, P, got.o, got.saved);
    backward(got);
    ctx.synchronize();
    auto close = [](const Tensor& a, const Tensor& b, const char* what) {
      const std::vector<float> x = DeviceBuffers::download(a), y = DeviceBuffers::download(b);
      EXPECT_TRUE(all_finite(x)) << what;
      const double e = rel_err(x, y);
      std::printf("  correction %-14s rel_err %.2e\n", what, e);
      EXPECT_LT(e, kBf16Tol) << what;
    };
    close(got.o, ref.o, "o");
    close(got.dq, ref.dq, "dq");
    close(got.dk, ref.dk, "dk");
    close(got.dv, ref.dv, "dv");
    close(got.dg, ref.dg, "dg");
    close(got.dbeta, ref.dbeta, "dbeta");
    close(got.dinit, ref.dinit, "dinitial_state");
    const std::vector<float> o_got = DeviceBuffers::download(got.o), o_zero_h = DeviceBuffers::download(o_zero);
    const size_t row = static_cast<size_t>(s.hv * s.dv);
    EXPECT_TRUE(
        std::equal(o_got.begin() + p.cu[2] * row, o_got.begin() + p.cu[3] * row, o_zero_h.begin() + p.cu[2] * row))
        << "a document with a zero initial state was changed by the correction";
    // The saved backward in steps: reverse + finish equal kda_backward_saved bit for bit; the reverse pass without
    // a final-state adjoint, the adjoint transitions R_c (from identities, zero output gradients) and the
    // correction by dfinal (document 2's zero) equal it to rounding.
    const Tensor ws = buf.poisoned({kda_backward_workspace_floats(k, v, cu)}, DType::f32);
    const Run steps = run(), corr = run(), ref2 = run();
    kda_backward_saved_reverse(ctx, k, v, cu, dout, dfin, steps.dinit, got.saved, ws);
    kda_backward_saved_finish(ctx, q, k, v, g, beta, cu, dout, steps.dq, steps.dk, steps.dv, steps.dg, steps.dbeta,
                              got.saved, ws);
    std::vector<float> dfin_h = p.dfinal;
    std::fill(dfin_h.begin() + 2 * s.hv * mb, dfin_h.begin() + 3 * s.hv * mb, 0.f);
    const Tensor dfin2 = buf.upload(dfin_h, {D, s.hv, s.dk, s.dv}, DType::f32);
    kda_backward_saved(ctx, q, k, v, g, beta, cu, dout, dfin2, ref2.dq, ref2.dk, ref2.dv, ref2.dg, ref2.dbeta, Tensor{},
                       got.saved);
    const Tensor R = buf.poisoned({kda_transitions_floats(k, v, cu)}, DType::f32);
    kda_backward_saved_reverse(ctx, k, v, cu, dout, Tensor{}, Tensor{}, got.saved, ws);
    kda_backward_saved_transition(ctx, k, v, cu, eye, got.saved, R);
    kda_backward_saved_correct(ctx, k, v, cu, dfin2, R, got.saved, ws);
    kda_backward_saved_finish(ctx, q, k, v, g, beta, cu, dout, corr.dq, corr.dk, corr.dv, corr.dg, corr.dbeta,
                              got.saved, ws);
    ctx.synchronize();
    auto same = [](const Tensor& a, const Tensor& b, const char* what) {
      EXPECT_EQ(DeviceBuffers::download(a), DeviceBuffers::download(b)) << what << " (reverse + finish)";
    };
    same(steps.dq, got.dq, "dq");
    same(steps.dk, got.dk, "dk");
    same(steps.dv, got.dv, "dv");
    same(steps.dg, got.dg, "dg");
    same(steps.dbeta, got.dbeta, "dbeta");
    same(steps.dinit, got.dinit, "dinitial_state");
    close(corr.dq, ref2.dq, "bwd dq");
    close(corr.dk, ref2.dk, "bwd dk");
    close(corr.dv, ref2.dv, "bwd dv");
    close(corr.dg, ref2.dg, "bwd dg");
    close(corr.dbeta, ref2.dbeta, "bwd dbeta");
    const Tensor small = buf.poisoned({16}, DType::f32);
    test::expect_error_mentioning([&] { kda_forward_saving_correct(ctx, k, v, cu, init, small, got.o, got.saved); },
                                  "transitions");
    test::expect_error_mentioning([&] { kda_backward_saved_correct(ctx, k, v, cu, dfin2, R, got.saved, small); },
                                  "workspace");
  });
}

TEST(GpuKda, LongSequenceTiming) {
  HYD_REQUIRE_GPU();
  // One document of 8192 tokens, H = HV = 16, dk = dv = 128: times only (no assertion on time).
  const Problem p = make_problem({8192}, 16, 16, 128, 128, false, Gates::mixed);
  const KdaDims& s = p.s;
  const int64_t n = s.n;
  ExecContext ctx(Device::cuda(0));
  DeviceBuffers buf(Device::cuda(0), size_t(1) << 30);
  const Tensor q = buf.upload(p.q, {n, s.h, s.dk}, DType::bf16), k = buf.upload(p.k, {n, s.h, s.dk}, DType::bf16),
               v = buf.upload(p.v, {n, s.hv, s.dv}, DType::bf16), g = buf.upload(p.g, {n, s.hv, s.dk}, DType::f32),
               beta = buf.upload(p.beta, {n, s.hv}, DType::f32), cu = buf.upload_i32(p.cu, {2}),
               dout = buf.upload(p.dout, {n, s.hv, s.dv}, DType::bf16);
  const Tensor o = buf.poisoned({n, s.hv, s.dv}, DType::bf16), fin = buf.poisoned({1, s.hv, s.dk, s.dv}, DType::f32);
  const Tensor dq = buf.poisoned({n, s.h, s.dk}, DType::bf16), dk = buf.poisoned({n, s.h, s.dk}, DType::bf16),
               dv = buf.poisoned({n, s.hv, s.dv}, DType::bf16), dg = buf.poisoned({n, s.hv, s.dk}, DType::f32),
               dbeta = buf.poisoned({n, s.hv}, DType::f32);
  test::device_sync();
  auto fwd = [&] { kda_forward(ctx, q, k, v, g, beta, cu, Tensor{}, o, fin); };
  auto bwd = [&] {
    kda_backward(ctx, q, k, v, g, beta, cu, Tensor{}, dout, Tensor{}, dq, dk, dv, dg, dbeta, Tensor{});
  };
  auto time_ms = [&](auto&& f) {
    ctx.synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    ctx.synchronize();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  time_ms([&] {  // warm-up (first-launch costs, allocator pool)
    fwd();
    bwd();
  });
  const double f_ms = time_ms(fwd);
  const double fb_ms = time_ms([&] {
    fwd();
    bwd();
  });
  std::printf("kda T=8192 H=16 dk=dv=128: forward %.2f ms, forward+backward %.2f ms\n", f_ms, fb_ms);
  for (const Tensor* t : {&o, &fin, &dq, &dk, &dv, &dg, &dbeta})
    EXPECT_TRUE(all_finite(DeviceBuffers::download(*t))) << "long sequence output holds NaN/Inf";
}

}  // namespace
}  // namespace hyd::kernels

// Golden test of causal GQA attention with documents and query offset (kernels/attention.h) against
// PyTorch's scaled_dot_product_attention.
//
// tests/golden/gen_attention_golden.py ran SDPA in float64 on the CPU over the packed batch as one sequence with
// a block-diagonal causal boolean mask (aligned at the end of each document's key range), GQA by repeating the kv
// heads, and stored per case (data/attention/<case>.safetensors):
//   inputs   q [N_q, 4, 64], k/v [N_k, 2, 64], do [N_q, 4, 64]: bf16-exact, stored as BF16;
//            cu_seqlens_q, cu_seqlens_k: I32 [D+1]
//   outputs  o, lse (logsumexp of the masked scaled scores) and the autograd gradients dq, dk, dv of
//            sum(o * do): the float64 results rounded to F32.
// Cases: packed_docs (documents of 1, 17, 20 tokens, no offset) and query_slice (the query slice [12, 30) of that
// sequence against the keys [0, 30), as LASP-2H calls it).
// Tolerances (||out - ref|| / ||ref|| per tensor):
//   double CPU reference vs the golden: 1e-7 (the golden is float64 rounded to f32: 2^-24 = 6e-8 per element);
//   f32 CPU reference through the dispatcher: 1e-5;
//   CUDA (bf16 in/out, f32 lse) on the golden's own inputs: o, dq, dk, dv 1e-2, lse 1e-3 (skipped without a GPU),
//   for both CUDA kernels: the FlashAttention-2 kernels (what the dispatcher runs for d = 64) and the simple
//   kernels (what it runs for other head dims), called directly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "kernels/attention.h"
#include "kernels/flash_attention.h"
#include "tests/common/test_util.h"
#include "trainer/core/exec_context.h"

namespace hyd::kernels {
namespace {

using test::DeviceBuffers;
using test::rel_err;

constexpr double kF64Tol = 1e-7;
constexpr double kF32Tol = 1e-5;
constexpr double kCudaBf16Tol = 1e-2;
constexpr double kCudaLseTol = 1e-3;

const std::vector<std::string> kCases = {"packed_docs", "query_slice"};
const std::vector<std::string> kBf16Inputs = {"q", "k", "v", "do"};
const std::vector<std::string> kOutputs = {"o", "lse", "dq", "dk", "dv"};

struct Golden {
  std::string name;
  int64_t n_q = 0, n_k = 0, hq = 0, hkv = 0, d = 0, num_docs = 0;
  int64_t max_len_q = 0, max_len_k = 0;  // the longest document's queries / keys
  double scale = 0;
  std::vector<int32_t> cu_q, cu_k;
  std::map<std::string, std::vector<double>> t;
  bool offset() const { return cu_q != cu_k; }
  const std::vector<double>& operator[](const std::string& n) const { return t.at(n); }
};

Golden read_golden(const std::string& name) {
  const std::string path = std::string(HYD_SOURCE_DIR) + "/tests/golden/data/attention/" + name + ".safetensors";
  SafetensorsFile f(path);
  Golden g;
  g.name = name;
  const auto& q = f.info("q").shape;
  const auto& k = f.info("k").shape;
  EXPECT_EQ(q.size(), 3u);
  EXPECT_EQ(k.size(), 3u);
  g.n_q = q.at(0);
  g.hq = q.at(1);
  g.d = q.at(2);
  g.n_k = k.at(0);
  g.hkv = k.at(1);
  for (int64_t c : f.read_i64("cu_seqlens_q")) g.cu_q.push_back(static_cast<int32_t>(c));
  for (int64_t c : f.read_i64("cu_seqlens_k")) g.cu_k.push_back(static_cast<int32_t>(c));
  g.num_docs = static_cast<int64_t>(g.cu_q.size()) - 1;
  for (size_t i = 1; i < g.cu_q.size() && i < g.cu_k.size(); ++i) {
    g.max_len_q = std::max<int64_t>(g.max_len_q, g.cu_q[i] - g.cu_q[i - 1]);
    g.max_len_k = std::max<int64_t>(g.max_len_k, g.cu_k[i] - g.cu_k[i - 1]);
  }
  EXPECT_EQ(g.cu_k.size(), g.cu_q.size());
  const nlohmann::json meta = nlohmann::json::parse(f.metadata().at("golden"));
  g.scale = meta.at("scale").get<double>();
  EXPECT_DOUBLE_EQ(g.scale, 1.0 / std::sqrt(static_cast<double>(g.d)));
  for (const std::string& n : kBf16Inputs) {
    EXPECT_EQ(f.info(n).dtype, SafetensorsDType::BF16) << path << ": " << n;
    const std::vector<float> x = f.read_f32(n);
    g.t[n] = std::vector<double>(x.begin(), x.end());
  }
  for (const std::string& n : kOutputs) {
    EXPECT_EQ(f.info(n).dtype, SafetensorsDType::F32) << path << ": " << n;
    const std::vector<float> x = f.read_f32(n);
    g.t[n] = std::vector<double>(x.begin(), x.end());
  }
  EXPECT_EQ(g["q"].size(), size_t(g.n_q * g.hq * g.d));
  EXPECT_EQ(g["do"].size(), size_t(g.n_q * g.hq * g.d));
  EXPECT_EQ(g["v"].size(), size_t(g.n_k * g.hkv * g.d));
  EXPECT_EQ(g["lse"].size(), size_t(g.n_q * g.hq));
  return g;
}

void expect_close(const Golden& g, const std::string& n, const std::vector<double>& out, double tol,
                  const std::string& what) {
  const double e = rel_err(out, g[n]);
  std::printf("  [%s %s] %-3s rel_err %.2e (tol %.0e)\n", g.name.c_str(), what.c_str(), n.c_str(), e, tol);
  EXPECT_LT(e, tol) << g.name << " " << what << ": " << n;
}

TEST(GoldenAttention, CasesHoldWhatTheyClaim) {
  const Golden a = read_golden("packed_docs"), b = read_golden("query_slice");
  EXPECT_FALSE(a.offset());
  EXPECT_EQ(a.cu_q, (std::vector<int32_t>{0, 1, 18, 38}));
  EXPECT_TRUE(b.offset());
  EXPECT_EQ(b.cu_q, (std::vector<int32_t>{0, 0, 6, 18}));
  EXPECT_EQ(b.cu_k, (std::vector<int32_t>{0, 1, 18, 30}));
  // The slice's queries are rows [12, 30) of the full sequence, its keys rows [0, 30): the inputs are not shared
  // (separate seeds), but the key of the length-1 document, seen by no query, has zero gradients.
  for (int64_t x = 0; x < b.hkv * b.d; ++x) {
    EXPECT_EQ(b["dk"][x], 0.0);
    EXPECT_EQ(b["dv"][x], 0.0);
  }
}

TEST(GoldenAttention, CpuDoubleMatchesSdpa) {
  for (const std::string& name : kCases) {
    const Golden g = read_golden(name);
    std::vector<double> o(g.n_q * g.hq * g.d, NAN), lse(g.n_q * g.hq, NAN), dq(o.size(), NAN),
        dk(g.n_k * g.hkv * g.d, NAN), dv(dk.size(), NAN);
    cpu::attention_forward<double>(g["q"].data(), g["k"].data(), g["v"].data(), g.cu_q.data(), g.cu_k.data(),
                                   g.num_docs, o.data(), lse.data(), g.n_q, g.n_k, g.hq, g.hkv, g.d, g.scale);
    cpu::attention_backward<double>(g["do"].data(), g["q"].data(), g["k"].data(), g["v"].data(), o.data(), lse.data(),
                                    g.cu_q.data(), g.cu_k.data(), g.num_docs, dq.data(), dk.data(), dv.data(), g.n_q,
                                    g.n_k, g.hq, g.hkv, g.d, g.scale);
    expect_close(g, "o", o, kF64Tol, "cpu f64");
    expect_close(g, "lse", lse, kF64Tol, "cpu f64");
    expect_close(g, "dq", dq, kF64Tol, "cpu f64");
    expect_close(g, "dk", dk, kF64Tol, "cpu f64");
    expect_close(g, "dv", dv, kF64Tol, "cpu f64");
  }
}

// Which code runs: the Tensor-level dispatcher (CPU f32 reference, or on CUDA the kernel it picks for the head
// dim), or on CUDA the simple kernels called directly.
enum class Path { dispatcher, cuda_simple_kernel };

// Runs `path` on `dev` (CPU f32 or CUDA bf16) over the golden's inputs; returns the outputs in double.
std::map<std::string, std::vector<double>> run_attention(const Golden& g, Device dev, Path path = Path::dispatcher) {
  ExecContext ctx(dev);
  DeviceBuffers buf(dev, size_t(16) << 20);
  const DType act = dev.is_cpu() ? DType::f32 : DType::bf16;
  auto up = [&](const std::string& n, std::initializer_list<int64_t> dims) {
    const std::vector<double>& x = g[n];
    return buf.upload(std::vector<float>(x.begin(), x.end()), dims, act);
  };
  const Tensor tq = up("q", {g.n_q, g.hq, g.d}), tk = up("k", {g.n_k, g.hkv, g.d}), tv = up("v", {g.n_k, g.hkv, g.d}),
               tdo = up("do", {g.n_q, g.hq, g.d});
  const Tensor tcq = buf.upload_i32(g.cu_q, {g.num_docs + 1}), tck = buf.upload_i32(g.cu_k, {g.num_docs + 1});
  const Tensor to = buf.poisoned({g.n_q, g.hq, g.d}, act), tlse = buf.poisoned({g.n_q, g.hq}, DType::f32),
               tdq = buf.poisoned({g.n_q, g.hq, g.d}, act), tdk = buf.poisoned({g.n_k, g.hkv, g.d}, act),
               tdv = buf.poisoned({g.n_k, g.hkv, g.d}, act);
  if (dev.is_cuda()) test::device_sync();  // uploads went through the legacy default stream
  const float scale = static_cast<float>(g.scale);
  if (path == Path::cuda_simple_kernel) {
#ifdef HYD_WITH_CUDA
    cuda::attention_forward(tq.ptr<bf16>(), tk.ptr<bf16>(), tv.ptr<bf16>(), tcq.ptr<int32_t>(), tck.ptr<int32_t>(),
                            g.num_docs, to.ptr<bf16>(), tlse.ptr<float>(), g.n_q, g.n_k, g.hq, g.hkv, g.d, scale,
                            ctx.stream());
    cuda::attention_backward(tdo.ptr<bf16>(), tq.ptr<bf16>(), tk.ptr<bf16>(), tv.ptr<bf16>(), to.ptr<bf16>(),
                             tlse.ptr<float>(), tcq.ptr<int32_t>(), tck.ptr<int32_t>(), g.num_docs, tdq.ptr<bf16>(),
                             tdk.ptr<bf16>(), tdv.ptr<bf16>(), g.n_q, g.n_k, g.hq, g.hkv, g.d, scale, ctx.stream());
#else
    ADD_FAILURE() << "the simple CUDA kernels need a CUDA build";
#endif
  } else if (g.offset()) {
    attention_forward(ctx, tq, tk, tv, tcq, tck, g.max_len_q, g.max_len_k, to, tlse, scale);
    attention_backward(ctx, tdo, tq, tk, tv, to, tlse, tcq, tck, g.max_len_q, g.max_len_k, tdq, tdk, tdv, scale);
  } else {
    attention_forward(ctx, tq, tk, tv, tcq, g.max_len_q, to, tlse, scale);
    attention_backward(ctx, tdo, tq, tk, tv, to, tlse, tcq, g.max_len_q, tdq, tdk, tdv, scale);
  }
  ctx.synchronize();
  std::map<std::string, std::vector<double>> out;
  for (auto [n, t] :
       {std::pair<std::string, const Tensor*>{"o", &to}, {"lse", &tlse}, {"dq", &tdq}, {"dk", &tdk}, {"dv", &tdv}}) {
    const std::vector<float> x = DeviceBuffers::download(*t);
    EXPECT_TRUE(test::all_finite(x)) << g.name << ": " << n << " has NaN/Inf";
    out[n] = std::vector<double>(x.begin(), x.end());
  }
  return out;
}

TEST(GoldenAttention, CpuFloatDispatcherMatchesSdpa) {
  for (const std::string& name : kCases) {
    const Golden g = read_golden(name);
    const auto out = run_attention(g, Device::cpu());
    for (const std::string& n : kOutputs) expect_close(g, n, out.at(n), kF32Tol, "cpu f32");
  }
}

// The dispatcher on CUDA runs the FlashAttention-2 kernels for the golden's d = 64.
TEST(GoldenAttention, CudaFlashMatchesSdpa) {
  HYD_REQUIRE_GPU();
  for (const std::string& name : kCases) {
    const Golden g = read_golden(name);
    ASSERT_TRUE(flash_attention_supported(g.d, DType::bf16)) << "d = " << g.d;
    const auto out = run_attention(g, Device::cuda(0));
    for (const std::string& n : kOutputs)
      expect_close(g, n, out.at(n), n == "lse" ? kCudaLseTol : kCudaBf16Tol, "cuda flash");
  }
}

TEST(GoldenAttention, CudaSimpleKernelMatchesSdpa) {
  HYD_REQUIRE_GPU();
  for (const std::string& name : kCases) {
    const Golden g = read_golden(name);
    const auto out = run_attention(g, Device::cuda(0), Path::cuda_simple_kernel);
    for (const std::string& n : kOutputs)
      expect_close(g, n, out.at(n), n == "lse" ? kCudaLseTol : kCudaBf16Tol, "cuda simple");
  }
}

}  // namespace
}  // namespace hyd::kernels

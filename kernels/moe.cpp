// Tensor-level dispatch of the MoE ops (see kernels/moe.h): argument validation, then the CPU reference
// (f32 | f64) or the CUDA kernels (bf16 rows, f32 router) chosen by the tensors' device.
#include "kernels/moe.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/dispatch.h"
#include "trainer/core/arena.h"

namespace hyd {

std::vector<int64_t> MoeRouting::counts_host() const {
  if (counts.empty()) HYD_THROW("MoeRouting::counts_host: counts missing (MoeRouting::alloc)");
  std::vector<int32_t> c(static_cast<size_t>(num_experts));
  if (counts.device.is_cpu()) {
    const int32_t* p = counts.ptr<int32_t>();
    c.assign(p, p + num_experts);
  } else {
    copy_tensor(Tensor(c.data(), DType::i32, Device::cpu(), {num_experts}), counts);
  }
  return std::vector<int64_t>(c.begin(), c.end());
}

namespace kernels {

MoeGemm moe_gemm_from_env() {
  const char* v = std::getenv("HYD_MOE_GEMM");
  if (v == nullptr || *v == '\0') return MoeGemm::automatic;
  const std::string s = v;
  if (s == "auto") return MoeGemm::automatic;
  if (s == "grouped") return MoeGemm::grouped;
  if (s == "loop") return MoeGemm::loop;
  if (s == "wmma") return MoeGemm::wmma;
  HYD_THROW("environment variable HYD_MOE_GEMM='", s, "': expected auto, grouped, loop or wmma");
}

int64_t moe_loop_min_macs() {
  const char* v = std::getenv("HYD_MOE_LOOP_MIN_MACS");
  if (v == nullptr || *v == '\0') return kMoeLoopMinMacs;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  if (*end != '\0' || n <= 0)
    HYD_THROW("environment variable HYD_MOE_LOOP_MIN_MACS='", v, "': expected a positive integer");
  return n;
}

bool moe_gemm_uses_grouped(MoeGemm impl, std::span<const int32_t> counts, int64_t macs_per_row) {
  if (impl != MoeGemm::automatic) return impl == MoeGemm::grouped;
  int64_t rows = 0, active = 0;
  for (const int32_t c : counts) {
    rows += c;
    active += c > 0 ? 1 : 0;
  }
  // mean rows x macs_per_row < threshold, without the division
  return active > 0 && static_cast<double>(rows) * static_cast<double>(macs_per_row) <
                           static_cast<double>(moe_loop_min_macs()) * static_cast<double>(active);
}

const char* moe_gemm_name(MoeGemm g) {
  switch (g) {
    case MoeGemm::grouped:
      return "grouped";
    case MoeGemm::loop:
      return "loop";
    case MoeGemm::wmma:
      return "wmma";
    case MoeGemm::automatic:
      return "auto";
  }
  return "?";
}

const char* moe_grouped_dw_path() {
#ifdef HYD_WITH_CUDA
  return cuda::moe_grouped_dw_path();
#else
  return "untried";
#endif
}

MoeHostCounts::~MoeHostCounts() {
#ifdef HYD_WITH_CUDA
  if (event_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
  if (pinned_ != nullptr) cudaFreeHost(pinned_);
#endif
}

void MoeHostCounts::start(const ExecContext& ctx, const Tensor& counts) {
  constexpr const char* op = "MoeHostCounts::start";
  if (counts.empty()) HYD_THROW(op, ": argument 'counts' is empty");
  expect_dtype(counts, DType::i32, op, "counts");
  size_ = counts.numel();
  pending_ = true;
  device_copy_ = !counts.device.is_cpu();
  if (!device_copy_) {
    const int32_t* p = counts.ptr<int32_t>();
    host_.assign(p, p + size_);
    return;
  }
#ifdef HYD_WITH_CUDA
  check_context(ctx, counts, op);
  if (size_ > capacity_) {
    if (pinned_ != nullptr) CHECK_CUDA(cudaFreeHost(pinned_));
    pinned_ = nullptr;
    void* p = nullptr;
    CHECK_CUDA(cudaMallocHost(&p, static_cast<size_t>(size_) * sizeof(int32_t)));
    pinned_ = static_cast<int32_t*>(p);
    capacity_ = size_;
  }
  if (event_ == nullptr) {
    cudaEvent_t ev;
    CHECK_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    event_ = ev;
  }
  const cudaStream_t s = static_cast<cudaStream_t>(ctx.stream());
  CHECK_CUDA(
      cudaMemcpyAsync(pinned_, counts.data, static_cast<size_t>(size_) * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
  CHECK_CUDA(cudaEventRecord(static_cast<cudaEvent_t>(event_), s));
#else
  pending_ = false;
  unsupported(op, counts);
#endif
}

void MoeHostCounts::wait(std::vector<int32_t>& out) {
  if (!pending_) HYD_THROW("MoeHostCounts::wait: no copy started (MoeHostCounts::start)");
  pending_ = false;
  if (!device_copy_) {
    out = host_;
    return;
  }
#ifdef HYD_WITH_CUDA
  CHECK_CUDA(cudaEventSynchronize(static_cast<cudaEvent_t>(event_)));
  out.assign(pinned_, pinned_ + size_);
#endif
}

namespace {

void expect_present(const Tensor& t, const char* op, const char* arg) {
  if (t.empty()) HYD_THROW(op, ": argument '", arg, "' is empty");
}

void expect_routing(const MoeRouting& r, const Tensor& like, const char* op) {
  if (r.expert.empty() || r.weight.empty() || r.counts.empty() || r.offsets.empty() || r.order.empty() ||
      r.position.empty())
    HYD_THROW(op, ": routing tensors missing (MoeRouting::alloc)");
  const int64_t n = r.tokens, k = r.top_k, e = r.num_experts;
  const std::pair<const Tensor*, const char*> idx[] = {{&r.expert, "routing.expert"},
                                                       {&r.counts, "routing.counts"},
                                                       {&r.offsets, "routing.offsets"},
                                                       {&r.order, "routing.order"},
                                                       {&r.position, "routing.position"}};
  for (const auto& [t, name] : idx) {
    expect_dtype(*t, DType::i32, op, name);
    expect_same_device(like, *t, op);
  }
  expect_shape(r.expert, {n, k}, op, "routing.expert");
  expect_shape(r.weight, {n, k}, op, "routing.weight");
  expect_shape(r.counts, {e}, op, "routing.counts");
  expect_shape(r.offsets, {e + 1}, op, "routing.offsets");
  expect_shape(r.order, {n * k}, op, "routing.order");
  expect_shape(r.position, {n * k}, op, "routing.position");
  expect_same_device(like, r.weight, op);
}

// CPU: f32 or f64 (the dtype of `t`); CUDA: `cuda_dtype`.
DType value_dtype(const Tensor& t, DType cuda_dtype, const char* op, const char* arg) {
  expect_present(t, op, arg);
  if (t.device.is_cpu()) {
    if (t.dtype != DType::f32 && t.dtype != DType::f64)
      HYD_THROW(op, ": argument '", arg, "' has dtype ", dtype_name(t.dtype), ", expected f32 or f64 on the CPU");
    return t.dtype;
  }
  expect_dtype(t, cuda_dtype, op, arg);
  return cuda_dtype;
}

// Row tensors (bf16 on CUDA) and score-like tensors (f32 on CUDA) of one call agree: on the CPU both
// have the rows' dtype.
DType score_dtype_for(const Tensor& rows) { return rows.device.is_cpu() ? rows.dtype : DType::f32; }

}  // namespace

void moe_route(const ExecContext& ctx, const MoeRouterOptions& opt, const Tensor& scores, const Tensor& bias,
               const MoeRouting& r) {
  constexpr const char* op = "moe_route";
  const DType dt = value_dtype(scores, DType::f32, op, "scores");
  expect_routing(r, scores, op);
  const int64_t N = r.tokens, E = r.num_experts, K = r.top_k;
  expect_shape(scores, {N, E}, op, "scores");
  expect_dtype(r.weight, dt, op, "routing.weight");
  if (K < 1 || K > E) HYD_THROW(op, ": top_k ", K, " must be in 1..", E, " (the experts)");
  if (!bias.empty()) {
    expect_shape(bias, {E}, op, "bias");
    expect_dtype(bias, dt, op, "bias");
    expect_same_device(scores, bias, op);
  }
  check_context(ctx, scores, op);
  if (scores.device.is_cpu()) {
    if (dt == DType::f64)
      cpu::moe_route<double>(opt, scores.ptr<double>(), bias.empty() ? nullptr : bias.ptr<double>(), N, E, K,
                             r.expert.ptr<int32_t>(), r.weight.ptr<double>(), r.counts.ptr<int32_t>(),
                             r.offsets.ptr<int32_t>(), r.order.ptr<int32_t>(), r.position.ptr<int32_t>());
    else
      cpu::moe_route<float>(opt, scores.ptr<float>(), bias.empty() ? nullptr : bias.ptr<float>(), N, E, K,
                            r.expert.ptr<int32_t>(), r.weight.ptr<float>(), r.counts.ptr<int32_t>(),
                            r.offsets.ptr<int32_t>(), r.order.ptr<int32_t>(), r.position.ptr<int32_t>());
    return;
  }
#ifdef HYD_WITH_CUDA
  if (K > kMoeMaxTopK) HYD_THROW(op, ": top_k ", K, " exceeds the CUDA router's limit of ", kMoeMaxTopK);
  cuda::moe_route(opt, scores.ptr<float>(), bias.empty() ? nullptr : bias.ptr<float>(), N, E, K,
                  r.expert.ptr<int32_t>(), r.weight.ptr<float>(), r.counts.ptr<int32_t>(), r.offsets.ptr<int32_t>(),
                  r.order.ptr<int32_t>(), r.position.ptr<int32_t>(), ctx.stream());
#else
  unsupported(op, scores);
#endif
}

void moe_permute(const ExecContext& ctx, const MoeRouting& r, const Tensor& x, const Tensor& xp) {
  constexpr const char* op = "moe_permute";
  const DType dt = value_dtype(x, DType::bf16, op, "x");
  expect_routing(r, x, op);
  expect_shape(x, {r.tokens, -1}, op, "x");
  const int64_t D = x.size(1), N = r.tokens, K = r.top_k;
  expect_shape(xp, {N * K, D}, op, "xp");
  expect_dtype(xp, dt, op, "xp");
  expect_same_device(x, xp, op);
  check_context(ctx, x, op);
  if (x.device.is_cpu()) {
    if (dt == DType::f64)
      cpu::moe_permute<double>(r.order.ptr<int32_t>(), x.ptr<double>(), xp.ptr<double>(), N, K, D);
    else
      cpu::moe_permute<float>(r.order.ptr<int32_t>(), x.ptr<float>(), xp.ptr<float>(), N, K, D);
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::moe_permute(r.order.ptr<int32_t>(), x.ptr<bf16>(), xp.ptr<bf16>(), N, K, D, ctx.stream());
#else
  unsupported(op, x);
#endif
}

void moe_unpermute(const ExecContext& ctx, const MoeRouting& r, const Tensor& xp, const Tensor& pairs) {
  constexpr const char* op = "moe_unpermute";
  const DType dt = value_dtype(xp, DType::bf16, op, "xp");
  expect_routing(r, xp, op);
  const int64_t N = r.tokens, K = r.top_k;
  expect_shape(xp, {N * K, -1}, op, "xp");
  const int64_t D = xp.size(1);
  expect_shape(pairs, {N * K, D}, op, "pairs");
  expect_dtype(pairs, dt, op, "pairs");
  expect_same_device(xp, pairs, op);
  check_context(ctx, xp, op);
  if (xp.device.is_cpu()) {
    if (dt == DType::f64)
      cpu::moe_unpermute<double>(r.position.ptr<int32_t>(), xp.ptr<double>(), pairs.ptr<double>(), N, K, D);
    else
      cpu::moe_unpermute<float>(r.position.ptr<int32_t>(), xp.ptr<float>(), pairs.ptr<float>(), N, K, D);
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::moe_unpermute(r.position.ptr<int32_t>(), xp.ptr<bf16>(), pairs.ptr<bf16>(), N, K, D, ctx.stream());
#else
  unsupported(op, xp);
#endif
}

namespace {

void gather_sum(const ExecContext& ctx, const char* op, const MoeRouting& r, bool weighted, const Tensor& rows,
                const Tensor& out, bool accumulate) {
  const DType dt = value_dtype(rows, DType::bf16, op, "rows");
  expect_routing(r, rows, op);
  const int64_t N = r.tokens, K = r.top_k;
  expect_shape(rows, {N * K, -1}, op, "rows");
  const int64_t D = rows.size(1);
  expect_shape(out, {N, D}, op, "out");
  expect_dtype(out, dt, op, "out");
  expect_same_device(rows, out, op);
  if (weighted) expect_dtype(r.weight, score_dtype_for(rows), op, "routing.weight");
  check_context(ctx, rows, op);
  const int32_t* pos = r.position.ptr<int32_t>();
  if (rows.device.is_cpu()) {
    if (dt == DType::f64)
      cpu::moe_gather_sum<double>(pos, weighted ? r.weight.ptr<double>() : nullptr, rows.ptr<double>(),
                                  out.ptr<double>(), N, K, D, accumulate);
    else
      cpu::moe_gather_sum<float>(pos, weighted ? r.weight.ptr<float>() : nullptr, rows.ptr<float>(), out.ptr<float>(),
                                 N, K, D, accumulate);
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::moe_gather_sum(pos, weighted ? r.weight.ptr<float>() : nullptr, rows.ptr<bf16>(), out.ptr<bf16>(), N, K, D,
                       accumulate, ctx.stream());
#else
  unsupported(op, rows);
#endif
}

}  // namespace

void moe_combine(const ExecContext& ctx, const MoeRouting& r, const Tensor& yp, const Tensor& out, bool accumulate) {
  gather_sum(ctx, "moe_combine", r, true, yp, out, accumulate);
}

void moe_permute_backward(const ExecContext& ctx, const MoeRouting& r, const Tensor& dxp, const Tensor& dx,
                          bool accumulate) {
  gather_sum(ctx, "moe_permute_backward", r, false, dxp, dx, accumulate);
}

void moe_combine_backward(const ExecContext& ctx, const MoeRouting& r, const Tensor& dout, const Tensor& yp,
                          const Tensor& d_yp, const Tensor& d_weight) {
  constexpr const char* op = "moe_combine_backward";
  const DType dt = value_dtype(dout, DType::bf16, op, "dout");
  expect_routing(r, dout, op);
  const int64_t N = r.tokens, K = r.top_k;
  expect_shape(dout, {N, -1}, op, "dout");
  const int64_t D = dout.size(1);
  expect_shape(yp, {N * K, D}, op, "yp");
  expect_shape(d_yp, {N * K, D}, op, "d_yp");
  expect_shape(d_weight, {N, K}, op, "d_weight");
  expect_dtype(yp, dt, op, "yp");
  expect_dtype(d_yp, dt, op, "d_yp");
  const DType st = score_dtype_for(dout);
  expect_dtype(d_weight, st, op, "d_weight");
  expect_dtype(r.weight, st, op, "routing.weight");
  expect_same_device(dout, yp, op);
  expect_same_device(dout, d_yp, op);
  expect_same_device(dout, d_weight, op);
  check_context(ctx, dout, op);
  const int32_t* order = r.order.ptr<int32_t>();
  if (dout.device.is_cpu()) {
    if (dt == DType::f64)
      cpu::moe_combine_backward<double>(order, r.weight.ptr<double>(), dout.ptr<double>(), yp.ptr<double>(),
                                        d_yp.ptr<double>(), d_weight.ptr<double>(), N, K, D);
    else
      cpu::moe_combine_backward<float>(order, r.weight.ptr<float>(), dout.ptr<float>(), yp.ptr<float>(),
                                       d_yp.ptr<float>(), d_weight.ptr<float>(), N, K, D);
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::moe_combine_backward(order, r.weight.ptr<float>(), dout.ptr<bf16>(), yp.ptr<bf16>(), d_yp.ptr<bf16>(),
                             d_weight.ptr<float>(), N, K, D, ctx.stream());
#else
  unsupported(op, dout);
#endif
}

void moe_router_backward(const ExecContext& ctx, const MoeRouterOptions& opt, const Tensor& scores, const MoeRouting& r,
                         const Tensor& d_weight, const Tensor& aux_frac, double aux_scale, const Tensor& d_logits) {
  constexpr const char* op = "moe_router_backward";
  const DType dt = value_dtype(scores, DType::f32, op, "scores");
  expect_routing(r, scores, op);
  const int64_t N = r.tokens, K = r.top_k, E = r.num_experts;
  expect_shape(scores, {N, E}, op, "scores");
  expect_shape(d_weight, {N, K}, op, "d_weight");
  expect_shape(aux_frac, {E}, op, "aux_frac");
  expect_shape(d_logits, {N, E}, op, "d_logits");
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&d_weight, "d_weight"},
                                {&aux_frac, "aux_frac"},
                                {&d_logits, "d_logits"}}) {
    expect_dtype(*t, dt, op, name);
    expect_same_device(scores, *t, op);
  }
  check_context(ctx, scores, op);
  const int32_t* ex = r.expert.ptr<int32_t>();
  if (scores.device.is_cpu()) {
    if (dt == DType::f64)
      cpu::moe_router_backward<double>(opt, scores.ptr<double>(), ex, d_weight.ptr<double>(), aux_frac.ptr<double>(),
                                       aux_scale, d_logits.ptr<double>(), N, E, K);
    else
      cpu::moe_router_backward<float>(opt, scores.ptr<float>(), ex, d_weight.ptr<float>(), aux_frac.ptr<float>(),
                                      static_cast<float>(aux_scale), d_logits.ptr<float>(), N, E, K);
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::moe_router_backward(opt, scores.ptr<float>(), ex, d_weight.ptr<float>(), aux_frac.ptr<float>(),
                            static_cast<float>(aux_scale), d_logits.ptr<float>(), N, E, K, ctx.stream());
#else
  unsupported(op, scores);
#endif
}

void moe_aux_stats(const ExecContext& ctx, const MoeRouting& r, const Tensor& scores, const Tensor& aux_frac,
                   const Tensor& aux_prob) {
  constexpr const char* op = "moe_aux_stats";
  const DType dt = value_dtype(scores, DType::f32, op, "scores");
  expect_routing(r, scores, op);
  const int64_t N = r.tokens, K = r.top_k, E = r.num_experts;
  expect_shape(scores, {N, E}, op, "scores");
  expect_shape(aux_frac, {E}, op, "aux_frac");
  expect_dtype(aux_frac, dt, op, "aux_frac");
  expect_same_device(scores, aux_frac, op);
  if (!aux_prob.empty()) {
    expect_shape(aux_prob, {E}, op, "aux_prob");
    expect_dtype(aux_prob, dt, op, "aux_prob");
    expect_same_device(scores, aux_prob, op);
  }
  check_context(ctx, scores, op);
  const int32_t* counts = r.counts.ptr<int32_t>();
  if (scores.device.is_cpu()) {
    if (dt == DType::f64)
      cpu::moe_aux_stats<double>(counts, scores.ptr<double>(), aux_frac.ptr<double>(),
                                 aux_prob.empty() ? nullptr : aux_prob.ptr<double>(), N, E, K);
    else
      cpu::moe_aux_stats<float>(counts, scores.ptr<float>(), aux_frac.ptr<float>(),
                                aux_prob.empty() ? nullptr : aux_prob.ptr<float>(), N, E, K);
    return;
  }
#ifdef HYD_WITH_CUDA
  cuda::moe_aux_stats(counts, scores.ptr<float>(), aux_frac.ptr<float>(),
                      aux_prob.empty() ? nullptr : aux_prob.ptr<float>(), N, E, K, ctx.stream());
#else
  unsupported(op, scores);
#endif
}

namespace {

// w [E, n, k]; offsets i32 [E + 1] on w's device. Returns {E, n, k}.
struct GroupedDims {
  int64_t e, n, k;
};
GroupedDims grouped_dims(const Tensor& offsets, const Tensor& w, const char* op) {
  expect_present(w, op, "w");
  expect_shape(w, {-1, -1, -1}, op, "w");
  const int64_t E = w.size(0);
  expect_present(offsets, op, "offsets");
  expect_shape(offsets, {E + 1}, op, "offsets");
  expect_dtype(offsets, DType::i32, op, "offsets");
  expect_same_device(w, offsets, op);
  return {E, w.size(1), w.size(2)};
}

// MoeGemm::automatic's measure of a call (MoeGemmPlan::expert_macs_per_row, else the call's own n x k).
[[maybe_unused]] int64_t plan_macs_per_row(const MoeGemmPlan& plan, const GroupedDims& g) {
  return plan.expert_macs_per_row > 0 ? plan.expert_macs_per_row : g.n * g.k;
}

// The plan's host counts: E entries; on the CPU each the difference of the offsets (which are there), on
// CUDA non-negative and summing to the rows R (the device offsets are not read back: that is the point).
// Returns them for the cuBLAS implementations on CUDA, nullptr otherwise.
const int32_t* plan_counts(const MoeGemmPlan& plan, const Tensor& offsets, int64_t E, int64_t R, const char* op) {
  const bool cpu = offsets.device.is_cpu();
  if (plan.host_counts.empty() && (cpu || plan.impl == MoeGemm::wmma)) return nullptr;
  if (static_cast<int64_t>(plan.host_counts.size()) != E)
    HYD_THROW(op, ": the plan's host counts have ", plan.host_counts.size(), " entries, expected ", E,
              " (one per expert; the cuBLAS implementation '", moe_gemm_name(plan.impl), "' needs them)");
  int64_t sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = plan.host_counts[e];
    if (c < 0) HYD_THROW(op, ": the plan's host count of expert ", e, " is negative (", c, ")");
    if (cpu && c != offsets.ptr<int32_t>()[e + 1] - offsets.ptr<int32_t>()[e])
      HYD_THROW(op, ": the plan's host count of expert ", e, " is ", c, " but the offsets give it ",
                offsets.ptr<int32_t>()[e + 1] - offsets.ptr<int32_t>()[e], " rows");
    sum += c;
  }
  if (sum != R)
    HYD_THROW(op, ": the plan's host counts sum to ", sum, " rows but x has ", R,
              " (counts of another routing? MoeHostCounts after moe_route)");
  return cpu || plan.impl == MoeGemm::wmma ? nullptr : plan.host_counts.data();
}

}  // namespace

void moe_grouped_linear_forward(const ExecContext& ctx, const Tensor& offsets, const Tensor& x, const Tensor& w,
                                const Tensor& y, const MoeGemmPlan& plan) {
  constexpr const char* op = "moe_grouped_linear_forward";
  const GroupedDims g = grouped_dims(offsets, w, op);
  const DType dt = value_dtype(x, DType::bf16, op, "x");
  expect_shape(x, {-1, g.k}, op, "x");
  const int64_t R = x.size(0);
  expect_shape(y, {R, g.n}, op, "y");
  expect_dtype(w, dt, op, "w");
  expect_dtype(y, dt, op, "y");
  expect_same_device(x, w, op);
  expect_same_device(x, y, op);
  check_context(ctx, x, op);
  if (x.device.is_cpu()) {
    // offsets[E] must equal R (the permutation covers every row).
    if (offsets.ptr<int32_t>()[g.e] != R)
      HYD_THROW(op, ": offsets end at ", offsets.ptr<int32_t>()[g.e], " but x has ", R, " rows");
    plan_counts(plan, offsets, g.e, R, op);
    if (dt == DType::f64)
      cpu::moe_grouped_linear_forward<double>(offsets.ptr<int32_t>(), x.ptr<double>(), w.ptr<double>(), y.ptr<double>(),
                                              g.e, g.n, g.k);
    else
      cpu::moe_grouped_linear_forward<float>(offsets.ptr<int32_t>(), x.ptr<float>(), w.ptr<float>(), y.ptr<float>(),
                                             g.e, g.n, g.k);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (const int32_t* counts = plan_counts(plan, offsets, g.e, R, op))
    cuda::moe_grouped_linear_forward_cublas(
        ctx.cublas(), ctx.stream(), moe_gemm_uses_grouped(plan.impl, plan.host_counts, plan_macs_per_row(plan, g)),
        counts, x.ptr<bf16>(), w.ptr<bf16>(), y.ptr<bf16>(), g.e, g.n, g.k);
  else
    cuda::moe_grouped_linear_forward(offsets.ptr<int32_t>(), x.ptr<bf16>(), w.ptr<bf16>(), y.ptr<bf16>(), R, g.e, g.n,
                                     g.k, ctx.stream());
#else
  unsupported(op, x);
#endif
}

void moe_grouped_linear_backward(const ExecContext& ctx, const Tensor& offsets, const Tensor& dy, const Tensor& x,
                                 const Tensor& w, const Tensor& dx, const Tensor& dw, const MoeGemmPlan& plan) {
  constexpr const char* op = "moe_grouped_linear_backward";
  const GroupedDims g = grouped_dims(offsets, w, op);
  const DType dt = value_dtype(x, DType::bf16, op, "x");
  expect_shape(x, {-1, g.k}, op, "x");
  const int64_t R = x.size(0);
  expect_shape(dy, {R, g.n}, op, "dy");
  expect_dtype(dy, dt, op, "dy");
  expect_dtype(w, dt, op, "w");
  expect_same_device(x, dy, op);
  expect_same_device(x, w, op);
  if (!dx.empty()) {
    expect_shape(dx, {R, g.k}, op, "dx");
    expect_dtype(dx, dt, op, "dx");
    expect_same_device(x, dx, op);
  }
  if (!dw.empty()) {
    expect_shape(dw, {g.e, g.n, g.k}, op, "dw");
    expect_dtype(dw, x.device.is_cpu() ? dt : DType::f32, op, "dw");  // master gradients: f32 on CUDA
    expect_same_device(x, dw, op);
  }
  check_context(ctx, x, op);
  if (x.device.is_cpu()) {
    if (offsets.ptr<int32_t>()[g.e] != R)
      HYD_THROW(op, ": offsets end at ", offsets.ptr<int32_t>()[g.e], " but x has ", R, " rows");
    plan_counts(plan, offsets, g.e, R, op);
    if (dt == DType::f64)
      cpu::moe_grouped_linear_backward<double>(offsets.ptr<int32_t>(), dy.ptr<double>(), x.ptr<double>(),
                                               w.ptr<double>(), dx.empty() ? nullptr : dx.ptr<double>(),
                                               dw.empty() ? nullptr : dw.ptr<double>(), g.e, g.n, g.k);
    else
      cpu::moe_grouped_linear_backward<float>(offsets.ptr<int32_t>(), dy.ptr<float>(), x.ptr<float>(), w.ptr<float>(),
                                              dx.empty() ? nullptr : dx.ptr<float>(),
                                              dw.empty() ? nullptr : dw.ptr<float>(), g.e, g.n, g.k);
    return;
  }
#ifdef HYD_WITH_CUDA
  if (const int32_t* counts = plan_counts(plan, offsets, g.e, R, op))
    cuda::moe_grouped_linear_backward_cublas(
        ctx.cublas(), ctx.stream(), moe_gemm_uses_grouped(plan.impl, plan.host_counts, plan_macs_per_row(plan, g)),
        counts, dy.ptr<bf16>(), x.ptr<bf16>(), w.ptr<bf16>(), dx.empty() ? nullptr : dx.ptr<bf16>(),
        dw.empty() ? nullptr : dw.ptr<float>(), g.e, g.n, g.k);
  else
    cuda::moe_grouped_linear_backward(offsets.ptr<int32_t>(), dy.ptr<bf16>(), x.ptr<bf16>(), w.ptr<bf16>(),
                                      dx.empty() ? nullptr : dx.ptr<bf16>(), dw.empty() ? nullptr : dw.ptr<float>(), R,
                                      g.e, g.n, g.k, ctx.stream());
#else
  unsupported(op, x);
#endif
}

}  // namespace kernels
}  // namespace hyd

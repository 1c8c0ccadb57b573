#include "trainer/layer_kda.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>

#include "kernels/gated_rmsnorm.h"
#include "kernels/kda.h"
#include "kernels/kda_gates.h"
#include "kernels/matmul.h"
#include "kernels/short_conv.h"
#include "parallel/sequence_parallel.h"
#include "trainer/lasp.h"

namespace hyd {

void KdaConfig::validate(const std::string& source) const {
  auto positive = [&](int64_t v, const char* field) {
    if (v <= 0) throw Error::at(source, field, "must be positive, got " + std::to_string(v));
  };
  positive(hidden, "hidden");
  positive(heads, "heads");
  positive(v_heads, "v_heads");
  positive(dk, "dk");
  positive(dv, "dv");
  positive(conv_size, "conv_size");
  if (v_heads % heads != 0)
    throw Error::at(source, "v_heads",
                    "must be a multiple of heads (" + std::to_string(heads) + "), got " + std::to_string(v_heads));
  if (!(norm_eps >= 0.f)) throw Error::at(source, "norm_eps", "must be >= 0");
}

namespace {

// Sequence parallel only (empty otherwise): the conv input rows before each local document, from the
// previous rank where the document continues (trainer/lasp.h). Buffers are keyed by the conv weight, slot
// 0 the halo (read again by the backward), slot 1 its gradient.
Tensor conv_halo(const ExecContext& ctx, const PackedSequence& seq, const WeightRef& w, const Tensor& x, int slot) {
  const int64_t K = w.value.size(1);
  if (seq.sp == nullptr || K < 2) return Tensor{};
  const Tensor halo = seq.sp->buffer(&w, slot, {seq.num_docs, K - 1, x.size(1)}, x.dtype);
  if (slot == 0) lasp_conv_halo(ctx, *seq.sp, x, K, halo);
  return halo;
}

// The l2 norm after the q / k convolution: its output y, rstd, head size and scale.
struct ConvNorm {
  Tensor y, rstd;
  int64_t head_dim;
  float scale;
};

// Short-conv backward (from the l2 norm's output gradient when `norm` is given: the fused q / k op); under
// sequence parallelism also the halo gradient's exchange (this rank's goes to the previous rank, the next
// rank's is added to dx's last rows).
void conv_backward(const ExecContext& ctx, const PackedSequence& seq, const WeightRef& w, const Tensor& dy,
                   const Tensor& x, const Tensor& dx, const ConvNorm* norm = nullptr) {
  const Tensor dhalo = conv_halo(ctx, seq, w, x, 1);
  const Tensor kept =
      dhalo.empty() ? Tensor{} : seq.sp->buffer(&w, 0, {dhalo.size(0), dhalo.size(1), dhalo.size(2)}, x.dtype);
  if (norm != nullptr)
    kernels::short_conv_l2norm_backward(ctx, dy, norm->y, norm->rstd, norm->head_dim, norm->scale, x, w.value,
                                        seq.cu_seqlens, dx, w.grad, kept, dhalo);
  else
    kernels::short_conv_backward(ctx, dy, x, w.value, seq.cu_seqlens, dx, w.grad, kept, dhalo);
  if (!dhalo.empty()) lasp_conv_return_dhalo(ctx, *seq.sp, dhalo, dx);
}

// f_proj.0 and g_proj.0 as one [2 dv, D] weight (and gradient) when they lie back to back in memory (param_specs
// keeps them adjacent in the flat buffers); empty tensors otherwise (then two products each way).
struct LowRankCat {
  Tensor value, grad;
};
LowRankCat low_rank_cat(const WeightRef& f0, const WeightRef& g0) {
  auto follows = [](const Tensor& a, const Tensor& b) {
    return a.dtype == b.dtype && a.device == b.device && b.data == static_cast<const char*>(a.data) + a.nbytes();
  };
  if (!follows(f0.value, g0.value)) return {};
  const int64_t rows = f0.value.size(0) + g0.value.size(0), cols = f0.value.size(1);
  LowRankCat cat;
  cat.value = Tensor(f0.value.data, f0.value.dtype, f0.value.device, {rows, cols});
  if (!f0.grad.empty() && follows(f0.grad, g0.grad))
    cat.grad = Tensor(f0.grad.data, f0.grad.dtype, f0.grad.device, {rows, cols});
  return cat;
}

}  // namespace

void KdaLayer::forward(const ExecContext& ctx, const PackedSequence& seq, const Tensor& in, const Tensor& out, Saved& s,
                       Arena& scratch, const Tensor& residual) const {
  NvtxRange range(nvtx_fwd.c_str());
  const int64_t n = seq.num_tokens, hv = cfg.v_heads;
  const ForwardScratch t = alloc_forward_scratch(scratch, n, s.q.dtype);
  s.x = in;

  // q, k, v: projection, causal conv + SiLU, then the l2 norm of q and k in place.
  kernels::linear_forward(ctx, in, q_proj.value, Tensor{}, s.q_lin);
  kernels::linear_forward(ctx, in, k_proj.value, Tensor{}, s.k_lin);
  kernels::linear_forward(ctx, in, v_proj.value, Tensor{}, s.v_lin);
  // Sequence parallel: the rows before a document continuing from the previous rank (its halo, kept for
  // the backward in the SP buffers of the conv weight).
  const Tensor hq = conv_halo(ctx, seq, q_conv1d, s.q_lin, 0);
  const Tensor hk = conv_halo(ctx, seq, k_conv1d, s.k_lin, 0);
  const Tensor hvl = conv_halo(ctx, seq, v_conv1d, s.v_lin, 0);
  const float q_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(cfg.dk)));
  kernels::short_conv_l2norm_forward(ctx, s.q_lin, q_conv1d.value, seq.cu_seqlens, s.q.view({n, cfg.key_dim()}),
                                     s.q_rstd, cfg.dk, q_scale, hq);
  kernels::short_conv_l2norm_forward(ctx, s.k_lin, k_conv1d.value, seq.cu_seqlens, s.k.view({n, cfg.key_dim()}),
                                     s.k_rstd, cfg.dk, 1.0f, hk);
  kernels::short_conv_forward(ctx, s.v_lin, v_conv1d.value, seq.cu_seqlens, s.v.view({n, cfg.value_dim()}), hvl);

  // The low-rank inputs of the gates and of the output gate, transposed (so that both come from one product of
  // the input, and each half feeds its second projection as a transposed operand):
  //   fg_lowT = [Wf0; Wg0] x^T  ([2 dv, N]; f_low^T over g_low^T).
  const Tensor f_lowT = s.fg_lowT.slice0(0, cfg.dv), g_lowT = s.fg_lowT.slice0(cfg.dv, 2 * cfg.dv);
  const LowRankCat cat = low_rank_cat(f_proj0, g_proj0);
  if (!cat.value.empty()) {
    kernels::gemm(ctx, false, true, 1.f, cat.value, in, 0.f, s.fg_lowT);
  } else {
    kernels::gemm(ctx, false, true, 1.f, f_proj0.value, in, 0.f, f_lowT);
    kernels::gemm(ctx, false, true, 1.f, g_proj0.value, in, 0.f, g_lowT);
  }

  // Gates: f = f_low Wf1^T.
  kernels::gemm(ctx, true, true, 1.f, f_lowT, f_proj1.value, 0.f, t.f);
  kernels::linear_forward(ctx, in, b_proj.value, Tensor{}, t.b);
  kernels::kda_gates_forward(ctx, t.f.view({n, hv, cfg.dk}), A_log.value, dt_bias.value, t.b, s.g, s.beta);

  s.core = Tensor{};
  if (s.keep_core && kernels::kda_split_forward_supported(s.k, s.v)) {  // this batch's view of core_mem
    const int64_t floats = kernels::kda_saved_floats(s.k, s.v, seq.cu_seqlens);
    const size_t bytes = static_cast<size_t>(floats) * 4 + 256;
    if (!s.core_mem || s.core_mem->capacity() < bytes) {
      s.core_mem.reset();  // the old buffer goes first
      s.core_mem = std::make_shared<Arena>("kda core saved", s.k.device, bytes);
    }
    s.core_mem->reset();
    s.core = s.core_mem->alloc({floats}, DType::f32);
  }
  if (seq.sp != nullptr) {
    lasp_kda_forward(ctx, *seq.sp, this, s.q, s.k, s.v, s.g, s.beta, seq.cu_seqlens, s.o, s.core);
  } else if (!s.core.empty()) {
    lasp_profile_start(ctx);
    kernels::kda_forward_saving(ctx, s.q, s.k, s.v, s.g, s.beta, seq.cu_seqlens, Tensor{}, s.o, Tensor{}, s.core);
    lasp_profile_mark(ctx, "kda.fwd.core");
  } else {
    lasp_profile_start(ctx);
    kernels::kda_forward(ctx, s.q, s.k, s.v, s.g, s.beta, seq.cu_seqlens, Tensor{}, s.o, Tensor{});
    lasp_profile_mark(ctx, "kda.fwd.core");
  }

  // Output gate, gated norm, projection.
  kernels::gemm(ctx, true, true, 1.f, g_lowT, g_proj1.value, 0.f, s.gate);  // gate = g_low Wg1^T + bg
  kernels::bias_add(ctx, s.gate, g_proj1_bias.value);
  kernels::gated_rmsnorm_forward(ctx, s.o.view({n * hv, cfg.dv}), s.gate.view({n * hv, cfg.dv}), o_norm.value,
                                 s.on.view({n * hv, cfg.dv}), s.o_rstd, cfg.norm_eps);
  kernels::linear_forward_residual(ctx, s.on, o_proj.value, residual, out);
}

bool KdaLayer::keep_core_from_env() {
  const char* e = std::getenv("HYD_KDA_SAVE");
  return e == nullptr || std::string(e) != "0";
}

void KdaLayer::backward(const ExecContext& ctx, const PackedSequence& seq, const Saved& s, const Tensor& dout,
                        const Tensor& din, Arena& scratch) const {
  NvtxRange range(nvtx_bwd.c_str());
  const int64_t n = seq.num_tokens, hv = cfg.v_heads;
  const Scratch t = alloc_scratch(scratch, n, s.q.dtype);

  // out = on Wo^T; on = gated_rmsnorm(o, gate); gate = g_low Wg1^T + bg:
  //   dWg1 += d_gate^T g_low, dbg += column sums of d_gate, d_g_low^T = Wg1^T d_gate^T.
  const Tensor f_lowT = s.fg_lowT.slice0(0, cfg.dv), g_lowT = s.fg_lowT.slice0(cfg.dv, 2 * cfg.dv);
  const Tensor d_f_lowT = t.d_lowT.slice0(0, cfg.dv), d_g_lowT = t.d_lowT.slice0(cfg.dv, 2 * cfg.dv);
  kernels::linear_backward(ctx, dout, s.on, o_proj.value, t.d_on, false, o_proj.grad, Tensor{});
  kernels::gated_rmsnorm_backward(ctx, t.d_on.view({n * hv, cfg.dv}), s.o.view({n * hv, cfg.dv}),
                                  s.gate.view({n * hv, cfg.dv}), o_norm.value, s.o_rstd, t.d_o.view({n * hv, cfg.dv}),
                                  t.d_gate.view({n * hv, cfg.dv}), o_norm.grad);
  kernels::gemm(ctx, true, true, 1.f, t.d_gate, g_lowT, 1.f, g_proj1.grad);
  kernels::bias_grad(ctx, t.d_gate, g_proj1_bias.grad);
  kernels::gemm(ctx, true, true, 1.f, g_proj1.value, t.d_gate, 0.f, d_g_lowT);

  if (seq.sp != nullptr) {
    lasp_kda_backward(ctx, *seq.sp, this, s.q, s.k, s.v, s.g, s.beta, seq.cu_seqlens, t.d_o, t.dq, t.dk, t.dv, t.dg,
                      t.dbeta, s.core);
  } else if (!s.core.empty()) {
    lasp_profile_start(ctx);
    kernels::kda_backward_saved(ctx, s.q, s.k, s.v, s.g, s.beta, seq.cu_seqlens, t.d_o, Tensor{}, t.dq, t.dk, t.dv,
                                t.dg, t.dbeta, Tensor{}, s.core);
    lasp_profile_mark(ctx, "kda.bwd.core");
  } else {
    lasp_profile_start(ctx);
    kernels::kda_backward(ctx, s.q, s.k, s.v, s.g, s.beta, seq.cu_seqlens, Tensor{}, t.d_o, Tensor{}, t.dq, t.dk, t.dv,
                          t.dg, t.dbeta, Tensor{});
    lasp_profile_mark(ctx, "kda.bwd.core");
  }

  // Gates: g from f = f_low Wf1^T; beta from b = x Wb^T (the first write of din).
  kernels::kda_gates_backward(ctx, t.dg, t.dbeta, s.g, s.beta, A_log.value, t.df, A_log.grad, dt_bias.grad, t.db);
  kernels::linear_backward(ctx, t.db, s.x, b_proj.value, din, false, b_proj.grad, Tensor{});
  const Tensor df = t.df.view({n, cfg.gate_dim()});
  kernels::gemm(ctx, true, true, 1.f, df, f_lowT, 1.f, f_proj1.grad);   // dWf1 += df^T f_low
  kernels::gemm(ctx, true, true, 1.f, f_proj1.value, df, 0.f, d_f_lowT);  // d_f_low^T = Wf1^T df^T
  // fg_lowT = [Wf0; Wg0] x^T:  din += d_low [Wf0; Wg0],  d[Wf0; Wg0] += d_low^T x  (d_low = d_lowT^T).
  const LowRankCat cat = low_rank_cat(f_proj0, g_proj0);
  if (!cat.value.empty() && !cat.grad.empty()) {
    kernels::gemm(ctx, true, false, 1.f, t.d_lowT, cat.value, 1.f, din);
    kernels::gemm(ctx, false, false, 1.f, t.d_lowT, s.x, 1.f, cat.grad);
  } else {
    kernels::gemm(ctx, true, false, 1.f, d_f_lowT, f_proj0.value, 1.f, din);
    kernels::gemm(ctx, true, false, 1.f, d_g_lowT, g_proj0.value, 1.f, din);
    kernels::gemm(ctx, false, false, 1.f, d_f_lowT, s.x, 1.f, f_proj0.grad);
    kernels::gemm(ctx, false, false, 1.f, d_g_lowT, s.x, 1.f, g_proj0.grad);
  }

  // q, k: l2 norm backward and conv in one op, then projection; v: conv, projection.
  const float q_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(cfg.dk)));
  const Tensor d_key = t.d_lin.slice0(0, n * cfg.key_dim()).view({n, cfg.key_dim()});
  const Tensor d_value = t.d_lin.slice0(0, n * cfg.value_dim()).view({n, cfg.value_dim()});
  const ConvNorm q_norm{s.q.view({n, cfg.key_dim()}), s.q_rstd, cfg.dk, q_scale};
  const ConvNorm k_norm{s.k.view({n, cfg.key_dim()}), s.k_rstd, cfg.dk, 1.0f};
  conv_backward(ctx, seq, q_conv1d, t.dq.view({n, cfg.key_dim()}), s.q_lin, d_key, &q_norm);
  kernels::linear_backward(ctx, d_key, s.x, q_proj.value, din, true, q_proj.grad, Tensor{});
  conv_backward(ctx, seq, k_conv1d, t.dk.view({n, cfg.key_dim()}), s.k_lin, d_key, &k_norm);
  kernels::linear_backward(ctx, d_key, s.x, k_proj.value, din, true, k_proj.grad, Tensor{});
  conv_backward(ctx, seq, v_conv1d, t.dv.view({n, cfg.value_dim()}), s.v_lin, d_value);
  kernels::linear_backward(ctx, d_value, s.x, v_proj.value, din, true, v_proj.grad, Tensor{});
}

// ------------------------------------------------------------------------------------ KdaLayerWeights

namespace {

struct ParamSpec {
  const char* name;
  std::vector<int64_t> shape;         // storage shape
  std::vector<int64_t> export_shape;  // PyTorch shape
  bool weight_decay;
  bool f32_on_cuda;  // A_log, dt_bias
  WeightRef KdaLayer::*member;
};

std::vector<ParamSpec> param_specs(const KdaConfig& c) {
  const int64_t D = c.hidden, kd = c.key_dim(), vd = c.value_dim(), gd = c.gate_dim(), K = c.conv_size;
  return {
      {"q_proj.weight", {kd, D}, {kd, D}, true, false, &KdaLayer::q_proj},
      {"k_proj.weight", {kd, D}, {kd, D}, true, false, &KdaLayer::k_proj},
      {"v_proj.weight", {vd, D}, {vd, D}, true, false, &KdaLayer::v_proj},
      {"q_conv1d.weight", {kd, K}, {kd, 1, K}, true, false, &KdaLayer::q_conv1d},
      {"k_conv1d.weight", {kd, K}, {kd, 1, K}, true, false, &KdaLayer::k_conv1d},
      {"v_conv1d.weight", {vd, K}, {vd, 1, K}, true, false, &KdaLayer::v_conv1d},
      {"f_proj.0.weight", {c.dv, D}, {c.dv, D}, true, false, &KdaLayer::f_proj0},
      {"g_proj.0.weight", {c.dv, D}, {c.dv, D}, true, false, &KdaLayer::g_proj0},
      {"f_proj.1.weight", {gd, c.dv}, {gd, c.dv}, true, false, &KdaLayer::f_proj1},
      {"b_proj.weight", {c.v_heads, D}, {c.v_heads, D}, true, false, &KdaLayer::b_proj},
      {"A_log", {c.v_heads}, {c.v_heads}, false, true, &KdaLayer::A_log},
      {"dt_bias", {gd}, {gd}, false, true, &KdaLayer::dt_bias},
      {"g_proj.1.weight", {vd, c.dv}, {vd, c.dv}, true, false, &KdaLayer::g_proj1},
      {"g_proj.1.bias", {vd}, {vd}, false, false, &KdaLayer::g_proj1_bias},
      {"o_norm.weight", {c.dv}, {c.dv}, false, false, &KdaLayer::o_norm},
      {"o_proj.weight", {D, vd}, {D, vd}, true, false, &KdaLayer::o_proj},
  };
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t v : shape) n *= v;
  return n;
}

// A tensor of `shape` carved from the arena (Arena::alloc takes an initializer list; the rank varies).
Tensor alloc_shaped(Arena& arena, const std::vector<int64_t>& shape, DType dtype) {
  Tensor t = arena.alloc({numel_of(shape)}, dtype);
  t.ndim = static_cast<int>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) t.shape[i] = shape[i];
  return t;
}

size_t padded(size_t bytes) { return (bytes + ArenaSizer::kAlign - 1) / ArenaSizer::kAlign * ArenaSizer::kAlign; }

// Host copy of a tensor's values as double (any float dtype, either device).
std::vector<double> download(const Tensor& t) {
  HostTensor h({t.numel()}, t.dtype);
  copy_tensor(h.t, t.view({t.numel()}));
  std::vector<double> out(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) {
    switch (t.dtype) {
      case DType::f32:
        out[i] = h.ptr<float>()[i];
        break;
      case DType::f64:
        out[i] = h.ptr<double>()[i];
        break;
      case DType::bf16:
        out[i] = bf16_to_float(h.ptr<bf16>()[i]);
        break;
      default:
        HYD_THROW("KdaLayerWeights: unexpected dtype ", dtype_name(t.dtype));
    }
  }
  return out;
}

void upload(const Tensor& t, const std::vector<double>& values) {
  HostTensor h({t.numel()}, t.dtype);
  for (int64_t i = 0; i < t.numel(); ++i) {
    switch (t.dtype) {
      case DType::f32:
        h.ptr<float>()[i] = static_cast<float>(values[i]);
        break;
      case DType::f64:
        h.ptr<double>()[i] = values[i];
        break;
      case DType::bf16:
        h.ptr<bf16>()[i] = float_to_bf16(static_cast<float>(values[i]));
        break;
      default:
        HYD_THROW("KdaLayerWeights: unexpected dtype ", dtype_name(t.dtype));
    }
  }
  copy_tensor(t.view({t.numel()}), h.t);
}

}  // namespace

KdaLayerWeights::KdaLayerWeights(const KdaConfig& cfg, Device device, DType dtype) : dtype_(dtype) {
  cfg.validate();
  if (device.is_cpu() ? (dtype != DType::f32 && dtype != DType::f64) : dtype != DType::bf16)
    HYD_THROW("KdaLayerWeights: dtype ", dtype_name(dtype), " on ", device.str(),
              " (expected f32 or f64 on the CPU, bf16 on CUDA)");
  const DType grad_dtype = dtype == DType::f64 ? DType::f64 : DType::f32;
  const std::vector<ParamSpec> specs = param_specs(cfg);
  auto value_dtype = [&](const ParamSpec& p) { return device.is_cuda() && p.f32_on_cuda ? DType::f32 : dtype; };
  size_t bytes = 0;
  for (const ParamSpec& p : specs) {
    const size_t n = static_cast<size_t>(numel_of(p.shape));
    bytes += padded(n * dtype_size(value_dtype(p))) + padded(n * dtype_size(grad_dtype));
  }
  arena_ = Arena("kda_layer_weights", device, bytes);
  layer_.cfg = cfg;
  // Every value, then every gradient, each in spec order (as a model's flat buffers: f_proj.0 and g_proj.0 back to
  // back, low_rank_cat).
  for (const ParamSpec& p : specs) {
    WeightRef& ref = layer_.*(p.member);
    ref.value = alloc_shaped(arena_, p.shape, value_dtype(p));
    params_.push_back({p.name, p.export_shape, p.weight_decay, &ref});
  }
  for (const ParamSpec& p : specs) (layer_.*(p.member)).grad = alloc_shaped(arena_, p.shape, grad_dtype);
  arena_.zero();
}

const KdaLayerWeights::Param& KdaLayerWeights::param(const std::string& name) const {
  for (const Param& p : params_)
    if (p.name == name) return p;
  HYD_THROW("KdaLayerWeights: no parameter named '", name, "'");
}

std::vector<size_t> kda_init_draw_order(const std::vector<std::string>& names) {
  std::vector<size_t> order;
  std::vector<size_t> deferred;  // g_proj.0.weight of the layer being walked
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i].ends_with("g_proj.0.weight")) {
      deferred.push_back(i);
      continue;
    }
    order.push_back(i);
    if (names[i].ends_with("dt_bias")) {
      order.insert(order.end(), deferred.begin(), deferred.end());
      deferred.clear();
    }
  }
  order.insert(order.end(), deferred.begin(), deferred.end());
  return order;
}

void KdaLayerWeights::init_random(uint64_t seed, float std) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, std);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<std::string> names;
  for (const Param& p : params_) names.push_back(p.name);
  for (size_t i : kda_init_draw_order(names)) {
    const Param& p = params_[i];
    std::vector<double> v(static_cast<size_t>(p.ref->value.numel()));
    if (p.name == "A_log") {
      for (double& x : v) x = std::log(1.0 + 15.0 * unit(gen));
    } else if (p.name == "dt_bias") {
      for (double& x : v) {
        const double dt = std::max(1e-4, std::exp(std::log(1e-3) + unit(gen) * (std::log(1e-1) - std::log(1e-3))));
        x = dt + std::log(-std::expm1(-dt));  // softplus(x) = dt
      }
    } else if (p.name == "g_proj.1.bias") {
      std::fill(v.begin(), v.end(), 0.0);
    } else if (p.name == "o_norm.weight") {
      std::fill(v.begin(), v.end(), 1.0);
    } else {
      for (double& x : v) x = normal(gen);
    }
    upload(p.ref->value, v);
  }
}

void KdaLayerWeights::set_param(const std::string& name, const std::vector<double>& values) {
  const Param& p = param(name);
  if (static_cast<int64_t>(values.size()) != p.ref->value.numel())
    HYD_THROW("KdaLayerWeights: parameter '", name, "' has ", p.ref->value.numel(), " values, got ", values.size());
  upload(p.ref->value, values);
}

std::vector<double> KdaLayerWeights::get_param(const std::string& name) const {
  return download(param(name).ref->value);
}

std::vector<double> KdaLayerWeights::get_grad(const std::string& name) const { return download(param(name).ref->grad); }

void KdaLayerWeights::zero_grad() {
  for (const Param& p : params_) zero_tensor(p.ref->grad);
}

}  // namespace hyd

#include "trainer/layer_moe.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "kernels/elementwise.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "parallel/comm.h"

namespace hyd {

void MoeConfig::validate(const std::string& source) const {
  auto positive = [&](int64_t v, const char* field) {
    if (v <= 0) throw Error::at(source, field, "must be positive, got " + std::to_string(v));
  };
  positive(hidden, "hidden");
  positive(num_experts, "num_experts");
  positive(top_k, "top_k");
  positive(expert_ffn, "expert_ffn");
  if (top_k > num_experts)
    throw Error::at(source, "top_k",
                    "must be <= num_experts (" + std::to_string(num_experts) + "), got " + std::to_string(top_k));
  if (num_shared_experts < 0)
    throw Error::at(source, "num_shared_experts", "must be >= 0, got " + std::to_string(num_shared_experts));
  if (num_shared_experts > 0) positive(shared_ffn, "shared_ffn");
  if (score_func != "softmax" && score_func != "sigmoid")
    throw Error::at(source, "score_func", "must be 'softmax' or 'sigmoid', got '" + score_func + "'");
  if (!(route_scale > 0.f) || !std::isfinite(route_scale))
    throw Error::at(source, "route_scale", "must be a positive finite number");
  if (!(aux_loss_coef >= 0.f) || !std::isfinite(aux_loss_coef))
    throw Error::at(source, "aux_loss_coef", "must be >= 0 and finite");
}

namespace {

// The CPU reference holds every floating tensor in one dtype: f32 or f64.
void expect_cpu_float(const Tensor& t, DType d, const char* op, const char* arg) {
  if (t.empty()) HYD_THROW(op, ": argument '", arg, "' is empty");
  if (!t.device.is_cpu())
    HYD_THROW(op, ": argument '", arg, "' is on ", t.device.str(), "; the MoE layer runs on the CPU only so far");
  expect_dtype(t, d, op, arg);
}

DType float_dtype(const Tensor& t, const char* op, const char* arg) {
  if (t.dtype != DType::f32 && t.dtype != DType::f64)
    HYD_THROW(op, ": argument '", arg, "' has dtype ", dtype_name(t.dtype), ", expected f32 or f64");
  return t.dtype;
}

void expect_routing(const MoeRouting& r, const char* op) {
  if (r.expert.empty() || r.weight.empty() || r.counts.empty() || r.offsets.empty() || r.order.empty() ||
      r.position.empty())
    HYD_THROW(op, ": routing tensors missing (MoeRouting::alloc)");
}

template <class T>
T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// y[m, n] = x[m, k] w[n, k]^T.
template <class T>
void linear(const T* x, const T* w, T* y, int64_t m, int64_t n, int64_t k) {
  if (m == 0) return;
  kernels::cpu::gemm<T>(false, true, m, n, k, T(1), x, w, T(0), y);
}
// dx[m, k] (= | +=) dy[m, n] w[n, k];  dw[n, k] += dy^T x.
template <class T>
void linear_bwd(const T* dy, const T* x, const T* w, T* dx, bool acc, T* dw, int64_t m, int64_t n, int64_t k) {
  if (m == 0) return;
  kernels::cpu::gemm<T>(false, false, m, k, n, T(1), dy, w, acc ? T(1) : T(0), dx);
  kernels::cpu::gemm<T>(true, false, n, k, m, T(1), dy, x, T(1), dw);
}

// gu [m, 2f] (gate | up) -> act [m, f] = silu(gate) * up.
template <class T>
void swiglu_fwd(const T* gu, T* act, int64_t m, int64_t f) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < f; ++j) {
      const T a = gu[i * 2 * f + j], b = gu[i * 2 * f + f + j];
      act[i * f + j] = a * sigmoid(a) * b;
    }
}
template <class T>
void swiglu_bwd(const T* dact, const T* gu, T* dgu, int64_t m, int64_t f) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < f; ++j) {
      const T a = gu[i * 2 * f + j], b = gu[i * 2 * f + f + j], sg = sigmoid(a), d = dact[i * f + j];
      dgu[i * 2 * f + j] = d * b * sg * (T(1) + a * (T(1) - sg));
      dgu[i * 2 * f + f + j] = d * a * sg;
    }
}

// One SwiGLU FFN on m rows: gu = x Wgu^T, act = swiglu(gu), y = act Wd^T.
template <class T>
void ffn_forward(const T* x, const T* wgu, const T* wd, T* gu, T* act, T* y, int64_t m, int64_t d, int64_t f) {
  linear(x, wgu, gu, m, 2 * f, d);
  swiglu_fwd(gu, act, m, f);
  linear(act, wd, y, m, d, f);
}
// dx (= | +=) the FFN's input gradient for dy; dWgu, dWd accumulate. d_act, d_gu: scratch [m, f], [m, 2f].
template <class T>
void ffn_backward(const T* dy, const T* x, const T* wgu, const T* wd, const T* gu, const T* act, T* d_act, T* d_gu,
                  T* dx, bool acc, T* dwgu, T* dwd, int64_t m, int64_t d, int64_t f) {
  linear_bwd(dy, act, wd, d_act, false, dwd, m, d, f);
  swiglu_bwd(d_act, gu, d_gu, m, f);
  linear_bwd(d_gu, x, wgu, dx, acc, dwgu, m, 2 * f, d);
}

template <class T>
void route_impl(const MoeConfig& cfg, const Tensor& x, const Tensor& router_w, const Tensor& bias, const Tensor& scores,
                const MoeRouting& r) {
  const int64_t N = x.size(0), D = cfg.hidden, E = cfg.num_experts, K = cfg.top_k;
  const T* xs = x.ptr<T>();
  T* s = scores.ptr<T>();
  linear(xs, router_w.ptr<T>(), s, N, E, D);  // logits, turned into scores in place
  const T* b = cfg.use_selection_bias ? bias.ptr<T>() : nullptr;
  int32_t* expert = r.expert.ptr<int32_t>();
  T* weight = r.weight.ptr<T>();
  std::vector<int64_t> idx(static_cast<size_t>(E));
  std::vector<T> sel(static_cast<size_t>(E));
  for (int64_t t = 0; t < N; ++t) {
    T* st = s + t * E;
    if (cfg.sigmoid()) {
      for (int64_t e = 0; e < E; ++e) st[e] = sigmoid(st[e]);
    } else {
      const T mx = *std::max_element(st, st + E);
      T sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += (st[e] = std::exp(st[e] - mx));
      for (int64_t e = 0; e < E; ++e) st[e] /= sum;
    }
    for (int64_t e = 0; e < E; ++e) sel[e] = st[e] + (b ? b[e] : T(0));
    std::iota(idx.begin(), idx.end(), int64_t(0));
    std::partial_sort(idx.begin(), idx.begin() + K, idx.end(),
                      [&](int64_t a, int64_t c) { return sel[a] > sel[c] || (sel[a] == sel[c] && a < c); });
    T norm = 0;
    for (int64_t j = 0; j < K; ++j) norm += st[idx[j]];
    const T scale = (cfg.norm_topk_prob ? T(1) / norm : T(1)) * static_cast<T>(cfg.route_scale);
    for (int64_t j = 0; j < K; ++j) {
      expert[t * K + j] = static_cast<int32_t>(idx[j]);
      weight[t * K + j] = st[idx[j]] * scale;
    }
  }
  // Stable counting sort of the pairs by expert.
  int32_t* counts = r.counts.ptr<int32_t>();
  int32_t* offsets = r.offsets.ptr<int32_t>();
  int32_t* order = r.order.ptr<int32_t>();
  int32_t* position = r.position.ptr<int32_t>();
  std::fill(counts, counts + E, 0);
  for (int64_t p = 0; p < N * K; ++p) ++counts[expert[p]];
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  std::vector<int32_t> next(offsets, offsets + E);
  for (int64_t p = 0; p < N * K; ++p) {
    const int32_t row = next[expert[p]]++;
    order[row] = static_cast<int32_t>(p);
    position[p] = row;
  }
}

template <class T>
void permute_impl(const MoeRouting& r, const Tensor& x, const Tensor& xp) {
  const int64_t D = x.size(1), K = r.top_k;
  const int32_t* order = r.order.ptr<int32_t>();
  for (int64_t p = 0; p < r.tokens * K; ++p) std::copy_n(x.ptr<T>() + (order[p] / K) * D, D, xp.ptr<T>() + p * D);
}

template <class T>
void unpermute_impl(const MoeRouting& r, const Tensor& xp, const Tensor& pairs) {
  const int64_t D = xp.size(1);
  const int32_t* position = r.position.ptr<int32_t>();
  for (int64_t q = 0; q < r.tokens * r.top_k; ++q)
    std::copy_n(xp.ptr<T>() + position[q] * D, D, pairs.ptr<T>() + q * D);
}

// out[t] (= | +=) sum_j w_tj yp[position[t k + j]] (w = 1 when weight is null).
template <class T>
void gather_sum(const MoeRouting& r, const T* weight, const Tensor& yp, const Tensor& out, bool accumulate) {
  const int64_t D = yp.size(1), K = r.top_k;
  const int32_t* position = r.position.ptr<int32_t>();
  for (int64_t t = 0; t < r.tokens; ++t) {
    T* o = out.ptr<T>() + t * D;
    if (!accumulate) std::fill(o, o + D, T(0));
    for (int64_t j = 0; j < K; ++j) {
      const T w = weight ? weight[t * K + j] : T(1);
      const T* y = yp.ptr<T>() + position[t * K + j] * D;
      for (int64_t i = 0; i < D; ++i) o[i] += w * y[i];
    }
  }
}

// ------------------------------------------------------------------------------------ expert parallelism

}  // namespace

struct MoeExpertParallel::Impl {
  const Communicator* group = nullptr;
  int rank = 0, size = 1;
  // What one layer's forward leaves for its backward.
  struct Saved {
    std::vector<int64_t> send_rows, recv_rows;  // per peer: rows sent / received
    std::vector<int64_t> recv_cnt;              // [P][El]: rows from source s for local expert e
    std::vector<char> xe, gu, act;              // received rows regrouped expert-major, and their intermediates
    int64_t rows = 0;
  };
  std::map<const MoeLayer*, Saved> saved;
};

MoeExpertParallel::MoeExpertParallel(const Communicator& group) : impl(std::make_unique<Impl>()) {
  impl->group = &group;
  impl->rank = group.rank();
  impl->size = group.size();
}
MoeExpertParallel::~MoeExpertParallel() = default;
int MoeExpertParallel::rank() const { return impl->rank; }
int MoeExpertParallel::size() const { return impl->size; }
int64_t MoeExpertParallel::last_received_rows(const MoeLayer& layer) const {
  auto it = impl->saved.find(&layer);
  return it == impl->saved.end() ? 0 : it->second.rows;
}

namespace {

template <class T>
T* as(std::vector<char>& v, int64_t n) {
  v.resize(static_cast<size_t>(n) * sizeof(T));
  return reinterpret_cast<T*>(v.data());
}

// Rows exchanged with the owners of the experts: `xp` [N k, D] expert-major (this rank's tokens) goes to the
// owners; `recv` [R, D] comes back grouped by source. `back` reverses the direction (recv -> xp).
template <class T>
void exchange_rows(const MoeExpertParallel::Impl& ep, const MoeExpertParallel::Impl::Saved& sv, int64_t D, T* xp,
                   T* recv, bool back) {
  const auto P = static_cast<size_t>(ep.size);
  std::vector<int64_t> sc(P), rc(P);
  for (size_t p = 0; p < P; ++p) {
    sc[p] = sv.send_rows[p] * D;
    rc[p] = sv.recv_rows[p] * D;
  }
  int64_t ns = 0, nr = 0;
  for (size_t p = 0; p < P; ++p) {
    ns += sc[p];
    nr += rc[p];
  }
  if (!back)
    ep.group->all_to_all_v<T>({xp, static_cast<size_t>(ns)}, sc, {recv, static_cast<size_t>(nr)}, rc);
  else
    ep.group->all_to_all_v<T>({recv, static_cast<size_t>(nr)}, rc, {xp, static_cast<size_t>(ns)}, sc);
}

// Source-grouped rows [R, D] <-> expert-major rows (for each local expert, its rows from every source in
// source order). to_expert: src grouped -> dst expert-major.
template <class T>
void regroup(const MoeExpertParallel::Impl::Saved& sv, int P, int64_t El, int64_t D, const T* src, T* dst,
             bool to_expert) {
  std::vector<int64_t> src_off(static_cast<size_t>(P) * El);  // offset of block (s, e) in the source-grouped rows
  int64_t o = 0;
  for (int s = 0; s < P; ++s)
    for (int64_t e = 0; e < El; ++e) {
      src_off[s * El + e] = o;
      o += sv.recv_cnt[s * El + e];
    }
  int64_t d = 0;
  for (int64_t e = 0; e < El; ++e)
    for (int s = 0; s < P; ++s) {
      const int64_t m = sv.recv_cnt[s * El + e] * D, a = src_off[s * El + e] * D;
      if (to_expert)
        std::copy_n(src + a, m, dst + d);
      else
        std::copy_n(src + d, m, dst + a);
      d += m;
    }
}

template <class T>
void ep_forward(MoeExpertParallel::Impl& ep, const MoeLayer& L, const MoeRouting& r, T* xp, T* yp) {
  const MoeConfig& c = L.cfg;
  const int P = ep.size;
  const int64_t E = c.num_experts, El = E / P, D = c.hidden, F = c.expert_ffn;
  HYD_CHECK(E % P == 0, "MoeExpertParallel: ", E, " experts over ", P, " ranks (num_experts must be a multiple)");
  const int32_t* off = r.offsets.ptr<int32_t>();
  MoeExpertParallel::Impl::Saved& sv = ep.saved[&L];
  // Counts per (destination, its local expert) -> per (source, my local expert).
  std::vector<int64_t> cnt(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) cnt[e] = off[e + 1] - off[e];
  sv.recv_cnt.assign(static_cast<size_t>(E), 0);
  ep.group->all_to_all<int64_t>(cnt, sv.recv_cnt);
  sv.send_rows.assign(static_cast<size_t>(P), 0);
  sv.recv_rows.assign(static_cast<size_t>(P), 0);
  for (int p = 0; p < P; ++p)
    for (int64_t e = 0; e < El; ++e) {
      sv.send_rows[p] += cnt[p * El + e];
      sv.recv_rows[p] += sv.recv_cnt[p * El + e];
    }
  int64_t R = 0;
  for (int p = 0; p < P; ++p) R += sv.recv_rows[p];
  sv.rows = R;
  std::vector<T> recv(static_cast<size_t>(R * D)), ye(static_cast<size_t>(R * D));
  exchange_rows<T>(ep, sv, D, xp, recv.data(), false);
  T* xe = as<T>(sv.xe, R * D);
  T* gu = as<T>(sv.gu, R * 2 * F);
  T* act = as<T>(sv.act, R * F);
  regroup<T>(sv, P, El, D, recv.data(), xe, true);
  int64_t row = 0;
  for (int64_t e = 0; e < El; ++e) {
    int64_t m = 0;
    for (int s = 0; s < P; ++s) m += sv.recv_cnt[s * El + e];
    const int64_t g = ep.rank * El + e;  // the global expert index
    if (m > 0)
      ffn_forward(xe + row * D, L.gate_up.value.ptr<T>() + g * 2 * F * D, L.down.value.ptr<T>() + g * D * F,
                  gu + row * 2 * F, act + row * F, ye.data() + row * D, m, D, F);
    row += m;
  }
  regroup<T>(sv, P, El, D, ye.data(), recv.data(), false);
  exchange_rows<T>(ep, sv, D, yp, recv.data(), true);
}

template <class T>
void ep_backward(MoeExpertParallel::Impl& ep, const MoeLayer& L, const MoeRouting& r, T* d_yp, T* d_xp) {
  (void)r;
  const MoeConfig& c = L.cfg;
  const int P = ep.size;
  const int64_t El = c.num_experts / P, D = c.hidden, F = c.expert_ffn;
  auto it = ep.saved.find(&L);
  HYD_CHECK(it != ep.saved.end(), "MoeExpertParallel: backward of a layer without its forward");
  MoeExpertParallel::Impl::Saved& sv = it->second;
  const int64_t R = sv.rows;
  std::vector<T> recv(static_cast<size_t>(R * D)), dye(static_cast<size_t>(R * D)), dxe(static_cast<size_t>(R * D));
  std::vector<T> d_act(static_cast<size_t>(R * F)), d_gu(static_cast<size_t>(R * 2 * F));
  exchange_rows<T>(ep, sv, D, d_yp, recv.data(), false);
  regroup<T>(sv, P, El, D, recv.data(), dye.data(), true);
  const T* xe = reinterpret_cast<const T*>(sv.xe.data());
  const T* gu = reinterpret_cast<const T*>(sv.gu.data());
  const T* act = reinterpret_cast<const T*>(sv.act.data());
  int64_t row = 0;
  for (int64_t e = 0; e < El; ++e) {
    int64_t m = 0;
    for (int s = 0; s < P; ++s) m += sv.recv_cnt[s * El + e];
    const int64_t g = ep.rank * El + e;
    if (m > 0)
      ffn_backward(dye.data() + row * D, xe + row * D, L.gate_up.value.ptr<T>() + g * 2 * F * D,
                   L.down.value.ptr<T>() + g * D * F, gu + row * 2 * F, act + row * F, d_act.data() + row * F,
                   d_gu.data() + row * 2 * F, dxe.data() + row * D, false, L.gate_up.grad.ptr<T>() + g * 2 * F * D,
                   L.down.grad.ptr<T>() + g * D * F, m, D, F);
    row += m;
  }
  regroup<T>(sv, P, El, D, dxe.data(), recv.data(), false);
  exchange_rows<T>(ep, sv, D, d_xp, recv.data(), true);
}

template <class T>
double forward_impl(const MoeLayer& L, const Tensor& in, const Tensor& out, MoeLayer::Saved& s,
                    const MoeExpertParallel* ep) {
  const MoeConfig& c = L.cfg;
  const int64_t N = in.size(0), D = c.hidden, E = c.num_experts, K = c.top_k, F = c.expert_ffn;
  const MoeRouting& r = s.routing;
  moe_route(c, in, L.router.value, L.selection_bias, s.scores, r);
  moe_permute(r, in, s.xp);
  const int32_t* off = r.offsets.ptr<int32_t>();
  if (ep != nullptr) {
    ep_forward<T>(*ep->impl, L, r, s.xp.ptr<T>(), s.yp.ptr<T>());
  } else {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t m = off[e + 1] - off[e];
      if (m == 0) continue;  // an expert without tokens does nothing (and gets a zero gradient)
      ffn_forward(s.xp.ptr<T>() + off[e] * D, L.gate_up.value.ptr<T>() + e * 2 * F * D,
                  L.down.value.ptr<T>() + e * D * F, s.gate_up.ptr<T>() + off[e] * 2 * F, s.act.ptr<T>() + off[e] * F,
                  s.yp.ptr<T>() + off[e] * D, m, D, F);
    }
  }
  gather_sum<T>(r, r.weight.ptr<T>(), s.yp, out, false);
  const int64_t Fs = c.shared_ffn;
  std::vector<T> ys(static_cast<size_t>(N * D));
  for (int64_t sh = 0; sh < c.num_shared_experts; ++sh) {
    ffn_forward(in.ptr<T>(), L.shared_gate_up.value.ptr<T>() + sh * 2 * Fs * D,
                L.shared_down.value.ptr<T>() + sh * D * Fs, s.shared_gate_up.ptr<T>() + sh * N * 2 * Fs,
                s.shared_act.ptr<T>() + sh * N * Fs, ys.data(), N, D, Fs);
    T* o = out.ptr<T>();
    for (int64_t i = 0; i < N * D; ++i) o[i] += ys[i];
  }
  // Load-balancing loss: f_e = count_e / (N k), P_e = mean_t s[t, e].
  T* frac = s.aux_frac.ptr<T>();
  const int32_t* counts = r.counts.ptr<int32_t>();
  double aux = 0;
  for (int64_t e = 0; e < E; ++e) {
    frac[e] = N > 0 ? static_cast<T>(counts[e]) / static_cast<T>(N * K) : T(0);
    if (c.aux_loss_coef > 0.f && N > 0) {
      double p = 0;
      for (int64_t t = 0; t < N; ++t) p += static_cast<double>(s.scores.ptr<T>()[t * E + e]);
      aux += static_cast<double>(frac[e]) * p / static_cast<double>(N);
    }
  }
  return static_cast<double>(c.aux_loss_coef) * static_cast<double>(E) * aux;
}

template <class T>
void backward_impl(const MoeLayer& L, const MoeLayer::Saved& s, const Tensor& dout, const Tensor& din,
                   const MoeLayer::Scratch& t, double d_aux, const MoeExpertParallel* ep) {
  const MoeConfig& c = L.cfg;
  const int64_t N = s.x.size(0), D = c.hidden, E = c.num_experts, K = c.top_k, F = c.expert_ffn;
  const MoeRouting& r = s.routing;
  const int32_t* off = r.offsets.ptr<int32_t>();
  const int32_t* order = r.order.ptr<int32_t>();
  const int32_t* expert = r.expert.ptr<int32_t>();
  const T* w = r.weight.ptr<T>();
  const T* g = dout.ptr<T>();

  // Combine: out[t] += w_tj yp[p]  ->  d_yp[p] = w_tj dout[t];  d_w_tj = dout[t] . yp[p].
  T* dw = t.d_weight.ptr<T>();
  for (int64_t p = 0; p < N * K; ++p) {
    const int64_t q = order[p], tok = q / K;
    const T* gt = g + tok * D;
    const T* y = s.yp.ptr<T>() + p * D;
    T* dy = t.d_yp.ptr<T>() + p * D;
    T dot = 0;
    for (int64_t i = 0; i < D; ++i) {
      dy[i] = w[q] * gt[i];
      dot += gt[i] * y[i];
    }
    dw[q] = dot;
  }
  // Experts, each on its rows; d_xp then scatters back to the tokens.
  if (ep != nullptr) {
    ep_backward<T>(*ep->impl, L, r, t.d_yp.ptr<T>(), t.d_xp.ptr<T>());
  } else {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t m = off[e + 1] - off[e];
      if (m == 0) continue;
      ffn_backward(t.d_yp.ptr<T>() + off[e] * D, s.xp.ptr<T>() + off[e] * D, L.gate_up.value.ptr<T>() + e * 2 * F * D,
                   L.down.value.ptr<T>() + e * D * F, s.gate_up.ptr<T>() + off[e] * 2 * F, s.act.ptr<T>() + off[e] * F,
                   t.d_act.ptr<T>() + off[e] * F, t.d_gate_up.ptr<T>() + off[e] * 2 * F, t.d_xp.ptr<T>() + off[e] * D,
                   false, L.gate_up.grad.ptr<T>() + e * 2 * F * D, L.down.grad.ptr<T>() + e * D * F, m, D, F);
    }
  }
  moe_permute_backward(r, t.d_xp, din, false);

  // Combine weights -> scores. w_j = rs s_j / Z (Z = sum_i s_i over the chosen; Z = 1 without norm_topk_prob):
  //   dL/ds_i = rs / Z (dw_i - sum_j dw_j s_j / Z).  Then L_aux: dL/ds[t, e] += d_aux coef E f_e / N.
  T* ds = t.d_scores.ptr<T>();
  const T* sc = s.scores.ptr<T>();
  const T rs = static_cast<T>(c.route_scale);
  const T aux_scale = N > 0 ? static_cast<T>(d_aux * c.aux_loss_coef * static_cast<double>(E) / N) : T(0);
  for (int64_t tok = 0; tok < N; ++tok) {
    T* dst = ds + tok * E;
    for (int64_t e = 0; e < E; ++e) dst[e] = aux_scale * s.aux_frac.ptr<T>()[e];
    const int32_t* ex = expert + tok * K;
    const T* dwt = dw + tok * K;
    if (c.norm_topk_prob) {
      T z = 0, dot = 0;
      for (int64_t j = 0; j < K; ++j) {
        z += sc[tok * E + ex[j]];
        dot += dwt[j] * sc[tok * E + ex[j]];
      }
      for (int64_t j = 0; j < K; ++j) dst[ex[j]] += rs / z * (dwt[j] - dot / z);
    } else {
      for (int64_t j = 0; j < K; ++j) dst[ex[j]] += rs * dwt[j];
    }
    // Scores -> logits, in place.
    const T* st = sc + tok * E;
    if (c.sigmoid()) {
      for (int64_t e = 0; e < E; ++e) dst[e] *= st[e] * (T(1) - st[e]);
    } else {
      T dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += st[e] * dst[e];
      for (int64_t e = 0; e < E; ++e) dst[e] = st[e] * (dst[e] - dot);
    }
  }
  linear_bwd(ds, s.x.ptr<T>(), L.router.value.ptr<T>(), din.ptr<T>(), true, L.router.grad.ptr<T>(), N, E, D);

  // Shared experts on every token.
  const int64_t Fs = c.shared_ffn;
  for (int64_t sh = 0; sh < c.num_shared_experts; ++sh)
    ffn_backward(g, s.x.ptr<T>(), L.shared_gate_up.value.ptr<T>() + sh * 2 * Fs * D,
                 L.shared_down.value.ptr<T>() + sh * D * Fs, s.shared_gate_up.ptr<T>() + sh * N * 2 * Fs,
                 s.shared_act.ptr<T>() + sh * N * Fs, t.d_shared_act.ptr<T>(), t.d_shared_gate_up.ptr<T>(),
                 din.ptr<T>(), true, L.shared_gate_up.grad.ptr<T>() + sh * 2 * Fs * D,
                 L.shared_down.grad.ptr<T>() + sh * D * Fs, N, D, Fs);
}

}  // namespace

std::vector<int64_t> MoeRouting::counts_host() const {
  if (counts.empty() || !counts.device.is_cpu()) HYD_THROW("MoeRouting::counts_host: counts missing or not on the CPU");
  const int32_t* c = counts.ptr<int32_t>();
  return std::vector<int64_t>(c, c + num_experts);
}

void moe_route(const MoeConfig& cfg, const Tensor& x, const Tensor& router_w, const Tensor& bias, const Tensor& scores,
               const MoeRouting& r) {
  constexpr const char* op = "moe_route";
  const DType dt = float_dtype(x, op, "x");
  expect_cpu_float(x, dt, op, "x");
  expect_shape(x, {-1, cfg.hidden}, op, "x");
  const int64_t N = x.size(0), E = cfg.num_experts, K = cfg.top_k;
  expect_cpu_float(router_w, dt, op, "router_w");
  expect_shape(router_w, {E, cfg.hidden}, op, "router_w");
  if (cfg.use_selection_bias) {
    expect_cpu_float(bias, dt, op, "bias");
    expect_shape(bias, {E}, op, "bias");
  }
  expect_cpu_float(scores, dt, op, "scores");
  expect_shape(scores, {N, E}, op, "scores");
  expect_routing(r, op);
  if (r.tokens != N || r.top_k != K || r.num_experts != E)
    HYD_THROW(op, ": routing allocated for N=", r.tokens, " k=", r.top_k, " E=", r.num_experts, ", called with N=", N,
              " k=", K, " E=", E);
  expect_cpu_float(r.weight, dt, op, "routing.weight");
  if (dt == DType::f64)
    route_impl<double>(cfg, x, router_w, bias, scores, r);
  else
    route_impl<float>(cfg, x, router_w, bias, scores, r);
}

void moe_permute(const MoeRouting& r, const Tensor& x, const Tensor& xp) {
  constexpr const char* op = "moe_permute";
  expect_routing(r, op);
  const DType dt = float_dtype(x, op, "x");
  expect_cpu_float(x, dt, op, "x");
  expect_shape(x, {r.tokens, -1}, op, "x");
  expect_cpu_float(xp, dt, op, "xp");
  expect_shape(xp, {r.tokens * r.top_k, x.size(1)}, op, "xp");
  if (dt == DType::f64)
    permute_impl<double>(r, x, xp);
  else
    permute_impl<float>(r, x, xp);
}

void moe_unpermute(const MoeRouting& r, const Tensor& xp, const Tensor& pairs) {
  constexpr const char* op = "moe_unpermute";
  expect_routing(r, op);
  const DType dt = float_dtype(xp, op, "xp");
  expect_cpu_float(xp, dt, op, "xp");
  expect_shape(xp, {r.tokens * r.top_k, -1}, op, "xp");
  expect_cpu_float(pairs, dt, op, "pairs");
  expect_shape(pairs, {r.tokens * r.top_k, xp.size(1)}, op, "pairs");
  if (dt == DType::f64)
    unpermute_impl<double>(r, xp, pairs);
  else
    unpermute_impl<float>(r, xp, pairs);
}

namespace {
void gather_checked(const char* op, const MoeRouting& r, bool weighted, const Tensor& yp, const Tensor& out,
                    bool accumulate) {
  expect_routing(r, op);
  const DType dt = float_dtype(yp, op, "rows");
  expect_cpu_float(yp, dt, op, "rows");
  expect_shape(yp, {r.tokens * r.top_k, -1}, op, "rows");
  expect_cpu_float(out, dt, op, "out");
  expect_shape(out, {r.tokens, yp.size(1)}, op, "out");
  if (weighted) expect_cpu_float(r.weight, dt, op, "routing.weight");
  if (dt == DType::f64)
    gather_sum<double>(r, weighted ? r.weight.ptr<double>() : nullptr, yp, out, accumulate);
  else
    gather_sum<float>(r, weighted ? r.weight.ptr<float>() : nullptr, yp, out, accumulate);
}
}  // namespace

void moe_combine(const MoeRouting& r, const Tensor& yp, const Tensor& out, bool accumulate) {
  gather_checked("moe_combine", r, true, yp, out, accumulate);
}

void moe_permute_backward(const MoeRouting& r, const Tensor& dxp, const Tensor& dx, bool accumulate) {
  gather_checked("moe_permute_backward", r, false, dxp, dx, accumulate);
}

void moe_update_selection_bias(const Tensor& bias, const std::vector<int64_t>& load, double rate) {
  constexpr const char* op = "moe_update_selection_bias";
  const DType dt = float_dtype(bias, op, "bias");
  expect_cpu_float(bias, dt, op, "bias");
  const int64_t E = bias.numel();
  if (static_cast<int64_t>(load.size()) != E)
    HYD_THROW(op, ": argument 'load' has ", load.size(), " entries, expected ", E, " (one per expert)");
  if (E == 0) return;
  const double mean = static_cast<double>(std::accumulate(load.begin(), load.end(), int64_t(0))) / E;
  for (int64_t e = 0; e < E; ++e) {
    const double diff = mean - static_cast<double>(load[e]);
    const double step = rate * static_cast<double>((diff > 0) - (diff < 0));
    if (dt == DType::f64)
      bias.ptr<double>()[e] += step;
    else
      bias.ptr<float>()[e] += static_cast<float>(step);
  }
}

double MoeLayer::forward(const ExecContext& ctx, const Tensor& in, const Tensor& out, Saved& saved,
                         const MoeExpertParallel* ep) const {
  constexpr const char* op = "MoeLayer::forward";
  NvtxRange range(nvtx_fwd.c_str());
  (void)ctx;
  const DType dt = float_dtype(in, op, "in");
  expect_cpu_float(in, dt, op, "in");
  expect_shape(in, {-1, cfg.hidden}, op, "in");
  expect_cpu_float(out, dt, op, "out");
  expect_shape(out, {in.size(0), cfg.hidden}, op, "out");
  expect_cpu_float(gate_up.value, dt, op, "gate_up");
  expect_cpu_float(saved.xp, dt, op, "saved.xp");
  expect_shape(saved.xp, {in.size(0) * cfg.top_k, cfg.hidden}, op, "saved.xp");
  saved.x = in;
  return dt == DType::f64 ? forward_impl<double>(*this, in, out, saved, ep)
                          : forward_impl<float>(*this, in, out, saved, ep);
}

void MoeLayer::backward(const ExecContext& ctx, const Saved& saved, const Tensor& dout, const Tensor& din,
                        Arena& scratch, double d_aux, const MoeExpertParallel* ep) const {
  constexpr const char* op = "MoeLayer::backward";
  NvtxRange range(nvtx_bwd.c_str());
  (void)ctx;
  const DType dt = float_dtype(saved.x, op, "saved.x");
  const int64_t n = saved.x.size(0);
  expect_cpu_float(dout, dt, op, "dout");
  expect_shape(dout, {n, cfg.hidden}, op, "dout");
  expect_cpu_float(din, dt, op, "din");
  expect_shape(din, {n, cfg.hidden}, op, "din");
  expect_cpu_float(router.grad, dt, op, "router.grad");
  const Scratch t = alloc_scratch(scratch, n, dt);
  if (dt == DType::f64)
    backward_impl<double>(*this, saved, dout, din, t, d_aux, ep);
  else
    backward_impl<float>(*this, saved, dout, din, t, d_aux, ep);
}

// ------------------------------------------------------------------------------------ MoeBlock

MoeConfig MoeBlock::config_for_model(const ModelConfig& mc) {
  MoeConfig c;
  c.hidden = mc.hidden_size;
  c.num_experts = mc.num_experts;
  c.top_k = mc.num_experts_per_tok;
  c.expert_ffn = mc.moe_intermediate_size;
  c.score_func = "softmax";
  c.norm_topk_prob = mc.norm_topk_prob;
  return c;
}

void MoeBlock::forward(const ExecContext& ctx, const Tensor& in, const Tensor& out, Saved& s) const {
  s.x = in;
  kernels::rmsnorm_forward(ctx, in, norm.value, s.m, s.rstd, eps);
  moe.forward(ctx, s.m, out, s.moe);  // L_aux is 0: aux_loss_coef is 0 here
  kernels::add_inplace(ctx, out, in);
}

void MoeBlock::backward(const ExecContext& ctx, const Saved& s, const Tensor& d_residual, Arena& scratch) const {
  const auto [dm, dx] = alloc_own_scratch(scratch, s.x.size(0), s.m.dtype);
  moe.backward(ctx, s.moe, d_residual, dm, scratch, /*d_aux=*/0.0);
  prenorm_residual_backward(ctx, dm, s.x, norm, s.rstd, d_residual, d_residual, dx);
}

// ------------------------------------------------------------------------------------ MoeLayerWeights

namespace {

size_t padded(size_t bytes) { return (bytes + ArenaSizer::kAlign - 1) / ArenaSizer::kAlign * ArenaSizer::kAlign; }

// A [rows, cols] view starting `offset` elements into t.
Tensor sub_matrix(const Tensor& t, int64_t offset, int64_t rows, int64_t cols) {
  Tensor v = t;
  v.data = static_cast<char*>(t.data) + offset * static_cast<int64_t>(dtype_size(t.dtype));
  v.ndim = 2;
  v.shape = {rows, cols, 0, 0};
  return v;
}

}  // namespace

MoeLayerWeights::MoeLayerWeights(const MoeConfig& cfg, Device device, DType dtype) : dtype_(dtype) {
  cfg.validate();
  if (!device.is_cpu() || (dtype != DType::f32 && dtype != DType::f64))
    HYD_THROW("MoeLayerWeights: dtype ", dtype_name(dtype), " on ", device.str(),
              " (the MoE layer is CPU-only so far: f32 or f64)");
  const int64_t D = cfg.hidden, E = cfg.num_experts, F = cfg.expert_ffn, S = cfg.num_shared_experts,
                Fs = cfg.shared_ffn;
  const size_t es = dtype_size(dtype);
  const int64_t nr = E * D, ngu = E * 2 * F * D, nd = E * D * F, nsgu = S * 2 * Fs * D, nsd = S * D * Fs;
  size_t bytes = padded(E * es);
  for (int64_t n : {nr, ngu, nd, nsgu, nsd}) bytes += 2 * padded(static_cast<size_t>(n) * es);
  arena_ = Arena("moe_layer_weights", device, bytes);
  layer_.cfg = cfg;
  auto weight = [&](WeightRef& ref, std::initializer_list<int64_t> dims) {
    ref.value = arena_.alloc(dims, dtype);
    ref.grad = arena_.alloc(dims, dtype);
  };
  weight(layer_.router, {E, D});
  weight(layer_.gate_up, {E, 2 * F, D});
  weight(layer_.down, {E, D, F});
  if (S > 0) {
    weight(layer_.shared_gate_up, {S, 2 * Fs, D});
    weight(layer_.shared_down, {S, D, Fs});
  }
  layer_.selection_bias = arena_.alloc({E}, dtype);
  arena_.zero();

  params_.push_back({"mlp.gate.weight", {E, D}, true, layer_.router.value, layer_.router.grad});
  auto ffn = [&](const std::string& prefix, const WeightRef& gu, const WeightRef& dn, int64_t i, int64_t f) {
    const int64_t gu_off = i * 2 * f * D, d_off = i * D * f;
    params_.push_back({prefix + ".gate_proj.weight",
                       {f, D},
                       true,
                       sub_matrix(gu.value, gu_off, f, D),
                       sub_matrix(gu.grad, gu_off, f, D)});
    params_.push_back({prefix + ".up_proj.weight",
                       {f, D},
                       true,
                       sub_matrix(gu.value, gu_off + f * D, f, D),
                       sub_matrix(gu.grad, gu_off + f * D, f, D)});
    params_.push_back({prefix + ".down_proj.weight",
                       {D, f},
                       true,
                       sub_matrix(dn.value, d_off, D, f),
                       sub_matrix(dn.grad, d_off, D, f)});
  };
  for (int64_t e = 0; e < E; ++e) ffn("mlp.experts." + std::to_string(e), layer_.gate_up, layer_.down, e, F);
  for (int64_t s = 0; s < S; ++s)
    ffn("mlp.shared_experts." + std::to_string(s), layer_.shared_gate_up, layer_.shared_down, s, Fs);
  if (cfg.use_selection_bias)
    params_.push_back({"mlp.gate.e_score_correction_bias", {E}, false, layer_.selection_bias, Tensor{}});
  else
    layer_.selection_bias = Tensor{};
}

const MoeLayerWeights::Param& MoeLayerWeights::param(const std::string& name) const {
  for (const Param& p : params_)
    if (p.name == name) return p;
  HYD_THROW("MoeLayerWeights: no parameter named '", name, "'");
}

namespace {

std::vector<double> to_host(const Tensor& t) {
  std::vector<double> out(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i)
    out[i] = t.dtype == DType::f64 ? t.ptr<double>()[i] : static_cast<double>(t.ptr<float>()[i]);
  return out;
}

void from_host(const Tensor& t, const std::vector<double>& v) {
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (t.dtype == DType::f64)
      t.ptr<double>()[i] = v[i];
    else
      t.ptr<float>()[i] = static_cast<float>(v[i]);
  }
}

}  // namespace

void MoeLayerWeights::init_random(uint64_t seed, float std) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, std);
  for (const Param& p : params_) {
    std::vector<double> v(static_cast<size_t>(p.value.numel()), 0.0);
    if (p.trainable)
      for (double& x : v) x = normal(gen);
    from_host(p.value, v);
  }
}

void MoeLayerWeights::set_param(const std::string& name, const std::vector<double>& values) {
  const Param& p = param(name);
  if (static_cast<int64_t>(values.size()) != p.value.numel())
    HYD_THROW("MoeLayerWeights: parameter '", name, "' has ", p.value.numel(), " values, got ", values.size());
  from_host(p.value, values);
}

std::vector<double> MoeLayerWeights::get_param(const std::string& name) const { return to_host(param(name).value); }

std::vector<double> MoeLayerWeights::get_grad(const std::string& name) const {
  const Param& p = param(name);
  if (!p.trainable) HYD_THROW("MoeLayerWeights: parameter '", name, "' has no gradient (a buffer)");
  return to_host(p.grad);
}

void MoeLayerWeights::zero_grad() {
  for (const Param& p : params_)
    if (p.trainable) zero_tensor(p.grad);
}

}  // namespace hyd

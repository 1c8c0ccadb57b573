#include "trainer/layer_moe.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "kernels/elementwise.h"
#include "kernels/matmul.h"
#include "kernels/moe.h"
#include "kernels/rmsnorm.h"
#include "kernels/swiglu.h"
#include "parallel/comm.h"
#include "parallel/nccl_comm.h"

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

// ------------------------------------------------------------------------------------ expert parallelism

}  // namespace

struct MoeExpertParallel::Impl {
  const Communicator* group = nullptr;
  int rank = 0, size = 1;
  std::unique_ptr<NcclCommunicator> nccl;  // CUDA layers: the rows' exchanges
  // CUDA: local experts [e0, e1), their received rows [r0, r1) (expert-major), the blocks of their
  // incoming exchange (in rows; the return exchange swaps the lists), where their offsets start in
  // Saved::offsets_d.
  struct Chunk {
    int64_t e0 = 0, e1 = 0, r0 = 0, r1 = 0, offsets_at = 0;
    std::vector<CommBlock> sends, recvs;
  };
  // What one layer's forward leaves for its backward.
  struct Saved {
    std::vector<int64_t> send_rows, recv_rows;  // per peer: rows sent / received
    std::vector<int64_t> recv_cnt;              // [P][El]: rows from source s for local expert e
    std::vector<char> xe, gu, act;              // CPU: received rows regrouped expert-major, their intermediates
    int64_t rows = 0;
    // CUDA: the exchange per chunk of local experts, the rows per local expert, the received rows and
    // intermediates (views of the layer's Saved or of `own`), the chunks' expert offsets on the device.
    std::vector<Chunk> chunks;
    std::vector<int32_t> local_counts;  // [El]
    Tensor xe_d, gu_d, act_d, offsets_d;
    std::unique_ptr<Arena> own, small;
  };
  std::map<const MoeLayer*, Saved> saved;
  std::unique_ptr<Arena> scratch;  // CUDA: this rank's rows leaving (forward, used within one layer call)
  std::unique_ptr<Arena> transit;  // CUDA: outputs / gradients in transit (used within one layer call)
};

MoeExpertParallel::MoeExpertParallel(const Communicator& group, Device device) : impl(std::make_unique<Impl>()) {
  impl->group = &group;
  impl->rank = group.rank();
  impl->size = group.size();
  if (device.is_cuda()) impl->nccl = std::make_unique<NcclCommunicator>(group);
}
MoeExpertParallel::~MoeExpertParallel() = default;
int MoeExpertParallel::rank() const { return impl->rank; }
int MoeExpertParallel::size() const { return impl->size; }
int64_t MoeExpertParallel::last_received_rows(const MoeLayer& layer) const {
  auto it = impl->saved.find(&layer);
  return it == impl->saved.end() ? 0 : it->second.rows;
}
uint64_t MoeExpertParallel::device_bytes_sent() const { return impl->nccl ? impl->nccl->counters().bytes : 0; }

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

// Where this rank's first local expert sits in the layer's storage: the layer holds every expert (rows
// E: at rank * E / P) or only this rank's (expert-sharded storage, rows E / P: at 0).
int64_t local_expert_base(const MoeLayer& L, int rank, int size) {
  return L.gate_up.value.size(0) == L.cfg.num_experts ? static_cast<int64_t>(rank) * (L.cfg.num_experts / size) : 0;
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
    const int64_t g = local_expert_base(L, ep.rank, P) + e;  // the expert's place in the storage
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
    const int64_t g = local_expert_base(L, ep.rank, P) + e;
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

kernels::MoeRouterOptions router_options(const MoeConfig& c) {
  kernels::MoeRouterOptions o;
  o.sigmoid = c.sigmoid();
  o.norm_topk_prob = c.norm_topk_prob;
  o.route_scale = c.route_scale;
  return o;
}

// The CPU layer: f32 or f64 throughout (kernels/cpu/moe.cpp is the reference of every MoE op).
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
    // Each expert's SwiGLU on its rows (an expert without rows does nothing and gets a zero gradient).
    kernels::cpu::moe_grouped_linear_forward<T>(off, s.xp.ptr<T>(), L.gate_up.value.ptr<T>(), s.gate_up.ptr<T>(), E,
                                                2 * F, D);
    swiglu_fwd(s.gate_up.ptr<T>(), s.act.ptr<T>(), N * K, F);
    kernels::cpu::moe_grouped_linear_forward<T>(off, s.act.ptr<T>(), L.down.value.ptr<T>(), s.yp.ptr<T>(), E, D, F);
  }
  kernels::cpu::moe_gather_sum<T>(r.position.ptr<int32_t>(), r.weight.ptr<T>(), s.yp.ptr<T>(), out.ptr<T>(), N, K, D,
                                  false);
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
  kernels::cpu::moe_aux_stats<T>(r.counts.ptr<int32_t>(), s.scores.ptr<T>(), s.aux_frac.ptr<T>(),
                                 c.aux_loss_coef > 0.f ? s.aux_prob.ptr<T>() : nullptr, N, E, K);
  double aux = 0;
  if (c.aux_loss_coef > 0.f && N > 0)
    for (int64_t e = 0; e < E; ++e)
      aux += static_cast<double>(s.aux_frac.ptr<T>()[e]) * static_cast<double>(s.aux_prob.ptr<T>()[e]);
  return static_cast<double>(c.aux_loss_coef) * static_cast<double>(E) * aux;
}

template <class T>
void backward_impl(const MoeLayer& L, const MoeLayer::Saved& s, const Tensor& dout, const Tensor& din,
                   const MoeLayer::Scratch& t, double d_aux, const MoeExpertParallel* ep) {
  const MoeConfig& c = L.cfg;
  const int64_t N = s.x.size(0), D = c.hidden, E = c.num_experts, K = c.top_k, F = c.expert_ffn;
  const MoeRouting& r = s.routing;
  const int32_t* off = r.offsets.ptr<int32_t>();
  const T* g = dout.ptr<T>();

  // Combine: d_yp[p] = w_tj dout[t];  d_w_tj = dout[t] . yp[p].
  kernels::cpu::moe_combine_backward<T>(r.order.ptr<int32_t>(), r.weight.ptr<T>(), g, s.yp.ptr<T>(), t.d_yp.ptr<T>(),
                                        t.d_weight.ptr<T>(), N, K, D);
  // Experts, each on its rows; d_xp then scatters back to the tokens.
  if (ep != nullptr) {
    ep_backward<T>(*ep->impl, L, r, t.d_yp.ptr<T>(), t.d_xp.ptr<T>());
  } else {
    kernels::cpu::moe_grouped_linear_backward<T>(off, t.d_yp.ptr<T>(), s.act.ptr<T>(), L.down.value.ptr<T>(),
                                                 t.d_act.ptr<T>(), L.down.grad.ptr<T>(), E, D, F);
    swiglu_bwd(t.d_act.ptr<T>(), s.gate_up.ptr<T>(), t.d_gate_up.ptr<T>(), N * K, F);
    kernels::cpu::moe_grouped_linear_backward<T>(off, t.d_gate_up.ptr<T>(), s.xp.ptr<T>(), L.gate_up.value.ptr<T>(),
                                                 t.d_xp.ptr<T>(), L.gate_up.grad.ptr<T>(), E, 2 * F, D);
  }
  kernels::cpu::moe_gather_sum<T>(r.position.ptr<int32_t>(), static_cast<const T*>(nullptr), t.d_xp.ptr<T>(),
                                  din.ptr<T>(), N, K, D, false);

  // Combine weights -> scores (norm_topk_prob, L_aux: dL/ds[t, e] += d_aux coef E f_e / N) -> logits.
  const T aux_scale = N > 0 ? static_cast<T>(d_aux * c.aux_loss_coef * static_cast<double>(E) / N) : T(0);
  T* ds = t.d_scores.ptr<T>();
  kernels::cpu::moe_router_backward<T>(router_options(c), s.scores.ptr<T>(), r.expert.ptr<int32_t>(),
                                       t.d_weight.ptr<T>(), s.aux_frac.ptr<T>(), aux_scale, ds, N, E, K);
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

// ------------------------------------------------------------------------------------ CUDA (one GPU)

// ------------------------------------------------------------------------------------ CUDA expert parallelism

// `a` with room for at least `bytes` (reallocated when smaller, after the device has drained: memory of
// the old one may still be read by queued kernels), reset.
Arena& ensure_arena(std::unique_ptr<Arena>& a, const char* name, const ExecContext& ctx, size_t bytes) {
  if (!a || a->capacity() < bytes) {
    ctx.synchronize();
    a.reset();
    a = std::make_unique<Arena>(name, ctx.device(), bytes + bytes / 4 + 4096);
  }
  a->reset();
  return *a;
}

// Bytes of bf16 tensors of `rows` x each width (with each allocation's alignment slack).
size_t rows_bytes(int64_t rows, std::initializer_list<int64_t> widths) {
  size_t b = 0;
  for (int64_t w : widths) b += static_cast<size_t>(rows * w) * sizeof(bf16) + 512;
  return b;
}

// Starts the exchange of rows `from` -> `to` ([*, D] bf16) along the block lists (in rows) over NCCL; the
// caller's stream waits only at ep.nccl->wait(ticket).
uint64_t start_rows_exchange(const MoeExpertParallel::Impl& ep, const ExecContext& ctx,
                             const std::vector<CommBlock>& sends, const Tensor& from,
                             const std::vector<CommBlock>& recvs, const Tensor& to) {
  const int64_t D = from.size(1);
  auto scaled = [D](const std::vector<CommBlock>& blocks) {
    std::vector<CommBlock> out(blocks);
    for (CommBlock& b : out) {
      b.offset *= D;
      b.count *= D;
    }
    return out;
  };
  return ep.nccl->all_to_all_blocks_start<bf16>({from.ptr<bf16>(), static_cast<size_t>(from.numel())}, scaled(sends),
                                                {to.ptr<bf16>(), static_cast<size_t>(to.numel())}, scaled(recvs),
                                                ctx.stream());
}

// The local experts are processed in up to this many chunks, so that the exchange of one chunk's rows
// overlaps the GEMMs of another (forward and backward).
constexpr int64_t kEpChunks = 4;

// One routed row's forward multiply-adds in an expert (gate + up + down): MoeGemm::automatic's measure.
int64_t expert_macs_per_row(const MoeConfig& c) { return 3 * c.hidden * c.expert_ffn; }

// The routed experts under expert parallelism (forward): this rank's expert-major rows `xp_send` [N k, D]
// (counts per global expert on the host) go to the experts' owners, the local experts run on what arrived,
// the outputs come back into s.yp. Chunk by chunk of local experts: every chunk's incoming exchange is
// started at once (they run in order on the communicator's stream), each chunk's GEMMs wait for its rows
// only, and its outputs start back right after.
void ep_forward_device(MoeExpertParallel::Impl& ep, const ExecContext& ctx, const MoeLayer& L, MoeLayer::Saved& s,
                       const Tensor& xp_send) {
  const MoeConfig& c = L.cfg;
  const int P = ep.size;
  const int64_t E = c.num_experts, El = E / P, D = c.hidden, F = c.expert_ffn, NK = xp_send.size(0);
  HYD_CHECK(E % P == 0, "MoeExpertParallel: ", E, " experts over ", P, " ranks (num_experts must be a multiple)");
  MoeExpertParallel::Impl::Saved& sv = ep.saved[&L];
  std::vector<int64_t> cnt(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) cnt[e] = s.counts_host[e];
  sv.recv_cnt.assign(static_cast<size_t>(E), 0);
  ep.group->all_to_all<int64_t>(cnt, sv.recv_cnt);
  // Where this rank's rows of global expert g start in xp_send.
  std::vector<int64_t> at(static_cast<size_t>(E + 1), 0);
  for (int64_t g = 0; g < E; ++g) at[g + 1] = at[g] + cnt[g];
  // Chunk j: local experts [e0, e1). Its sends: this rank's rows of global experts p El + e (e in the
  // chunk) to rank p; its receives: the rows of local expert e from source src, landing expert-major (e
  // outer, src inner). Blocks between a pair of ranks are listed in expert order on both sides.
  const int64_t C = std::min(kEpChunks, El);
  sv.chunks.assign(static_cast<size_t>(C), {});
  sv.local_counts.assign(static_cast<size_t>(El), 0);
  std::vector<int32_t> offsets;  // per chunk: its experts' row offsets from the chunk's first row
  int64_t R = 0;
  for (int64_t j = 0; j < C; ++j) {
    MoeExpertParallel::Impl::Chunk& ch = sv.chunks[j];
    ch.e0 = j * El / C;
    ch.e1 = (j + 1) * El / C;
    ch.r0 = R;
    ch.offsets_at = static_cast<int64_t>(offsets.size());
    for (int p = 0; p < P; ++p)
      for (int64_t e = ch.e0; e < ch.e1; ++e) ch.sends.push_back({p, at[p * El + e], cnt[p * El + e]});
    offsets.push_back(0);
    for (int64_t e = ch.e0; e < ch.e1; ++e) {
      for (int src = 0; src < P; ++src) {
        const int64_t m = sv.recv_cnt[src * El + e];
        ch.recvs.push_back({src, R, m});
        R += m;
        sv.local_counts[e] += static_cast<int32_t>(m);
      }
      offsets.push_back(static_cast<int32_t>(R - ch.r0));
    }
    ch.r1 = R;
  }
  sv.rows = R;
  const int64_t n_off = static_cast<int64_t>(offsets.size());
  ensure_arena(sv.small, "moe ep offsets", ctx, static_cast<size_t>(n_off) * sizeof(int32_t) + 1024);
  sv.offsets_d = sv.small->alloc({n_off}, DType::i32);
  copy_tensor(sv.offsets_d, Tensor(offsets.data(), DType::i32, Device::cpu(), {n_off}));
  // The received rows and their intermediates: the layer's own buffers when they fit, else buffers of this
  // object (per layer, an unbalanced routing). The outputs ye are in transit (this object's scratch).
  if (R <= NK) {
    sv.xe_d = s.xp.slice0(0, R);
    sv.gu_d = s.gate_up.slice0(0, R);
    sv.act_d = s.act.slice0(0, R);
  } else {
    Arena& a = ensure_arena(sv.own, "moe ep rows", ctx, rows_bytes(R, {D, 2 * F, F}));
    sv.xe_d = a.alloc({R, D}, DType::bf16);
    sv.gu_d = a.alloc({R, 2 * F}, DType::bf16);
    sv.act_d = a.alloc({R, F}, DType::bf16);
  }
  const Tensor ye = ensure_arena(ep.transit, "moe ep transit", ctx, rows_bytes(R, {D})).alloc({R, D}, DType::bf16);
  std::vector<uint64_t> in(static_cast<size_t>(C)), out(static_cast<size_t>(C));
  for (int64_t j = 0; j < C; ++j)
    in[j] = start_rows_exchange(ep, ctx, sv.chunks[j].sends, xp_send, sv.chunks[j].recvs, sv.xe_d);
  for (int64_t j = 0; j < C; ++j) {
    const MoeExpertParallel::Impl::Chunk& ch = sv.chunks[j];
    ep.nccl->wait(in[j], ctx.stream());
    if (ch.r1 > ch.r0) {
      const kernels::MoeGemmPlan plan{
          s.gemm, std::span<const int32_t>(sv.local_counts.data() + ch.e0, static_cast<size_t>(ch.e1 - ch.e0)),
          expert_macs_per_row(c)};
      const Tensor off = sv.offsets_d.slice0(ch.offsets_at, ch.offsets_at + ch.e1 - ch.e0 + 1);
      const int64_t base = local_expert_base(L, ep.rank, P), g0 = base + ch.e0, g1 = base + ch.e1;
      const Tensor gu = sv.gu_d.slice0(ch.r0, ch.r1), act = sv.act_d.slice0(ch.r0, ch.r1);
      kernels::moe_grouped_linear_forward(ctx, off, sv.xe_d.slice0(ch.r0, ch.r1), L.gate_up.value.slice0(g0, g1), gu,
                                          plan);
      kernels::swiglu_forward(ctx, gu, act);
      kernels::moe_grouped_linear_forward(ctx, off, act, L.down.value.slice0(g0, g1), ye.slice0(ch.r0, ch.r1), plan);
    }
    out[j] = start_rows_exchange(ep, ctx, ch.recvs, ye, ch.sends, s.yp);
  }
  for (int64_t j = 0; j < C; ++j) ep.nccl->wait(out[j], ctx.stream());
}

// The mirror of ep_forward_device, chunk by chunk as well: the output gradients d_yp [N k, D] go to the
// owners, the local experts' backward runs (their weight gradients accumulate into this rank's slice of the
// f32 gradients), and the input gradients come back into d_xp.
void ep_backward_device(MoeExpertParallel::Impl& ep, const ExecContext& ctx, const MoeLayer& L, kernels::MoeGemm gemm,
                        const MoeLayer::Scratch& t) {
  const MoeConfig& c = L.cfg;
  const int P = ep.size;
  const int64_t D = c.hidden, F = c.expert_ffn, NK = t.d_yp.size(0);
  auto it = ep.saved.find(&L);
  HYD_CHECK(it != ep.saved.end(), "MoeExpertParallel: backward of a layer without its forward");
  MoeExpertParallel::Impl::Saved& sv = it->second;
  const int64_t R = sv.rows, C = static_cast<int64_t>(sv.chunks.size());
  // dye [R, D] in transit (each chunk's rows then hold its dxe); d_act and d_gu in the layer's scratch when
  // they fit.
  Arena& a =
      ensure_arena(ep.transit, "moe ep transit", ctx, R <= NK ? rows_bytes(R, {D}) : rows_bytes(R, {D, F, 2 * F}));
  const Tensor dye = a.alloc({R, D}, DType::bf16);
  const Tensor d_act = R <= NK ? t.d_act.slice0(0, R) : a.alloc({R, F}, DType::bf16);
  const Tensor d_gu = R <= NK ? t.d_gate_up.slice0(0, R) : a.alloc({R, 2 * F}, DType::bf16);
  std::vector<uint64_t> in(static_cast<size_t>(C)), out(static_cast<size_t>(C));
  for (int64_t j = 0; j < C; ++j)
    in[j] = start_rows_exchange(ep, ctx, sv.chunks[j].sends, t.d_yp, sv.chunks[j].recvs, dye);
  for (int64_t j = 0; j < C; ++j) {
    const MoeExpertParallel::Impl::Chunk& ch = sv.chunks[j];
    ep.nccl->wait(in[j], ctx.stream());
    if (ch.r1 > ch.r0) {
      const kernels::MoeGemmPlan plan{
          gemm, std::span<const int32_t>(sv.local_counts.data() + ch.e0, static_cast<size_t>(ch.e1 - ch.e0)),
          expert_macs_per_row(c)};
      const Tensor off = sv.offsets_d.slice0(ch.offsets_at, ch.offsets_at + ch.e1 - ch.e0 + 1);
      const int64_t base = local_expert_base(L, ep.rank, P), g0 = base + ch.e0, g1 = base + ch.e1;
      const Tensor dy = dye.slice0(ch.r0, ch.r1), da = d_act.slice0(ch.r0, ch.r1), dg = d_gu.slice0(ch.r0, ch.r1);
      kernels::moe_grouped_linear_backward(ctx, off, dy, sv.act_d.slice0(ch.r0, ch.r1), L.down.value.slice0(g0, g1), da,
                                           L.down.grad.slice0(g0, g1), plan);
      kernels::swiglu_backward(ctx, da, sv.gu_d.slice0(ch.r0, ch.r1), dg);
      kernels::moe_grouped_linear_backward(ctx, off, dg, sv.xe_d.slice0(ch.r0, ch.r1), L.gate_up.value.slice0(g0, g1),
                                           dy, L.gate_up.grad.slice0(g0, g1), plan);
    }
    out[j] = start_rows_exchange(ep, ctx, ch.recvs, dye, ch.sends, t.d_xp);
  }
  for (int64_t j = 0; j < C; ++j) ep.nccl->wait(out[j], ctx.stream());
}

// Shared expert sh's matrix out of the stacked [S, rows, cols] storage.
Tensor stacked(const Tensor& t, int64_t sh) { return t.slice0(sh, sh + 1).view({t.size(1), t.size(2)}); }

// The layer through the dispatching ops of kernels/moe.h (bf16 rows, f32 router, f32 weight gradients);
// the same steps as forward_impl. The shared experts are the dense MLP's path (linear, swiglu, linear).
double forward_device(const ExecContext& ctx, const MoeLayer& L, const Tensor& in, const Tensor& out,
                      MoeLayer::Saved& s, const MoeExpertParallel* ep) {
  const MoeConfig& c = L.cfg;
  const int64_t N = in.size(0), E = c.num_experts;
  const MoeRouting& r = s.routing;
  // logits = x W_r^T with f32 output (bf16 inputs, f32 accumulation), turned into scores in place.
  kernels::gemm(ctx, false, true, 1.f, in, L.router.value, 0.f, s.scores);
  kernels::moe_route(ctx, router_options(c), s.scores, c.use_selection_bias ? L.selection_bias : Tensor{}, r);
  // The cuBLAS GEMMs take every expert's row count on the host: this is the layer forward's one host
  // synchronisation (on an event right behind the router; the permutation queued meanwhile keeps the GPU
  // busy). The counts stay in `s` for the backward of the same micro-batch. wmma reads the device offsets.
  // Expert parallelism needs the counts for its exchanges whatever the GEMMs.
  s.gemm = L.gemm;
  s.counts_host.clear();
  const bool host_counts = s.gemm != kernels::MoeGemm::wmma || ep != nullptr;
  if (host_counts) {
    if (!L.host_counts) HYD_THROW("MoeLayer::forward: host_counts is null (the cuBLAS GEMMs need its staging)");
    L.host_counts->start(ctx, r.counts);
  }
  if (ep != nullptr) {
    // The rows leave from a transit buffer; the received ones take s.xp (ep_forward_device).
    const int64_t NK = N * c.top_k;
    Arena& a = ensure_arena(ep->impl->scratch, "moe ep scratch", ctx, rows_bytes(NK, {c.hidden}));
    const Tensor xp_send = a.alloc({NK, c.hidden}, DType::bf16);
    kernels::moe_permute(ctx, r, in, xp_send);
    L.host_counts->wait(s.counts_host);
    ep_forward_device(*ep->impl, ctx, L, s, xp_send);
  } else {
    kernels::moe_permute(ctx, r, in, s.xp);
    if (host_counts) L.host_counts->wait(s.counts_host);
    const kernels::MoeGemmPlan plan{s.gemm, s.counts_host, expert_macs_per_row(c)};
    kernels::moe_grouped_linear_forward(ctx, r.offsets, s.xp, L.gate_up.value, s.gate_up, plan);
    kernels::swiglu_forward(ctx, s.gate_up, s.act);
    kernels::moe_grouped_linear_forward(ctx, r.offsets, s.act, L.down.value, s.yp, plan);
  }
  kernels::moe_combine(ctx, r, s.yp, out, false);
  for (int64_t sh = 0; sh < c.num_shared_experts; ++sh) {
    const Tensor gu = s.shared_gate_up.slice0(sh * N, (sh + 1) * N), act = s.shared_act.slice0(sh * N, (sh + 1) * N);
    kernels::linear_forward(ctx, in, stacked(L.shared_gate_up.value, sh), Tensor{}, gu);
    kernels::swiglu_forward(ctx, gu, act);
    kernels::gemm(ctx, false, true, 1.f, act, stacked(L.shared_down.value, sh), 1.f, out);  // out += act W_d^T
  }
  kernels::moe_aux_stats(ctx, r, s.scores, s.aux_frac, c.aux_loss_coef > 0.f ? s.aux_prob : Tensor{});
  if (!(c.aux_loss_coef > 0.f) || N == 0) return 0.0;
  // The value of L_aux is wanted on the host: the one synchronising copy of this layer (two [E] vectors).
  ctx.synchronize();
  std::vector<float> frac(static_cast<size_t>(E)), prob(static_cast<size_t>(E));
  copy_tensor(Tensor(frac.data(), DType::f32, Device::cpu(), {E}), s.aux_frac);
  copy_tensor(Tensor(prob.data(), DType::f32, Device::cpu(), {E}), s.aux_prob);
  double aux = 0;
  for (int64_t e = 0; e < E; ++e) aux += static_cast<double>(frac[e]) * static_cast<double>(prob[e]);
  return static_cast<double>(c.aux_loss_coef) * static_cast<double>(E) * aux;
}

void backward_device(const ExecContext& ctx, const MoeLayer& L, const MoeLayer::Saved& s, const Tensor& dout,
                     const Tensor& din, const MoeLayer::Scratch& t, double d_aux, const MoeExpertParallel* ep) {
  const MoeConfig& c = L.cfg;
  const int64_t N = s.x.size(0), E = c.num_experts;
  const MoeRouting& r = s.routing;
  kernels::moe_combine_backward(ctx, r, dout, s.yp, t.d_yp, t.d_weight);
  // The forward's implementation and host counts (no synchronisation here).
  if (ep != nullptr) {
    ep_backward_device(*ep->impl, ctx, L, s.gemm, t);
  } else {
    const kernels::MoeGemmPlan plan{s.gemm, s.counts_host, expert_macs_per_row(c)};
    kernels::moe_grouped_linear_backward(ctx, r.offsets, t.d_yp, s.act, L.down.value, t.d_act, L.down.grad, plan);
    kernels::swiglu_backward(ctx, t.d_act, s.gate_up, t.d_gate_up);
    kernels::moe_grouped_linear_backward(ctx, r.offsets, t.d_gate_up, s.xp, L.gate_up.value, t.d_xp, L.gate_up.grad,
                                         plan);
  }
  kernels::moe_permute_backward(ctx, r, t.d_xp, din, false);
  const double aux_scale = N > 0 ? d_aux * c.aux_loss_coef * static_cast<double>(E) / static_cast<double>(N) : 0.0;
  kernels::moe_router_backward(ctx, router_options(c), s.scores, r, t.d_weight, s.aux_frac, aux_scale, t.d_scores);
  // d_logits (f32) rounded to bf16 for the GEMMs: din += d_logits W_r, dW_r += d_logits^T x (f32).
  const Tensor d_logits = t.d_logits_lp.empty() ? t.d_scores : t.d_logits_lp;
  if (!t.d_logits_lp.empty()) kernels::convert(ctx, t.d_logits_lp, t.d_scores);
  kernels::linear_backward(ctx, d_logits, s.x, L.router.value, din, true, L.router.grad, Tensor{});
  for (int64_t sh = 0; sh < c.num_shared_experts; ++sh) {
    const Tensor gu = s.shared_gate_up.slice0(sh * N, (sh + 1) * N), act = s.shared_act.slice0(sh * N, (sh + 1) * N);
    kernels::linear_backward(ctx, dout, act, stacked(L.shared_down.value, sh), t.d_shared_act, false,
                             stacked(L.shared_down.grad, sh), Tensor{});
    kernels::swiglu_backward(ctx, t.d_shared_act, gu, t.d_shared_gate_up);
    kernels::linear_backward(ctx, t.d_shared_gate_up, s.x, stacked(L.shared_gate_up.value, sh), din, true,
                             stacked(L.shared_gate_up.grad, sh), Tensor{});
  }
}

// Arguments of the device layer: bf16 activations and weights, f32 gradients, all on the context's device.
void expect_device_layer(const MoeLayer& L, const ExecContext& ctx, const Tensor& x, const char* op) {
  const std::pair<const Tensor*, const char*> weights[] = {{&L.router.value, "router"},
                                                           {&L.gate_up.value, "gate_up"},
                                                           {&L.down.value, "down"},
                                                           {&L.shared_gate_up.value, "shared_gate_up"},
                                                           {&L.shared_down.value, "shared_down"}};
  const std::pair<const Tensor*, const char*> grads[] = {{&L.router.grad, "router.grad"},
                                                         {&L.gate_up.grad, "gate_up.grad"},
                                                         {&L.down.grad, "down.grad"},
                                                         {&L.shared_gate_up.grad, "shared_gate_up.grad"},
                                                         {&L.shared_down.grad, "shared_down.grad"}};
  const bool shared = L.cfg.num_shared_experts > 0;
  for (int i = 0; i < 5; ++i) {
    if (i >= 3 && !shared) break;
    if (weights[i].first->empty()) HYD_THROW(op, ": weight '", weights[i].second, "' is empty");
    expect_dtype(*weights[i].first, DType::bf16, op, weights[i].second);
    expect_same_device(x, *weights[i].first, op);
    if (!grads[i].first->empty()) {
      expect_dtype(*grads[i].first, DType::f32, op, grads[i].second);
      expect_same_device(x, *grads[i].first, op);
    }
  }
  if (L.cfg.use_selection_bias) {
    if (L.selection_bias.empty()) HYD_THROW(op, ": selection_bias is empty (use_selection_bias)");
    expect_dtype(L.selection_bias, DType::f32, op, "selection_bias");
    expect_same_device(x, L.selection_bias, op);
  }
  if (!(ctx.device() == x.device))
    HYD_THROW(op, ": tensors on ", x.device.str(), " but the context is on ", ctx.device().str());
}

}  // namespace

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
  if (r.tokens != N || r.top_k != K || r.num_experts != E)
    HYD_THROW(op, ": routing allocated for N=", r.tokens, " k=", r.top_k, " E=", r.num_experts, ", called with N=", N,
              " k=", K, " E=", E);
  // logits, turned into scores in place by the router op.
  if (dt == DType::f64)
    linear(x.ptr<double>(), router_w.ptr<double>(), scores.ptr<double>(), N, E, cfg.hidden);
  else
    linear(x.ptr<float>(), router_w.ptr<float>(), scores.ptr<float>(), N, E, cfg.hidden);
  const ExecContext cpu(Device::cpu());
  kernels::moe_route(cpu, router_options(cfg), scores, cfg.use_selection_bias ? bias : Tensor{}, r);
}

void moe_permute(const MoeRouting& r, const Tensor& x, const Tensor& xp) {
  const DType dt = float_dtype(x, "moe_permute", "x");
  expect_cpu_float(x, dt, "moe_permute", "x");
  kernels::moe_permute(ExecContext(Device::cpu()), r, x, xp);
}

void moe_unpermute(const MoeRouting& r, const Tensor& xp, const Tensor& pairs) {
  const DType dt = float_dtype(xp, "moe_unpermute", "xp");
  expect_cpu_float(xp, dt, "moe_unpermute", "xp");
  kernels::moe_unpermute(ExecContext(Device::cpu()), r, xp, pairs);
}

void moe_combine(const MoeRouting& r, const Tensor& yp, const Tensor& out, bool accumulate) {
  const DType dt = float_dtype(yp, "moe_combine", "rows");
  expect_cpu_float(yp, dt, "moe_combine", "rows");
  kernels::moe_combine(ExecContext(Device::cpu()), r, yp, out, accumulate);
}

void moe_permute_backward(const MoeRouting& r, const Tensor& dxp, const Tensor& dx, bool accumulate) {
  const DType dt = float_dtype(dxp, "moe_permute_backward", "rows");
  expect_cpu_float(dxp, dt, "moe_permute_backward", "rows");
  kernels::moe_permute_backward(ExecContext(Device::cpu()), r, dxp, dx, accumulate);
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

// The routed experts' storage: all E experts, or (expert parallelism over P ranks) only this rank's E / P.
static void expect_expert_storage(const MoeLayer& L, const MoeExpertParallel* ep, const char* op) {
  const int64_t E = L.cfg.num_experts, rows = L.gate_up.value.empty() ? E : L.gate_up.value.size(0);
  const int64_t local = ep != nullptr ? E / ep->size() : E;
  if (rows != E && rows != local)
    HYD_THROW(op, ": 'gate_up' holds ", rows, " experts; expected all ", E,
              ep != nullptr ? " or this rank's " + std::to_string(local) + " (expert-sharded storage)" : std::string());
  if (!L.down.value.empty() && L.down.value.size(0) != rows)
    HYD_THROW(op, ": 'down' holds ", L.down.value.size(0), " experts but 'gate_up' ", rows);
}

double MoeLayer::forward(const ExecContext& ctx, const Tensor& in, const Tensor& out, Saved& saved,
                         const MoeExpertParallel* ep) const {
  constexpr const char* op = "MoeLayer::forward";
  NvtxRange range(nvtx_fwd.c_str());
  if (in.empty()) HYD_THROW(op, ": argument 'in' is empty");
  expect_expert_storage(*this, ep, op);
  if (in.device.is_cuda()) {
    if (ep != nullptr && !ep->impl->nccl)
      HYD_THROW(op, ": the MoeExpertParallel was made for the CPU but the layer's input is on ", in.device.str(),
                " (construct it with the layers' device)");
    expect_dtype(in, DType::bf16, op, "in");
    expect_shape(in, {-1, cfg.hidden}, op, "in");
    expect_dtype(out, DType::bf16, op, "out");
    expect_shape(out, {in.size(0), cfg.hidden}, op, "out");
    expect_same_device(in, out, op);
    expect_device_layer(*this, ctx, in, op);
    expect_shape(saved.xp, {in.size(0) * cfg.top_k, cfg.hidden}, op, "saved.xp");
    expect_dtype(saved.scores, DType::f32, op, "saved.scores");
    saved.x = in;
    return forward_device(ctx, *this, in, out, saved, ep);
  }
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
  if (saved.x.empty()) HYD_THROW(op, ": saved.x is empty (backward without forward)");
  const int64_t n = saved.x.size(0);
  if (saved.x.device.is_cuda()) {
    if (ep != nullptr && !ep->impl->nccl)
      HYD_THROW(op, ": the MoeExpertParallel was made for the CPU but the layer's input is on ", saved.x.device.str(),
                " (construct it with the layers' device)");
    expect_dtype(dout, DType::bf16, op, "dout");
    expect_shape(dout, {n, cfg.hidden}, op, "dout");
    expect_dtype(din, DType::bf16, op, "din");
    expect_shape(din, {n, cfg.hidden}, op, "din");
    expect_same_device(saved.x, dout, op);
    expect_same_device(saved.x, din, op);
    expect_device_layer(*this, ctx, saved.x, op);
    if (router.grad.empty() || gate_up.grad.empty() || down.grad.empty())
      HYD_THROW(op, ": the router and expert gradients must be present on CUDA");
    const Scratch t = alloc_scratch(scratch, n, DType::bf16);
    backward_device(ctx, *this, saved, dout, din, t, d_aux, ep);
    return;
  }
  const DType dt = float_dtype(saved.x, op, "saved.x");
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
  c.score_func = mc.moe_score_func;
  c.norm_topk_prob = mc.norm_topk_prob;
  c.route_scale = static_cast<float>(mc.routed_scaling_factor);
  c.use_selection_bias = mc.moe_selection_bias;
  // HF's n_shared_experts shared experts are one MLP of their summed width.
  c.num_shared_experts = mc.num_shared_experts > 0 ? 1 : 0;
  c.shared_ffn = mc.shared_expert_ffn();
  return c;
}

std::vector<MoeBlock::ParamSpec> MoeBlock::param_specs(const ModelConfig& mc) {
  const int64_t D = mc.hidden_size, E = mc.num_experts, Fe = mc.moe_intermediate_size, Fs = mc.shared_expert_ffn();
  std::vector<ParamSpec> out = {
      {"mlp.gate.weight", {E, D}, true}, {"mlp.gate_up", {E, 2 * Fe, D}, true}, {"mlp.down", {E, D, Fe}, true}};
  if (Fs > 0) {
    out.push_back({"mlp.shared_gate_up", {1, 2 * Fs, D}, true});
    out.push_back({"mlp.shared_down", {1, D, Fs}, true});
  }
  if (mc.moe_selection_bias) out.push_back({"mlp.gate.e_score_correction_bias", {E}, false});
  return out;
}

Arena MoeBlock::make_selection_bias_copies(std::vector<MoeBlock>& blocks, Device device) {
  if (!device.is_cuda()) return Arena();
  ArenaSizer sizer;
  for (const MoeBlock& b : blocks)
    if (!b.selection_bias_param.empty()) sizer.alloc({b.moe.cfg.num_experts}, DType::f32);
  if (sizer.used() == 0) return Arena();
  Arena arena("moe_selection_bias", device, sizer.used());
  for (MoeBlock& b : blocks)
    if (!b.selection_bias_param.empty()) b.moe.selection_bias = arena.alloc({b.moe.cfg.num_experts}, DType::f32);
  return arena;
}

double MoeBlock::forward(const ExecContext& ctx, const Tensor& in, const Tensor& out, Saved& s,
                         const MoeExpertParallel* ep) const {
  // CUDA: the f32 working copy of the (bf16) selection bias, on the context's stream before the router.
  if (!selection_bias_param.empty() && selection_bias_param.data != moe.selection_bias.data)
    kernels::convert(ctx, moe.selection_bias, selection_bias_param);
  s.x = in;
  kernels::rmsnorm_forward(ctx, in, norm.value, s.m, s.rstd, eps);
  const double aux = moe.forward(ctx, s.m, out, s.moe, ep);
  kernels::add_inplace(ctx, out, in);
  return aux;
}

void MoeBlock::backward(const ExecContext& ctx, const Saved& s, const Tensor& d_residual, Arena& scratch,
                        const MoeExpertParallel* ep, double d_aux) const {
  const Tensor dm = alloc_own_scratch(scratch, s.x.size(0), s.m.dtype);
  moe.backward(ctx, s.moe, d_residual, dm, scratch, d_aux, ep);
  prenorm_residual_backward(ctx, dm, s.x, norm, s.rstd, d_residual, d_residual);
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

// CPU references of the KDA core (kernels/kda.h): the chunked form against the recurrence (chunk
// sizes 1, 5, 64; packed documents of lengths 0, 1, 63, 64, 65, 130; GQA; initial states; gates near
// 0 and down to -20, beta near 0 and 1), float against double, the recurrent backward against
// central differences (every input, initial and final state gradients) and a directional derivative
// on a long document, the affine transition (M, B) and its composition over split documents, and
// the dispatchers (f32 and f64 CPU tensors, errors naming the argument).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/kda.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::central_differences;
using test::expect_error_naming;
using test::randn_f64;
using test::rel_err;
using test::rng;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// How the log-decay g is drawn: mixed (per element: near 0, moderate, strong), or all of one kind.
enum class Gates { mixed, near_zero, strong };

double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng()); }

struct Problem {
  KdaDims s;
  std::vector<int32_t> cu;                     // [D + 1]
  std::vector<double> q, k, v, g, beta, init;  // init: [D, HV, dk, dv] or empty (zero initial states)
  int64_t state_size() const { return s.num_docs * s.hv * s.dk * s.dv; }
  const double* init_ptr() const { return init.empty() ? nullptr : init.data(); }
};

std::vector<int32_t> offsets(const std::vector<int32_t>& lengths) {
  std::vector<int32_t> cu = {0};
  for (int32_t len : lengths) cu.push_back(cu.back() + len);
  return cu;
}

// q and k are unit-norm per head (q then scaled by dk^-1/2) as the layer feeds them, so that the
// delta rule is a contraction and long documents stay bounded.
Problem make_problem(const std::vector<int32_t>& lengths, int64_t h, int64_t hv, int64_t dk, int64_t dv, bool initial,
                     Gates gates = Gates::mixed) {
  Problem p;
  p.cu = offsets(lengths);
  p.s.n = p.cu.back();
  p.s.num_docs = static_cast<int64_t>(lengths.size());
  p.s.h = h;
  p.s.hv = hv;
  p.s.dk = dk;
  p.s.dv = dv;
  p.q = randn_f64(p.s.n * h * dk);
  p.k = randn_f64(p.s.n * h * dk);
  for (int64_t row = 0; row < p.s.n * h; ++row) {
    double nq = 0, nk = 0;
    for (int64_t i = 0; i < dk; ++i) {
      nq += p.q[row * dk + i] * p.q[row * dk + i];
      nk += p.k[row * dk + i] * p.k[row * dk + i];
    }
    for (int64_t i = 0; i < dk; ++i) {
      p.q[row * dk + i] /= std::sqrt(nq * static_cast<double>(dk));
      p.k[row * dk + i] /= std::sqrt(nk);
    }
  }
  p.v = randn_f64(p.s.n * hv * dv);
  p.g.resize(p.s.n * hv * dk);
  for (double& x : p.g) {
    int kind = gates == Gates::near_zero ? 0 : gates == Gates::strong ? 2 : static_cast<int>(uniform(0, 3));
    x = kind == 0 ? -uniform(0, 1e-3) : kind == 1 ? -uniform(0, 2) : -uniform(5, 20);
  }
  p.beta.resize(p.s.n * hv);
  for (double& b : p.beta) {
    const int kind = static_cast<int>(uniform(0, 3));
    b = kind == 0 ? uniform(0, 1e-3) : kind == 1 ? 1 - uniform(0, 1e-3) : uniform(0, 1);
  }
  if (initial) p.init = randn_f64(p.state_size(), 0.5);
  return p;
}

struct Forward {
  std::vector<double> o, final_state;
};

Forward recurrent(const Problem& p) {
  Forward f{std::vector<double>(p.s.n * p.s.hv * p.s.dv, kNaN), std::vector<double>(p.state_size(), kNaN)};
  cpu::kda_recurrent_forward<double>(p.s, p.q.data(), p.k.data(), p.v.data(), p.g.data(), p.beta.data(), p.cu.data(),
                                     p.init_ptr(), f.o.data(), f.final_state.data());
  return f;
}

Forward chunked(const Problem& p, int64_t chunk) {
  Forward f{std::vector<double>(p.s.n * p.s.hv * p.s.dv, kNaN), std::vector<double>(p.state_size(), kNaN)};
  cpu::kda_chunk_forward<double>(p.s, p.q.data(), p.k.data(), p.v.data(), p.g.data(), p.beta.data(), p.cu.data(),
                                 p.init_ptr(), f.o.data(), f.final_state.data(), chunk);
  return f;
}

// The same computations with float inputs and outputs, returned in double.
std::vector<float> f32(const std::vector<double>& x) { return test::to_f32(x); }

Forward recurrent_f32(const Problem& p, bool chunk_form) {
  std::vector<float> q = f32(p.q), k = f32(p.k), v = f32(p.v), g = f32(p.g), beta = f32(p.beta), init = f32(p.init);
  std::vector<float> o(p.s.n * p.s.hv * p.s.dv, NAN), fin(p.state_size(), NAN);
  const float* init_ptr = init.empty() ? nullptr : init.data();
  if (chunk_form)
    cpu::kda_chunk_forward<float>(p.s, q.data(), k.data(), v.data(), g.data(), beta.data(), p.cu.data(), init_ptr,
                                  o.data(), fin.data(), 64);
  else
    cpu::kda_recurrent_forward<float>(p.s, q.data(), k.data(), v.data(), g.data(), beta.data(), p.cu.data(), init_ptr,
                                      o.data(), fin.data());
  return {test::to_f64(o), test::to_f64(fin)};
}

struct Grads {
  std::vector<double> dq, dk, dv, dg, dbeta, dinit;
};

// Backward for dout = w_o and dfinal_state = w_final (null when empty).
Grads backward(const Problem& p, const std::vector<double>& w_o, const std::vector<double>& w_final) {
  Grads d{std::vector<double>(p.q.size(), kNaN),    std::vector<double>(p.k.size(), kNaN),
          std::vector<double>(p.v.size(), kNaN),    std::vector<double>(p.g.size(), kNaN),
          std::vector<double>(p.beta.size(), kNaN), std::vector<double>(p.state_size(), kNaN)};
  cpu::kda_recurrent_backward<double>(p.s, p.q.data(), p.k.data(), p.v.data(), p.g.data(), p.beta.data(), p.cu.data(),
                                      p.init_ptr(), w_o.data(), w_final.empty() ? nullptr : w_final.data(), d.dq.data(),
                                      d.dk.data(), d.dv.data(), d.dg.data(), d.dbeta.data(), d.dinit.data());
  return d;
}

// L = <o, w_o> + <final_state, w_final> (the second term only when w_final is given).
double loss(const Problem& p, const std::vector<double>& w_o, const std::vector<double>& w_final) {
  const Forward f = recurrent(p);
  double l = 0;
  for (size_t x = 0; x < f.o.size(); ++x) l += f.o[x] * w_o[x];
  for (size_t x = 0; x < w_final.size(); ++x) l += f.final_state[x] * w_final[x];
  return l;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t x = 0; x < a.size(); ++x) s += a[x] * b[x];
  return s;
}

const std::vector<int32_t> kLengths = {1, 63, 0, 64, 65, 130};

TEST(KdaReference, ChunkFormEqualsRecurrence) {
  struct Case {
    int64_t h, hv, dk, dv;
    bool initial;
    Gates gates;
  };
  const Case cases[] = {{2, 4, 8, 6, true, Gates::mixed},
                        {1, 2, 5, 7, true, Gates::near_zero},
                        {2, 2, 6, 4, false, Gates::strong},
                        {1, 2, 16, 16, true, Gates::mixed}};
  for (const Case& c : cases) {
    const Problem p = make_problem(kLengths, c.h, c.hv, c.dk, c.dv, c.initial, c.gates);
    const Forward ref = recurrent(p);
    ASSERT_TRUE(test::all_finite(test::to_f32(ref.o)));
    for (int64_t chunk : {1, 5, 64}) {
      SCOPED_TRACE("h " + std::to_string(c.h) + " hv " + std::to_string(c.hv) + " dk " + std::to_string(c.dk) + " dv " +
                   std::to_string(c.dv) + " gates " + std::to_string(static_cast<int>(c.gates)) + " chunk " +
                   std::to_string(chunk));
      const Forward f = chunked(p, chunk);
      EXPECT_LT(rel_err(f.o, ref.o), 1e-12);
      EXPECT_LT(rel_err(f.final_state, ref.final_state), 1e-12);
    }
  }
}

// Independent of either implementation: one token from S_0 gives S_1 = Diag(a) S_0 + beta k (v - (Diag(a) S_0)^T k)^T
// and o = S_1^T q; an empty document passes its initial state through.
TEST(KdaReference, SingleTokenAndEmptyDocument) {
  const Problem p = make_problem({1, 0}, 1, 1, 3, 2, true);
  const Forward f = recurrent(p);
  const int64_t dk = 3, dv = 2;
  std::vector<double> sp(dk * dv), s1(dk * dv), o(dv, 0.0);
  for (int64_t i = 0; i < dk; ++i)
    for (int64_t j = 0; j < dv; ++j) sp[i * dv + j] = std::exp(p.g[i]) * p.init[i * dv + j];
  for (int64_t j = 0; j < dv; ++j) {
    double pred = 0;
    for (int64_t i = 0; i < dk; ++i) pred += sp[i * dv + j] * p.k[i];
    for (int64_t i = 0; i < dk; ++i) s1[i * dv + j] = sp[i * dv + j] + p.beta[0] * p.k[i] * (p.v[j] - pred);
    for (int64_t i = 0; i < dk; ++i) o[j] += s1[i * dv + j] * p.q[i];
  }
  EXPECT_LT(rel_err(f.o, o), 1e-14);
  EXPECT_LT(rel_err(std::vector<double>(f.final_state.begin(), f.final_state.begin() + dk * dv), s1), 1e-14);
  const std::vector<double> init1(p.init.begin() + dk * dv, p.init.end());
  EXPECT_EQ(std::vector<double>(f.final_state.begin() + dk * dv, f.final_state.end()), init1);
  const Forward c = chunked(p, 64);
  EXPECT_EQ(std::vector<double>(c.final_state.begin() + dk * dv, c.final_state.end()), init1);
}

TEST(KdaReference, FloatMatchesDouble) {
  const Problem p = make_problem(kLengths, 2, 4, 8, 6, true);
  const Forward ref = recurrent(p);
  for (bool chunk_form : {false, true}) {
    SCOPED_TRACE(chunk_form ? "chunk" : "recurrent");
    const Forward f = recurrent_f32(p, chunk_form);
    EXPECT_LT(rel_err(f.o, ref.o), 1e-5);
    EXPECT_LT(rel_err(f.final_state, ref.final_state), 1e-5);
  }
  // Backward in float against double.
  const std::vector<double> w_o = randn_f64(ref.o.size()), w_final = randn_f64(p.state_size());
  const Grads d = backward(p, w_o, w_final);
  std::vector<float> q = f32(p.q), k = f32(p.k), v = f32(p.v), g = f32(p.g), beta = f32(p.beta), init = f32(p.init),
                     dout = f32(w_o), dfin = f32(w_final);
  std::vector<float> dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN), dg(g.size(), NAN),
      dbeta(beta.size(), NAN), dinit(init.size(), NAN);
  cpu::kda_recurrent_backward<float>(p.s, q.data(), k.data(), v.data(), g.data(), beta.data(), p.cu.data(), init.data(),
                                     dout.data(), dfin.data(), dq.data(), dk.data(), dv.data(), dg.data(), dbeta.data(),
                                     dinit.data());
  EXPECT_LT(rel_err(test::to_f64(dq), d.dq), 1e-5);
  EXPECT_LT(rel_err(test::to_f64(dk), d.dk), 1e-5);
  EXPECT_LT(rel_err(test::to_f64(dv), d.dv), 1e-5);
  EXPECT_LT(rel_err(test::to_f64(dg), d.dg), 1e-5);
  EXPECT_LT(rel_err(test::to_f64(dbeta), d.dbeta), 1e-5);
  EXPECT_LT(rel_err(test::to_f64(dinit), d.dinit), 1e-5);
}

// Every gradient against central differences of L = <o, w_o> [+ <final_state, w_final>]. Documents
// of length 1, 5, 0 and 70 (the last crosses the backward's 64-token recomputation block); GQA.
void check_backward_fd(bool initial, bool with_dfinal) {
  Problem p = make_problem({1, 5, 0, 70}, 1, 2, 3, 2, true);
  if (!initial) std::fill(p.init.begin(), p.init.end(), 0.0);
  const std::vector<double> w_o = randn_f64(p.s.n * p.s.hv * p.s.dv);
  const std::vector<double> w_final = with_dfinal ? randn_f64(p.state_size()) : std::vector<double>{};
  Grads d;
  if (initial) {
    d = backward(p, w_o, w_final);
  } else {
    // Null initial state: the gradient of a zero initial state still comes back.
    Problem no_init = p;
    no_init.init.clear();
    d = backward(no_init, w_o, w_final);
  }
  const double h = 1e-5;
  auto L = [&] { return loss(p, w_o, w_final); };
  EXPECT_LT(rel_err(d.dq, central_differences(p.q, h, L)), 1e-6);
  EXPECT_LT(rel_err(d.dk, central_differences(p.k, h, L)), 1e-6);
  EXPECT_LT(rel_err(d.dv, central_differences(p.v, h, L)), 1e-6);
  EXPECT_LT(rel_err(d.dg, central_differences(p.g, h, L)), 1e-6);
  EXPECT_LT(rel_err(d.dbeta, central_differences(p.beta, h, L)), 1e-6);
  EXPECT_LT(rel_err(d.dinit, central_differences(p.init, h, L)), 1e-6);
}

TEST(KdaReference, BackwardMatchesFiniteDifferences) {
  {
    SCOPED_TRACE("initial state and dfinal_state");
    check_backward_fd(true, true);
  }
  {
    SCOPED_TRACE("no initial state, no dfinal_state");
    check_backward_fd(false, false);
  }
}

// A long document (many recomputation blocks) plus a short one: the directional derivative of L along
// a random direction of all inputs equals <gradient, direction>.
TEST(KdaReference, BackwardDirectionalDerivativeOnLongDocument) {
  Problem p = make_problem({3000, 200}, 1, 2, 4, 3, true, Gates::near_zero);
  for (double& g : p.g) g -= uniform(0, 0.05);  // memory over hundreds of tokens
  const std::vector<double> w_o = randn_f64(p.s.n * p.s.hv * p.s.dv), w_final = randn_f64(p.state_size());
  const Grads d = backward(p, w_o, w_final);
  std::vector<std::vector<double>*> inputs = {&p.q, &p.k, &p.v, &p.g, &p.beta, &p.init};
  const std::vector<const std::vector<double>*> grads = {&d.dq, &d.dk, &d.dv, &d.dg, &d.dbeta, &d.dinit};
  std::vector<std::vector<double>> dirs, keep;
  double analytic = 0;
  for (size_t x = 0; x < inputs.size(); ++x) {
    dirs.push_back(randn_f64(inputs[x]->size()));
    keep.push_back(*inputs[x]);
    analytic += dot(*grads[x], dirs.back());
  }
  auto shifted_loss = [&](double eps) {
    for (size_t x = 0; x < inputs.size(); ++x)
      for (size_t i = 0; i < keep[x].size(); ++i) (*inputs[x])[i] = keep[x][i] + eps * dirs[x][i];
    return loss(p, w_o, w_final);
  };
  const double eps = 1e-6;
  const double numeric = (shifted_loss(eps) - shifted_loss(-eps)) / (2 * eps);
  EXPECT_TRUE(std::isfinite(analytic));
  EXPECT_NEAR(numeric, analytic, 1e-6 * std::abs(analytic) + 1e-9);
}

struct Transition {
  std::vector<double> M, B;
};

Transition transition(const Problem& p) {
  Transition t{std::vector<double>(p.s.num_docs * p.s.hv * p.s.dk * p.s.dk, kNaN),
               std::vector<double>(p.state_size(), kNaN)};
  cpu::kda_transition<double>(p.s, p.k.data(), p.v.data(), p.g.data(), p.beta.data(), p.cu.data(), t.M.data(),
                              t.B.data());
  return t;
}

// Y = M X + B per (document, value head) slot; X, B, Y [slots, dk, dv], M [slots, dk, dk].
std::vector<double> apply_affine(const KdaDims& s, const std::vector<double>& M, const std::vector<double>& X,
                                 const std::vector<double>& B) {
  std::vector<double> Y(B);
  const int64_t slots = static_cast<int64_t>(B.size()) / (s.dk * s.dv);
  for (int64_t sl = 0; sl < slots; ++sl)
    for (int64_t i = 0; i < s.dk; ++i)
      for (int64_t c = 0; c < s.dk; ++c)
        for (int64_t j = 0; j < s.dv; ++j)
          Y[(sl * s.dk + i) * s.dv + j] += M[(sl * s.dk + i) * s.dk + c] * X[(sl * s.dk + c) * s.dv + j];
  return Y;
}

TEST(KdaReference, TransitionIsTheAffineStateMap) {
  const Problem p = make_problem(kLengths, 2, 4, 6, 5, true);
  const Transition t = transition(p);
  const Forward f = recurrent(p);
  EXPECT_LT(rel_err(apply_affine(p.s, t.M, p.init, t.B), f.final_state), 1e-12);
  // B alone is the final state from zero initial states.
  Problem zero = p;
  zero.init.clear();
  EXPECT_LT(rel_err(t.B, recurrent(zero).final_state), 1e-14);
  // The empty document (index 2): M = I, B = 0.
  const int64_t dk = p.s.dk, slot = 2 * p.s.hv * dk * dk;
  for (int64_t i = 0; i < dk; ++i)
    for (int64_t c = 0; c < dk; ++c) EXPECT_EQ(t.M[slot + i * dk + c], i == c ? 1.0 : 0.0);
  // Float agrees with double.
  std::vector<float> k = f32(p.k), v = f32(p.v), g = f32(p.g), beta = f32(p.beta), M(t.M.size(), NAN),
                     B(t.B.size(), NAN);
  cpu::kda_transition<float>(p.s, k.data(), v.data(), g.data(), beta.data(), p.cu.data(), M.data(), B.data());
  EXPECT_LT(rel_err(test::to_f64(M), t.M), 1e-5);
  EXPECT_LT(rel_err(test::to_f64(B), t.B), 1e-5);
}

// Split every document in two at a random point: (M2, B2) o (M1, B1) = (M2 M1, M2 B1 + B2) is the
// transition of the whole document, and running the first part, then the second from the first's
// final state, gives the whole document's outputs and final state.
TEST(KdaReference, TransitionComposesOverSplitDocuments) {
  const std::vector<int32_t> lengths = {2, 63, 64, 65, 130, 200};
  const Problem whole = make_problem(lengths, 1, 2, 5, 4, true);
  std::vector<int32_t> split_lengths;
  for (int32_t len : lengths) {
    const int32_t first = 1 + static_cast<int32_t>(uniform(0, len - 1));
    split_lengths.push_back(first);
    split_lengths.push_back(len - first);
  }
  Problem split = whole;
  split.cu = offsets(split_lengths);
  split.s.num_docs = static_cast<int64_t>(split_lengths.size());
  const int64_t dk = whole.s.dk, dv = whole.s.dv, hv = whole.s.hv, ms = dk * dk, bs = dk * dv;
  const Transition tw = transition(whole), ts = transition(split);
  for (size_t doc = 0; doc < lengths.size(); ++doc) {
    for (int64_t head = 0; head < hv; ++head) {
      const int64_t s1 = (2 * doc) * hv + head, s2 = (2 * doc + 1) * hv + head, sw = doc * hv + head;
      const std::vector<double> M1(ts.M.begin() + s1 * ms, ts.M.begin() + (s1 + 1) * ms),
          M2(ts.M.begin() + s2 * ms, ts.M.begin() + (s2 + 1) * ms),
          B1(ts.B.begin() + s1 * bs, ts.B.begin() + (s1 + 1) * bs),
          B2(ts.B.begin() + s2 * bs, ts.B.begin() + (s2 + 1) * bs);
      KdaDims sq = whole.s;
      sq.dv = dk;
      const std::vector<double> M21 = apply_affine(sq, M2, M1, std::vector<double>(ms, 0.0));
      const std::vector<double> B21 = apply_affine(whole.s, M2, B1, B2);
      EXPECT_LT(rel_err(M21, std::vector<double>(tw.M.begin() + sw * ms, tw.M.begin() + (sw + 1) * ms)), 1e-12);
      EXPECT_LT(rel_err(B21, std::vector<double>(tw.B.begin() + sw * bs, tw.B.begin() + (sw + 1) * bs)), 1e-12);
    }
  }
  // Run the first parts (from the documents' initial states), then the second parts from their final states.
  const Forward ref = recurrent(whole);
  split.init.assign(split.state_size(), 0.0);
  for (size_t doc = 0; doc < lengths.size(); ++doc)
    std::copy(whole.init.begin() + doc * hv * bs, whole.init.begin() + (doc + 1) * hv * bs,
              split.init.begin() + 2 * doc * hv * bs);
  const Forward first = recurrent(split);
  for (size_t doc = 0; doc < lengths.size(); ++doc)
    std::copy(first.final_state.begin() + 2 * doc * hv * bs, first.final_state.begin() + (2 * doc + 1) * hv * bs,
              split.init.begin() + (2 * doc + 1) * hv * bs);
  const Forward second = recurrent(split);
  std::vector<double> final_whole;
  for (size_t doc = 0; doc < lengths.size(); ++doc)
    final_whole.insert(final_whole.end(), second.final_state.begin() + (2 * doc + 1) * hv * bs,
                       second.final_state.begin() + (2 * doc + 2) * hv * bs);
  EXPECT_LT(rel_err(second.o, ref.o), 1e-12);
  EXPECT_LT(rel_err(final_whole, ref.final_state), 1e-12);
}

template <class T>
Tensor view(std::vector<T>& x, std::initializer_list<int64_t> dims) {
  return Tensor(x.data(), dtype_of<T>(), Device::cpu(), dims);
}
template <class T>
Tensor view(std::vector<T>& x) {
  return Tensor(x.data(), dtype_of<T>(), Device::cpu(), {static_cast<int64_t>(x.size())});
}

// The Tensor-level entry points on f32 and f64 CPU tensors reproduce the double references.
template <class T>
void check_dispatch(double tol) {
  Problem p = make_problem({3, 0, 70}, 1, 2, 4, 3, true);
  const KdaDims& s = p.s;
  const int64_t D = s.num_docs;
  auto conv = [](const std::vector<double>& x) { return std::vector<T>(x.begin(), x.end()); };
  auto back = [](const std::vector<T>& x) { return std::vector<double>(x.begin(), x.end()); };
  std::vector<T> q = conv(p.q), k = conv(p.k), v = conv(p.v), g = conv(p.g), beta = conv(p.beta), init = conv(p.init);
  std::vector<int32_t> cu = p.cu;
  const Tensor tq = view(q, {s.n, s.h, s.dk}), tk = view(k, {s.n, s.h, s.dk}), tv = view(v, {s.n, s.hv, s.dv}),
               tg = view(g, {s.n, s.hv, s.dk}), tb = view(beta, {s.n, s.hv}), tcu = view(cu),
               tinit = view(init, {D, s.hv, s.dk, s.dv});
  ExecContext ctx(Device::cpu());
  const T nan = std::numeric_limits<T>::quiet_NaN();

  std::vector<T> o(s.n * s.hv * s.dv, nan), fin(p.state_size(), nan);
  kda_forward(ctx, tq, tk, tv, tg, tb, tcu, tinit, view(o, {s.n, s.hv, s.dv}), view(fin, {D, s.hv, s.dk, s.dv}));
  const Forward ref = recurrent(p);
  EXPECT_LT(rel_err(back(o), ref.o), tol);
  EXPECT_LT(rel_err(back(fin), ref.final_state), tol);
  // Without initial and final states.
  Problem zero = p;
  zero.init.clear();
  std::fill(o.begin(), o.end(), nan);
  kda_forward(ctx, tq, tk, tv, tg, tb, tcu, Tensor{}, view(o, {s.n, s.hv, s.dv}), Tensor{});
  EXPECT_LT(rel_err(back(o), recurrent(zero).o), tol);

  const std::vector<double> w_o = randn_f64(ref.o.size()), w_final = randn_f64(p.state_size());
  const Grads d = backward(p, w_o, w_final);
  std::vector<T> dout = conv(w_o), dfin = conv(w_final), dq(q.size(), nan), dk(k.size(), nan), dv(v.size(), nan),
                 dg(g.size(), nan), dbeta(beta.size(), nan), dinit(init.size(), nan);
  kda_backward(ctx, tq, tk, tv, tg, tb, tcu, tinit, view(dout, {s.n, s.hv, s.dv}), view(dfin, {D, s.hv, s.dk, s.dv}),
               view(dq, {s.n, s.h, s.dk}), view(dk, {s.n, s.h, s.dk}), view(dv, {s.n, s.hv, s.dv}),
               view(dg, {s.n, s.hv, s.dk}), view(dbeta, {s.n, s.hv}), view(dinit, {D, s.hv, s.dk, s.dv}));
  EXPECT_LT(rel_err(back(dq), d.dq), tol);
  EXPECT_LT(rel_err(back(dk), d.dk), tol);
  EXPECT_LT(rel_err(back(dv), d.dv), tol);
  EXPECT_LT(rel_err(back(dg), d.dg), tol);
  EXPECT_LT(rel_err(back(dbeta), d.dbeta), tol);
  EXPECT_LT(rel_err(back(dinit), d.dinit), tol);
  // Optional state tensors left out.
  std::fill(dq.begin(), dq.end(), nan);
  kda_backward(ctx, tq, tk, tv, tg, tb, tcu, Tensor{}, view(dout, {s.n, s.hv, s.dv}), Tensor{},
               view(dq, {s.n, s.h, s.dk}), view(dk, {s.n, s.h, s.dk}), view(dv, {s.n, s.hv, s.dv}),
               view(dg, {s.n, s.hv, s.dk}), view(dbeta, {s.n, s.hv}), Tensor{});
  EXPECT_LT(rel_err(back(dq), backward(zero, w_o, {}).dq), tol);

  const Transition t = transition(p);
  std::vector<T> M(t.M.size(), nan), B(t.B.size(), nan);
  kda_transition(ctx, tk, tv, tg, tb, tcu, view(M, {D, s.hv, s.dk, s.dk}), view(B, {D, s.hv, s.dk, s.dv}));
  EXPECT_LT(rel_err(back(M), t.M), tol);
  EXPECT_LT(rel_err(back(B), t.B), tol);
}

TEST(KdaReference, DispatchersRunTheReferences) {
  {
    SCOPED_TRACE("f32");
    check_dispatch<float>(1e-5);
  }
  {
    SCOPED_TRACE("f64");
    check_dispatch<double>(1e-14);
  }
}

TEST(KdaReference, DispatchersRejectBadArguments) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 6, h = 1, hv = 2, dk = 4, dv = 3, D = 2;
  std::vector<float> q(n * 2 * dk), k(n * 2 * dk), v(n * 3 * dv), g(n * hv * dk), beta(n * hv), o(n * hv * dv),
      st(D * hv * dk * dv + 64), M(D * hv * dk * dk);
  std::vector<double> q64(q.size());
  std::vector<int32_t> cu = {0, 2, 6}, cu_short = {0, 2, 5}, cu_dec = {0, 4, 2, 6};
  const Tensor tq = view(q, {n, h, dk}), tk = view(k, {n, h, dk}), tv = view(v, {n, hv, dv}), tg = view(g, {n, hv, dk}),
               tb = view(beta, {n, hv}), tcu = view(cu), to = view(o, {n, hv, dv}), tst = view(st, {D, hv, dk, dv});
  auto fwd = [&](const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& g_, const Tensor& b_,
                 const Tensor& cu_, const Tensor& init_, const Tensor& o_, const Tensor& fin_) {
    return [=, &ctx] { kda_forward(ctx, q_, k_, v_, g_, b_, cu_, init_, o_, fin_); };
  };
  expect_error_naming(fwd(view(q, {n, h, dk + 1}), tk, tv, tg, tb, tcu, tst, to, tst), "kda_forward", "'q'");
  expect_error_naming(fwd(tq, view(k, {n, h}), tv, tg, tb, tcu, tst, to, tst), "kda_forward", "'k'");
  // 3 value heads over 2 q/k heads.
  expect_error_naming(fwd(view(q, {n, 2, dk}), view(k, {n, 2, dk}), view(v, {n, 3, dv}), tg, tb, tcu, tst, to, tst),
                      "kda_forward", "'v'");
  expect_error_naming(fwd(tq, tk, tv, view(g, {n, hv, dk - 1}), tb, tcu, tst, to, tst), "kda_forward", "'g'");
  expect_error_naming(fwd(tq, tk, tv, tg, view(beta, {n * hv}), tcu, tst, to, tst), "kda_forward", "'beta'");
  expect_error_naming(fwd(tq, tk, tv, tg, tb, view(cu_short), tst, to, tst), "kda_forward", "'cu_seqlens'");
  expect_error_naming(fwd(tq, tk, tv, tg, tb, view(cu_dec), view(st, {3, hv, dk, dv}), to, Tensor{}), "kda_forward",
                      "'cu_seqlens'");
  expect_error_naming(fwd(tq, tk, tv, tg, tb, view(g, {3}), tst, to, tst), "kda_forward", "'cu_seqlens'");
  expect_error_naming(fwd(tq, tk, tv, tg, tb, tcu, view(st, {D + 1, hv, dk, dv}), to, tst), "kda_forward",
                      "'initial_state'");
  expect_error_naming(fwd(tq, tk, tv, tg, tb, tcu, tst, view(o, {n, hv, dv - 1}), tst), "kda_forward", "'o'");
  expect_error_naming(fwd(tq, tk, tv, tg, tb, tcu, tst, to, view(st, {D, hv, dv, dk + 1})), "kda_forward",
                      "'final_state'");
  // dtypes: bf16 on the CPU, f64 mixed with f32.
  expect_error_naming(fwd(Tensor(q.data(), DType::bf16, Device::cpu(), {n, h, dk}), tk, tv, tg, tb, tcu, tst, to, tst),
                      "kda_forward", "'q'");
  expect_error_naming(fwd(view(q64, {n, h, dk}), tk, tv, tg, tb, tcu, tst, to, tst), "kda_forward", "'k'");
  expect_error_naming(fwd(tq, tk, tv, tg, Tensor(beta.data(), DType::i32, Device::cpu(), {n, hv}), tcu, tst, to, tst),
                      "kda_forward", "'beta'");

  std::vector<float> dq(q.size()), dk_(k.size()), dv_(v.size()), dg(g.size()), dbeta(beta.size());
  const Tensor tdv = view(dv_, {n, hv, dv});
  auto bwd = [&](const Tensor& dq_t, const Tensor& dk_t, const Tensor& dg_t, const Tensor& dbeta_t,
                 const Tensor& dfin_t, const Tensor& dinit_t) {
    return [=, &ctx] {
      kda_backward(ctx, tq, tk, tv, tg, tb, tcu, tst, to, dfin_t, dq_t, dk_t, tdv, dg_t, dbeta_t, dinit_t);
    };
  };
  const Tensor tdq = view(dq, {n, h, dk}), tdk = view(dk_, {n, h, dk}), tdg = view(dg, {n, hv, dk}),
               tdb = view(dbeta, {n, hv});
  expect_error_naming(bwd(view(dq, {n, hv, dk}), tdk, tdg, tdb, tst, tst), "kda_backward", "'dq'");
  expect_error_naming(bwd(tdq, view(dk_, {n, h, dk - 1}), tdg, tdb, tst, tst), "kda_backward", "'dk'");
  expect_error_naming(bwd(tdq, tdk, view(dg, {n, h, dk}), tdb, tst, tst), "kda_backward", "'dg'");
  expect_error_naming(bwd(tdq, tdk, tdg, view(dbeta, {n, hv, 1}), tst, tst), "kda_backward", "'dbeta'");
  expect_error_naming(bwd(tdq, tdk, tdg, tdb, view(st, {D, hv, dk, dv + 1}), tst), "kda_backward", "'dfinal_state'");
  expect_error_naming(bwd(tdq, tdk, tdg, tdb, tst, view(st, {D, hv + 1, dk, dv})), "kda_backward", "'dinitial_state'");
  expect_error_naming(
      [&] {
        kda_backward(ctx, tq, tk, tv, tg, tb, tcu, tst, view(o, {n, hv, dv + 1}), tst, tdq, tdk, view(dv_, {n, hv, dv}),
                     tdg, tdb, tst);
      },
      "kda_backward", "'dout'");
  expect_error_naming(
      [&] {
        kda_backward(ctx, tq, tk, tv, tg, tb, tcu, tst, to, tst, tdq, tdk, view(dv_, {n, h, dv}), tdg, tdb, tst);
      },
      "kda_backward", "'dv'");

  expect_error_naming(
      [&] {
        kda_transition(ctx, tk, tv, tg, tb, tcu, view(M, {D, hv, dk, dv}), tst);
      },
      "kda_transition", "'M'");
  expect_error_naming(
      [&] {
        kda_transition(ctx, tk, tv, tg, tb, tcu, view(M, {D, hv, dk, dk}), view(st, {D, hv, dk, dk}));
      },
      "kda_transition", "'B'");
  expect_error_naming(
      [&] {
        kda_transition(ctx, tk, tv, tg, view(beta, {n, h}), tcu, view(M, {D, hv, dk, dk}), tst);
      },
      "kda_transition", "'beta'");

  // A CUDA tensor: mixed with CPU tensors, and (all on CUDA) with a CPU context or in a CPU-only build.
  const Device gpu = Device::cuda(0);
  test::expect_error(fwd(tq, tk, tv, tg, tb, tcu, tst, Tensor(o.data(), DType::f32, gpu, {n, hv, dv}), tst),
                     {"kda_forward", "'o'", "different devices"});
  const Tensor gq(q.data(), DType::bf16, gpu, {n, h, dk}), gk(k.data(), DType::bf16, gpu, {n, h, dk}),
      gv(v.data(), DType::bf16, gpu, {n, hv, dv}), gg(g.data(), DType::f32, gpu, {n, hv, dk}),
      gb(beta.data(), DType::f32, gpu, {n, hv}), gcu(cu.data(), DType::i32, gpu, {3}),
      go(o.data(), DType::bf16, gpu, {n, hv, dv}), gst(st.data(), DType::f32, gpu, {D, hv, dk, dv});
  expect_error_naming(fwd(gq, gk, gv, gg, gb, gcu, gst, go, gst), "kda_forward", "cuda");
  expect_error_naming(fwd(gq, gk, gv, gg, gb, gcu, gst, go, Tensor(st.data(), DType::bf16, gpu, {D, hv, dk, dv})),
                      "kda_forward", "'final_state'");
  expect_error_naming(
      [&] {
        kda_transition(ctx, gk, gv, gg, gb, gcu, Tensor(M.data(), DType::f32, gpu, {D, hv, dk, dk}), gst);
      },
      "kda_transition", "cuda");
}

}  // namespace
}  // namespace hyd::kernels

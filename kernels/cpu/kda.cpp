// CPU references for the KDA core (kernels/kda.h, ../shared/KDA.md). Plain loops per document and
// value head; every state, sum and intermediate is held in double whatever T is, so the float
// instantiation differs from the double one only by the rounding of inputs and outputs.
//
// Notation (KDA.md), one document, one value head hv (q/k head h = hv / (HV / H)), token t:
//   a_t = exp(g_t) (per channel i of d_k)
//   S'_t = Diag(a_t) S_{t-1}
//   p_t = S'_t^T k_t,   e_t = v_t - p_t                       (prediction and its error, d_v)
//   S_t = S'_t + beta_t k_t e_t^T
//   o_t = S_t^T q_t
//
// Backward (reverse-time adjoint). Write dX for dL/dX. Start with dS_T = dfinal_state (or 0) and go
// t = T..1, with dS_t the adjoint of S_t accumulated from the later tokens:
//   o_t = S_t^T q_t          =>  dS_t += q_t do_t^T,         dq_t = S_t do_t
//   S_t = S'_t + beta k e^T  =>  dbeta_t = k_t^T dS_t e_t,   dk_t += beta_t dS_t e_t,
//                                de_t = beta_t dS_t^T k_t,   dS'_t = dS_t (direct part)
//   e_t = v_t - p_t          =>  dv_t = de_t,                dp_t = -de_t
//   p_t = S'_t^T k_t         =>  dS'_t += k_t dp_t^T,        dk_t += S'_t dp_t
//   S'_t = Diag(a_t) S_{t-1} =>  dS_{t-1} = Diag(a_t) dS'_t,
//                                dg_t[i] = a_t[i] sum_j dS'_t[i,j] S_{t-1}[i,j] = sum_j dS'_t[i,j] S'_t[i,j]
// and dinitial_state = dS_0. dq and dk of a q/k head sum over the value heads of its group.
// The states S_{t-1} are recomputed: the forward pass keeps the state entering every block of
// kBackwardBlock tokens, and each block is replayed (block + 1 states) before its reverse sweep, so
// memory is O((T / block + block) d_k d_v) per (document, head) and long documents are fine.
//
// Chunked forward (KDA.md "Chunkwise form"), chunk rows r, c in [0, L), L <= C (the last chunk of a
// document may be shorter), G_r = sum of g over rows 0..r of the chunk:
//   A[r,c] = beta_r sum_i k_r[i] k_c[i] exp(G_r[i] - G_c[i])   (c < r)
//   (I + A) T = Diag(beta)  by forward substitution; w = T (exp(G) * k), u = T v
//   v_new = u - w S;  o = (q * exp(G)) S + Aqk v_new,  Aqk[r,c] = sum_i q_r[i] k_c[i] exp(G_r[i] - G_c[i]) (c <= r)
//   S <- Diag(exp(G_last)) S + (exp(G_last - G) * k)^T v_new
// Every exponent is a difference G_r - G_c with c <= r (or G itself), i.e. a sum of g <= 0: no overflow,
// and underflow only where the true factor is below the double range.
//
// Transition: per token M <- (I - beta k k^T) Diag(a) M (starting from I) and B follows the recurrence
// from a zero state, so that S_out = M S_in + B.
#include "kernels/kda.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace hyd::kernels::cpu {

namespace {

constexpr int64_t kBackwardBlock = 64;

void check_dims(const KdaDims& s, const int32_t* cu, const char* op) {
  HYD_CHECK(s.h > 0 && s.hv > 0 && s.hv % s.h == 0, op, ": ", s.hv, " value heads are not a multiple of the ", s.h,
            " q/k heads");
  HYD_CHECK(s.dk > 0 && s.dv > 0, op, ": head dims must be positive (dk ", s.dk, ", dv ", s.dv, ")");
  HYD_CHECK(s.num_docs >= 0 && cu[0] == 0, op, ": argument 'cu_seqlens' must start at 0");
  for (int64_t d = 0; d < s.num_docs; ++d)
    HYD_CHECK(cu[d + 1] >= cu[d], op, ": argument 'cu_seqlens' is not non-decreasing at document ", d);
  HYD_CHECK(cu[s.num_docs] == s.n, op, ": argument 'cu_seqlens' ends at ", cu[s.num_docs],
            ", expected the token count ", s.n);
}

// Pointers to one token's inputs for value head hv.
template <class T>
struct TokenInputs {
  const T* q;  // [dk] (may be null where not needed)
  const T* k;  // [dk]
  const T* v;  // [dv]
  const T* g;  // [dk]
  double beta;
};

template <class T>
TokenInputs<T> token(const KdaDims& s, const T* q, const T* k, const T* v, const T* g, const T* beta, int64_t t,
                     int64_t hv) {
  const int64_t h = hv / (s.hv / s.h);
  return {q ? q + (t * s.h + h) * s.dk : nullptr, k + (t * s.h + h) * s.dk, v + (t * s.hv + hv) * s.dv,
          g + (t * s.hv + hv) * s.dk, static_cast<double>(beta[t * s.hv + hv])};
}

// One step of the recurrence in place: S <- S_t from S_{t-1}. `p` is scratch [dv].
template <class T>
void delta_step(const KdaDims& s, const TokenInputs<T>& in, double* S, double* p) {
  const int64_t dk = s.dk, dv = s.dv;
  std::fill(p, p + dv, 0.0);
  for (int64_t i = 0; i < dk; ++i) {
    const double a = std::exp(static_cast<double>(in.g[i])), ki = static_cast<double>(in.k[i]);
    double* row = S + i * dv;
    for (int64_t j = 0; j < dv; ++j) {
      row[j] *= a;
      p[j] += ki * row[j];
    }
  }
  for (int64_t j = 0; j < dv; ++j) p[j] = in.beta * (static_cast<double>(in.v[j]) - p[j]);
  for (int64_t i = 0; i < dk; ++i) {
    const double ki = static_cast<double>(in.k[i]);
    double* row = S + i * dv;
    for (int64_t j = 0; j < dv; ++j) row[j] += ki * p[j];
  }
}

template <class T>
void load_state(const T* src, int64_t count, std::vector<double>& S) {
  S.assign(static_cast<size_t>(count), 0.0);
  if (src)
    for (int64_t x = 0; x < count; ++x) S[x] = static_cast<double>(src[x]);
}

template <class T>
void store_state(const std::vector<double>& S, T* dst) {
  if (dst)
    for (size_t x = 0; x < S.size(); ++x) dst[x] = static_cast<T>(S[x]);
}

}  // namespace

template <class T>
void kda_recurrent_forward(const KdaDims& s, const T* q, const T* k, const T* v, const T* g, const T* beta,
                           const int32_t* cu_seqlens, const T* initial_state, T* o, T* final_state) {
  check_dims(s, cu_seqlens, "kda_recurrent_forward");
  const int64_t dk = s.dk, dv = s.dv, state = dk * dv;
  std::vector<double> S, p(static_cast<size_t>(dv));
  for (int64_t doc = 0; doc < s.num_docs; ++doc) {
    for (int64_t hv = 0; hv < s.hv; ++hv) {
      const int64_t slot = (doc * s.hv + hv) * state;
      load_state(initial_state ? initial_state + slot : nullptr, state, S);
      for (int64_t t = cu_seqlens[doc]; t < cu_seqlens[doc + 1]; ++t) {
        const TokenInputs<T> in = token(s, q, k, v, g, beta, t, hv);
        delta_step(s, in, S.data(), p.data());
        T* ot = o + (t * s.hv + hv) * dv;
        std::fill(p.begin(), p.end(), 0.0);
        for (int64_t i = 0; i < dk; ++i) {
          const double qi = static_cast<double>(in.q[i]);
          for (int64_t j = 0; j < dv; ++j) p[j] += qi * S[i * dv + j];
        }
        for (int64_t j = 0; j < dv; ++j) ot[j] = static_cast<T>(p[j]);
      }
      store_state(S, final_state ? final_state + slot : nullptr);
    }
  }
}

template <class T>
void kda_chunk_forward(const KdaDims& s, const T* q, const T* k, const T* v, const T* g, const T* beta,
                       const int32_t* cu_seqlens, const T* initial_state, T* o, T* final_state, int64_t chunk) {
  check_dims(s, cu_seqlens, "kda_chunk_forward");
  HYD_CHECK(chunk >= 1, "kda_chunk_forward: chunk size must be >= 1, got ", chunk);
  const int64_t dk = s.dk, dv = s.dv, state = dk * dv, C = chunk;
  // Per-chunk scratch, rows r of the chunk: G [C x dk], A/Tm/Aqk [C x C], w [C x dk], u/vnew [C x dv].
  std::vector<double> S, G(C * dk), A(C * C), Tm(C * C), Aqk(C * C), w(C * dk), u(C * dv), vnew(C * dv), row(dv);
  for (int64_t doc = 0; doc < s.num_docs; ++doc) {
    const int64_t begin = cu_seqlens[doc], end = cu_seqlens[doc + 1];
    for (int64_t hv = 0; hv < s.hv; ++hv) {
      const int64_t slot = (doc * s.hv + hv) * state;
      load_state(initial_state ? initial_state + slot : nullptr, state, S);
      for (int64_t c0 = begin; c0 < end; c0 += C) {
        const int64_t L = std::min(C, end - c0);
        auto in = [&](int64_t r) { return token(s, q, k, v, g, beta, c0 + r, hv); };
        // Cumulative log-decay per channel.
        for (int64_t r = 0; r < L; ++r) {
          const TokenInputs<T> x = in(r);
          for (int64_t i = 0; i < dk; ++i)
            G[r * dk + i] = (r ? G[(r - 1) * dk + i] : 0.0) + static_cast<double>(x.g[i]);
        }
        // A (strictly lower) and Aqk (lower, diagonal included): decay-weighted products.
        for (int64_t r = 0; r < L; ++r) {
          const TokenInputs<T> xr = in(r);
          for (int64_t c = 0; c <= r; ++c) {
            const TokenInputs<T> xc = in(c);
            double kk = 0, qk = 0;
            for (int64_t i = 0; i < dk; ++i) {
              const double decay = std::exp(G[r * dk + i] - G[c * dk + i]);
              const double kc = static_cast<double>(xc.k[i]) * decay;
              kk += static_cast<double>(xr.k[i]) * kc;
              qk += static_cast<double>(xr.q[i]) * kc;
            }
            A[r * C + c] = c < r ? xr.beta * kk : 0.0;
            Aqk[r * C + c] = qk;
          }
        }
        // T = (I + A)^-1 Diag(beta), row by row (T is lower triangular).
        for (int64_t r = 0; r < L; ++r) {
          for (int64_t c = 0; c <= r; ++c) {
            double x = c == r ? in(r).beta : 0.0;
            for (int64_t m = c; m < r; ++m) x -= A[r * C + m] * Tm[m * C + c];
            Tm[r * C + c] = x;
          }
        }
        // w = T (exp(G) * k), u = T v.
        for (int64_t r = 0; r < L; ++r) {
          std::fill(w.begin() + r * dk, w.begin() + (r + 1) * dk, 0.0);
          std::fill(u.begin() + r * dv, u.begin() + (r + 1) * dv, 0.0);
          for (int64_t c = 0; c <= r; ++c) {
            const TokenInputs<T> xc = in(c);
            const double t_rc = Tm[r * C + c];
            for (int64_t i = 0; i < dk; ++i)
              w[r * dk + i] += t_rc * std::exp(G[c * dk + i]) * static_cast<double>(xc.k[i]);
            for (int64_t j = 0; j < dv; ++j) u[r * dv + j] += t_rc * static_cast<double>(xc.v[j]);
          }
        }
        // v_new = u - w S.
        for (int64_t r = 0; r < L; ++r)
          for (int64_t j = 0; j < dv; ++j) {
            double ws = 0;
            for (int64_t i = 0; i < dk; ++i) ws += w[r * dk + i] * S[i * dv + j];
            vnew[r * dv + j] = u[r * dv + j] - ws;
          }
        // o = (q * exp(G)) S + Aqk v_new.
        for (int64_t r = 0; r < L; ++r) {
          const TokenInputs<T> xr = in(r);
          std::fill(row.begin(), row.end(), 0.0);
          for (int64_t i = 0; i < dk; ++i) {
            const double qg = static_cast<double>(xr.q[i]) * std::exp(G[r * dk + i]);
            for (int64_t j = 0; j < dv; ++j) row[j] += qg * S[i * dv + j];
          }
          for (int64_t c = 0; c <= r; ++c)
            for (int64_t j = 0; j < dv; ++j) row[j] += Aqk[r * C + c] * vnew[c * dv + j];
          T* ot = o + ((c0 + r) * s.hv + hv) * dv;
          for (int64_t j = 0; j < dv; ++j) ot[j] = static_cast<T>(row[j]);
        }
        // S <- Diag(exp(G_last)) S + (exp(G_last - G) * k)^T v_new.
        const double* Glast = G.data() + (L - 1) * dk;
        for (int64_t i = 0; i < dk; ++i) {
          const double a = std::exp(Glast[i]);
          for (int64_t j = 0; j < dv; ++j) S[i * dv + j] *= a;
        }
        for (int64_t c = 0; c < L; ++c) {
          const TokenInputs<T> xc = in(c);
          for (int64_t i = 0; i < dk; ++i) {
            const double kd = std::exp(Glast[i] - G[c * dk + i]) * static_cast<double>(xc.k[i]);
            for (int64_t j = 0; j < dv; ++j) S[i * dv + j] += kd * vnew[c * dv + j];
          }
        }
      }
      store_state(S, final_state ? final_state + slot : nullptr);
    }
  }
}

template <class T>
void kda_recurrent_backward(const KdaDims& s, const T* q, const T* k, const T* v, const T* g, const T* beta,
                            const int32_t* cu_seqlens, const T* initial_state, const T* dout, const T* dfinal_state,
                            T* dq, T* dk, T* dv, T* dg, T* dbeta, T* dinitial_state) {
  check_dims(s, cu_seqlens, "kda_recurrent_backward");
  const int64_t Dk = s.dk, Dv = s.dv, state = Dk * Dv, group = s.hv / s.h;
  // q/k gradients sum over the value heads of a group: accumulate in double, write at the end.
  std::vector<double> dq_acc(static_cast<size_t>(s.n * s.h * Dk), 0.0), dk_acc(dq_acc.size(), 0.0);
  std::vector<double> S, dS, checkpoints, states, Sp(state), p(Dv), e(Dv), de(Dv), Se(Dk);
  for (int64_t doc = 0; doc < s.num_docs; ++doc) {
    const int64_t begin = cu_seqlens[doc], len = cu_seqlens[doc + 1] - begin;
    const int64_t blocks = (len + kBackwardBlock - 1) / kBackwardBlock;
    for (int64_t hv = 0; hv < s.hv; ++hv) {
      const int64_t slot = (doc * s.hv + hv) * state, h = hv / group;
      // Forward: the state entering every block.
      load_state(initial_state ? initial_state + slot : nullptr, state, S);
      checkpoints.resize(static_cast<size_t>(blocks * state));
      for (int64_t b = 0; b < blocks; ++b) {
        std::copy(S.begin(), S.end(), checkpoints.begin() + b * state);
        const int64_t t1 = begin + std::min(len, (b + 1) * kBackwardBlock);
        for (int64_t t = begin + b * kBackwardBlock; t < t1; ++t)
          delta_step(s, token(s, q, k, v, g, beta, t, hv), S.data(), p.data());
      }
      load_state(dfinal_state ? dfinal_state + slot : nullptr, state, dS);
      for (int64_t b = blocks - 1; b >= 0; --b) {
        const int64_t t0 = begin + b * kBackwardBlock, L = std::min(len - b * kBackwardBlock, kBackwardBlock);
        // states[r] = S entering token t0 + r; states[L] = S after the block.
        states.resize(static_cast<size_t>((L + 1) * state));
        std::copy(checkpoints.begin() + b * state, checkpoints.begin() + (b + 1) * state, states.begin());
        for (int64_t r = 0; r < L; ++r) {
          std::copy(states.begin() + r * state, states.begin() + (r + 1) * state, states.begin() + (r + 1) * state);
          delta_step(s, token(s, q, k, v, g, beta, t0 + r, hv), states.data() + (r + 1) * state, p.data());
        }
        for (int64_t r = L - 1; r >= 0; --r) {
          const int64_t t = t0 + r;
          const TokenInputs<T> in = token(s, q, k, v, g, beta, t, hv);
          const double* Sprev = states.data() + r * state;
          const double* St = states.data() + (r + 1) * state;
          const T* dot = dout + (t * s.hv + hv) * Dv;
          // Recompute S' = Diag(a) S_{t-1}, p = S'^T k, e = v - p.
          std::fill(p.begin(), p.end(), 0.0);
          for (int64_t i = 0; i < Dk; ++i) {
            const double a = std::exp(static_cast<double>(in.g[i])), ki = static_cast<double>(in.k[i]);
            for (int64_t j = 0; j < Dv; ++j) {
              Sp[i * Dv + j] = a * Sprev[i * Dv + j];
              p[j] += ki * Sp[i * Dv + j];
            }
          }
          for (int64_t j = 0; j < Dv; ++j) e[j] = static_cast<double>(in.v[j]) - p[j];
          // o_t = S_t^T q_t.
          double* dqt = dq_acc.data() + (t * s.h + h) * Dk;
          for (int64_t i = 0; i < Dk; ++i) {
            const double qi = static_cast<double>(in.q[i]);
            double acc = 0;
            for (int64_t j = 0; j < Dv; ++j) {
              const double doj = static_cast<double>(dot[j]);
              acc += St[i * Dv + j] * doj;
              dS[i * Dv + j] += qi * doj;
            }
            dqt[i] += acc;
          }
          // S_t = S' + beta k e^T.
          double db = 0;
          std::fill(de.begin(), de.end(), 0.0);
          for (int64_t i = 0; i < Dk; ++i) {
            const double ki = static_cast<double>(in.k[i]);
            double se = 0;
            for (int64_t j = 0; j < Dv; ++j) {
              se += dS[i * Dv + j] * e[j];
              de[j] += dS[i * Dv + j] * ki;
            }
            Se[i] = se;
            db += ki * se;
          }
          for (int64_t j = 0; j < Dv; ++j) de[j] *= in.beta;
          dbeta[t * s.hv + hv] = static_cast<T>(db);
          T* dvt = dv + (t * s.hv + hv) * Dv;
          for (int64_t j = 0; j < Dv; ++j) dvt[j] = static_cast<T>(de[j]);
          // p = S'^T k with dp = -de; then S' = Diag(a) S_{t-1}.
          double* dkt = dk_acc.data() + (t * s.h + h) * Dk;
          T* dgt = dg + (t * s.hv + hv) * Dk;
          for (int64_t i = 0; i < Dk; ++i) {
            const double ki = static_cast<double>(in.k[i]), a = std::exp(static_cast<double>(in.g[i]));
            double spde = 0, dga = 0;
            for (int64_t j = 0; j < Dv; ++j) {
              const double dsp = dS[i * Dv + j] - ki * de[j];  // dS'
              spde += Sp[i * Dv + j] * de[j];
              dga += dsp * Sp[i * Dv + j];
              dS[i * Dv + j] = a * dsp;  // dS_{t-1}
            }
            dkt[i] += in.beta * Se[i] - spde;
            dgt[i] = static_cast<T>(dga);
          }
        }
      }
      store_state(dS, dinitial_state ? dinitial_state + slot : nullptr);
    }
  }
  for (size_t x = 0; x < dq_acc.size(); ++x) {
    dq[x] = static_cast<T>(dq_acc[x]);
    dk[x] = static_cast<T>(dk_acc[x]);
  }
}

template <class T>
void kda_transition(const KdaDims& s, const T* k, const T* v, const T* g, const T* beta, const int32_t* cu_seqlens,
                    T* M, T* B) {
  check_dims(s, cu_seqlens, "kda_transition");
  const int64_t dk = s.dk, dv = s.dv;
  std::vector<double> Mt(dk * dk), Bt(dk * dv), km(dk), p(dv);
  for (int64_t doc = 0; doc < s.num_docs; ++doc) {
    for (int64_t hv = 0; hv < s.hv; ++hv) {
      std::fill(Mt.begin(), Mt.end(), 0.0);
      for (int64_t i = 0; i < dk; ++i) Mt[i * dk + i] = 1.0;
      std::fill(Bt.begin(), Bt.end(), 0.0);
      for (int64_t t = cu_seqlens[doc]; t < cu_seqlens[doc + 1]; ++t) {
        const TokenInputs<T> in = token<T>(s, nullptr, k, v, g, beta, t, hv);
        // M <- (I - beta k k^T) Diag(a) M.
        std::fill(km.begin(), km.end(), 0.0);
        for (int64_t i = 0; i < dk; ++i) {
          const double a = std::exp(static_cast<double>(in.g[i])), ki = static_cast<double>(in.k[i]);
          for (int64_t c = 0; c < dk; ++c) {
            Mt[i * dk + c] *= a;
            km[c] += ki * Mt[i * dk + c];
          }
        }
        for (int64_t i = 0; i < dk; ++i) {
          const double bk = in.beta * static_cast<double>(in.k[i]);
          for (int64_t c = 0; c < dk; ++c) Mt[i * dk + c] -= bk * km[c];
        }
        delta_step(s, in, Bt.data(), p.data());
      }
      const int64_t slot = doc * s.hv + hv;
      for (int64_t x = 0; x < dk * dk; ++x) M[slot * dk * dk + x] = static_cast<T>(Mt[x]);
      for (int64_t x = 0; x < dk * dv; ++x) B[slot * dk * dv + x] = static_cast<T>(Bt[x]);
    }
  }
}

template void kda_recurrent_forward<float>(const KdaDims&, const float*, const float*, const float*, const float*,
                                           const float*, const int32_t*, const float*, float*, float*);
template void kda_chunk_forward<float>(const KdaDims&, const float*, const float*, const float*, const float*,
                                       const float*, const int32_t*, const float*, float*, float*, int64_t);
template void kda_recurrent_backward<float>(const KdaDims&, const float*, const float*, const float*, const float*,
                                            const float*, const int32_t*, const float*, const float*, const float*,
                                            float*, float*, float*, float*, float*, float*);
template void kda_transition<float>(const KdaDims&, const float*, const float*, const float*, const float*,
                                    const int32_t*, float*, float*);
template void kda_recurrent_forward<double>(const KdaDims&, const double*, const double*, const double*, const double*,
                                            const double*, const int32_t*, const double*, double*, double*);
template void kda_chunk_forward<double>(const KdaDims&, const double*, const double*, const double*, const double*,
                                        const double*, const int32_t*, const double*, double*, double*, int64_t);
template void kda_recurrent_backward<double>(const KdaDims&, const double*, const double*, const double*, const double*,
                                             const double*, const int32_t*, const double*, const double*, const double*,
                                             double*, double*, double*, double*, double*, double*);
template void kda_transition<double>(const KdaDims&, const double*, const double*, const double*, const double*,
                                     const int32_t*, double*, double*);

}  // namespace hyd::kernels::cpu

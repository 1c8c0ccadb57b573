// Dispatchers for the KDA core (see kernels/kda.h): argument validation naming the op and the
// argument, then the CPU reference (f32 -> cpu::<float>, f64 -> cpu::<double>; the forward is the
// token-by-token recurrence, the definition) or the CUDA kernels, chosen by the tensors' device.
// cu_seqlens contents are checked here for CPU tensors; on CUDA they live on the device and are
// trusted (the batch builder checks them on the host before upload).
#include "kernels/kda.h"

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

// Validates one op's arguments against the sizes read from the leading tensors. CPU: every floating
// tensor has the dtype of the first one (f32, or f64 for finite-difference harnesses). CUDA:
// activations (q, k, v, o, dout, dq, dk, dv) bf16; gates, states and their gradients f32.
class KdaArgs {
 public:
  KdaArgs(const char* op, const Tensor& lead, const char* lead_name) : op_(op), lead_(lead) {
    if (lead.device.is_cpu()) {
      if (lead.dtype != DType::f32 && lead.dtype != DType::f64)
        HYD_THROW(op, ": argument '", lead_name, "' has dtype ", dtype_name(lead.dtype),
                  ", expected f32 or f64 on the CPU");
      activation_ = state_ = lead.dtype;
    } else {
      activation_ = DType::bf16;
      state_ = DType::f32;
    }
  }

  void activation(const Tensor& t, std::initializer_list<int64_t> dims, const char* name) const {
    check(t, dims, activation_, name);
  }
  void state(const Tensor& t, std::initializer_list<int64_t> dims, const char* name) const {
    check(t, dims, state_, name);
  }
  // Optional tensors (initial/final states and their gradients) may be empty.
  void optional_state(const Tensor& t, std::initializer_list<int64_t> dims, const char* name) const {
    if (!t.empty()) check(t, dims, state_, name);
  }
  // Offsets of the documents: i32 [D + 1], 0 = cu[0] <= cu[1] <= ... <= cu[D] = n (contents checked on the CPU only).
  void cu_seqlens(const Tensor& t, int64_t n) const {
    expect_shape(t, {-1}, op_, "cu_seqlens");
    if (t.shape[0] < 1) HYD_THROW(op_, ": argument 'cu_seqlens' is empty, expected [num_docs + 1]");
    expect_dtype(t, DType::i32, op_, "cu_seqlens");
    same_device(t, "cu_seqlens");
    if (!t.device.is_cpu()) return;
    const int32_t* cu = t.ptr<int32_t>();
    const int64_t docs = t.shape[0] - 1;
    if (cu[0] != 0) HYD_THROW(op_, ": argument 'cu_seqlens' starts at ", cu[0], ", expected 0");
    for (int64_t d = 0; d < docs; ++d)
      if (cu[d + 1] < cu[d]) HYD_THROW(op_, ": argument 'cu_seqlens' decreases after document ", d);
    if (cu[docs] != n) HYD_THROW(op_, ": argument 'cu_seqlens' ends at ", cu[docs], ", expected the token count ", n);
  }

 private:
  void check(const Tensor& t, std::initializer_list<int64_t> dims, DType dtype, const char* name) const {
    expect_shape(t, dims, op_, name);
    expect_dtype(t, dtype, op_, name);
    same_device(t, name);
  }
  void same_device(const Tensor& t, const char* name) const {
    if (!(t.device == lead_.device))
      HYD_THROW(op_, ": argument '", name, "' is on ", t.device.str(), " but the other tensors are on ",
                lead_.device.str(), " (tensors on different devices)");
  }

  const char* op_;
  const Tensor& lead_;
  DType activation_, state_;
};

// Sizes from q/k [N, H, dk], v [N, HV, dv] (or, for the transition, k and v alone) and cu_seqlens.
KdaDims read_dims(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens, const char* op) {
  expect_shape(k, {-1, -1, -1}, op, "k");
  KdaDims s;
  s.n = k.shape[0];
  s.h = k.shape[1];
  s.dk = k.shape[2];
  expect_shape(v, {s.n, -1, -1}, op, "v");
  s.hv = v.shape[1];
  s.dv = v.shape[2];
  if (s.h == 0 || s.hv % s.h != 0 || s.hv == 0)
    HYD_THROW(op, ": argument 'v' has ", s.hv, " value heads, which must be a positive multiple of the ", s.h,
              " q/k heads of 'k'");
  if (s.dk == 0 || s.dv == 0) HYD_THROW(op, ": head dims of 'k' (", s.dk, ") and 'v' (", s.dv, ") must be positive");
  expect_shape(cu_seqlens, {-1}, op, "cu_seqlens");
  s.num_docs = cu_seqlens.shape[0] - 1;
  return s;
}

// Arguments shared by forward and backward.
void check_inputs(const KdaArgs& a, const KdaDims& s, const Tensor& q, const Tensor& k, const Tensor& v,
                  const Tensor& g, const Tensor& beta, const Tensor& cu_seqlens, const Tensor& initial_state) {
  a.activation(q, {s.n, s.h, s.dk}, "q");
  a.activation(k, {s.n, s.h, s.dk}, "k");
  a.activation(v, {s.n, s.hv, s.dv}, "v");
  a.state(g, {s.n, s.hv, s.dk}, "g");
  a.state(beta, {s.n, s.hv}, "beta");
  a.cu_seqlens(cu_seqlens, s.n);
  a.optional_state(initial_state, {s.num_docs, s.hv, s.dk, s.dv}, "initial_state");
}

// The backward's output-gradient input and gradient outputs (kda_backward, kda_backward_saved).
void check_gradients(const KdaArgs& a, const KdaDims& s, const Tensor& dout, const Tensor& dfinal_state,
                     const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dg, const Tensor& dbeta,
                     const Tensor& dinitial_state) {
  a.activation(dout, {s.n, s.hv, s.dv}, "dout");
  a.optional_state(dfinal_state, {s.num_docs, s.hv, s.dk, s.dv}, "dfinal_state");
  a.activation(dq, {s.n, s.h, s.dk}, "dq");
  a.activation(dk, {s.n, s.h, s.dk}, "dk");
  a.activation(dv, {s.n, s.hv, s.dv}, "dv");
  a.state(dg, {s.n, s.hv, s.dk}, "dg");
  a.state(dbeta, {s.n, s.hv}, "dbeta");
  a.optional_state(dinitial_state, {s.num_docs, s.hv, s.dk, s.dv}, "dinitial_state");
}

template <class T>
const T* opt_ptr(const Tensor& t) {
  return t.empty() ? nullptr : t.ptr<T>();
}
template <class T>
T* opt_mut(const Tensor& t) {
  return t.empty() ? nullptr : t.ptr<T>();
}

}  // namespace

void kda_forward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                 const Tensor& beta, const Tensor& cu_seqlens, const Tensor& initial_state, const Tensor& o,
                 const Tensor& final_state) {
  constexpr const char* op = "kda_forward";
  const KdaDims s = read_dims(k, v, cu_seqlens, op);
  const KdaArgs a(op, q, "q");
  check_inputs(a, s, q, k, v, g, beta, cu_seqlens, initial_state);
  a.activation(o, {s.n, s.hv, s.dv}, "o");
  a.optional_state(final_state, {s.num_docs, s.hv, s.dk, s.dv}, "final_state");
  if (q.device.is_cpu()) {
    if (q.dtype == DType::f64)
      cpu::kda_recurrent_forward<double>(s, q.ptr<double>(), k.ptr<double>(), v.ptr<double>(), g.ptr<double>(),
                                         beta.ptr<double>(), cu_seqlens.ptr<int32_t>(), opt_ptr<double>(initial_state),
                                         o.ptr<double>(), opt_mut<double>(final_state));
    else
      cpu::kda_recurrent_forward<float>(s, q.ptr<float>(), k.ptr<float>(), v.ptr<float>(), g.ptr<float>(),
                                        beta.ptr<float>(), cu_seqlens.ptr<int32_t>(), opt_ptr<float>(initial_state),
                                        o.ptr<float>(), opt_mut<float>(final_state));
    return;
  }
#ifdef HYD_WITH_CUDA
  if (q.device.is_cuda()) {
    check_context(ctx, q, op);
    cuda::kda_forward(s, q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), g.ptr<float>(), beta.ptr<float>(),
                      cu_seqlens.ptr<int32_t>(), opt_ptr<float>(initial_state), o.ptr<bf16>(),
                      opt_mut<float>(final_state), ctx.stream());
    return;
  }
#endif
  unsupported(op, q);
}

void kda_backward(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                  const Tensor& beta, const Tensor& cu_seqlens, const Tensor& initial_state, const Tensor& dout,
                  const Tensor& dfinal_state, const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dg,
                  const Tensor& dbeta, const Tensor& dinitial_state) {
  constexpr const char* op = "kda_backward";
  const KdaDims s = read_dims(k, v, cu_seqlens, op);
  const KdaArgs a(op, q, "q");
  check_inputs(a, s, q, k, v, g, beta, cu_seqlens, initial_state);
  check_gradients(a, s, dout, dfinal_state, dq, dk, dv, dg, dbeta, dinitial_state);
  if (q.device.is_cpu()) {
    if (q.dtype == DType::f64)
      cpu::kda_recurrent_backward<double>(s, q.ptr<double>(), k.ptr<double>(), v.ptr<double>(), g.ptr<double>(),
                                          beta.ptr<double>(), cu_seqlens.ptr<int32_t>(), opt_ptr<double>(initial_state),
                                          dout.ptr<double>(), opt_ptr<double>(dfinal_state), dq.ptr<double>(),
                                          dk.ptr<double>(), dv.ptr<double>(), dg.ptr<double>(), dbeta.ptr<double>(),
                                          opt_mut<double>(dinitial_state));
    else
      cpu::kda_recurrent_backward<float>(s, q.ptr<float>(), k.ptr<float>(), v.ptr<float>(), g.ptr<float>(),
                                         beta.ptr<float>(), cu_seqlens.ptr<int32_t>(), opt_ptr<float>(initial_state),
                                         dout.ptr<float>(), opt_ptr<float>(dfinal_state), dq.ptr<float>(),
                                         dk.ptr<float>(), dv.ptr<float>(), dg.ptr<float>(), dbeta.ptr<float>(),
                                         opt_mut<float>(dinitial_state));
    return;
  }
#ifdef HYD_WITH_CUDA
  if (q.device.is_cuda()) {
    check_context(ctx, q, op);
    cuda::kda_backward(s, q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), g.ptr<float>(), beta.ptr<float>(),
                       cu_seqlens.ptr<int32_t>(), opt_ptr<float>(initial_state), dout.ptr<bf16>(),
                       opt_ptr<float>(dfinal_state), dq.ptr<bf16>(), dk.ptr<bf16>(), dv.ptr<bf16>(), dg.ptr<float>(),
                       dbeta.ptr<float>(), opt_mut<float>(dinitial_state), ctx.stream());
    return;
  }
#endif
  unsupported(op, q);
}

void kda_transition(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta,
                    const Tensor& cu_seqlens, const Tensor& M, const Tensor& B) {
  constexpr const char* op = "kda_transition";
  const KdaDims s = read_dims(k, v, cu_seqlens, op);
  const KdaArgs a(op, k, "k");
  a.activation(k, {s.n, s.h, s.dk}, "k");
  a.activation(v, {s.n, s.hv, s.dv}, "v");
  a.state(g, {s.n, s.hv, s.dk}, "g");
  a.state(beta, {s.n, s.hv}, "beta");
  a.cu_seqlens(cu_seqlens, s.n);
  a.state(M, {s.num_docs, s.hv, s.dk, s.dk}, "M");
  a.state(B, {s.num_docs, s.hv, s.dk, s.dv}, "B");
  if (k.device.is_cpu()) {
    if (k.dtype == DType::f64)
      cpu::kda_transition<double>(s, k.ptr<double>(), v.ptr<double>(), g.ptr<double>(), beta.ptr<double>(),
                                  cu_seqlens.ptr<int32_t>(), M.ptr<double>(), B.ptr<double>());
    else
      cpu::kda_transition<float>(s, k.ptr<float>(), v.ptr<float>(), g.ptr<float>(), beta.ptr<float>(),
                                 cu_seqlens.ptr<int32_t>(), M.ptr<float>(), B.ptr<float>());
    return;
  }
#ifdef HYD_WITH_CUDA
  if (k.device.is_cuda()) {
    check_context(ctx, k, op);
    cuda::kda_transition(s, k.ptr<bf16>(), v.ptr<bf16>(), g.ptr<float>(), beta.ptr<float>(), cu_seqlens.ptr<int32_t>(),
                         M.ptr<float>(), B.ptr<float>(), ctx.stream());
    return;
  }
#endif
  unsupported(op, k);
}

// ------------------------------------------------------------------ the split forward (LASP-2)

bool kda_split_forward_supported(const Tensor& k, const Tensor& v) {
#ifdef HYD_WITH_CUDA
  if (!k.device.is_cuda() || k.ndim != 3 || v.ndim != 3) return false;
  KdaDims s;
  s.dk = k.shape[2];
  s.dv = v.shape[2];
  return cuda::kda_split_supported(s);
#else
  (void)k;
  (void)v;
  return false;
#endif
}

int64_t kda_forward_workspace_floats(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens, bool zero_values) {
  const KdaDims s = read_dims(k, v, cu_seqlens, "kda_forward_workspace_floats");
#ifdef HYD_WITH_CUDA
  return static_cast<int64_t>((cuda::kda_forward_workspace_bytes(s, zero_values) + 3) / 4);
#else
  (void)s;
  (void)zero_values;
  HYD_THROW("kda_forward_workspace_floats: the split forward needs CUDA");
#endif
}

namespace {
void check_split(const char* op, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens, const Tensor& workspace,
                 bool zero_values) {
  if (!kda_split_forward_supported(k, v))
    HYD_THROW(op, ": the split forward needs CUDA tensors with dk, dv in {64, 128} (got ", k.device.str(), ", k ",
              k.shape_str(), ", v ", v.shape_str(), ")");
  if (workspace.empty()) return;  // the saving forward / saved backward: check_saved
  expect_dtype(workspace, DType::f32, op, "workspace");
  if (!(workspace.device == k.device)) HYD_THROW(op, ": argument 'workspace' is on ", workspace.device.str());
  const int64_t need = kda_forward_workspace_floats(k, v, cu_seqlens, zero_values);
  if (workspace.numel() < need)
    HYD_THROW(op, ": argument 'workspace' has ", workspace.numel(), " floats, needs ", need);
}
// The caller-kept f32 buffers of the split saving forward and saved backward (CUDA only).
enum class KdaBuffer { saved, saving_u, transitions, backward_workspace };

int64_t buffer_floats(const char* op, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens, KdaBuffer which) {
  const KdaDims s = read_dims(k, v, cu_seqlens, op);
#ifdef HYD_WITH_CUDA
  const size_t bytes = which == KdaBuffer::saved         ? cuda::kda_saved_bytes(s)
                       : which == KdaBuffer::saving_u    ? cuda::kda_saving_u_bytes(s)
                       : which == KdaBuffer::transitions ? cuda::kda_transitions_bytes(s)
                                                         : cuda::kda_backward_workspace_bytes(s);
  return static_cast<int64_t>((bytes + 3) / 4);
#else
  (void)s;
  (void)which;
  HYD_THROW(op, ": the split KDA kernels need CUDA");
#endif
}

// Argument `name` of op: such a buffer, f32 on k's device with buffer_floats elements.
void check_buffer(const char* op, const char* name, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                  const Tensor& t, KdaBuffer which) {
  expect_dtype(t, DType::f32, op, name);
  if (!(t.device == k.device)) HYD_THROW(op, ": argument '", name, "' is on ", t.device.str());
  const int64_t need = buffer_floats(op, k, v, cu_seqlens, which);
  if (t.numel() < need) HYD_THROW(op, ": argument '", name, "' has ", t.numel(), " floats, needs ", need);
}

// `saved` of kda_forward_saving / kda_backward_saved.
void check_saved(const char* op, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens, const Tensor& saved) {
  check_buffer(op, "saved", k, v, cu_seqlens, saved, KdaBuffer::saved);
}
// The sizes of a split op over `saved` that takes no q (the passes, transitions and corrections), after the checks
// they share: cu_seqlens, the split kernels' availability, saved.
KdaDims saved_op_dims(const char* op, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens, const Tensor& saved) {
  const KdaDims s = read_dims(k, v, cu_seqlens, op);
  KdaArgs(op, k, "k").cu_seqlens(cu_seqlens, s.n);
  check_split(op, k, v, cu_seqlens, Tensor{}, false);
  check_saved(op, k, v, cu_seqlens, saved);
  return s;
}
}  // namespace

void kda_forward_prepare(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                         const Tensor& beta, const Tensor& cu_seqlens, const Tensor& workspace, bool zero_values) {
  constexpr const char* op = "kda_forward_prepare";
  const KdaDims s = read_dims(k, v, cu_seqlens, op);
  const KdaArgs a(op, q, "q");
  check_inputs(a, s, q, k, v, g, beta, cu_seqlens, Tensor{});
  check_split(op, k, v, cu_seqlens, workspace, zero_values);
#ifdef HYD_WITH_CUDA
  check_context(ctx, q, op);
  cuda::kda_forward_prepare(s, q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), g.ptr<float>(), beta.ptr<float>(),
                            cu_seqlens.ptr<int32_t>(), workspace.data, zero_values, ctx.stream());
#else
  (void)ctx;
#endif
}

void kda_forward_pass(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                      const Tensor& workspace, const Tensor& initial_state, const Tensor& o, const Tensor& final_state,
                      bool zero_values) {
  constexpr const char* op = "kda_forward_pass";
  const KdaDims s = read_dims(k, v, cu_seqlens, op);
  check_split(op, k, v, cu_seqlens, workspace, zero_values);
  const KdaArgs a(op, k, "k");
  a.cu_seqlens(cu_seqlens, s.n);
  const int64_t cols = zero_values ? s.dk : s.dv;
  a.optional_state(initial_state, {s.num_docs, s.hv, s.dk, cols}, "initial_state");
  a.optional_state(final_state, {s.num_docs, s.hv, s.dk, cols}, "final_state");
  if (zero_values && !o.empty()) HYD_THROW(op, ": a zero-value pass has no output: argument 'o' must be empty");
  if (!o.empty()) a.activation(o, {s.n, s.hv, s.dv}, "o");
#ifdef HYD_WITH_CUDA
  check_context(ctx, k, op);
  cuda::kda_forward_pass(s, cu_seqlens.ptr<int32_t>(), workspace.data, opt_ptr<float>(initial_state),
                         o.empty() ? nullptr : o.ptr<bf16>(), opt_mut<float>(final_state), zero_values, ctx.stream());
#else
  (void)ctx;
#endif
}

int64_t kda_saved_floats(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens) {
  return buffer_floats("kda_saved_floats", k, v, cu_seqlens, KdaBuffer::saved);
}

void kda_forward_saving(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                        const Tensor& beta, const Tensor& cu_seqlens, const Tensor& initial_state, const Tensor& o,
                        const Tensor& final_state, const Tensor& saved) {
  constexpr const char* op = "kda_forward_saving";
  const KdaDims s = read_dims(k, v, cu_seqlens, op);
  const KdaArgs a(op, q, "q");
  check_inputs(a, s, q, k, v, g, beta, cu_seqlens, initial_state);
  a.activation(o, {s.n, s.hv, s.dv}, "o");
  a.optional_state(final_state, {s.num_docs, s.hv, s.dk, s.dv}, "final_state");
  check_split(op, k, v, cu_seqlens, Tensor{}, false);
  check_saved(op, k, v, cu_seqlens, saved);
#ifdef HYD_WITH_CUDA
  check_context(ctx, q, op);
  cuda::kda_forward_saving(s, q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), g.ptr<float>(), beta.ptr<float>(),
                           cu_seqlens.ptr<int32_t>(), opt_ptr<float>(initial_state), o.ptr<bf16>(),
                           opt_mut<float>(final_state), saved.data, ctx.stream());
#else
  (void)ctx;
#endif
}

int kda_saving_windows(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens) {
  const KdaDims s = read_dims(k, v, cu_seqlens, "kda_saving_windows");
#ifdef HYD_WITH_CUDA
  if (k.device.is_cuda() && cuda::kda_split_supported(s)) return cuda::kda_saving_windows(s);
#else
  (void)s;
#endif
  return 1;
}

void kda_backward_saved(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                        const Tensor& beta, const Tensor& cu_seqlens, const Tensor& dout, const Tensor& dfinal_state,
                        const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dg, const Tensor& dbeta,
                        const Tensor& dinitial_state, const Tensor& saved) {
  constexpr const char* op = "kda_backward_saved";
  const KdaDims s = read_dims(k, v, cu_seqlens, op);
  const KdaArgs a(op, q, "q");
  check_inputs(a, s, q, k, v, g, beta, cu_seqlens, Tensor{});
  check_gradients(a, s, dout, dfinal_state, dq, dk, dv, dg, dbeta, dinitial_state);
  check_split(op, k, v, cu_seqlens, Tensor{}, false);
  check_saved(op, k, v, cu_seqlens, saved);
#ifdef HYD_WITH_CUDA
  check_context(ctx, q, op);
  cuda::kda_backward_saved(s, q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), g.ptr<float>(), beta.ptr<float>(),
                           cu_seqlens.ptr<int32_t>(), dout.ptr<bf16>(), opt_ptr<float>(dfinal_state), dq.ptr<bf16>(),
                           dk.ptr<bf16>(), dv.ptr<bf16>(), dg.ptr<float>(), dbeta.ptr<float>(),
                           opt_mut<float>(dinitial_state), saved.data, ctx.stream());
#else
  (void)ctx;
#endif
}

namespace {
void check_saving_u(const char* op, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens, const Tensor& u) {
  check_buffer(op, "u", k, v, cu_seqlens, u, KdaBuffer::saving_u);
}
[[maybe_unused]] void check_transitions(const char* op, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                        const Tensor& t) {
  check_buffer(op, "transitions", k, v, cu_seqlens, t, KdaBuffer::transitions);
}
[[maybe_unused]] void check_backward_workspace(const char* op, const Tensor& k, const Tensor& v,
                                               const Tensor& cu_seqlens, const Tensor& ws) {
  check_buffer(op, "workspace", k, v, cu_seqlens, ws, KdaBuffer::backward_workspace);
}
}  // namespace

int64_t kda_saving_u_floats(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens) {
  return buffer_floats("kda_saving_u_floats", k, v, cu_seqlens, KdaBuffer::saving_u);
}
int64_t kda_transitions_floats(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens) {
  return buffer_floats("kda_transitions_floats", k, v, cu_seqlens, KdaBuffer::transitions);
}
int64_t kda_backward_workspace_floats(const Tensor& k, const Tensor& v, const Tensor& cu_seqlens) {
  return buffer_floats("kda_backward_workspace_floats", k, v, cu_seqlens, KdaBuffer::backward_workspace);
}

namespace {
// The inputs of the saving forward's prep (kda_forward_saving_prepare, kda_forward_saving_lasp) checked; their dims.
KdaDims check_prepare(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                      const Tensor& beta, const Tensor& cu_seqlens, const Tensor& saved, const Tensor& u) {
  const KdaDims s = read_dims(k, v, cu_seqlens, op);
  const KdaArgs a(op, q, "q");
  check_inputs(a, s, q, k, v, g, beta, cu_seqlens, Tensor{});
  check_split(op, k, v, cu_seqlens, Tensor{}, false);
  check_saved(op, k, v, cu_seqlens, saved);
  check_saving_u(op, k, v, cu_seqlens, u);
  return s;
}
}  // namespace

void kda_forward_saving_prepare(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& g, const Tensor& beta, const Tensor& cu_seqlens, const Tensor& saved,
                                const Tensor& u) {
  constexpr const char* op = "kda_forward_saving_prepare";
  const KdaDims s = check_prepare(op, q, k, v, g, beta, cu_seqlens, saved, u);
#ifdef HYD_WITH_CUDA
  check_context(ctx, q, op);
  cuda::kda_forward_saving_prepare(s, q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), g.ptr<float>(), beta.ptr<float>(),
                                   cu_seqlens.ptr<int32_t>(), saved.data, u.ptr<float>(), ctx.stream());
#else
  (void)ctx;
  (void)s;
#endif
}

void kda_forward_saving_pass(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                             const Tensor& initial_state, const Tensor& o, const Tensor& final_state,
                             const Tensor& saved, const Tensor& u) {
  constexpr const char* op = "kda_forward_saving_pass";
  const KdaDims s = saved_op_dims(op, k, v, cu_seqlens, saved);
  const KdaArgs a(op, k, "k");
  a.optional_state(initial_state, {s.num_docs, s.hv, s.dk, s.dv}, "initial_state");
  a.optional_state(final_state, {s.num_docs, s.hv, s.dk, s.dv}, "final_state");
  if (!o.empty()) a.activation(o, {s.n, s.hv, s.dv}, "o");
  check_saving_u(op, k, v, cu_seqlens, u);
#ifdef HYD_WITH_CUDA
  check_context(ctx, k, op);
  cuda::kda_forward_saving_pass(s, cu_seqlens.ptr<int32_t>(), opt_ptr<float>(initial_state),
                                o.empty() ? nullptr : o.ptr<bf16>(), opt_mut<float>(final_state), saved.data,
                                u.ptr<float>(), ctx.stream());
#else
  (void)ctx;
#endif
}

void kda_forward_saving_transition(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                   const Tensor& initial_state, const Tensor& final_state, const Tensor& saved,
                                   const Tensor& transitions) {
  constexpr const char* op = "kda_forward_saving_transition";
  const KdaDims s = saved_op_dims(op, k, v, cu_seqlens, saved);
  const KdaArgs a(op, k, "k");
  a.optional_state(initial_state, {s.num_docs, s.hv, s.dk, s.dk}, "initial_state");
  a.state(final_state, {s.num_docs, s.hv, s.dk, s.dk}, "final_state");
#ifdef HYD_WITH_CUDA
  check_context(ctx, k, op);
  if (!transitions.empty()) check_transitions(op, k, v, cu_seqlens, transitions);
  cuda::kda_forward_saving_transition(s, cu_seqlens.ptr<int32_t>(), opt_ptr<float>(initial_state),
                                      final_state.ptr<float>(), saved.data, ctx.stream(),
                                      transitions.empty() ? nullptr : static_cast<bf16*>(transitions.data));
#else
  (void)ctx;
  (void)transitions;
#endif
}

void kda_forward_saving_lasp(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                             const Tensor& beta, const Tensor& cu_seqlens, const Tensor& o, const Tensor& final_state,
                             const Tensor& saved, const Tensor& u, const Tensor& eye, const Tensor& transition_final,
                             const Tensor& transitions) {
  constexpr const char* op = "kda_forward_saving_lasp";
  const KdaDims s = check_prepare(op, q, k, v, g, beta, cu_seqlens, saved, u);
  const KdaArgs a(op, q, "q");
  a.activation(o, {s.n, s.hv, s.dv}, "o");
  a.optional_state(final_state, {s.num_docs, s.hv, s.dk, s.dv}, "final_state");
  a.state(eye, {s.num_docs, s.hv, s.dk, s.dk}, "eye");
  a.state(transition_final, {s.num_docs, s.hv, s.dk, s.dk}, "transition_final");
#ifdef HYD_WITH_CUDA
  check_context(ctx, q, op);
  check_transitions(op, k, v, cu_seqlens, transitions);
  cuda::kda_forward_saving_lasp(s, q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), g.ptr<float>(), beta.ptr<float>(),
                                cu_seqlens.ptr<int32_t>(), o.ptr<bf16>(), opt_mut<float>(final_state), saved.data,
                                u.ptr<float>(), eye.ptr<float>(), transition_final.ptr<float>(),
                                static_cast<bf16*>(transitions.data), ctx.stream());
#else
  (void)ctx;
  (void)transitions;
#endif
}

void kda_forward_saving_correct(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                const Tensor& initial_state, const Tensor& transitions, const Tensor& o,
                                const Tensor& saved) {
  constexpr const char* op = "kda_forward_saving_correct";
  const KdaDims s = saved_op_dims(op, k, v, cu_seqlens, saved);
  const KdaArgs a(op, k, "k");
  a.state(initial_state, {s.num_docs, s.hv, s.dk, s.dv}, "initial_state");
  a.activation(o, {s.n, s.hv, s.dv}, "o");
#ifdef HYD_WITH_CUDA
  check_context(ctx, k, op);
  check_transitions(op, k, v, cu_seqlens, transitions);
  cuda::kda_forward_saving_correct(s, cu_seqlens.ptr<int32_t>(), initial_state.ptr<float>(),
                                   static_cast<const bf16*>(transitions.data), o.ptr<bf16>(), saved.data, ctx.stream());
#else
  (void)ctx;
  (void)transitions;
#endif
}

void kda_backward_saved_reverse(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                const Tensor& dout, const Tensor& dfinal_state, const Tensor& dinitial_state,
                                const Tensor& saved, const Tensor& workspace) {
  constexpr const char* op = "kda_backward_saved_reverse";
  const KdaDims s = saved_op_dims(op, k, v, cu_seqlens, saved);
  const KdaArgs a(op, k, "k");
  a.activation(dout, {s.n, s.hv, s.dv}, "dout");
  a.optional_state(dfinal_state, {s.num_docs, s.hv, s.dk, s.dv}, "dfinal_state");
  a.optional_state(dinitial_state, {s.num_docs, s.hv, s.dk, s.dv}, "dinitial_state");
#ifdef HYD_WITH_CUDA
  check_context(ctx, k, op);
  check_backward_workspace(op, k, v, cu_seqlens, workspace);
  cuda::kda_backward_saved_reverse(s, cu_seqlens.ptr<int32_t>(), dout.ptr<bf16>(), opt_ptr<float>(dfinal_state),
                                   opt_mut<float>(dinitial_state), saved.data, workspace.ptr<float>(), ctx.stream());
#else
  (void)ctx;
  (void)workspace;
#endif
}

void kda_backward_saved_transition(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                   const Tensor& final_adjoint, const Tensor& saved, const Tensor& transitions) {
  constexpr const char* op = "kda_backward_saved_transition";
  const KdaDims s = saved_op_dims(op, k, v, cu_seqlens, saved);
  const KdaArgs a(op, k, "k");
  a.state(final_adjoint, {s.num_docs, s.hv, s.dk, s.dk}, "final_adjoint");
#ifdef HYD_WITH_CUDA
  check_context(ctx, k, op);
  check_transitions(op, k, v, cu_seqlens, transitions);
  cuda::kda_backward_saved_transition(s, cu_seqlens.ptr<int32_t>(), final_adjoint.ptr<float>(), saved.data,
                                      static_cast<bf16*>(transitions.data), ctx.stream());
#else
  (void)ctx;
  (void)transitions;
#endif
}

void kda_backward_saved_correct(const ExecContext& ctx, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                const Tensor& dfinal_state, const Tensor& transitions, const Tensor& saved,
                                const Tensor& workspace) {
  constexpr const char* op = "kda_backward_saved_correct";
  const KdaDims s = saved_op_dims(op, k, v, cu_seqlens, saved);
  const KdaArgs a(op, k, "k");
  a.state(dfinal_state, {s.num_docs, s.hv, s.dk, s.dv}, "dfinal_state");
#ifdef HYD_WITH_CUDA
  check_context(ctx, k, op);
  check_transitions(op, k, v, cu_seqlens, transitions);
  check_backward_workspace(op, k, v, cu_seqlens, workspace);
  cuda::kda_backward_saved_correct(s, cu_seqlens.ptr<int32_t>(), dfinal_state.ptr<float>(),
                                   static_cast<const bf16*>(transitions.data), saved.data, workspace.ptr<float>(),
                                   ctx.stream());
#else
  (void)ctx;
  (void)transitions;
  (void)workspace;
#endif
}

void kda_backward_saved_finish(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& g, const Tensor& beta, const Tensor& cu_seqlens, const Tensor& dout,
                               const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dg,
                               const Tensor& dbeta, const Tensor& saved, const Tensor& workspace) {
  constexpr const char* op = "kda_backward_saved_finish";
  const KdaDims s = read_dims(k, v, cu_seqlens, op);
  const KdaArgs a(op, q, "q");
  check_inputs(a, s, q, k, v, g, beta, cu_seqlens, Tensor{});
  check_gradients(a, s, dout, Tensor{}, dq, dk, dv, dg, dbeta, Tensor{});
  check_split(op, k, v, cu_seqlens, Tensor{}, false);
  check_saved(op, k, v, cu_seqlens, saved);
#ifdef HYD_WITH_CUDA
  check_context(ctx, q, op);
  check_backward_workspace(op, k, v, cu_seqlens, workspace);
  cuda::kda_backward_saved_finish(s, q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), g.ptr<float>(), beta.ptr<float>(),
                                  cu_seqlens.ptr<int32_t>(), dout.ptr<bf16>(), dq.ptr<bf16>(), dk.ptr<bf16>(),
                                  dv.ptr<bf16>(), dg.ptr<float>(), dbeta.ptr<float>(), saved.data,
                                  workspace.ptr<float>(), ctx.stream());
#else
  (void)ctx;
  (void)workspace;
#endif
}

void kda_backward_initial_adjoint(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& g, const Tensor& beta, const Tensor& cu_seqlens, const Tensor& dout,
                                  const Tensor& dinitial_state) {
  constexpr const char* op = "kda_backward_initial_adjoint";
  const KdaDims s = read_dims(k, v, cu_seqlens, op);
  const KdaArgs a(op, q, "q");
  check_inputs(a, s, q, k, v, g, beta, cu_seqlens, Tensor{});
  a.activation(dout, {s.n, s.hv, s.dv}, "dout");
  a.state(dinitial_state, {s.num_docs, s.hv, s.dk, s.dv}, "dinitial_state");
  if (!kda_split_forward_supported(k, v))
    HYD_THROW(op, ": needs CUDA tensors with dk, dv in {64, 128} (got ", k.device.str(), ", k ", k.shape_str(), ", v ",
              v.shape_str(), ")");
#ifdef HYD_WITH_CUDA
  check_context(ctx, q, op);
  cuda::kda_backward_initial_adjoint(s, q.ptr<bf16>(), k.ptr<bf16>(), v.ptr<bf16>(), g.ptr<float>(), beta.ptr<float>(),
                                     cu_seqlens.ptr<int32_t>(), dout.ptr<bf16>(), dinitial_state.ptr<float>(),
                                     ctx.stream());
#else
  (void)ctx;
#endif
}

}  // namespace hyd::kernels

// Tensor-level dispatch for the KDA gates (see kernels/kda_gates.h): validates, then runs the CPU
// reference (f32 or f64, every tensor of one dtype) or the CUDA kernels (bf16 f, b, df, db; f32 gate
// parameters, gates and their gradients).
#include "kernels/kda_gates.h"

#include <utility>

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

struct GateDims {
  int64_t n, hv, dk;
};

// f-like [N, HV, dk], A_log [HV], dt_bias [HV * dk], b-like [N, HV].
GateDims check_shapes(const Tensor& f_like, const char* f_name, const Tensor& A_log, const Tensor& dt_bias,
                      const char* dt_name, const Tensor& b_like, const char* b_name, const char* op) {
  expect_shape(f_like, {-1, -1, -1}, op, f_name);
  const int64_t n = f_like.shape[0], hv = f_like.shape[1], dk = f_like.shape[2];
  expect_shape(A_log, {hv}, op, "A_log");
  expect_shape(dt_bias, {hv * dk}, op, dt_name);
  expect_shape(b_like, {n, hv}, op, b_name);
  return {n, hv, dk};
}

void expect_cpu_float(const Tensor& t, const char* op, const char* arg) {
  if (t.dtype != DType::f32 && t.dtype != DType::f64)
    HYD_THROW(op, ": argument '", arg, "' has dtype ", dtype_name(t.dtype), ", expected f32 or f64 on the CPU");
}

}  // namespace

void kda_gates_forward(const ExecContext& ctx, const Tensor& f, const Tensor& A_log, const Tensor& dt_bias,
                       const Tensor& b, const Tensor& g, const Tensor& beta) {
  constexpr const char* op = "kda_gates_forward";
  const GateDims s = check_shapes(f, "f", A_log, dt_bias, "dt_bias", b, "b", op);
  expect_shape(g, {s.n, s.hv, s.dk}, op, "g");
  expect_shape(beta, {s.n, s.hv}, op, "beta");
  for (const Tensor* t : {&A_log, &dt_bias, &b, &g, &beta}) expect_same_device(f, *t, op);
  check_context(ctx, f, op);
  if (f.device.is_cpu()) {
    expect_cpu_float(f, op, "f");
    expect_dtype(A_log, f.dtype, op, "A_log");
    expect_dtype(dt_bias, f.dtype, op, "dt_bias");
    expect_dtype(b, f.dtype, op, "b");
    expect_dtype(g, f.dtype, op, "g");
    expect_dtype(beta, f.dtype, op, "beta");
    if (f.dtype == DType::f32) {
      cpu::kda_gates_forward<float>(f.ptr<float>(), A_log.ptr<float>(), dt_bias.ptr<float>(), b.ptr<float>(),
                                    g.ptr<float>(), beta.ptr<float>(), s.n, s.hv, s.dk);
    } else {
      cpu::kda_gates_forward<double>(f.ptr<double>(), A_log.ptr<double>(), dt_bias.ptr<double>(), b.ptr<double>(),
                                     g.ptr<double>(), beta.ptr<double>(), s.n, s.hv, s.dk);
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  expect_dtype(f, DType::bf16, op, "f");
  expect_dtype(A_log, DType::f32, op, "A_log");
  expect_dtype(dt_bias, DType::f32, op, "dt_bias");
  expect_dtype(b, DType::bf16, op, "b");
  expect_dtype(g, DType::f32, op, "g");
  expect_dtype(beta, DType::f32, op, "beta");
  cuda::kda_gates_forward(f.ptr<bf16>(), A_log.ptr<float>(), dt_bias.ptr<float>(), b.ptr<bf16>(), g.ptr<float>(),
                          beta.ptr<float>(), s.n, s.hv, s.dk, ctx.stream());
#else
  unsupported(op, f);
#endif
}

void kda_gates_backward(const ExecContext& ctx, const Tensor& dg, const Tensor& dbeta, const Tensor& g,
                        const Tensor& beta, const Tensor& A_log, const Tensor& df, const Tensor& dA_log,
                        const Tensor& ddt_bias, const Tensor& db) {
  constexpr const char* op = "kda_gates_backward";
  const GateDims s = check_shapes(g, "g", A_log, ddt_bias, "ddt_bias", beta, "beta", op);
  expect_shape(dg, {s.n, s.hv, s.dk}, op, "dg");
  expect_shape(df, {s.n, s.hv, s.dk}, op, "df");
  expect_shape(dbeta, {s.n, s.hv}, op, "dbeta");
  expect_shape(db, {s.n, s.hv}, op, "db");
  expect_shape(dA_log, {s.hv}, op, "dA_log");
  for (const Tensor* t : {&dg, &dbeta, &beta, &A_log, &df, &dA_log, &ddt_bias, &db}) expect_same_device(g, *t, op);
  check_context(ctx, g, op);
  if (g.device.is_cpu()) {
    expect_cpu_float(g, op, "g");
    for (auto [t, name] : {std::pair{&dg, "dg"},
                           {&dbeta, "dbeta"},
                           {&beta, "beta"},
                           {&A_log, "A_log"},
                           {&df, "df"},
                           {&dA_log, "dA_log"},
                           {&ddt_bias, "ddt_bias"},
                           {&db, "db"}})
      expect_dtype(*t, g.dtype, op, name);
    if (g.dtype == DType::f32) {
      cpu::kda_gates_backward<float>(dg.ptr<float>(), dbeta.ptr<float>(), g.ptr<float>(), beta.ptr<float>(),
                                     A_log.ptr<float>(), df.ptr<float>(), dA_log.ptr<float>(), ddt_bias.ptr<float>(),
                                     db.ptr<float>(), s.n, s.hv, s.dk);
    } else {
      cpu::kda_gates_backward<double>(dg.ptr<double>(), dbeta.ptr<double>(), g.ptr<double>(), beta.ptr<double>(),
                                      A_log.ptr<double>(), df.ptr<double>(), dA_log.ptr<double>(),
                                      ddt_bias.ptr<double>(), db.ptr<double>(), s.n, s.hv, s.dk);
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  for (auto [t, name] : {std::pair{&dg, "dg"},
                         {&dbeta, "dbeta"},
                         {&g, "g"},
                         {&beta, "beta"},
                         {&A_log, "A_log"},
                         {&dA_log, "dA_log"},
                         {&ddt_bias, "ddt_bias"}})
    expect_dtype(*t, DType::f32, op, name);
  expect_dtype(df, DType::bf16, op, "df");
  expect_dtype(db, DType::bf16, op, "db");
  cuda::kda_gates_backward(dg.ptr<float>(), dbeta.ptr<float>(), g.ptr<float>(), beta.ptr<float>(), A_log.ptr<float>(),
                           df.ptr<bf16>(), dA_log.ptr<float>(), ddt_bias.ptr<float>(), db.ptr<bf16>(), s.n, s.hv, s.dk,
                           ctx.stream());
#else
  unsupported(op, g);
#endif
}

}  // namespace hyd::kernels

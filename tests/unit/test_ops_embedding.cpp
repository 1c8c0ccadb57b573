// CPU embedding: forward against a direct gather, backward (with repeated ids, accumulating into
// dtable) against finite differences in double, float vs double agreement, dispatcher errors.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kernels/embedding.h"
#include "tests/common/test_util.h"

namespace hyd::kernels {
namespace {

using test::central_differences;
using test::cpu_f32;
using test::cpu_i32;
using test::expect_error_mentioning;
using test::randint;
using test::randn;
using test::randn_f64;
using test::rel_err;
using test::to_f64;

TEST(OpsEmbedding, ForwardIsGather) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 23, vocab = 11, dim = 7;
  std::vector<int32_t> ids = randint(n, 0, vocab);
  ids[0] = 0;
  ids[1] = vocab - 1;  // both ends of the table
  std::vector<float> table = randn(vocab * dim), out(n * dim, std::nanf(""));
  embedding_forward(ctx, cpu_i32(ids, {n}), cpu_f32(table, {vocab, dim}), cpu_f32(out, {n, dim}));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < dim; ++j) ASSERT_EQ(out[i * dim + j], table[ids[i] * dim + j]) << i << "," << j;
}

TEST(OpsEmbedding, BackwardMatchesFiniteDifferences) {
  const int64_t n = 19, vocab = 6, dim = 5;  // n > vocab: ids repeat
  std::vector<int32_t> ids = randint(n, 0, vocab);
  ids[3] = ids[4] = ids[5] = 2;
  std::vector<double> table = randn_f64(vocab * dim), g = randn_f64(n * dim);
  // L(table) = sum_ij g[i,j] * out[i,j]
  auto loss = [&] {
    std::vector<double> out(n * dim);
    cpu::embedding_forward<double>(ids.data(), table.data(), out.data(), n, vocab, dim);
    double l = 0;
    for (int64_t k = 0; k < n * dim; ++k) l += g[k] * out[k];
    return l;
  };
  const std::vector<double> numeric = central_differences(table, 1e-6, loss);
  // Accumulation: start from a non-zero dtable and subtract it afterwards.
  const std::vector<double> base = randn_f64(vocab * dim);
  std::vector<double> dtable = base;
  cpu::embedding_backward<double>(ids.data(), g.data(), dtable.data(), n, vocab, dim);
  for (int64_t k = 0; k < vocab * dim; ++k) dtable[k] -= base[k];
  EXPECT_LT(rel_err(dtable, numeric), 1e-8);
}

TEST(OpsEmbedding, FloatDispatcherMatchesDouble) {
  ExecContext ctx(Device::cpu());
  const int64_t n = 40, vocab = 9, dim = 12;
  std::vector<int32_t> ids = randint(n, 0, vocab);
  std::vector<float> dout = randn(n * dim), dtable(vocab * dim, 0.f);
  embedding_backward(ctx, cpu_i32(ids, {n}), cpu_f32(dout, {n, dim}), cpu_f32(dtable, {vocab, dim}));
  std::vector<double> ref(vocab * dim, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < dim; ++j) ref[ids[i] * dim + j] += dout[i * dim + j];
  EXPECT_LT(rel_err(to_f64(dtable), ref), 1e-6);
}

TEST(OpsEmbedding, DispatcherErrorsNameTheArgument) {
  ExecContext ctx(Device::cpu());
  std::vector<int32_t> ids = {0, 1, 2};
  std::vector<float> table(4 * 3), out(3 * 3), big(5 * 3);
  expect_error_mentioning(
      [&] {
        embedding_forward(ctx, cpu_i32(ids, {3}), cpu_f32(table, {4, 3}), cpu_f32(big, {5, 3}));
      },
      "'out'");
  expect_error_mentioning(
      [&] {
        embedding_forward(ctx, cpu_i32(ids, {1, 3}), cpu_f32(table, {4, 3}), cpu_f32(out, {3, 3}));
      },
      "'ids'");
  expect_error_mentioning(
      [&] {
        embedding_forward(ctx, Tensor(table.data(), DType::f32, Device::cpu(), {3}), cpu_f32(table, {4, 3}),
                          cpu_f32(out, {3, 3}));
      },
      "'ids'");
  expect_error_mentioning(
      [&] {
        embedding_backward(ctx, cpu_i32(ids, {3}), cpu_f32(out, {3, 3}),
                           Tensor(table.data(), DType::bf16, Device::cpu(), {4, 3}));
      },
      "'dtable'");
  // Out-of-range ids are caught by the CPU reference, forward and backward, before anything is written.
  std::vector<int32_t> bad = {0, 4, 1};
  expect_error_mentioning(
      [&] {
        embedding_forward(ctx, cpu_i32(bad, {3}), cpu_f32(table, {4, 3}), cpu_f32(out, {3, 3}));
      },
      "ids[1] = 4");
  std::vector<float> dtable(4 * 3, 0.f);
  bad = {0, 1, -1};
  expect_error_mentioning(
      [&] {
        embedding_backward(ctx, cpu_i32(bad, {3}), cpu_f32(out, {3, 3}), cpu_f32(dtable, {4, 3}));
      },
      "ids[2] = -1");
  for (float v : dtable) EXPECT_EQ(v, 0.f);
}

}  // namespace
}  // namespace hyd::kernels

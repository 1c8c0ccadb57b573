// CPU reference for the token embedding (see kernels/embedding.h).
#include "kernels/embedding.h"

namespace hyd::kernels::cpu {

namespace {
void check_id(int32_t id, int64_t i, int64_t vocab) {
  if (id < 0 || id >= vocab) HYD_THROW("embedding: ids[", i, "] = ", id, " is outside the vocabulary [0, ", vocab, ")");
}
}  // namespace

template <class T>
void embedding_forward(const int32_t* ids, const T* table, T* out, int64_t n, int64_t vocab, int64_t dim) {
  for (int64_t i = 0; i < n; ++i) {
    check_id(ids[i], i, vocab);
    const T* row = table + static_cast<int64_t>(ids[i]) * dim;
    for (int64_t j = 0; j < dim; ++j) out[i * dim + j] = row[j];
  }
}

template <class T>
void embedding_backward(const int32_t* ids, const T* dout, T* dtable, int64_t n, int64_t vocab, int64_t dim) {
  for (int64_t i = 0; i < n; ++i) check_id(ids[i], i, vocab);  // all or nothing: no partial accumulation
  for (int64_t i = 0; i < n; ++i) {
    T* row = dtable + static_cast<int64_t>(ids[i]) * dim;
    for (int64_t j = 0; j < dim; ++j) row[j] += dout[i * dim + j];
  }
}

template void embedding_forward<float>(const int32_t*, const float*, float*, int64_t, int64_t, int64_t);
template void embedding_forward<double>(const int32_t*, const double*, double*, int64_t, int64_t, int64_t);
template void embedding_backward<float>(const int32_t*, const float*, float*, int64_t, int64_t, int64_t);
template void embedding_backward<double>(const int32_t*, const double*, double*, int64_t, int64_t, int64_t);

}  // namespace hyd::kernels::cpu

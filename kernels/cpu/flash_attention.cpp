// CPU path of kernels/flash_attention.h: checks the boundary arrays (errors name the flash op),
// then runs the attention reference with separate query and key boundaries
// (kernels/cpu/attention.cpp), which defines the end-aligned mask j <= i + (len_k - len_q).
#include "kernels/attention.h"
#include "kernels/flash_attention.h"

namespace hyd::kernels::cpu {

namespace {

void check_boundaries(const int32_t* cu, int64_t num_docs, int64_t n, const char* op, const char* arg) {
  HYD_CHECK(num_docs >= 0 && cu[0] == 0, op, ": argument '", arg, "' must start at 0");
  for (int64_t d = 0; d < num_docs; ++d)
    HYD_CHECK(cu[d + 1] >= cu[d], op, ": argument '", arg, "' is not non-decreasing at document ", d);
  HYD_CHECK(cu[num_docs] == n, op, ": argument '", arg, "' ends at ", cu[num_docs], ", expected the token count ", n);
}

}  // namespace

template <class T>
void flash_attention_forward(const T* q, const T* k, const T* v, const int32_t* cu_q, const int32_t* cu_k,
                             int64_t num_docs, T* o, T* lse, int64_t nq, int64_t nk, int64_t hq, int64_t hkv,
                             int64_t d, double scale) {
  constexpr const char* op = "flash_attention_forward";
  check_boundaries(cu_q, num_docs, nq, op, "cu_seqlens_q");
  check_boundaries(cu_k, num_docs, nk, op, "cu_seqlens_k");
  HYD_CHECK(hkv > 0 && hq % hkv == 0, op, ": query heads ", hq, " not a multiple of kv heads ", hkv);
  attention_forward<T>(q, k, v, cu_q, cu_k, num_docs, o, lse, nq, nk, hq, hkv, d, scale);
}

template <class T>
void flash_attention_backward(const T* dout, const T* q, const T* k, const T* v, const T* o, const T* lse,
                              const int32_t* cu_q, const int32_t* cu_k, int64_t num_docs, T* dq, T* dk, T* dv,
                              int64_t nq, int64_t nk, int64_t hq, int64_t hkv, int64_t d, double scale) {
  constexpr const char* op = "flash_attention_backward";
  check_boundaries(cu_q, num_docs, nq, op, "cu_seqlens_q");
  check_boundaries(cu_k, num_docs, nk, op, "cu_seqlens_k");
  HYD_CHECK(hkv > 0 && hq % hkv == 0, op, ": query heads ", hq, " not a multiple of kv heads ", hkv);
  attention_backward<T>(dout, q, k, v, o, lse, cu_q, cu_k, num_docs, dq, dk, dv, nq, nk, hq, hkv, d, scale);
}

template void flash_attention_forward<float>(const float*, const float*, const float*, const int32_t*, const int32_t*,
                                             int64_t, float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                             double);
template void flash_attention_forward<double>(const double*, const double*, const double*, const int32_t*,
                                              const int32_t*, int64_t, double*, double*, int64_t, int64_t, int64_t,
                                              int64_t, int64_t, double);
template void flash_attention_backward<float>(const float*, const float*, const float*, const float*, const float*,
                                              const float*, const int32_t*, const int32_t*, int64_t, float*, float*,
                                              float*, int64_t, int64_t, int64_t, int64_t, int64_t, double);
template void flash_attention_backward<double>(const double*, const double*, const double*, const double*,
                                               const double*, const double*, const int32_t*, const int32_t*, int64_t,
                                               double*, double*, double*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                               double);

}  // namespace hyd::kernels::cpu

// Small elementwise ops the model glue needs.
//   add_inplace: y += x          (same dtype: f32 or bf16; residual connections)
//   convert:     dst = src       (f32 <-> bf16, same device)
//   fill:        t = value       (f32 or bf16)
//   scale_inplace: t *= s        (f32)
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

void add_inplace(const ExecContext& ctx, const Tensor& y, const Tensor& x);
void convert(const ExecContext& ctx, const Tensor& dst, const Tensor& src);
void fill(const ExecContext& ctx, const Tensor& t, float value);
void scale_inplace(const ExecContext& ctx, const Tensor& t, float s);

namespace cpu {
template <class T>
void add_inplace(T* y, const T* x, int64_t n);
template <class T>
void scale_inplace(T* t, T s, int64_t n);
}  // namespace cpu

namespace cuda {
void add_inplace_bf16(bf16* y, const bf16* x, int64_t n, void* stream);
void add_inplace_f32(float* y, const float* x, int64_t n, void* stream);
void convert_f32_to_bf16(bf16* dst, const float* src, int64_t n, void* stream);
void convert_bf16_to_f32(float* dst, const bf16* src, int64_t n, void* stream);
void fill_f32(float* t, float value, int64_t n, void* stream);
void fill_bf16(bf16* t, float value, int64_t n, void* stream);
void scale_f32(float* t, float s, int64_t n, void* stream);
}  // namespace cuda

}  // namespace hyd::kernels

#include "trainer/model_common.h"

#include <algorithm>
#include <utility>

#include "trainer/core/arena.h"
#include "trainer/core/dtype.h"
#include "trainer/core/error.h"

#ifdef HYD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace hyd::model_common {

void add_param(std::vector<ParamInfo>& params, std::unordered_map<std::string, size_t>& index, const std::string& name,
               std::vector<int64_t> shape, bool weight_decay, int64_t& offset) {
  ParamInfo p;
  p.name = name;
  p.shape = std::move(shape);
  p.weight_decay = weight_decay;
  p.numel = 1;
  for (int64_t v : p.shape) p.numel *= v;
  p.offset = offset;
  offset += (p.numel + kParamAlign - 1) / kParamAlign * kParamAlign;
  index[name] = params.size();
  params.push_back(std::move(p));
}

const ParamInfo& find_param(const std::vector<ParamInfo>& params, const std::unordered_map<std::string, size_t>& index,
                            const std::string& name, const char* model) {
  auto it = index.find(name);
  if (it == index.end()) HYD_THROW(model, ": no parameter named '", name, "'");
  return params[it->second];
}

void write_values(Device d, const Tensor& t, const float* data) {
  device_sync(d);
  upload_f32(t, data);
  device_sync(d);
}

void write_param(Device d, const ParamInfo& p, const float* data, int64_t n, const char* model) {
  if (n != p.numel) HYD_THROW(model, "::set_param('", p.name, "'): ", n, " values for ", p.numel, " elements");
  write_values(d, p.value, data);
}

std::vector<float> read_values(Device d, const Tensor& t) {
  device_sync(d);
  return download_f32(t);
}

void zero_values(Device d, const Tensor& t) {
  device_sync(d);
  zero_tensor(t);
  device_sync(d);
}

int64_t logits_chunk_tokens(int64_t vocab, size_t scratch_bytes) {
  constexpr size_t kChunkBytes = size_t(64) << 20;
  constexpr int64_t kMin = 16, kMax = 4096;
  const int64_t c = static_cast<int64_t>(std::max(kChunkBytes, scratch_bytes) / (static_cast<size_t>(vocab) * 4));
  return std::clamp(c / kMin * kMin, kMin, kMax);
}

void device_sync(Device d) {
#ifdef HYD_WITH_CUDA
  if (d.is_cuda()) CHECK_CUDA(cudaDeviceSynchronize());
#else
  (void)d;
#endif
}

Tensor view_at(const Tensor& flat, int64_t offset, const std::vector<int64_t>& shape) {
  char* p = static_cast<char*>(flat.data) + offset * static_cast<int64_t>(dtype_size(flat.dtype));
  if (shape.size() == 1) return Tensor(p, flat.dtype, flat.device, {shape[0]});
  if (shape.size() == 3) return Tensor(p, flat.dtype, flat.device, {shape[0], shape[1], shape[2]});  // experts
  HYD_CHECK(shape.size() == 2, "parameters are vectors, matrices or stacks of expert matrices");
  return Tensor(p, flat.dtype, flat.device, {shape[0], shape[1]});
}

std::vector<float> download_f32(const Tensor& t) {
  const int64_t n = t.numel();
  std::vector<float> out(static_cast<size_t>(n));
  if (t.dtype == DType::f32) {
    copy_tensor(Tensor(out.data(), DType::f32, Device::cpu(), {n}), t.view({n}));
  } else {
    HYD_CHECK(t.dtype == DType::bf16, "download_f32: unsupported dtype ", dtype_name(t.dtype));
    std::vector<bf16> tmp(static_cast<size_t>(n));
    copy_tensor(Tensor(tmp.data(), DType::bf16, Device::cpu(), {n}), t.view({n}));
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(tmp[i]);
  }
  return out;
}

void upload_f32(const Tensor& t, const float* src) {
  const int64_t n = t.numel();
  if (t.dtype == DType::f32) {
    copy_tensor(t.view({n}), Tensor(const_cast<float*>(src), DType::f32, Device::cpu(), {n}));
  } else {
    HYD_CHECK(t.dtype == DType::bf16, "upload_f32: unsupported dtype ", dtype_name(t.dtype));
    std::vector<bf16> tmp(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) tmp[i] = float_to_bf16(src[i]);
    copy_tensor(t.view({n}), Tensor(tmp.data(), DType::bf16, Device::cpu(), {n}));
  }
}

}  // namespace hyd::model_common

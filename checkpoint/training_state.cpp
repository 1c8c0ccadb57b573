#include "checkpoint/training_state.h"

#include <cstring>
#include <string>

#include "trainer/batch_upload.h"  // device_fence
#include "trainer/core/arena.h"
#include "trainer/core/error.h"

namespace hyd {

namespace {

SafetensorsDType stored_dtype(DType t) {
  switch (t) {
    case DType::f32:
      return SafetensorsDType::F32;
    case DType::bf16:
      return SafetensorsDType::BF16;
    default:
      HYD_THROW("checkpoint: tensors of dtype ", dtype_name(t), " are not stored");
  }
}

// The raw bytes of a device (or host) tensor.
std::vector<char> tensor_bytes(const Tensor& t) {
  std::vector<char> host(t.nbytes());
  device_fence(t.device);
  copy_tensor(Tensor(host.data(), t.dtype, Device::cpu(), {t.numel()}), t.view({t.numel()}));
  return host;
}

void add_tensor(SafetensorsWriter& w, const std::string& name, const std::vector<int64_t>& shape, const Tensor& t) {
  const std::vector<char> bytes = tensor_bytes(t);
  w.add(name, stored_dtype(t.dtype), shape, bytes.data(), bytes.size());
}

// dst (any device, f32 or bf16) = the stored tensor `name`, which must have `shape`.
void restore_tensor(const SafetensorsFile& f, const std::string& name, const std::vector<int64_t>& shape,
                    const Tensor& dst) {
  if (!f.contains(name)) throw Error::at(f.path(), name, "missing from the checkpoint's state file");
  const SafetensorsTensorInfo& info = f.info(name);
  if (info.shape != shape)
    throw Error::at(f.path(), name, "has shape " + info.shape_str() + ", the model expects " + shape_to_string(shape));
  std::vector<char> host;
  if (info.dtype == stored_dtype(dst.dtype)) {
    host = f.read_bytes(name);
  } else {
    if (info.dtype != SafetensorsDType::F32 && info.dtype != SafetensorsDType::BF16)
      throw Error::at(f.path(), name,
                      std::string("has dtype ") + safetensors_dtype_name(info.dtype) + ", expected F32 or BF16");
    const std::vector<float> v = f.read_f32(name);
    host.resize(v.size() * dtype_size(dst.dtype));
    if (dst.dtype == DType::f32) {
      std::memcpy(host.data(), v.data(), host.size());
    } else {
      auto* out = reinterpret_cast<bf16*>(host.data());
      for (size_t i = 0; i < v.size(); ++i) out[i] = float_to_bf16(v[i]);
    }
  }
  device_fence(dst.device);
  copy_tensor(dst.view({dst.numel()}), Tensor(host.data(), dst.dtype, Device::cpu(), {dst.numel()}));
  device_fence(dst.device);
}

}  // namespace

void add_parameters(SafetensorsWriter& w, const std::vector<ParamInfo>& params) {
  for (const ParamInfo& p : params) add_tensor(w, "param/" + p.name, p.shape, p.value);
}

void add_optimizer_state(SafetensorsWriter& w, const AdamW& opt) {
  const std::vector<ParamInfo>& params = opt.params();
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamInfo& p = params[i];
    if (opt.separate_masters()) add_tensor(w, "master/" + p.name, p.shape, opt.masters()[i]);
    add_tensor(w, "adam_m/" + p.name, p.shape, opt.first_moments()[i]);
    add_tensor(w, "adam_v/" + p.name, p.shape, opt.second_moments()[i]);
  }
}

nlohmann::json optimizer_counters(const AdamW& opt) {
  return {{"steps_taken", opt.steps_taken()},
          {"skipped_steps", opt.skipped_steps()},
          {"params", static_cast<int64_t>(opt.params().size())}};
}

void restore_parameters(const SafetensorsFile& f, const std::vector<ParamInfo>& params) {
  for (const ParamInfo& p : params) restore_tensor(f, "param/" + p.name, p.shape, p.value);
}

void restore_optimizer_state(const SafetensorsFile& f, const nlohmann::json& counters, const std::string& manifest_path,
                             AdamW& opt) {
  const std::vector<ParamInfo>& params = opt.params();
  auto counter = [&](const char* key) {
    const auto it = counters.find(key);
    if (it == counters.end() || !it->is_number_integer() || it->get<int64_t>() < 0)
      throw Error::at(manifest_path, std::string("optimizer.") + key, "missing or not a non-negative integer");
    return it->get<int64_t>();
  };
  const int64_t n = counter("params");
  if (n != static_cast<int64_t>(params.size()))
    throw Error::at(manifest_path, "optimizer.params",
                    "the checkpoint's optimizer holds " + std::to_string(n) + " parameters, this run's " +
                        std::to_string(params.size()));
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamInfo& p = params[i];
    const std::string stored_master = "master/" + p.name;
    if (opt.separate_masters())
      restore_tensor(f, f.contains(stored_master) ? stored_master : "param/" + p.name, p.shape, opt.masters()[i]);
    else if (f.contains(stored_master))  // the CPU's masters are the parameters: a CUDA checkpoint's exact f32
      restore_tensor(f, stored_master, p.shape, opt.masters()[i]);  // master wins over its bf16 working copy
    restore_tensor(f, "adam_m/" + p.name, p.shape, opt.first_moments()[i]);
    restore_tensor(f, "adam_v/" + p.name, p.shape, opt.second_moments()[i]);
  }
  opt.restore_counters(counter("steps_taken"), counter("skipped_steps"));
}

}  // namespace hyd

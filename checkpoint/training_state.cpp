#include "checkpoint/training_state.h"

#include <algorithm>
#include <cstring>
#include <map>
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

nlohmann::json zero1_counters(const AdamW& opt, int64_t ranks, int64_t shard_numel, int64_t flat_numel,
                              int64_t model_params) {
  return {{"steps_taken", opt.steps_taken()},
          {"skipped_steps", opt.skipped_steps()},
          {"params", model_params},
          {"zero1", {{"ranks", ranks}, {"shard_numel", shard_numel}, {"flat_numel", flat_numel}}}};
}

void restore_optimizer_resharded(const Checkpoint& ck, const std::vector<ParamInfo>& model_params, AdamW& opt) {
  const std::string mpath = ck.manifest_path();
  const nlohmann::json& counters = ck.manifest.optimizer;
  auto count = [&](const nlohmann::json& j, const char* key, const char* field) {
    const auto it = j.find(key);
    if (it == j.end() || !it->is_number_integer() || it->get<int64_t>() < 0)
      throw Error::at(mpath, std::string("optimizer.") + field, "missing or not a non-negative integer");
    return it->get<int64_t>();
  };
  int64_t flat = 0;
  std::map<std::string, const ParamInfo*> by_name;
  for (const ParamInfo& p : model_params) {
    by_name[p.name] = &p;
    flat = std::max(flat, p.offset + p.numel);
  }
  // The old layout: R_old contiguous shards of S_old elements (one shard of the whole buffer when unsharded).
  int64_t old_ranks = 1, old_shard = flat;
  if (counters.contains("zero1")) {
    const nlohmann::json& z = counters.at("zero1");
    if (!z.is_object()) throw Error::at(mpath, "optimizer.zero1", "expected an object");
    old_ranks = count(z, "ranks", "zero1.ranks");
    old_shard = count(z, "shard_numel", "zero1.shard_numel");
    const int64_t old_flat = count(z, "flat_numel", "zero1.flat_numel");
    if (old_flat != flat)
      throw Error::at(mpath, "optimizer.zero1.flat_numel",
                      std::to_string(old_flat) + " parameters in the checkpoint, " + std::to_string(flat) +
                          " in this run's model");
    if (old_ranks != ck.manifest.world_size || old_shard * old_ranks < flat)
      throw Error::at(mpath, "optimizer.zero1", "ranks x shard_numel does not cover flat_numel with world_size files");
  } else if (ck.manifest.world_size != 1) {
    throw Error::at(mpath, "optimizer.zero1", "missing in a checkpoint of " + std::to_string(ck.manifest.world_size) +
                                                  " state files");
  }
  // Rank 0's file is the one open_checkpoint already opened; the others are opened here.
  std::vector<SafetensorsFile> others;
  for (int64_t r = 1; r < old_ranks; ++r) others.push_back(ck.open_rank(r));
  auto file = [&](int64_t r) -> const SafetensorsFile& {
    return r == 0 ? ck.tensors : others[static_cast<size_t>(r - 1)];
  };

  // Values [a, a + n) (elements of parameter `base`) of `kind` from the files that hold them.
  auto gather = [&](const std::string& kind, const ParamInfo& base, int64_t a, int64_t n, bool* found) {
    std::vector<float> out(static_cast<size_t>(n));
    int64_t filled = 0;
    *found = true;
    for (int64_t q = 0; q < old_ranks; ++q) {
      const int64_t oa = std::max(base.offset, q * old_shard) - base.offset;
      const int64_t ob = std::min(base.offset + base.numel, (q + 1) * old_shard) - base.offset;
      const int64_t lo = std::max(a, oa), hi = std::min(a + n, ob);
      if (lo >= hi) continue;
      const SafetensorsFile& f = file(q);
      std::string name = kind;
      name.append("/").append(base.name);
      if (old_ranks > 1) name.append("[").append(std::to_string(oa)).append(":").append(std::to_string(ob)).append("]");
      if (!f.contains(name)) {
        *found = false;
        if (kind == "master") return out;  // optional
        throw Error::at(f.path(), name, "missing from the checkpoint's state file");
      }
      const std::vector<float> v = f.read_f32(name);
      if (static_cast<int64_t>(v.size()) != ob - oa)
        throw Error::at(f.path(), name, "holds " + std::to_string(v.size()) + " values, expected " +
                                            std::to_string(ob - oa));
      std::copy(v.begin() + (lo - oa), v.begin() + (hi - oa), out.begin() + (lo - a));
      filled += hi - lo;
    }
    if (filled != n)
      throw Error::at(mpath, "optimizer.zero1", "the state files cover " + std::to_string(filled) + " of the " +
                                                    std::to_string(n) + " values of " + base.name);
    return out;
  };
  auto upload = [](const std::vector<float>& v, const Tensor& dst) {
    device_fence(dst.device);
    copy_tensor(dst.view({dst.numel()}), Tensor(const_cast<float*>(v.data()), DType::f32, Device::cpu(), {dst.numel()}));
    device_fence(dst.device);
  };
  const std::vector<ParamInfo>& params = opt.params();
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamInfo& p = params[i];
    const size_t bracket = p.name.find('[');
    const std::string base_name = p.name.substr(0, bracket);
    const auto it = by_name.find(base_name);
    HYD_CHECK(it != by_name.end(), "restore_optimizer_resharded: '", p.name, "' is not a piece of a model parameter");
    const ParamInfo& base = *it->second;
    const int64_t a = p.offset - base.offset;
    HYD_CHECK(a >= 0 && a + p.numel <= base.numel, "restore_optimizer_resharded: '", p.name, "' outside ", base.name);
    bool found = false;
    upload(gather("adam_m", base, a, p.numel, &found), opt.first_moments()[i]);
    upload(gather("adam_v", base, a, p.numel, &found), opt.second_moments()[i]);
    const std::vector<float> master = gather("master", base, a, p.numel, &found);
    if (found) {
      upload(master, opt.masters()[i]);
    } else if (opt.separate_masters()) {  // a CPU checkpoint: its parameters were the masters
      const std::vector<float> whole = file(0).read_f32("param/" + base.name);
      upload(std::vector<float>(whole.begin() + a, whole.begin() + a + p.numel), opt.masters()[i]);
    }
  }
  opt.restore_counters(count(counters, "steps_taken", "steps_taken"), count(counters, "skipped_steps", "skipped_steps"));
}

}  // namespace hyd

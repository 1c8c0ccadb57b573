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

// dst (any device, f32 or bf16) = v.
void upload(const std::vector<float>& v, const Tensor& dst) {
  HYD_CHECK(static_cast<int64_t>(v.size()) == dst.numel(), "checkpoint: ", v.size(), " values for a tensor of ",
            dst.numel());
  std::vector<bf16> rounded;
  void* src = const_cast<float*>(v.data());
  if (dst.dtype == DType::bf16) {
    rounded.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) rounded[i] = float_to_bf16(v[i]);
    src = rounded.data();
  } else {
    HYD_CHECK(dst.dtype == DType::f32, "checkpoint: tensors of dtype ", dtype_name(dst.dtype), " are not restored");
  }
  device_fence(dst.device);
  copy_tensor(dst.view({dst.numel()}), Tensor(src, dst.dtype, Device::cpu(), {dst.numel()}));
  device_fence(dst.device);
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// "12:345]" -> {12, 345}; false unless the text is exactly that.
bool parse_range(const std::string& text, int64_t* a, int64_t* b) {
  const size_t colon = text.find(':');
  if (colon == std::string::npos || text.empty() || text.back() != ']') return false;
  const std::string lo = text.substr(0, colon), hi = text.substr(colon + 1, text.size() - colon - 2);
  auto digits = [](const std::string& t) {
    return !t.empty() && t.size() < 19 && t.find_first_not_of("0123456789") == std::string::npos;
  };
  if (!digits(lo) || !digits(hi)) return false;
  *a = std::stoll(lo);
  *b = std::stoll(hi);
  return *a < *b;
}

}  // namespace

void add_parameters(SafetensorsWriter& w, const std::vector<ParamInfo>& params, ParamSelection which) {
  for (const ParamInfo& p : params) {
    const bool piece = !p.global_shape.empty();
    if (which == (piece ? ParamSelection::whole : ParamSelection::pieces)) continue;
    if (!piece) {
      add_tensor(w, "param/" + p.name, p.shape, p.value);
    } else {
      add_tensor(w,
                 "param/" + p.name + "[" + std::to_string(p.global_begin) + ":" +
                     std::to_string(p.global_begin + p.numel) + "]",
                 {p.numel}, p.value);
    }
  }
}

CheckpointTensors::CheckpointTensors(const Checkpoint& ck) : ck_(&ck) {
  for (int64_t r = 1; r < ck.manifest.world_size; ++r) others_.push_back(ck.open_rank(r));
  for (size_t r = 0; r <= others_.size(); ++r) {
    const SafetensorsFile& f = file(r);
    for (const std::string& t : f.names()) {
      Piece piece;
      piece.file = r;
      piece.tensor = t;
      const int64_t stored = numel_of(f.info(t).shape);
      std::string key = t;
      const size_t bracket = t.find('[');
      if (bracket != std::string::npos && t.find('/') < bracket) {
        if (!parse_range(t.substr(bracket + 1), &piece.begin, &piece.end))
          throw Error::at(f.path(), t, "a piece's name must end in [a:b] with a < b");
        if (piece.end - piece.begin != stored)
          throw Error::at(
              f.path(), t,
              "holds " + std::to_string(stored) + " values, its name says " + std::to_string(piece.end - piece.begin));
        key = t.substr(0, bracket);
      } else {
        piece.end = stored;
        piece.whole = true;
      }
      pieces_[key].push_back(std::move(piece));
    }
  }
  for (auto& [key, v] : pieces_)
    std::sort(v.begin(), v.end(), [](const Piece& x, const Piece& y) { return x.begin < y.begin; });
}

bool CheckpointTensors::contains(const std::string& kind, const std::string& name) const {
  return pieces_.count(kind + "/" + name) != 0;
}

std::vector<float> CheckpointTensors::read(const std::string& kind, const std::string& name,
                                           const std::vector<int64_t>& shape, int64_t begin, int64_t n) const {
  const std::string key = kind + "/" + name;
  const auto it = pieces_.find(key);
  if (it == pieces_.end()) {
    const std::string where = others_.empty() ? "missing from the checkpoint's state file"
                                              : "missing from every state file of the checkpoint";
    throw Error::at(ck_->tensors.path(), key, where);
  }
  const std::vector<Piece>& v = it->second;
  const int64_t total = numel_of(shape);
  for (const Piece& p : v) {
    const SafetensorsFile& f = file(p.file);
    if (p.whole && f.info(p.tensor).shape != shape)
      throw Error::at(f.path(), p.tensor,
                      "has shape " + f.info(p.tensor).shape_str() + ", the model expects " + shape_to_string(shape));
    if (p.end > total)
      throw Error::at(f.path(), p.tensor,
                      "reaches element " + std::to_string(p.end) + " of a tensor the model has as " +
                          shape_to_string(shape) + " (" + std::to_string(total) + " elements)");
  }
  if (v.back().end != total && !v.back().whole) {
    int64_t end = 0;
    for (const Piece& p : v) end = std::max(end, p.end);
    if (end != total)
      throw Error::at(file(v.back().file).path(), v.back().tensor,
                      "the pieces of " + key + " end at element " + std::to_string(end) + ", the model's " +
                          shape_to_string(shape) + " has " + std::to_string(total));
  }
  std::vector<float> out;
  int64_t next = begin;
  const int64_t stop = begin + n;
  for (const Piece& p : v) {
    if (next >= stop) break;
    if (p.end <= next || p.begin > next) continue;
    const SafetensorsFile& f = file(p.file);
    const SafetensorsTensorInfo& info = f.info(p.tensor);
    if (info.dtype != SafetensorsDType::F32 && info.dtype != SafetensorsDType::BF16)
      throw Error::at(f.path(), p.tensor,
                      std::string("has dtype ") + safetensors_dtype_name(info.dtype) + ", expected F32 or BF16");
    std::vector<float> values = f.read_f32(p.tensor);
    if (p.begin == begin && p.end == stop) return values;  // exactly this piece
    if (out.empty()) out.resize(static_cast<size_t>(n));
    const int64_t hi = std::min(stop, p.end);
    std::copy(values.begin() + (next - p.begin), values.begin() + (hi - p.begin), out.begin() + (next - begin));
    next = hi;
  }
  if (next < stop)
    throw Error::at(ck_->tensors.path(), key,
                    "no state file of the checkpoint holds elements " + std::to_string(next) + ".." +
                        std::to_string(stop) + " of it");
  return out;
}

void restore_parameters(const Checkpoint& ck, const std::vector<ParamInfo>& params) {
  const CheckpointTensors tensors(ck);
  for (const ParamInfo& p : params)
    upload(tensors.read("param", p.base_name(), p.full_shape(), p.global_begin, p.numel), p.value);
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
                              int64_t model_params, int64_t expert_shards) {
  return {
      {"steps_taken", opt.steps_taken()},
      {"skipped_steps", opt.skipped_steps()},
      {"params", model_params},
      {"zero1",
       {{"ranks", ranks}, {"shard_numel", shard_numel}, {"flat_numel", flat_numel}, {"expert_shards", expert_shards}}}};
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
  if (counters.contains("zero1")) {
    const nlohmann::json& z = counters.at("zero1");
    if (!z.is_object()) throw Error::at(mpath, "optimizer.zero1", "expected an object");
    if (count(z, "ranks", "zero1.ranks") != ck.manifest.world_size)
      throw Error::at(mpath, "optimizer.zero1.ranks",
                      "differs from the world_size of " + std::to_string(ck.manifest.world_size) + " state files");
  } else if (ck.manifest.world_size != 1) {
    throw Error::at(mpath, "optimizer.zero1", "missing in a checkpoint of " + std::to_string(ck.manifest.world_size) +
                                                  " state files");
  }
  std::map<std::string, const ParamInfo*> by_name;
  for (const ParamInfo& p : model_params) by_name[p.name] = &p;
  const CheckpointTensors tensors(ck);
  const std::vector<ParamInfo>& params = opt.params();
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamInfo& p = params[i];
    const std::string base = p.base_name();
    HYD_CHECK(by_name.count(base) != 0, "restore_optimizer_resharded: '", p.name,
              "' is not a piece of a model parameter");
    const std::vector<int64_t>& shape = p.full_shape();
    auto read = [&](const char* kind) { return tensors.read(kind, base, shape, p.global_begin, p.numel); };
    upload(read("adam_m"), opt.first_moments()[i]);
    upload(read("adam_v"), opt.second_moments()[i]);
    if (tensors.contains("master", base))
      upload(read("master"), opt.masters()[i]);
    else if (opt.separate_masters())  // a CPU checkpoint: its parameters were the masters
      upload(read("param"), opt.masters()[i]);
  }
  opt.restore_counters(count(counters, "steps_taken", "steps_taken"), count(counters, "skipped_steps", "skipped_steps"));
}

}  // namespace hyd

// What DenseModel (trainer/model.cpp) and HybridModel (trainer/hybrid_model.cpp) build their parameter
// buffers and host transfers with: the parameter list's layout rule, the LM head's chunk size, host <-> device
// copies as f32.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "trainer/core/tensor.h"
#include "trainer/model.h"

namespace hyd::model_common {

// Every parameter view starts at a multiple of 64 elements (128 B in bf16, 256 B in f32) of the flat buffers, so
// vectorised kernels and cuBLAS see aligned pointers even for tiny test shapes. Padding elements are zero and
// belong to no parameter.
constexpr int64_t kParamAlign = 64;

// Appends parameter `name` of `shape` at element `offset` of the flat buffers (its value / grad views are set
// later), records it in `index` and advances `offset` past it, padded to kParamAlign.
void add_param(std::vector<ParamInfo>& params, std::unordered_map<std::string, size_t>& index, const std::string& name,
               std::vector<int64_t> shape, bool weight_decay, int64_t& offset);

// The parameter `name` of `params` (index: name -> position); throws "<model>: no parameter named 'name'".
const ParamInfo& find_param(const std::vector<ParamInfo>& params, const std::unordered_map<std::string, size_t>& index,
                            const std::string& name, const char* model);

// The model-level host transfers, each fenced by device_sync on both sides: host values into a tensor (its numel
// of them), n host values into parameter p (n must be p.numel; model and the name go into the error), a tensor's
// values as host f32, a tensor zeroed.
void write_values(Device d, const Tensor& t, const float* data);
void write_param(Device d, const ParamInfo& p, const float* data, int64_t n, const char* model);
std::vector<float> read_values(Device d, const Tensor& t);
void zero_values(Device d, const Tensor& t);

// Tokens per LM-head chunk for a vocabulary of `vocab`: C * vocab * 4 bytes <= max(64 MiB, `scratch_bytes`), a
// multiple of 16 in [16, 4096], so that the logits of a whole batch never exist. `scratch_bytes`: what the model's
// scratch holds anyway for its layers, which a larger chunk then fills for free. Larger chunks matter: each chunk's
// weight gradient GEMM reads and writes the whole f32 [vocab, hidden] gradient (issue 9's student at 16384 tokens:
// 32 chunks of 512 tokens moved 8.4 GB for it).
int64_t logits_chunk_tokens(int64_t vocab, size_t scratch_bytes = 0);

// copy_tensor / zero_tensor run on the legacy default stream, which does not order against the contexts'
// non-blocking streams: host <-> device transfers are fenced with a full device synchronisation (no-op on the CPU).
void device_sync(Device d);

// A view of `shape` (1, 2 or 3 dimensions) at element `offset` of the flat buffer `flat`.
Tensor view_at(const Tensor& flat, int64_t offset, const std::vector<int64_t>& shape);

// Tensor (f32 or bf16, any device) -> host f32. The caller has synchronised the device.
std::vector<float> download_f32(const Tensor& t);

// Host f32 -> tensor (f32 or bf16, rounded to nearest even).
void upload_f32(const Tensor& t, const float* src);

}  // namespace hyd::model_common

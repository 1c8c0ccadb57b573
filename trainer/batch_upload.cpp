#include "trainer/batch_upload.h"

#include <algorithm>

#ifdef HYD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace hyd {

void device_fence(Device d) {
#ifdef HYD_WITH_CUDA
  if (d.is_cuda()) CHECK_CUDA(cudaDeviceSynchronize());
#else
  (void)d;
#endif
}

int64_t max_doc_len(const std::vector<int32_t>& cu_seqlens) {
  int64_t longest = 0;
  for (size_t d = 1; d < cu_seqlens.size(); ++d)
    longest = std::max<int64_t>(longest, cu_seqlens[d] - cu_seqlens[d - 1]);
  return longest;
}

namespace {
constexpr size_t kPad = 512;  // per-allocation slack for the arena's alignment
}  // namespace

BatchUploader::BatchUploader(Device device, int64_t max_tokens, bool with_loss_mask)
    // tokens, targets, positions [N] and cu_seqlens [<= N + 1] as i32, plus the u8 mask [N].
    : arena_("batch", device,
             static_cast<size_t>(4 * (4 * max_tokens + 1) + (with_loss_mask ? max_tokens : 0)) + 5 * kPad),
      max_tokens_(max_tokens),
      with_loss_mask_(with_loss_mask) {}

Batch BatchUploader::upload(ExecContext& ctx, const HostBatch& hb) {
  const auto n = static_cast<int64_t>(hb.tokens.size());
  HYD_CHECK(n <= max_tokens_ && hb.targets.size() == hb.tokens.size() && hb.positions.size() == hb.tokens.size() &&
                static_cast<int64_t>(hb.cu_seqlens.size()) == hb.num_docs + 1,
            "malformed host batch: ", n, " tokens, ", hb.num_docs, " documents, ", hb.cu_seqlens.size(),
            " boundaries (at most ", max_tokens_, " tokens)");
  ctx.synchronize();
  device_fence(arena_.device());
  arena_.reset();
  Batch b;
  b.tokens = put(hb.tokens);
  b.targets = put(hb.targets);
  b.positions = put(hb.positions);
  b.cu_seqlens = put(hb.cu_seqlens);
  if (with_loss_mask_) {
    mask_host_.resize(static_cast<size_t>(n));
    for (size_t i = 0; i < mask_host_.size(); ++i) mask_host_[i] = hb.targets[i] >= 0 ? 1 : 0;
    mask_ = arena_.alloc({n}, DType::u8);
    copy_tensor(mask_, Tensor(mask_host_.data(), DType::u8, Device::cpu(), {n}));
  }
  device_fence(arena_.device());
  b.num_tokens = n;
  b.num_docs = hb.num_docs;
  b.max_doc_len = max_doc_len(hb.cu_seqlens);
  b.num_targets = hb.num_targets;
  return b;
}

const Tensor& BatchUploader::loss_mask() const {
  HYD_CHECK(with_loss_mask_, "BatchUploader: constructed without a loss mask");
  return mask_;
}

Tensor BatchUploader::put(const std::vector<int32_t>& v) {
  const auto n = static_cast<int64_t>(v.size());
  Tensor t = arena_.alloc({n}, DType::i32);
  copy_tensor(t, Tensor(const_cast<int32_t*>(v.data()), DType::i32, Device::cpu(), {n}));
  return t;
}

}  // namespace hyd

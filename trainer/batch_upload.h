// Device copies of a packed host micro-batch, shared by the training and distillation loops.
#pragma once

#include <cstdint>
#include <vector>

#include "data/dataset.h"
#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/model.h"

namespace hyd {

// copy_tensor runs on the legacy default stream, which does not order against the context's
// non-blocking stream (and a pageable host-to-device cudaMemcpy may return before the DMA lands):
// host <-> device transfers are fenced with a full device synchronisation. No-op on the CPU.
void device_fence(Device d);

// The longest document of host boundaries cu [D+1] (0 for none): Batch::max_doc_len.
int64_t max_doc_len(const std::vector<int32_t>& cu_seqlens);

// Device buffers for one micro-batch (tokens, targets, positions, cu_seqlens and, when asked for, the
// loss mask targets >= 0 as u8); reset and refilled for every micro-batch.
class BatchUploader {
 public:
  BatchUploader(Device device, int64_t max_tokens, bool with_loss_mask = false);
  // Waits for the previous micro-batch's kernels (they may still read these buffers), then uploads.
  Batch upload(ExecContext& ctx, const HostBatch& hb);
  const Tensor& loss_mask() const;  // u8 [N] of the last upload; only with_loss_mask
  size_t bytes() const { return arena_.capacity(); }

 private:
  Tensor put(const std::vector<int32_t>& v);
  Arena arena_;
  int64_t max_tokens_;
  bool with_loss_mask_;
  std::vector<uint8_t> mask_host_;
  Tensor mask_;
};

}  // namespace hyd

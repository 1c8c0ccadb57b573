// Dispatcher for AdamW (see kernels/adamw.h). Tensors are treated as flat arrays of n elements (a
// parameter keeps its own shape; only the element counts must agree).
#include "kernels/adamw.h"

#include <climits>
#include <cstdint>
#include <utility>

#include "kernels/dispatch.h"

namespace hyd::kernels {

namespace {

void expect_numel(const Tensor& t, int64_t n, const char* op, const char* arg) {
  if (t.numel() != n)
    HYD_THROW(op, ": argument '", arg, "' has shape ", t.shape_str(), " (", t.numel(), " elements), expected ", n,
              " elements like 'master'");
}

// The checks adamw_update and AdamWGroup share: f32 master / grad / m / v of one element count on one device, and
// a working copy (when given) of that count on that device. (Its dtype depends on the path: checked by the caller.)
void check_tensors(const Tensor& master, const Tensor& grad, const Tensor& m, const Tensor& v, const Tensor& working,
                   const char* op) {
  const int64_t n = master.numel();
  expect_dtype(master, DType::f32, op, "master");
  expect_dtype(grad, DType::f32, op, "grad");
  expect_dtype(m, DType::f32, op, "m");
  expect_dtype(v, DType::f32, op, "v");
  expect_numel(grad, n, op, "grad");
  expect_numel(m, n, op, "m");
  expect_numel(v, n, op, "v");
  for (const Tensor* t : {&grad, &m, &v}) expect_same_device(master, *t, op);
  if (!working.empty()) {
    expect_numel(working, n, op, "working");
    expect_same_device(master, working, op);
  }
}

}  // namespace

void adamw_update(const ExecContext& ctx, const Tensor& master, const Tensor& grad, const Tensor& m, const Tensor& v,
                  const Tensor& working, const AdamWStep& s) {
  constexpr const char* op = "adamw_update";
  const int64_t n = master.numel();
  check_tensors(master, grad, m, v, working, op);
  if (s.step < 1) HYD_THROW(op, ": step must be >= 1 (1-based), got ", s.step);
  if (master.device.is_cpu()) {
    float* p = master.ptr<float>();
    cpu::adamw_update<float>(p, grad.ptr<float>(), m.ptr<float>(), v.ptr<float>(), n, s);
    if (!working.empty()) {
      // On the CPU the model may compute in f32 (a plain copy) or hold a bf16 copy like the GPU.
      if (working.dtype == DType::bf16) {
        bf16* w = working.ptr<bf16>();
        for (int64_t i = 0; i < n; ++i) w[i] = float_to_bf16(p[i]);
      } else {
        expect_dtype(working, DType::f32, op, "working");
        float* w = working.ptr<float>();
        for (int64_t i = 0; i < n; ++i) w[i] = p[i];
      }
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  if (master.device.is_cuda()) {
    check_context(ctx, master, op);
    if (!working.empty()) expect_dtype(working, DType::bf16, op, "working");
    cuda::adamw_update(master.ptr<float>(), grad.ptr<float>(), m.ptr<float>(), v.ptr<float>(),
                       working.empty() ? nullptr : working.ptr<bf16>(), n, s, ctx.stream());
    return;
  }
#endif
  unsupported(op, master);
}

AdamWGroup::AdamWGroup(Device device, std::vector<Item> items) : device_(device), items_(std::move(items)) {
  constexpr const char* op = "AdamWGroup";
  for (const Item& it : items_) {
    check_tensors(it.master, it.grad, it.m, it.v, it.working, op);
    if (!(it.master.device == device))
      HYD_THROW(op, ": a master is on ", it.master.device.str(), ", the group on ", device.str());
    if (!it.working.empty() && device.is_cuda()) expect_dtype(it.working, DType::bf16, op, "working");
  }
  if (!device.is_cuda()) return;
#ifdef HYD_WITH_CUDA
  std::vector<cuda::AdamWSegment> segs;
  std::vector<int32_t> chunks;
  auto aligned = [](const Tensor& t, uintptr_t a) { return reinterpret_cast<uintptr_t>(t.data) % a == 0; };
  for (const Item& it : items_) {
    const int64_t n = it.master.numel();
    if (n == 0) continue;
    HYD_CHECK(
        segs.size() < static_cast<size_t>(INT32_MAX) && (n + cuda::kAdamWChunk - 1) / cuda::kAdamWChunk <= INT32_MAX,
        op, ": too many tensors or elements for the table");
    const bool vec4 = aligned(it.master, 16) && aligned(it.grad, 16) && aligned(it.m, 16) && aligned(it.v, 16) &&
                      (it.working.empty() || aligned(it.working, 8));
    for (int64_t c = 0; c * cuda::kAdamWChunk < n; ++c) {
      chunks.push_back(static_cast<int32_t>(segs.size()));
      chunks.push_back(static_cast<int32_t>(c));
    }
    segs.push_back(cuda::AdamWSegment{it.master.ptr<float>(), it.grad.ptr<float>(), it.m.ptr<float>(),
                                      it.v.ptr<float>(), it.working.empty() ? nullptr : it.working.ptr<bf16>(), n,
                                      it.weight_decay, vec4 ? 1 : 0});
  }
  if (segs.empty()) return;
  const auto seg_bytes = static_cast<int64_t>(segs.size() * sizeof(cuda::AdamWSegment));
  table_ = Arena("adamw table", device, static_cast<size_t>(seg_bytes) + chunks.size() * 4 + 512);
  segments_ = table_.alloc({seg_bytes}, DType::u8);
  chunks_ = table_.alloc({static_cast<int64_t>(chunks.size())}, DType::i32);
  copy_tensor(segments_, Tensor(segs.data(), DType::u8, Device::cpu(), {seg_bytes}));
  copy_tensor(chunks_, Tensor(chunks.data(), DType::i32, Device::cpu(), {static_cast<int64_t>(chunks.size())}));
#else
  HYD_THROW(op, ": CUDA tensors in a CPU-only build");
#endif
}

void AdamWGroup::update(const ExecContext& ctx, const AdamWStep& s) const {
  if (s.step < 1) HYD_THROW("AdamWGroup::update: step must be >= 1 (1-based), got ", s.step);
  if (!device_.is_cuda()) {
    for (const Item& it : items_) {
      AdamWStep one = s;
      one.weight_decay = it.weight_decay;
      adamw_update(ctx, it.master, it.grad, it.m, it.v, it.working, one);
    }
    return;
  }
#ifdef HYD_WITH_CUDA
  if (!(ctx.device() == device_))
    HYD_THROW("AdamWGroup::update on ", device_.str(), " called with an execution context on ", ctx.device().str());
  if (chunks_.empty()) return;
  cuda::adamw_update_table(reinterpret_cast<const cuda::AdamWSegment*>(segments_.data), chunks_.ptr<int32_t>(),
                           chunks_.numel() / 2, s, ctx.stream());
#endif
}

}  // namespace hyd::kernels

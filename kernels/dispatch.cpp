#include "kernels/dispatch.h"

namespace hyd::kernels {

void check_context(const ExecContext& ctx, const Tensor& t, const char* op) {
  if (t.device.is_cuda() && !(ctx.device() == t.device))
    HYD_THROW(op, ": tensors on ", t.device.str(), " but the context is on ", ctx.device().str());
}

void unsupported(const char* op, const Tensor& t) {
  HYD_THROW(op, ": no implementation for ", dtype_name(t.dtype), " tensors on ", t.device.str(),
            t.device.is_cuda() ? " (this build has no CUDA support; configure with -DHYD_CUDA=ON)" : "");
}

}  // namespace hyd::kernels

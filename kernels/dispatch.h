// Checks shared by the Tensor-level dispatchers in kernels/*.cpp (each op validates its own
// arguments; these two cover the device choice every dispatcher makes the same way).
#pragma once

#include "trainer/core/exec_context.h"
#include "trainer/core/tensor.h"

namespace hyd::kernels {

// A CUDA op runs on the context's stream, so the context must belong to the tensors' device; CPU
// tensors need nothing of the context. Throws "OP: tensors on DEVICE but the context is on DEVICE".
void check_context(const ExecContext& ctx, const Tensor& t, const char* op);

// No branch of the dispatcher handles `t` (in practice: a CUDA tensor in a build without CUDA).
// Throws a hyd::Error naming the op, the tensor's dtype and device.
[[noreturn]] void unsupported(const char* op, const Tensor& t);

}  // namespace hyd::kernels

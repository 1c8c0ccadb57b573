// SwiGLU MLP block of the dense decoder, with its residual connection:
//   m = RMSNorm(x) ; gu = m Wgate_up^T ; s = silu(gu[:, :F]) * gu[:, F:] ; out = x + s Wdown^T
// Shapes (N tokens): x, m, out [N, D]; gu [N, 2F]; s [N, F]; rstd f32 [N]. Activations f32 (CPU) /
// bf16 (CUDA).
#pragma once

#include <string>

#include "trainer/core/exec_context.h"
#include "trainer/layer_common.h"

namespace hyd {

class Arena;

struct MlpLayer {
  int64_t hidden = 0, intermediate = 0;
  float eps = 1e-6f;
  std::string nvtx_fwd, nvtx_bwd;  // "layer.L.mlp.fwd" / ".bwd"

  WeightRef norm;       // mlp_norm [D]
  WeightRef w_gate_up;  // [2F, D]: gate rows then up rows
  WeightRef w_down;     // [D, F]

  // Exactly what backward needs; x is a view of the layer input, owned by the caller.
  struct Saved {
    Tensor x, m, rstd, gate_up, act;
  };
  struct Scratch {
    Tensor d_act, d_gate_up, dm;
  };

  template <class Alloc>
  Saved alloc_saved(Alloc& arena, int64_t n, DType act) const {
    Saved s;
    s.m = arena.alloc({n, hidden}, act);
    s.rstd = arena.alloc({n}, DType::f32);
    s.gate_up = arena.alloc({n, 2 * intermediate}, act);
    s.act = arena.alloc({n, intermediate}, act);
    return s;
  }
  template <class Alloc>
  Scratch alloc_scratch(Alloc& arena, int64_t n, DType act) const {
    Scratch s;
    s.d_act = arena.alloc({n, intermediate}, act);
    s.d_gate_up = arena.alloc({n, 2 * intermediate}, act);
    s.dm = arena.alloc({n, hidden}, act);
    return s;
  }

  // out = in + mlp(RMSNorm(in)); out must not alias in.
  void forward(const ExecContext& ctx, const Tensor& in, const Tensor& out, Saved& saved) const;
  // din = dout + d(mlp path)/d(in); din may be the same tensor as dout. Weight gradients accumulate.
  void backward(const ExecContext& ctx, const Saved& saved, const Tensor& dout, const Tensor& din,
                Arena& scratch) const;
};

}  // namespace hyd

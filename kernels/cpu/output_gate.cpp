// CPU reference for the sigmoid output gate (see kernels/output_gate.h). Each element is read before
// it is written, so y may alias o, and d_o / dgate may alias dy.
#include "kernels/output_gate.h"

#include <cmath>

namespace hyd::kernels::cpu {

namespace {

// 1 / (1 + e^-g), written so that neither branch overflows.
template <class T>
T sigmoid(T g) {
  if (g >= T(0)) return T(1) / (T(1) + std::exp(-g));
  const T e = std::exp(g);
  return e / (T(1) + e);
}

}  // namespace

template <class T>
void output_gate_forward(const T* o, const T* gate, T* y, int64_t n) {
  for (int64_t x = 0; x < n; ++x) y[x] = o[x] * sigmoid(gate[x]);
}

template <class T>
void output_gate_backward(const T* dy, const T* o, const T* gate, T* d_o, T* dgate, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const T s = sigmoid(gate[x]), g = dy[x], ov = o[x];
    d_o[x] = g * s;
    dgate[x] = g * ov * s * (T(1) - s);
  }
}

template void output_gate_forward<float>(const float*, const float*, float*, int64_t);
template void output_gate_forward<double>(const double*, const double*, double*, int64_t);
template void output_gate_backward<float>(const float*, const float*, const float*, float*, float*, int64_t);
template void output_gate_backward<double>(const double*, const double*, const double*, double*, double*, int64_t);

}  // namespace hyd::kernels::cpu

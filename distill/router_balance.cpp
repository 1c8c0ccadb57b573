#include "distill/router_balance.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "kernels/elementwise.h"
#include "trainer/core/arena.h"
#include "trainer/core/error.h"
#include "trainer/layer_moe.h"

namespace hyd {

double apply_selection_bias_update(const ExecContext& ctx, const std::vector<ParamInfo>& model_params, AdamW& opt,
                                   const std::vector<HybridModel::MoeLoad>& loads, double rate) {
  constexpr const char* op = "apply_selection_bias_update";
  HYD_CHECK(rate >= 0 && std::isfinite(rate), op, ": rate ", rate, " must be finite and >= 0");
  double imbalance = 0;
  int64_t layers = 0;
  for (const HybridModel::MoeLoad& l : loads) {
    const int64_t E = static_cast<int64_t>(l.load.size()), total = std::accumulate(l.load.begin(), l.load.end(), int64_t(0));
    if (E > 0 && total > 0) {
      imbalance += static_cast<double>(*std::max_element(l.load.begin(), l.load.end())) * E / static_cast<double>(total);
      ++layers;
    }
    if (l.bias_param.empty() || rate == 0) continue;
    const auto it = std::find_if(model_params.begin(), model_params.end(),
                                 [&](const ParamInfo& p) { return p.name == l.bias_param; });
    if (it == model_params.end()) HYD_THROW(op, ": the model has no parameter '", l.bias_param, "'");
    if (it->numel != E)
      HYD_THROW(op, ": '", l.bias_param, "' has ", it->numel, " entries but layer ", l.layer, " has ", E, " loads");
    // The move of every entry, by the rule itself (applied to zeros).
    std::vector<double> delta(static_cast<size_t>(E), 0.0);
    moe_update_selection_bias(Tensor(delta.data(), DType::f64, Device::cpu(), {E}), l.load, rate);
    // The optimizer's pieces of this parameter: [offset, offset + numel) inside the parameter's range.
    const std::vector<ParamInfo>& held = opt.params();
    for (size_t i = 0; i < held.size(); ++i) {
      const ParamInfo& q = held[i];
      if (q.offset < it->offset || q.offset + q.numel > it->offset + it->numel) continue;
      const int64_t lo = q.offset - it->offset, n = q.numel;
      // f32 values of the piece: the parameter (CPU) or the master (CUDA), moved on the host (E is small).
      const Tensor target = opt.separate_masters() ? opt.masters()[i] : q.value;
      HYD_CHECK(target.dtype == DType::f32 && target.numel() == n, op, ": '", q.name, "': expected f32 of ", n,
                " elements to move");
      std::vector<float> v(static_cast<size_t>(n));
      const Tensor host(v.data(), DType::f32, Device::cpu(), {n});
      copy_tensor(host, target.view({n}));
      for (int64_t j = 0; j < n; ++j) v[j] += static_cast<float>(delta[lo + j]);
      copy_tensor(target.view({n}), host);
      // CUDA: the working weight follows its master (rounded as AdamW's step rounds it).
      if (opt.separate_masters()) kernels::convert(ctx, q.value.view({n}), target.view({n}));
    }
  }
  return layers > 0 ? imbalance / static_cast<double>(layers) : NAN;
}

}  // namespace hyd

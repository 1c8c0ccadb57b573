// Auxiliary-loss-free load balancing of the student's MoE routers in distillation stage 2 (DeepSeek-V3;
// DistillOptions::router_bias_rate): after an optimizer step, every MoE layer's selection bias b moves by
//   b_e += rate * sign(mean_load - load_e)          (trainer/layer_moe.h moe_update_selection_bias)
// with the step's routed rows per expert summed over every rank, so that every replica makes the same move.
// The bias is a parameter without gradient (AdamW leaves it where it is); the move is applied to whatever the
// optimizer holds of it: the f32 parameter itself on the CPU (the parameters are the masters), the f32
// master and then the bf16 working weight rounded from it on CUDA. Under ZeRO-1 each rank's optimizer holds
// pieces "NAME[a:b]" of its shard only: each rank moves its pieces, and the caller's gather_parameters
// afterwards gives every replica the moved values.
#pragma once

#include <vector>

#include "trainer/core/exec_context.h"
#include "trainer/hybrid_model.h"
#include "trainer/model.h"
#include "trainer/optimizer.h"

namespace hyd {

// loads: HybridModel::moe_expert_loads() with every load already summed over the ranks; model_params: the
// model's parameter list (to place the optimizer's pieces inside the bias parameters). Layers without a
// bias parameter are left alone. Returns the mean over the MoE layers of max_e load_e / mean load (1 =
// perfectly balanced; NaN without MoE layers or loads).
double apply_selection_bias_update(const ExecContext& ctx, const std::vector<ParamInfo>& model_params, AdamW& opt,
                                   const std::vector<HybridModel::MoeLoad>& loads, double rate);

}  // namespace hyd

// DenseModel: parameter list and flat buffers, the activation plan, forward, chunked LM head + loss,
// and backward. The math is written in trainer/model.h; the blocks live in layer_attention.* and
// layer_mlp.*.
//
// Memory (N = max_tokens, act = 4 bytes on the CPU / 2 on CUDA, every allocation rounded up to 256 B):
//   parameters  P_pad * (4 | 2)   P_pad = num_parameters() plus per-tensor padding to 64 elements
//   gradients   P_pad * 4
//   rope tables 2 * T * d/2 * 4   T = max(max_position_embeddings, N)
//   activations act * N * [ (2L + 1) D                      residual stream h_0, h after each block
//                           + L (D + q + 2 kv + q)            a, q, k, v, o          (q = Hq d, kv = Hkv d)
//                           + L (q + kv)                      q, k before the norm   (qk_norm only)
//                           + L (D + 2F + F)                  m, gate_up, swiglu out   (dense layers)
//                           + L (D + MoeLayer::alloc_saved)   m, router scores, routing, permuted rows
//                                                             (N k rows of D, 2F_moe, F_moe, D)   (MoE layers)
//                           + 3 D ]                           final normed, its grad, residual grad
//               + 4 * N * [ L (1 + Hq + 1) + L (Hq + Hkv) [qk_norm] + 1 + 1 ]   rstd, lse, q/k rstd, final rstd,
//                                                                               per-token losses
//   scratch     max( attention backward temporaries act * N (2 q + 2 kv + D [+ q + kv]),
//                    MLP backward temporaries      act * N (3 F + D),
//                    MoE block backward             act * N (D) + MoeLayer::alloc_scratch,
//                    one logits chunk              4 * C * V )
// The capacities are computed by running the same alloc_* code on an ArenaSizer, so this comment and
// the arenas cannot disagree by more than the comment's own mistakes.
#include "trainer/model.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <unordered_map>
#include <utility>

#include "kernels/cross_entropy.h"
#include "kernels/elementwise.h"
#include "kernels/embedding.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "trainer/layer_attention.h"
#include "trainer/layer_mlp.h"
#include "trainer/layer_moe.h"
#include "trainer/model_common.h"

namespace hyd {

using model_common::device_sync;
using model_common::download_f32;
using model_common::upload_f32;
using model_common::view_at;

struct DenseModel::Impl {
  ModelConfig cfg;
  Device device;
  int64_t max_tokens = 0;
  DType act = DType::f32;  // activations and parameters: f32 on the CPU, bf16 on CUDA
  int64_t logits_chunk = 0;

  std::vector<ParamInfo> params;
  std::unordered_map<std::string, size_t> index;
  Arena param_arena, grad_arena, table_arena, act_arena, scratch_arena;
  Arena moe_bias_arena;  // CUDA: f32 working copies of the MoE selection biases (MoeBlock)
  Tensor flat_params, flat_grads, rope_cos, rope_sin;

  WeightRef embed, final_norm, lm_head;
  std::vector<AttentionLayer> attn;
  // Per layer, the FFN block: the dense MLP (mlp[l]) or, where cfg.is_moe_layer(l), the MoE block moe[l]
  // (the other vector's entry is then unused and empty).
  std::vector<MlpLayer> mlp;
  std::vector<MoeBlock> moe;
  std::vector<bool> sparse;

  // Activations of one micro-batch, allocated from the activation arena (reset every step).
  struct Step {
    std::vector<Tensor> residual;  // 2L + 1 tensors [N, D]: h_0, then h after each attention / MLP block
    std::vector<AttentionLayer::Saved> attn;
    std::vector<MlpLayer::Saved> mlp;  // dense layers (empty entries for MoE layers)
    std::vector<MoeBlock::Saved> moe;  // MoE layers (empty entries for dense layers)
    Tensor final_normed, final_rstd;   // [N, D], f32 [N]
    Tensor losses;                     // f32 [N]
    Tensor d_normed, d_residual;       // [N, D]
  };

  template <class Alloc>
  Step alloc_step(Alloc& a, int64_t n) const {
    Step s;
    const int64_t D = cfg.hidden_size;
    s.residual.push_back(a.alloc({n, D}, act));
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      s.residual.push_back(a.alloc({n, D}, act));
      s.residual.push_back(a.alloc({n, D}, act));
      s.attn.push_back(attn[l].alloc_saved(a, n, act));
      if (sparse[l]) {
        s.mlp.emplace_back();
        s.moe.push_back(moe[l].alloc_saved(a, n, act));
      } else {
        s.mlp.push_back(mlp[l].alloc_saved(a, n, act));
        s.moe.emplace_back();
      }
    }
    s.final_normed = a.alloc({n, D}, act);
    s.final_rstd = a.alloc({n}, DType::f32);
    s.losses = a.alloc({n}, DType::f32);
    s.d_normed = a.alloc({n, D}, act);
    s.d_residual = a.alloc({n, D}, act);
    return s;
  }

  // Scratch: the largest of one layer's backward temporaries and one f32 logits chunk.
  size_t scratch_bytes(int64_t n) const {
    size_t bytes = 0;
    if (cfg.num_layers > 0) {
      ArenaSizer sa;
      attn[0].alloc_scratch(sa, n, act);
      bytes = sa.used();
    }
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      ArenaSizer sm;
      if (sparse[l]) {
        moe[l].alloc_scratch(sm, n, act);
      } else {
        mlp[l].alloc_scratch(sm, n, act);
      }
      bytes = std::max(bytes, sm.used());
    }
    ArenaSizer sl;
    sl.alloc({std::min(logits_chunk, n), cfg.vocab_size}, DType::f32);
    return std::max(bytes, sl.used());
  }

  void add_param(const std::string& name, std::vector<int64_t> shape, bool weight_decay, int64_t& offset) {
    model_common::add_param(params, index, name, std::move(shape), weight_decay, offset);
  }

  WeightRef ref(const std::string& name) const {
    const ParamInfo& p = params[index.at(name)];
    return {p.value, p.grad};
  }

  void build();
  void check_batch(const ExecContext& ctx, const Batch& b) const;
  PackedSequence sequence(const Batch& b) const;
  void forward(const ExecContext& ctx, const Batch& b, Step& st);
  void lm_head_loss(const ExecContext& ctx, const Batch& b, Step& st, bool with_grad, float loss_scale);
  double mean_loss(const ExecContext& ctx, const Batch& b, const Step& st) const;
  void backward(const ExecContext& ctx, const Batch& b, Step& st);
};

void DenseModel::Impl::build() {
  const int64_t V = cfg.vocab_size, D = cfg.hidden_size, F = cfg.intermediate_size, L = cfg.num_layers;
  const int64_t d = cfg.head_dim;

  // Parameter list, in the fixed order of the flat buffers.
  int64_t offset = 0;
  add_param("embed", {V, D}, true, offset);
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    add_param(p + "attn_norm", {D}, false, offset);
    add_param(p + "wqkv", {cfg.qkv_dim(), D}, true, offset);
    if (cfg.qkv_bias) add_param(p + "bqkv", {cfg.qkv_dim()}, false, offset);
    if (cfg.qk_norm) {
      add_param(p + "q_norm", {d}, false, offset);
      add_param(p + "k_norm", {d}, false, offset);
    }
    add_param(p + "wo", {D, cfg.q_dim()}, true, offset);
    add_param(p + "mlp_norm", {D}, false, offset);
    if (cfg.is_moe_layer(l)) {
      for (const MoeBlock::ParamSpec& s : MoeBlock::param_specs(cfg))
        add_param(p + s.name, s.shape, s.weight_decay, offset);
    } else {
      add_param(p + "w_gate_up", {2 * F, D}, true, offset);
      add_param(p + "w_down", {D, F}, true, offset);
    }
  }
  add_param("final_norm", {D}, false, offset);
  if (!cfg.tie_word_embeddings) add_param("lm_head", {V, D}, true, offset);
  const int64_t total = offset;

  param_arena = Arena("params", device, static_cast<size_t>(total) * dtype_size(act));
  grad_arena = Arena("grads", device, static_cast<size_t>(total) * 4);
  flat_params = param_arena.alloc({total}, act);
  flat_grads = grad_arena.alloc({total}, DType::f32);
  zero_tensor(flat_params);  // padding stays zero forever
  zero_tensor(flat_grads);
  for (ParamInfo& p : params) {
    p.value = view_at(flat_params, p.offset, p.shape);
    p.grad = view_at(flat_grads, p.offset, p.shape);
  }

  // Layers: views of their weights plus the dimensions they need.
  const float eps = static_cast<float>(cfg.rms_norm_eps);
  embed = ref("embed");
  final_norm = ref("final_norm");
  lm_head = cfg.tie_word_embeddings ? embed : ref("lm_head");
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    AttentionLayer a;
    a.eps = eps;
    a.nvtx_fwd = "layer." + std::to_string(l) + ".attn.fwd";
    a.nvtx_bwd = "layer." + std::to_string(l) + ".attn.bwd";
    a.norm = ref(p + "attn_norm");
    a.mixer = AttentionMixer::for_model(cfg, eps, true, "layer." + std::to_string(l) + ".attn.mixer",
                                        [&](const std::string& name) { return ref(p + name); });
    attn.push_back(std::move(a));

    sparse.push_back(cfg.is_moe_layer(l));
    MlpLayer m;
    MoeBlock e;
    if (sparse[l]) {
      e = MoeBlock::for_model(cfg, l, eps, [&](const std::string& name) { return ref(p + name); });
    } else {
      m.hidden = D;
      m.intermediate = F;
      m.eps = eps;
      m.nvtx_fwd = "layer." + std::to_string(l) + ".mlp.fwd";
      m.nvtx_bwd = "layer." + std::to_string(l) + ".mlp.bwd";
      m.norm = ref(p + "mlp_norm");
      m.w_gate_up = ref(p + "w_gate_up");
      m.w_down = ref(p + "w_down");
    }
    mlp.push_back(std::move(m));
    moe.push_back(std::move(e));
  }
  moe_bias_arena = MoeBlock::make_selection_bias_copies(moe, device);

  // RoPE tables: positions inside a document never exceed max_tokens - 1 in one micro-batch, and a
  // caller may also pass positions up to max_position_embeddings - 1 (e.g. a sequence-parallel shard).
  const int64_t table_len = std::max(cfg.max_position_embeddings, max_tokens);
  double attention_factor = 1.0;
  const std::vector<double> inv_freq =
      kernels::rope_inv_freq(cfg.rope_theta, static_cast<int>(d), cfg.rope_scaling, &attention_factor);
  std::vector<float> cos_host(static_cast<size_t>(table_len * d / 2)), sin_host(cos_host.size());
  kernels::rope_build_tables(inv_freq, attention_factor, table_len, cos_host.data(), sin_host.data());
  ArenaSizer ts;
  ts.alloc({table_len, d / 2}, DType::f32);
  ts.alloc({table_len, d / 2}, DType::f32);
  table_arena = Arena("rope_tables", device, ts.used());
  rope_cos = table_arena.alloc({table_len, d / 2}, DType::f32);
  rope_sin = table_arena.alloc({table_len, d / 2}, DType::f32);
  upload_f32(rope_cos, cos_host.data());
  upload_f32(rope_sin, sin_host.data());

  // Activation and scratch arenas, sized by running the allocation code on a counter.
  logits_chunk = model_common::logits_chunk_tokens(V);
  ArenaSizer as;
  alloc_step(as, max_tokens);
  act_arena = Arena("activations", device, as.used());
  scratch_arena = Arena("scratch", device, scratch_bytes(max_tokens));
  device_sync(device);
}

// No device synchronisation: a batch's tensors arrive through copy_tensor / BatchUploader, which return
// once the data is on the device; a batch written by kernels on another stream must be ordered by its
// writer (ExecContext::wait_for).
void DenseModel::Impl::check_batch(const ExecContext& ctx, const Batch& b) const {
  const char* op = "DenseModel";
  if (!(ctx.device() == device))
    HYD_THROW("DenseModel on ", device.str(), " called with an execution context on ", ctx.device().str());
  if (b.num_tokens <= 0 || b.num_tokens > max_tokens)
    HYD_THROW("DenseModel: batch of ", b.num_tokens, " tokens; the model was built for 1..", max_tokens);
  if (b.num_docs <= 0) HYD_THROW("DenseModel: batch has ", b.num_docs, " documents");
  if (b.max_doc_len <= 0 || b.max_doc_len > b.num_tokens)
    HYD_THROW("DenseModel: batch has max_doc_len ", b.max_doc_len, ", expected 1..", b.num_tokens, " (its tokens)");
  if (b.num_targets < 0 || b.num_targets > b.num_tokens)
    HYD_THROW("DenseModel: batch has ", b.num_targets, " targets for ", b.num_tokens, " tokens");
  const std::pair<const Tensor*, const char*> ids[] = {
      {&b.tokens, "tokens"}, {&b.targets, "targets"}, {&b.positions, "positions"}};
  for (const auto& [t, name] : ids) {
    expect_shape(*t, {b.num_tokens}, op, name);
    expect_dtype(*t, DType::i32, op, name);
    if (!(t->device == device))
      HYD_THROW("DenseModel: batch tensor '", name, "' on ", t->device.str(), ", model on ", device.str());
  }
  expect_shape(b.cu_seqlens, {b.num_docs + 1}, op, "cu_seqlens");
  expect_dtype(b.cu_seqlens, DType::i32, op, "cu_seqlens");
  if (!(b.cu_seqlens.device == device))
    HYD_THROW("DenseModel: batch tensor 'cu_seqlens' on ", b.cu_seqlens.device.str(), ", model on ", device.str());
}

PackedSequence DenseModel::Impl::sequence(const Batch& b) const {
  if (b.sp != nullptr)
    HYD_THROW("DenseModel: sequence-parallel batches run on the HybridModel (an all-T student is this model)");
  if (b.ep != nullptr)
    HYD_THROW("DenseModel: expert-parallel batches run on the HybridModel (an all-T student is this model)");
  PackedSequence s;
  s.num_tokens = b.num_tokens;
  s.num_docs = b.num_docs;
  s.max_doc_len = b.max_doc_len;
  s.positions = b.positions;
  s.cu_seqlens = b.cu_seqlens;
  s.rope_cos = rope_cos;
  s.rope_sin = rope_sin;
  return s;
}

void DenseModel::Impl::forward(const ExecContext& ctx, const Batch& b, Step& st) {
  const PackedSequence seq = sequence(b);
  {
    NvtxRange range("embed.fwd");
    kernels::embedding_forward(ctx, b.tokens, embed.value, st.residual[0]);
  }
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    attn[l].forward(ctx, seq, st.residual[2 * l], st.residual[2 * l + 1], st.attn[l]);
    if (sparse[l])
      moe[l].forward(ctx, st.residual[2 * l + 1], st.residual[2 * l + 2], st.moe[l]);
    else
      mlp[l].forward(ctx, st.residual[2 * l + 1], st.residual[2 * l + 2], st.mlp[l]);
  }
  NvtxRange range("final_norm.fwd");
  kernels::rmsnorm_forward(ctx, st.residual.back(), final_norm.value, st.final_normed, st.final_rstd,
                           static_cast<float>(cfg.rms_norm_eps));
}

// Chunk by chunk: logits = normed Wlm^T; CE (dlogits in place, scaled by loss_scale / num_targets);
// then d(normed) = dlogits Wlm and dWlm += dlogits^T normed, before the next chunk reuses the buffer.
void DenseModel::Impl::lm_head_loss(const ExecContext& ctx, const Batch& b, Step& st, bool with_grad,
                                    float loss_scale) {
  NvtxRange range(with_grad ? "lm_head_loss.fwd_bwd" : "lm_head_loss.fwd");
  const int64_t n = b.num_tokens, V = cfg.vocab_size;
  const float grad_scale = b.num_targets > 0 ? loss_scale / static_cast<float>(b.num_targets) : 0.0f;
  for (int64_t c0 = 0; c0 < n; c0 += logits_chunk) {
    const int64_t c1 = std::min(n, c0 + logits_chunk);
    scratch_arena.reset();
    const Tensor logits = scratch_arena.alloc({c1 - c0, V}, act);
    const Tensor x = st.final_normed.slice0(c0, c1);
    kernels::linear_forward(ctx, x, lm_head.value, Tensor{}, logits);
    kernels::cross_entropy(ctx, logits, b.targets.slice0(c0, c1), st.losses.slice0(c0, c1), with_grad, grad_scale);
    if (with_grad)
      kernels::linear_backward(ctx, logits, x, lm_head.value, st.d_normed.slice0(c0, c1), false, lm_head.grad,
                               Tensor{});
  }
}

// Waits for the device and returns the mean of the per-token losses over the batch's targets (0 for a
// batch without targets). Called once per step, after backward is queued, so the host waits only once.
double DenseModel::Impl::mean_loss(const ExecContext& ctx, const Batch& b, const Step& st) const {
  ctx.synchronize();
  device_sync(device);
  if (b.num_targets == 0) return 0.0;
  const std::vector<float> losses = download_f32(st.losses);
  double sum = 0;
  for (float v : losses) sum += v;  // ignored tokens contribute exactly 0
  return sum / static_cast<double>(b.num_targets);
}

void DenseModel::Impl::backward(const ExecContext& ctx, const Batch& b, Step& st) {
  const PackedSequence seq = sequence(b);
  {
    NvtxRange range("final_norm.bwd");
    kernels::rmsnorm_backward(ctx, st.d_normed, st.residual.back(), final_norm.value, st.final_rstd, st.d_residual,
                              final_norm.grad);
  }
  // The residual-stream gradient is updated in place, block by block.
  for (int64_t l = cfg.num_layers - 1; l >= 0; --l) {
    scratch_arena.reset();
    if (sparse[l])
      moe[l].backward(ctx, st.moe[l], st.d_residual, scratch_arena);
    else
      mlp[l].backward(ctx, st.mlp[l], st.d_residual, st.d_residual, scratch_arena);
    scratch_arena.reset();
    attn[l].backward(ctx, seq, st.attn[l], st.d_residual, st.d_residual, scratch_arena);
  }
  NvtxRange range("embed.bwd");
  kernels::embedding_backward(ctx, b.tokens, st.d_residual, embed.grad);
}

// ------------------------------------------------------------------------------------------------

DenseModel::DenseModel(const ModelConfig& cfg, Device device, int64_t max_tokens) : impl_(std::make_unique<Impl>()) {
  impl_->cfg = cfg;
  impl_->cfg.finalize("DenseModel");  // idempotent: resolves head_dim, rejects an invalid config
  impl_->device = device;
  if (max_tokens <= 0) HYD_THROW("DenseModel: max_tokens must be positive, got ", max_tokens);
  impl_->max_tokens = max_tokens;
  impl_->act = device.is_cpu() ? DType::f32 : DType::bf16;
  impl_->build();
}

DenseModel::~DenseModel() = default;

const ModelConfig& DenseModel::config() const { return impl_->cfg; }
Device DenseModel::device() const { return impl_->device; }
std::vector<ParamInfo>& DenseModel::params() { return impl_->params; }

const ParamInfo& DenseModel::param(const std::string& name) const {
  return model_common::find_param(impl_->params, impl_->index, name, "DenseModel");
}

bool DenseModel::has_param(const std::string& name) const { return impl_->index.count(name) > 0; }
Tensor DenseModel::flat_params() const { return impl_->flat_params; }
Tensor DenseModel::flat_grads() const { return impl_->flat_grads; }

void DenseModel::init_random(uint64_t seed, float std) {
  const ModelConfig& c = impl_->cfg;
  const double out_scale = 1.0 / std::sqrt(2.0 * static_cast<double>(c.num_layers));
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Filled on the host in flat-buffer order (padding zero), then uploaded once.
  std::vector<float> host(static_cast<size_t>(impl_->flat_params.numel()), 0.0f);
  for (const ParamInfo& p : impl_->params) {
    float* v = host.data() + p.offset;
    const std::string& n = p.name;
    const bool is_norm = n.ends_with("norm");
    const bool is_bias = n.ends_with("bqkv") || n.ends_with(".e_score_correction_bias");  // HF inits both to 0
    float s = std;
    if (n.ends_with(".wo") || n.ends_with(".w_down") || n.ends_with(".mlp.down") || n.ends_with(".mlp.shared_down"))
      s = static_cast<float>(std * out_scale);
    for (int64_t i = 0; i < p.numel; ++i) v[i] = is_norm ? 1.0f : is_bias ? 0.0f : s * normal(gen);
  }
  model_common::write_values(impl_->device, impl_->flat_params, host.data());
}

void DenseModel::set_param(const std::string& name, const float* data, int64_t n) {
  model_common::write_param(impl_->device, param(name), data, n, "DenseModel");
}

std::vector<float> DenseModel::get_param(const std::string& name) const {
  return model_common::read_values(impl_->device, param(name).value);
}

std::vector<float> DenseModel::get_grad(const std::string& name) const {
  return model_common::read_values(impl_->device, param(name).grad);
}

void DenseModel::zero_grad() { model_common::zero_values(impl_->device, impl_->flat_grads); }
void DenseModel::zero_grad(const ExecContext& ctx) { kernels::fill(ctx, impl_->flat_grads, 0.0f); }

double DenseModel::forward_backward(ExecContext& ctx, const Batch& batch, float loss_scale) {
  Impl& m = *impl_;
  m.check_batch(ctx, batch);
  m.act_arena.reset();
  Impl::Step st = m.alloc_step(m.act_arena, batch.num_tokens);
  m.forward(ctx, batch, st);
  m.lm_head_loss(ctx, batch, st, true, loss_scale);
  m.backward(ctx, batch, st);
  return m.mean_loss(ctx, batch, st);  // synchronises: gradients are complete on return
}

double DenseModel::forward_loss(ExecContext& ctx, const Batch& batch) {
  Impl& m = *impl_;
  m.check_batch(ctx, batch);
  m.act_arena.reset();
  Impl::Step st = m.alloc_step(m.act_arena, batch.num_tokens);
  m.forward(ctx, batch, st);
  m.lm_head_loss(ctx, batch, st, false, 1.0f);
  return m.mean_loss(ctx, batch, st);
}

std::vector<float> DenseModel::forward_logits(ExecContext& ctx, const Batch& batch) {
  Impl& m = *impl_;
  m.check_batch(ctx, batch);
  m.act_arena.reset();
  Impl::Step st = m.alloc_step(m.act_arena, batch.num_tokens);
  m.forward(ctx, batch, st);
  const int64_t n = batch.num_tokens, V = m.cfg.vocab_size;
  std::vector<float> out(static_cast<size_t>(n * V));
  for (int64_t c0 = 0; c0 < n; c0 += m.logits_chunk) {
    const int64_t c1 = std::min(n, c0 + m.logits_chunk);
    m.scratch_arena.reset();
    // f32 output (cuBLAS accumulates in f32 and writes it unrounded): the exact logits the bf16 inputs give.
    const Tensor logits = m.scratch_arena.alloc({c1 - c0, V}, DType::f32);
    kernels::gemm(ctx, false, true, 1.0f, st.final_normed.slice0(c0, c1), m.lm_head.value, 0.0f, logits);
    ctx.synchronize();
    const std::vector<float> chunk = model_common::read_values(m.device, logits);
    std::copy(chunk.begin(), chunk.end(), out.begin() + c0 * V);
  }
  return out;
}

size_t DenseModel::memory_bytes() const {
  const Impl& m = *impl_;
  return m.param_arena.capacity() + m.grad_arena.capacity() + m.table_arena.capacity() + m.act_arena.capacity() +
         m.scratch_arena.capacity();
}

}  // namespace hyd

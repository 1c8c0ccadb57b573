// HybridModel: pattern parsing, parameter list and flat buffers, the activation plan, forward, chunked
// LM head + loss, backward, and the per-layer mixer entry points of stage 1. The math is written in
// trainer/hybrid_model.h; the blocks live in layer_kda.*, layer_attention_mixer.* and layer_mlp.*.
//
// A mixer block (pre-norm + mixer + residual) is assembled here, in the order AttentionLayer uses:
//   forward:  a, rstd = RMSNorm(x) ; out = Mixer(a) ; out += x
//   backward: da = Mixer'(a)^T dh ; dh += RMSNorm'(x)^T da          (dh: the residual-stream gradient)
// Memory (N = max_tokens, act = 4 bytes on the CPU / 2 on CUDA, every allocation rounded to 256 B):
//   parameters P_pad * (4 | 2), gradients P_pad * 4 (P_pad: numels padded to 64 elements each)
//   rope tables 2 * T * d/2 * 4 when some layer is T (T = max(max_position_embeddings, N))
//   KDA gate working copies (CUDA only) per K layer 4 * (HV + HV dk)
//   activations: h_0 and h after every block (2L + 1) [N, D]; per layer a, rstd and the mixer's
//     Saved (AttentionMixer or KdaLayer), the MLP's Saved (dense layers) or, for a MoE layer, m [N, D],
//     rstd and MoeLayer::alloc_saved; final normed, its rstd, losses, d_normed, dh
//   scratch: max( a mixer block's backward (da [N, D] + the mixer's Scratch), the KDA forward
//     scratch, the MLP backward or a MoE block's (dm [N, D] + MoeLayer::alloc_scratch), one logits
//     chunk 4 * C * V )
// ModelUse::inference: no gradients; activations h in two [N, D] buffers, one set of a / rstd / Saved per
//   mixer kind and per FFN kind (shared by the layers), final normed, its rstd, losses; scratch: max(the KDA
//   forward scratch, one logits chunk).
// Capacities come from running the same alloc code on an ArenaSizer.
#include "trainer/hybrid_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <unordered_map>

#include "kernels/cross_entropy.h"
#include "kernels/elementwise.h"
#include "kernels/embedding.h"
#include "kernels/global_norm.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "trainer/layer_attention_mixer.h"
#include "trainer/layer_mlp.h"
#include "trainer/layer_moe.h"
#include "trainer/model_common.h"

#ifdef HYD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace hyd {

// ------------------------------------------------------------------------------------------ pattern

namespace {

bool mixer_letter(char c, MixerKind& kind) {
  switch (c) {
    case 'K':
      kind = MixerKind::kda;
      return true;
    case 'A':
      kind = MixerKind::nope_attention;
      return true;
    case 'T':
      kind = MixerKind::teacher_attention;
      return true;
    default:
      return false;
  }
}

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  const size_t e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

}  // namespace

std::vector<MixerKind> parse_layer_pattern(const std::string& pattern, int64_t num_layers, const std::string& source) {
  constexpr const char* field = "student.pattern";
  auto fail = [&](const std::string& msg) { throw Error::at(source, field, msg); };
  if (num_layers <= 0) fail("needs a positive num_layers, got " + std::to_string(num_layers));
  const std::string p = trim(pattern);
  if (p.empty()) fail("is empty; expected letters K (KDA), A (NoPE attention), T (teacher attention)");

  std::vector<MixerKind> layers;
  auto bad_letter = [&](const std::string& item) {
    fail("'" + item + "' in \"" + pattern + "\" is not a layer letter: expected K (KDA), A (NoPE attention) or T " +
         "(teacher attention)");
  };
  if (p.find(',') != std::string::npos) {
    // Explicit list: one letter per layer.
    size_t start = 0;
    while (true) {
      const size_t comma = p.find(',', start);
      const std::string item = trim(p.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
      MixerKind k{};
      if (item.size() != 1 || !mixer_letter(item[0], k)) bad_letter(item);
      layers.push_back(k);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
    if (static_cast<int64_t>(layers.size()) != num_layers)
      fail("the explicit list \"" + pattern + "\" has " + std::to_string(layers.size()) + " layers, the model has " +
           std::to_string(num_layers) + " (num_layers)");
    return layers;
  }

  // Short pattern, repeated (one letter per layer when it is exactly num_layers long).
  std::vector<MixerKind> unit;
  bool has_a = false;
  for (char c : p) {
    MixerKind k{};
    if (!mixer_letter(c, k)) bad_letter(std::string(1, c));
    unit.push_back(k);
    has_a = has_a || k == MixerKind::nope_attention;
  }
  if (static_cast<int64_t>(unit.size()) > num_layers)
    fail("\"" + pattern + "\" is " + std::to_string(unit.size()) + " letters, longer than the model's " +
         std::to_string(num_layers) + " layers (num_layers); give a shorter pattern to repeat or an explicit " +
         "comma-separated list of " + std::to_string(num_layers) + " letters");
  for (int64_t l = 0; l < num_layers; ++l) layers.push_back(unit[static_cast<size_t>(l) % unit.size()]);
  if (has_a && static_cast<int64_t>(unit.size()) < num_layers) layers.back() = MixerKind::nope_attention;
  return layers;
}

std::string layer_pattern_string(const std::vector<MixerKind>& layers) {
  std::string s;
  for (MixerKind k : layers) s += static_cast<char>(k);
  return s;
}

void HybridConfig::finalize(const std::string& source) {
  model.finalize(source);
  layers = parse_layer_pattern(pattern, model.num_layers, source);
  if (has(MixerKind::kda)) {
    if (kda.hidden == 0) kda.hidden = model.hidden_size;
    if (kda.hidden != model.hidden_size)
      throw Error::at(
          source, "student.kda.hidden",
          "is " + std::to_string(kda.hidden) + ", the model's hidden_size is " + std::to_string(model.hidden_size));
    kda.validate(source);
  }
  if (expert_shards != 1 || expert_shard != 0) {
    if (model.num_experts == 0)
      throw Error::at(source, "expert_shards", "is " + std::to_string(expert_shards) + " but the model has no experts");
    if (expert_shards < 1 || model.num_experts % expert_shards != 0)
      throw Error::at(source, "expert_shards",
                      "is " + std::to_string(expert_shards) + ": it must divide the " +
                          std::to_string(model.num_experts) + " experts");
    if (expert_shard < 0 || expert_shard >= expert_shards)
      throw Error::at(source, "expert_shard",
                      "is " + std::to_string(expert_shard) + ", outside 0.." + std::to_string(expert_shards - 1));
  }
}

bool HybridConfig::has(MixerKind kind) const { return std::find(layers.begin(), layers.end(), kind) != layers.end(); }

// ------------------------------------------------------------------------------------------ helpers

namespace {

using model_common::device_sync;
using model_common::download_f32;
using model_common::upload_f32;
using model_common::view_at;

// dst = src (same dtype and numel, both on the device of ctx), ordered on ctx's stream.
void copy_on_stream(const ExecContext& ctx, const Tensor& dst, const Tensor& src) {
  const size_t bytes = static_cast<size_t>(src.numel()) * dtype_size(src.dtype);
#ifdef HYD_WITH_CUDA
  if (dst.device.is_cuda()) {
    CHECK_CUDA(
        cudaMemcpyAsync(dst.data, src.data, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(ctx.stream())));
    return;
  }
#else
  (void)ctx;
#endif
  std::memcpy(dst.data, src.data, bytes);
}

// The KDA parameters: name suffix, storage shape, weight decay, member of KdaLayer. Names and shapes
// are KdaLayerWeights' (trainer/layer_kda.h); tests/model/test_hybrid_model.cpp checks they agree.
struct KdaParamSpec {
  const char* name;
  std::vector<int64_t> shape;
  bool weight_decay;
  WeightRef KdaLayer::*member;
};

std::vector<KdaParamSpec> kda_param_specs(const KdaConfig& c) {
  const int64_t D = c.hidden, kd = c.key_dim(), vd = c.value_dim(), gd = c.gate_dim(), K = c.conv_size;
  return {
      {"q_proj.weight", {kd, D}, true, &KdaLayer::q_proj},
      {"k_proj.weight", {kd, D}, true, &KdaLayer::k_proj},
      {"v_proj.weight", {vd, D}, true, &KdaLayer::v_proj},
      {"q_conv1d.weight", {kd, K}, true, &KdaLayer::q_conv1d},
      {"k_conv1d.weight", {kd, K}, true, &KdaLayer::k_conv1d},
      {"v_conv1d.weight", {vd, K}, true, &KdaLayer::v_conv1d},
      {"f_proj.0.weight", {c.dv, D}, true, &KdaLayer::f_proj0},
      {"g_proj.0.weight", {c.dv, D}, true, &KdaLayer::g_proj0},
      {"f_proj.1.weight", {gd, c.dv}, true, &KdaLayer::f_proj1},
      {"b_proj.weight", {c.v_heads, D}, true, &KdaLayer::b_proj},
      {"A_log", {c.v_heads}, false, &KdaLayer::A_log},
      {"dt_bias", {gd}, false, &KdaLayer::dt_bias},
      {"g_proj.1.weight", {vd, c.dv}, true, &KdaLayer::g_proj1},
      {"g_proj.1.bias", {vd}, false, &KdaLayer::g_proj1_bias},
      {"o_norm.weight", {c.dv}, false, &KdaLayer::o_norm},
      {"o_proj.weight", {D, vd}, true, &KdaLayer::o_proj},
  };
}

}  // namespace

// ------------------------------------------------------------------------------------------ Impl

struct HybridModel::Impl {
  HybridConfig cfg;
  Device device;
  int64_t max_tokens = 0;
  DType act = DType::f32;            // activations and parameters: f32 on the CPU, bf16 on CUDA
  int64_t logits_chunk = 0;          // tokens per LM-head chunk (set_logits_chunk_size)
  int64_t default_logits_chunk = 0;  // what the scratch arena is sized for

  std::vector<ParamInfo> params;
  std::unordered_map<std::string, size_t> index;
  std::vector<std::pair<size_t, size_t>> mixer_range;  // per layer: [first, last) index into params
  Arena param_arena, grad_arena, table_arena, gate_arena, act_arena, scratch_arena;
  Arena moe_bias_arena;  // CUDA: f32 working copies of the MoE selection biases (MoeBlock)
  Tensor flat_params, flat_grads, rope_cos, rope_sin;
  std::vector<MoeBlock::ParamSpec> sharded_experts;  // expert_shards > 1: the local experts, added last
  int64_t expert_offset = 0;                         // where they start (the flat size when not sharded)
  bool inference = false;  // ModelUse::inference: no gradients, one layer's activations (HybridModel ctor)
  // Throws unless the model was built for training (what: the call that needs gradients or a backward).
  void require_training(const char* what) const {
    if (inference)
      HYD_THROW("HybridModel::", what,
                ": this model was built for inference (ModelUse::inference: no gradients, "
                "no per-layer activations); build it with ModelUse::train");
  }

  WeightRef embed, final_norm, lm_head;
  std::vector<WeightRef> mixer_norm;                 // layers.L.attn_norm
  std::vector<AttentionMixer> attn;                  // used for A and T layers
  std::vector<KdaLayer> kda;                         // used for K layers
  // Per K layer with keep_core (the default; HYD_KDA_SAVE=0 turns it off): the buffer its saving core fills, kept from
  // step to step (each step's activations are planned anew, and a buffer per step would cudaMalloc / cudaFree ~150 KB
  // per 64 tokens and value head of every such layer every step, each cudaFree a device synchronisation).
  std::vector<std::shared_ptr<Arena>> kda_core;
  std::vector<std::pair<Tensor, Tensor>> gate_bf16;  // CUDA, K layers: flat (bf16) A_log, dt_bias values
  // Per layer, the FFN block: the dense MLP (mlp[l]) or, where cfg.model.is_moe_layer(l), the MoE block
  // moe[l] (as DenseModel; the other entry is unused and empty).
  std::vector<MlpLayer> mlp;
  std::vector<MoeBlock> moe;
  std::vector<bool> sparse;
  std::vector<std::string> nvtx_fwd, nvtx_bwd;  // per mixer block

  struct MixerSaved {
    Tensor x, a, rstd;  // block input (view), normed input, its rstd
    AttentionMixer::Saved attn;
    KdaLayer::Saved kda;
  };
  // Activations of one micro-batch (activation arena, reset every call).
  struct Step {
    std::vector<Tensor> residual;  // 2L + 1 tensors [N, D]: h_0, then h after every block
    std::vector<MixerSaved> mix;
    std::vector<MlpLayer::Saved> mlp;  // dense layers (empty entries for MoE layers)
    std::vector<MoeBlock::Saved> moe;  // MoE layers (empty entries for dense layers)
    Tensor final_normed, final_rstd, losses, d_normed, d_residual;
    Tensor hidden_sq;  // f32 [1]: sum of the hidden-state term's squared differences (HiddenStateMatch)
  };
  Step step;
  // Stage-1 state: the activation arena holds a Step for `mixer_tokens` tokens whose mixer slots are
  // filled by mixer_forward (mixer_ready[l]); any full-model call ends it.
  bool mixer_mode = false;
  int64_t mixer_tokens = 0;
  std::vector<bool> mixer_ready;
  // step.final_normed holds the last forward's final hidden states for `hidden_tokens` tokens
  // (lm_head_logits); cleared whenever the activation arena is re-planned.
  bool hidden_ready = false;
  int64_t hidden_tokens = 0;

  bool is_kda(int64_t l) const { return cfg.layers[static_cast<size_t>(l)] == MixerKind::kda; }
  bool uses_rope(int64_t l) const { return cfg.layers[static_cast<size_t>(l)] == MixerKind::teacher_attention; }

  // Training: every layer keeps its own activations for the backward. Inference: the residual stream
  // alternates between two buffers (a block reads one and writes the other) and all layers of one kind share
  // one set of saved activations (nothing is kept for a backward); the backward-only tensors are absent.
  template <class Alloc>
  Step alloc_step(Alloc& a, int64_t n) const {
    Step s;
    const int64_t D = cfg.model.hidden_size;
    s.residual.push_back(a.alloc({n, D}, act));
    const Tensor other = inference ? a.alloc({n, D}, act) : Tensor{};
    int64_t first_kda = -1, first_attn = -1, first_mlp = -1, first_moe = -1;
    for (int64_t l = 0; l < cfg.model.num_layers; ++l) {
      if (inference) {
        s.residual.push_back(other);
        s.residual.push_back(s.residual[0]);
      } else {
        s.residual.push_back(a.alloc({n, D}, act));
        s.residual.push_back(a.alloc({n, D}, act));
      }
      int64_t& shared_mix = is_kda(l) ? first_kda : first_attn;
      if (inference && shared_mix >= 0) {
        s.mix.push_back(s.mix[static_cast<size_t>(shared_mix)]);
      } else {
        MixerSaved m;
        m.a = a.alloc({n, D}, act);
        m.rstd = a.alloc({n}, DType::f32);
        if (is_kda(l)) {
          m.kda = kda[l].alloc_saved(a, n, act);
          m.kda.keep_core = !inference && KdaLayer::keep_core_from_env();
        } else
          m.attn = attn[l].alloc_saved(a, n, act);
        s.mix.push_back(m);
        shared_mix = l;
      }
      int64_t& shared_ffn = sparse[l] ? first_moe : first_mlp;
      if (inference && shared_ffn >= 0) {
        s.mlp.push_back(s.mlp[static_cast<size_t>(shared_ffn)]);
        s.moe.push_back(s.moe[static_cast<size_t>(shared_ffn)]);
      } else if (sparse[l]) {
        s.mlp.emplace_back();
        s.moe.push_back(moe[l].alloc_saved(a, n, act));
        shared_ffn = l;
      } else {
        s.mlp.push_back(mlp[l].alloc_saved(a, n, act));
        s.moe.emplace_back();
        shared_ffn = l;
      }
    }
    s.final_normed = a.alloc({n, D}, act);
    s.final_rstd = a.alloc({n}, DType::f32);
    s.losses = a.alloc({n}, DType::f32);
    if (!inference) {
      s.d_normed = a.alloc({n, D}, act);
      s.d_residual = a.alloc({n, D}, act);
      s.hidden_sq = a.alloc({1}, DType::f32);
    }
    return s;
  }

  // The scratch of a mixer block's backward: da and dx [N, D], then the mixer's own Scratch.
  template <class Alloc>
  Tensor alloc_block_grads(Alloc& a, int64_t n) const {
    return a.alloc({n, cfg.model.hidden_size}, act);  // da: the gradient of the mixer's normed input
  }

  // The scratch of the hidden-state term at one layer boundary: the f32 difference and the f32 target,
  // plus the gradient in the activation dtype when that is not f32.
  template <class Alloc>
  std::pair<Tensor, Tensor> alloc_hidden_scratch(Alloc& a, int64_t n) const {
    const int64_t D = cfg.model.hidden_size;
    Tensor diff = a.alloc({n, D}, DType::f32);
    Tensor target = a.alloc({n, D}, DType::f32);
    return {diff, target};
  }

  // with_logits false: the layers' part only (what a logits chunk may fill for free, logits_chunk_tokens).
  size_t scratch_bytes(int64_t n, bool with_logits = true) const {
    size_t bytes = 0;
    if (inference) {  // the forward's own scratch (K layers) and the LM head's chunk
      for (int64_t l = 0; l < cfg.model.num_layers; ++l)
        if (is_kda(l)) {
          ArenaSizer sf;
          kda[l].alloc_forward_scratch(sf, n, act);
          bytes = std::max(bytes, sf.used());
        }
      if (!with_logits) return bytes;
      ArenaSizer sl;
      sl.alloc({std::min(logits_chunk, n), cfg.model.vocab_size}, DType::f32);
      sl.alloc({n}, DType::f32);
      return std::max(bytes, sl.used());
    }
    {
      ArenaSizer sh;
      alloc_hidden_scratch(sh, n);
      if (act != DType::f32) sh.alloc({n, cfg.model.hidden_size}, act);
      bytes = sh.used();
    }
    for (int64_t l = 0; l < cfg.model.num_layers; ++l) {
      ArenaSizer sb, sf, sm;
      alloc_block_grads(sb, n);
      if (is_kda(l)) {
        kda[l].alloc_scratch(sb, n, act);
        kda[l].alloc_forward_scratch(sf, n, act);
      } else {
        attn[l].alloc_scratch(sb, n, act);
      }
      if (sparse[l]) {
        moe[l].alloc_scratch(sm, n, act);
      } else {
        mlp[l].alloc_scratch(sm, n, act);
      }
      bytes = std::max({bytes, sb.used(), sf.used(), sm.used()});
    }
    if (!with_logits) return bytes;
    ArenaSizer sl;
    sl.alloc({std::min(logits_chunk, n), cfg.model.vocab_size}, DType::f32);
    sl.alloc({n}, DType::f32);  // mixer_input_norm's rstd never meets a logits chunk; counted generously
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
  void check_layer(int64_t layer, const char* what) const;
  void check_sequence(const ExecContext& ctx, const Batch& b, bool need_tokens, bool need_positions,
                      const char* what) const;
  void check_batch(const ExecContext& ctx, const Batch& b) const;
  void check_activation(const Tensor& t, int64_t n, const char* what, const char* arg) const;
  PackedSequence sequence(const Batch& b) const;
  void refresh_gates(const ExecContext& ctx, int64_t layer) const;
  // out = mixer(a), or residual + mixer(a) when residual is given (the add inside the output projection).
  void mixer_run(const ExecContext& ctx, const PackedSequence& seq, int64_t l, const Tensor& a, const Tensor& out,
                 MixerSaved& s, const Tensor& residual = Tensor{});
  void mixer_grad(const ExecContext& ctx, const PackedSequence& seq, int64_t l, const MixerSaved& s, const Tensor& dout,
                  const Tensor& da);
  void begin_step(const Batch& b);
  // mix_out (optional): per layer, an empty tensor or [N, D] receiving the mixer's output before the
  // residual add.
  void forward(const ExecContext& ctx, const Batch& b, const std::vector<Tensor>* mix_out = nullptr);
  void lm_head_loss(const ExecContext& ctx, const Batch& b, bool with_grad, float loss_scale);

  // The chunked LM head over the last forward's final hidden states: per chunk [c0, c1), logits =
  // normed Wlm^T into a scratch buffer, chunk_fn(c0, c1, logits) and, when with_grad (chunk_fn has
  // then written dlogits in place), d(normed) = dlogits Wlm and dWlm += dlogits^T normed, before the
  // next chunk reuses the buffer.
  template <class ChunkFn>
  void lm_head_chunks(const ExecContext& ctx, int64_t n, bool with_grad, ChunkFn&& chunk_fn) {
    Step& st = step;
    const int64_t V = cfg.model.vocab_size;
    for (int64_t c0 = 0; c0 < n; c0 += logits_chunk) {
      const int64_t c1 = std::min(n, c0 + logits_chunk);
      scratch_arena.reset();
      const Tensor logits = scratch_arena.alloc({c1 - c0, V}, act);
      const Tensor x = st.final_normed.slice0(c0, c1);
      kernels::linear_forward(ctx, x, lm_head.value, Tensor{}, logits);
      chunk_fn(c0, c1, logits);
      if (with_grad)
        kernels::linear_backward(ctx, logits, x, lm_head.value, st.d_normed.slice0(c0, c1), false, lm_head.grad,
                                 Tensor{});
    }
  }
  double mean_loss(const ExecContext& ctx, const Batch& b) const;
  // hidden (optional): the hidden-state term (HybridModel::HiddenStateMatch); its squared differences
  // accumulate into step.hidden_sq and, when hidden->weight != 0, its gradient joins d_residual.
  void backward(const ExecContext& ctx, const Batch& b, const HiddenStateMatch* hidden = nullptr);
  // The FFN block of layer l: out = in + FFN(RMSNorm(in)) (out must not alias in), dense or MoE.
  void ffn_forward(const ExecContext& ctx, int64_t l, const Tensor& in, const Tensor& out);
  const MoeExpertParallel* ep = nullptr;  // the last forward's batch's (Batch::ep)
  double aux_sum = 0;                     // the MoE layers' L_aux of the last forward
  double aux_grad = 0;                    // d objective / d L_aux for the backward (set_moe_aux_loss)
  // d_residual += the FFN block's input gradient (in place); weight gradients accumulate. Uses scratch.
  void ffn_backward(const ExecContext& ctx, int64_t l, const Tensor& d_residual);
  void hidden_term(const ExecContext& ctx, int64_t l, int64_t n, const HiddenStateMatch& hidden, float grad_scale,
                   const std::vector<std::pair<int64_t, int64_t>>& skipped);
};

void HybridModel::Impl::build() {
  const ModelConfig& mc = cfg.model;
  const int64_t V = mc.vocab_size, D = mc.hidden_size, F = mc.intermediate_size, L = mc.num_layers;
  const int64_t d = mc.head_dim;
  const std::vector<KdaParamSpec> kspecs = kda_param_specs(cfg.kda);

  // Parameter list, in the fixed order of the flat buffers.
  int64_t offset = 0;
  add_param("embed", {V, D}, true, offset);
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    add_param(p + "attn_norm", {D}, false, offset);
    const size_t first = params.size();
    if (is_kda(l)) {
      for (const KdaParamSpec& s : kspecs) add_param(p + s.name, s.shape, s.weight_decay, offset);
    } else {
      add_param(p + "wqkv", {mc.qkv_dim(), D}, true, offset);
      if (mc.qkv_bias) add_param(p + "bqkv", {mc.qkv_dim()}, false, offset);
      if (mc.qk_norm) {
        add_param(p + "q_norm", {d}, false, offset);
        add_param(p + "k_norm", {d}, false, offset);
      }
      add_param(p + "wo", {D, mc.q_dim()}, true, offset);
    }
    mixer_range.emplace_back(first, params.size());
    add_param(p + "mlp_norm", {D}, false, offset);
    if (mc.is_moe_layer(l)) {
      for (MoeBlock::ParamSpec s : MoeBlock::param_specs(mc)) {
        if (cfg.expert_shards > 1 && (s.name == "mlp.gate_up" || s.name == "mlp.down")) {
          s.name = p + s.name;
          s.shape[0] /= cfg.expert_shards;  // this rank's experts, after every replicated parameter
          sharded_experts.push_back(std::move(s));
          continue;
        }
        add_param(p + s.name, s.shape, s.weight_decay, offset);
      }
    } else {
      add_param(p + "w_gate_up", {2 * F, D}, true, offset);
      add_param(p + "w_down", {D, F}, true, offset);
    }
  }
  add_param("final_norm", {D}, false, offset);
  if (!mc.tie_word_embeddings) add_param("lm_head", {V, D}, true, offset);
  expert_offset = offset;
  for (const MoeBlock::ParamSpec& s : sharded_experts) {
    add_param(s.name, s.shape, s.weight_decay, offset);
    ParamInfo& p = params.back();  // experts [shard E / S, (shard + 1) E / S) of the [E, ...] tensor
    p.global_shape = p.shape;
    p.global_shape[0] *= cfg.expert_shards;
    p.global_begin = cfg.expert_shard * p.numel;
  }
  const int64_t total = offset;

  param_arena = Arena("params", device, static_cast<size_t>(total) * dtype_size(act));
  flat_params = param_arena.alloc({total}, act);
  zero_tensor(flat_params);  // padding stays zero forever
  if (!inference) {
    grad_arena = Arena("grads", device, static_cast<size_t>(total) * 4);
    flat_grads = grad_arena.alloc({total}, DType::f32);
    zero_tensor(flat_grads);
  }
  for (ParamInfo& p : params) {
    p.value = view_at(flat_params, p.offset, p.shape);
    if (!inference) p.grad = view_at(flat_grads, p.offset, p.shape);
  }

  // CUDA: f32 working copies of every K layer's A_log and dt_bias (the KDA gate kernels read f32).
  if (device.is_cuda() && cfg.has(MixerKind::kda)) {
    ArenaSizer gs;
    for (int64_t l = 0; l < L; ++l)
      if (is_kda(l)) {
        gs.alloc({cfg.kda.v_heads}, DType::f32);
        gs.alloc({cfg.kda.gate_dim()}, DType::f32);
      }
    gate_arena = Arena("kda_gate_params", device, gs.used());
  }

  const float eps = static_cast<float>(mc.rms_norm_eps);
  embed = ref("embed");
  final_norm = ref("final_norm");
  lm_head = mc.tie_word_embeddings ? embed : ref("lm_head");
  attn.resize(static_cast<size_t>(L));
  kda.resize(static_cast<size_t>(L));
  gate_bf16.resize(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    const std::string ls = std::to_string(l), p = "layers." + ls + ".";
    const MixerKind kind = cfg.layers[static_cast<size_t>(l)];
    mixer_norm.push_back(ref(p + "attn_norm"));
    const std::string tag = kind == MixerKind::kda ? "kda" : kind == MixerKind::nope_attention ? "nope_attn" : "attn";
    nvtx_fwd.push_back("layer." + ls + "." + tag + ".fwd");
    nvtx_bwd.push_back("layer." + ls + "." + tag + ".bwd");
    if (kind == MixerKind::kda) {
      KdaLayer& k = kda[l];
      k.cfg = cfg.kda;
      k.nvtx_fwd = "layer." + ls + ".kda.core.fwd";
      k.nvtx_bwd = "layer." + ls + ".kda.core.bwd";
      for (const KdaParamSpec& s : kspecs) k.*(s.member) = ref(p + s.name);
      if (device.is_cuda()) {
        gate_bf16[l] = {k.A_log.value, k.dt_bias.value};
        k.A_log.value = gate_arena.alloc({cfg.kda.v_heads}, DType::f32);
        k.dt_bias.value = gate_arena.alloc({cfg.kda.gate_dim()}, DType::f32);
      }
    } else {
      attn[l] =
          AttentionMixer::for_model(mc, eps, kind == MixerKind::teacher_attention, "layer." + ls + "." + tag + ".core",
                                    [&](const std::string& name) { return ref(p + name); });
    }
    sparse.push_back(mc.is_moe_layer(l));
    MlpLayer m;
    MoeBlock e;
    if (sparse[l]) {
      e = MoeBlock::for_model(mc, l, eps, [&](const std::string& name) { return ref(p + name); });
    } else {
      m.hidden = D;
      m.intermediate = F;
      m.eps = eps;
      m.nvtx_fwd = "layer." + ls + ".mlp.fwd";
      m.nvtx_bwd = "layer." + ls + ".mlp.bwd";
      m.norm = ref(p + "mlp_norm");
      m.w_gate_up = ref(p + "w_gate_up");
      m.w_down = ref(p + "w_down");
    }
    mlp.push_back(std::move(m));
    moe.push_back(std::move(e));
  }
  moe_bias_arena = MoeBlock::make_selection_bias_copies(moe, device);

  // RoPE tables, only when some layer keeps the teacher's rotary attention.
  if (cfg.has(MixerKind::teacher_attention)) {
    const int64_t table_len = std::max(mc.max_position_embeddings, max_tokens);
    double attention_factor = 1.0;
    const std::vector<double> inv_freq =
        kernels::rope_inv_freq(mc.rope_theta, static_cast<int>(d), mc.rope_scaling, &attention_factor);
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
  }

  logits_chunk = model_common::logits_chunk_tokens(V, scratch_bytes(max_tokens, false));
  default_logits_chunk = logits_chunk;
  ArenaSizer as;
  alloc_step(as, max_tokens);
  act_arena = Arena("activations", device, as.used());
  scratch_arena = Arena("scratch", device, scratch_bytes(max_tokens));
  mixer_ready.assign(static_cast<size_t>(L), false);
  device_sync(device);
}

void HybridModel::Impl::check_layer(int64_t layer, const char* what) const {
  if (layer < 0 || layer >= cfg.model.num_layers)
    HYD_THROW("HybridModel::", what, ": layer ", layer, " outside 0..", cfg.model.num_layers - 1);
}

// No device synchronisation (which would also wait for work queued on other streams, e.g. a teacher's
// forward meant to overlap with this model's): a batch's tensors arrive through copy_tensor /
// BatchUploader, which return once the data is on the device; a batch written by kernels on another
// stream must be ordered by its writer (ExecContext::wait_for).
void HybridModel::Impl::check_sequence(const ExecContext& ctx, const Batch& b, bool need_tokens, bool need_positions,
                                       const char* what) const {
  if (!(ctx.device() == device))
    HYD_THROW("HybridModel::", what, " on ", device.str(), " called with an execution context on ", ctx.device().str());
  if (b.num_tokens <= 0 || b.num_tokens > max_tokens)
    HYD_THROW("HybridModel::", what, ": batch of ", b.num_tokens, " tokens; the model was built for 1..", max_tokens);
  if (b.num_docs <= 0) HYD_THROW("HybridModel::", what, ": batch has ", b.num_docs, " documents");
  if (b.max_doc_len <= 0 || b.max_doc_len > b.num_tokens)
    HYD_THROW("HybridModel::", what, ": batch has max_doc_len ", b.max_doc_len, ", expected 1..", b.num_tokens,
              " (its tokens)");
  std::vector<std::pair<const Tensor*, const char*>> ids;
  if (need_tokens) {
    if (b.num_targets < 0 || b.num_targets > b.num_tokens)
      HYD_THROW("HybridModel::", what, ": batch has ", b.num_targets, " targets for ", b.num_tokens, " tokens");
    ids.push_back({&b.tokens, "tokens"});
    ids.push_back({&b.targets, "targets"});
  }
  if (need_positions) ids.push_back({&b.positions, "positions"});
  for (const auto& [t, name] : ids) {
    expect_shape(*t, {b.num_tokens}, "HybridModel", name);
    expect_dtype(*t, DType::i32, "HybridModel", name);
    if (!(t->device == device))
      HYD_THROW("HybridModel: batch tensor '", name, "' on ", t->device.str(), ", model on ", device.str());
  }
  expect_shape(b.cu_seqlens, {b.num_docs + 1}, "HybridModel", "cu_seqlens");
  expect_dtype(b.cu_seqlens, DType::i32, "HybridModel", "cu_seqlens");
  if (!(b.cu_seqlens.device == device))
    HYD_THROW("HybridModel: batch tensor 'cu_seqlens' on ", b.cu_seqlens.device.str(), ", model on ", device.str());
}

void HybridModel::Impl::check_batch(const ExecContext& ctx, const Batch& b) const {
  check_sequence(ctx, b, true, cfg.has(MixerKind::teacher_attention), "forward");
}

void HybridModel::Impl::check_activation(const Tensor& t, int64_t n, const char* what, const char* arg) const {
  const std::string op = std::string("HybridModel::") + what;
  expect_shape(t, {n, cfg.model.hidden_size}, op.c_str(), arg);
  expect_dtype(t, act, op.c_str(), arg);
  if (!(t.device == device)) HYD_THROW(op, ": argument '", arg, "' on ", t.device.str(), ", model on ", device.str());
}

PackedSequence HybridModel::Impl::sequence(const Batch& b) const {
  PackedSequence s;
  s.num_tokens = b.num_tokens;
  s.num_docs = b.num_docs;
  s.max_doc_len = b.max_doc_len;
  s.positions = b.positions;
  s.cu_seqlens = b.cu_seqlens;
  s.rope_cos = rope_cos;
  s.rope_sin = rope_sin;
  s.sp = b.sp;
  return s;
}

// CUDA: the f32 working copies of layer l's A_log and dt_bias from their bf16 flat values (on the
// context's stream, so they are ordered before the layer's kernels). Nothing to do on the CPU.
void HybridModel::Impl::refresh_gates(const ExecContext& ctx, int64_t l) const {
  if (!device.is_cuda() || !is_kda(l)) return;
  kernels::convert(ctx, kda[l].A_log.value, gate_bf16[l].first);
  kernels::convert(ctx, kda[l].dt_bias.value, gate_bf16[l].second);
}

void HybridModel::Impl::mixer_run(const ExecContext& ctx, const PackedSequence& seq, int64_t l, const Tensor& a,
                                  const Tensor& out, MixerSaved& s, const Tensor& residual) {
  if (is_kda(l)) {
    scratch_arena.reset();
    kda[l].forward(ctx, seq, a, out, s.kda, scratch_arena, residual);
  } else {
    attn[l].forward(ctx, seq, a, out, s.attn, residual);
  }
}

void HybridModel::Impl::mixer_grad(const ExecContext& ctx, const PackedSequence& seq, int64_t l, const MixerSaved& s,
                                   const Tensor& dout, const Tensor& da) {
  if (is_kda(l))
    kda[l].backward(ctx, seq, s.kda, dout, da, scratch_arena);
  else
    attn[l].backward(ctx, seq, s.attn, dout, da, scratch_arena);
}

void HybridModel::Impl::begin_step(const Batch& b) {
  mixer_mode = false;
  hidden_ready = false;
  act_arena.reset();
  step = alloc_step(act_arena, b.num_tokens);
  kda_core.resize(static_cast<size_t>(cfg.model.num_layers));
  for (int64_t l = 0; l < cfg.model.num_layers; ++l)
    if (is_kda(l) && step.mix[l].kda.keep_core)  // handed over, so that a buffer that must grow is freed first
      step.mix[l].kda.core_mem = std::move(kda_core[static_cast<size_t>(l)]);
}

void HybridModel::Impl::forward(const ExecContext& ctx, const Batch& b, const std::vector<Tensor>* mix_out) {
  const PackedSequence seq = sequence(b);
  ep = b.ep;  // the backward of this forward runs the same exchanges
  aux_sum = 0;
  Step& st = step;
  {
    NvtxRange range("embed.fwd");
    kernels::embedding_forward(ctx, b.tokens, embed.value, st.residual[0]);
  }
  const float eps = static_cast<float>(cfg.model.rms_norm_eps);
  for (int64_t l = 0; l < cfg.model.num_layers; ++l) {
    const Tensor& in = st.residual[2 * l];
    const Tensor& out = st.residual[2 * l + 1];
    MixerSaved& s = st.mix[l];
    {
      NvtxRange range(nvtx_fwd[l].c_str());
      refresh_gates(ctx, l);
      s.x = in;
      kernels::rmsnorm_forward(ctx, in, mixer_norm[l].value, s.a, s.rstd, eps);
      if (mix_out != nullptr && !(*mix_out)[l].empty()) {  // the mixer's output before the residual add is wanted
        mixer_run(ctx, seq, l, s.a, out, s);
        copy_on_stream(ctx, (*mix_out)[l], out);
        kernels::add_inplace(ctx, out, in);
      } else {
        mixer_run(ctx, seq, l, s.a, out, s, in);
      }
    }
    ffn_forward(ctx, l, out, st.residual[2 * l + 2]);
  }
  // The saving KDA cores' buffers (grown by this forward where the batch needs more) for the next step.
  if (!kda_core.empty())
    for (int64_t l = 0; l < cfg.model.num_layers; ++l)
      if (is_kda(l) && st.mix[l].kda.keep_core) kda_core[static_cast<size_t>(l)] = st.mix[l].kda.core_mem;
  NvtxRange range("final_norm.fwd");
  kernels::rmsnorm_forward(ctx, st.residual.back(), final_norm.value, st.final_normed, st.final_rstd, eps);
  hidden_ready = true;
  hidden_tokens = b.num_tokens;
}

void HybridModel::Impl::ffn_forward(const ExecContext& ctx, int64_t l, const Tensor& in, const Tensor& out) {
  if (!sparse[l]) {
    mlp[l].forward(ctx, in, out, step.mlp[l]);
    return;
  }
  aux_sum += moe[l].forward(ctx, in, out, step.moe[l], ep);
}

void HybridModel::Impl::ffn_backward(const ExecContext& ctx, int64_t l, const Tensor& d_residual) {
  if (!sparse[l]) {
    mlp[l].backward(ctx, step.mlp[l], d_residual, d_residual, scratch_arena);
    return;
  }
  moe[l].backward(ctx, step.moe[l], d_residual, scratch_arena, ep, aux_grad);
}

// Chunk by chunk: logits = normed Wlm^T; CE (dlogits in place, scaled by loss_scale / num_targets);
// then d(normed) = dlogits Wlm and dWlm += dlogits^T normed, before the next chunk reuses the buffer.
void HybridModel::Impl::lm_head_loss(const ExecContext& ctx, const Batch& b, bool with_grad, float loss_scale) {
  NvtxRange range(with_grad ? "lm_head_loss.fwd_bwd" : "lm_head_loss.fwd");
  const float grad_scale = b.num_targets > 0 ? loss_scale / static_cast<float>(b.num_targets) : 0.0f;
  lm_head_chunks(ctx, b.num_tokens, with_grad, [&](int64_t c0, int64_t c1, const Tensor& logits) {
    kernels::cross_entropy(ctx, logits, b.targets.slice0(c0, c1), step.losses.slice0(c0, c1), with_grad, grad_scale);
  });
}

double HybridModel::Impl::mean_loss(const ExecContext& ctx, const Batch& b) const {
  ctx.synchronize();
  device_sync(device);
  if (b.num_targets == 0) return 0.0;
  const std::vector<float> losses = download_f32(step.losses);
  double sum = 0;
  for (float v : losses) sum += v;  // ignored tokens contribute exactly 0
  return sum / static_cast<double>(b.num_targets);
}

// Layer l's share of the hidden-state term: diff = h_s[l] - h_t[l] in f32, rows of uncounted tokens
// (`skipped`: [t0, t1) runs with token_mask 0) zeroed; hidden_sq += sum diff^2; when the weight is not 0,
// d_residual (= dLoss/dh_s[l] at this point of the backward) += grad_scale * diff, grad_scale =
// 2 w / (L n D).
void HybridModel::Impl::hidden_term(const ExecContext& ctx, int64_t l, int64_t n, const HiddenStateMatch& hidden,
                                    float grad_scale, const std::vector<std::pair<int64_t, int64_t>>& skipped) {
  NvtxRange range("hidden_mse.bwd");
  const Tensor& h_s = step.residual[2 * l + 2];
  const Tensor& h_t = hidden.targets[static_cast<size_t>(l)];
  scratch_arena.reset();
  const auto [diff, target] = alloc_hidden_scratch(scratch_arena, n);
  if (act == DType::f32) {
    copy_on_stream(ctx, diff, h_s);
    copy_on_stream(ctx, target, h_t);
  } else {
    kernels::convert(ctx, diff, h_s);
    kernels::convert(ctx, target, h_t);
  }
  kernels::scale_inplace(ctx, target, -1.0f);
  kernels::add_inplace(ctx, diff, target);
  for (const auto& [t0, t1] : skipped) kernels::fill(ctx, diff.slice0(t0, t1), 0.0f);
  kernels::sum_squares_accumulate(ctx, diff.view({diff.numel()}), step.hidden_sq);
  if (hidden.weight == 0.0f) return;
  kernels::scale_inplace(ctx, diff, grad_scale);
  if (act == DType::f32) {
    kernels::add_inplace(ctx, step.d_residual, diff);
  } else {
    const Tensor g = scratch_arena.alloc({n, cfg.model.hidden_size}, act);
    kernels::convert(ctx, g, diff);
    kernels::add_inplace(ctx, step.d_residual, g);
  }
}

void HybridModel::Impl::backward(const ExecContext& ctx, const Batch& b, const HiddenStateMatch* hidden) {
  const PackedSequence seq = sequence(b);
  Step& st = step;
  {
    NvtxRange range("final_norm.bwd");
    kernels::rmsnorm_backward(ctx, st.d_normed, st.residual.back(), final_norm.value, st.final_rstd, st.d_residual,
                              final_norm.grad);
  }
  // The hidden-state term: its token count n and the runs of tokens it skips.
  const int64_t L = cfg.model.num_layers, n_tok = b.num_tokens;
  std::vector<std::pair<int64_t, int64_t>> skipped;
  int64_t counted = n_tok;
  if (hidden && !hidden->token_mask.empty()) {
    counted = 0;
    for (int64_t t = 0; t < n_tok;) {
      if (hidden->token_mask[static_cast<size_t>(t)] != 0) {
        ++counted;
        ++t;
        continue;
      }
      const int64_t t0 = t;
      while (t < n_tok && hidden->token_mask[static_cast<size_t>(t)] == 0) ++t;
      skipped.emplace_back(t0, t);
    }
  }
  const bool with_hidden = hidden != nullptr && counted > 0;
  const int64_t denominator = hidden != nullptr && hidden->count > 0 ? hidden->count : counted;
  const float hidden_scale = with_hidden
                                 ? static_cast<float>(2.0 * hidden->weight /
                                                      (static_cast<double>(L) * static_cast<double>(denominator) *
                                                       static_cast<double>(cfg.model.hidden_size)))
                                 : 0.0f;
  if (hidden) kernels::fill(ctx, st.hidden_sq, 0.0f);
  // The residual-stream gradient is updated in place, block by block. At the top of iteration l it is
  // dLoss/dh[l] (h[l] = residual[2 l + 2], the output of layer l), where the hidden-state term joins it.
  for (int64_t l = cfg.model.num_layers - 1; l >= 0; --l) {
    if (with_hidden) hidden_term(ctx, l, n_tok, *hidden, hidden_scale, skipped);
    scratch_arena.reset();
    ffn_backward(ctx, l, st.d_residual);
    NvtxRange range(nvtx_bwd[l].c_str());
    scratch_arena.reset();
    const Tensor da = alloc_block_grads(scratch_arena, b.num_tokens);
    const MixerSaved& s = st.mix[l];
    mixer_grad(ctx, seq, l, s, st.d_residual, da);
    prenorm_residual_backward(ctx, da, s.x, mixer_norm[l], s.rstd, st.d_residual, st.d_residual);
  }
  NvtxRange range("embed.bwd");
  kernels::embedding_backward(ctx, b.tokens, st.d_residual, embed.grad);
}

// ------------------------------------------------------------------------------------------ public

HybridModel::HybridModel(const HybridConfig& cfg, Device device, int64_t max_tokens, ModelUse use)
    : impl_(std::make_unique<Impl>()) {
  impl_->inference = use == ModelUse::inference;
  impl_->cfg = cfg;
  impl_->cfg.finalize("HybridModel");  // idempotent: resolves dims, parses the pattern, validates
  impl_->device = device;
  if (max_tokens <= 0) HYD_THROW("HybridModel: max_tokens must be positive, got ", max_tokens);
  impl_->max_tokens = max_tokens;
  impl_->act = device.is_cpu() ? DType::f32 : DType::bf16;
  impl_->build();
}

HybridModel::~HybridModel() = default;

const HybridConfig& HybridModel::config() const { return impl_->cfg; }
Device HybridModel::device() const { return impl_->device; }
int64_t HybridModel::num_layers() const { return impl_->cfg.model.num_layers; }

MixerKind HybridModel::layer_kind(int64_t layer) const {
  impl_->check_layer(layer, "layer_kind");
  return impl_->cfg.layers[static_cast<size_t>(layer)];
}

std::vector<ParamInfo>& HybridModel::params() { return impl_->params; }

const ParamInfo& HybridModel::param(const std::string& name) const {
  return model_common::find_param(impl_->params, impl_->index, name, "HybridModel");
}

bool HybridModel::has_param(const std::string& name) const { return impl_->index.count(name) > 0; }

std::vector<ParamInfo> HybridModel::mixer_params(int64_t layer) const {
  impl_->check_layer(layer, "mixer_params");
  const auto [first, last] = impl_->mixer_range[static_cast<size_t>(layer)];
  return {impl_->params.begin() + static_cast<std::ptrdiff_t>(first),
          impl_->params.begin() + static_cast<std::ptrdiff_t>(last)};
}

Tensor HybridModel::flat_params() const { return impl_->flat_params; }
Tensor HybridModel::flat_grads() const { return impl_->flat_grads; }
int64_t HybridModel::expert_region_offset() const { return impl_->expert_offset; }

void HybridModel::init_random(uint64_t seed, float std) {
  const ModelConfig& c = impl_->cfg.model;
  const double out_scale = 1.0 / std::sqrt(2.0 * static_cast<double>(c.num_layers));
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<float> host(static_cast<size_t>(impl_->flat_params.numel()), 0.0f);
  std::vector<std::string> names;
  for (const ParamInfo& p : impl_->params) names.push_back(p.name);
  for (size_t i : kda_init_draw_order(names)) {
    const ParamInfo& p = impl_->params[i];
    float* v = host.data() + p.offset;
    const std::string& n = p.name;
    if (n.ends_with("norm") || n.ends_with("o_norm.weight")) {
      std::fill(v, v + p.numel, 1.0f);
    } else if (n.ends_with("bqkv") || n.ends_with("g_proj.1.bias") || n.ends_with(".e_score_correction_bias")) {
      std::fill(v, v + p.numel, 0.0f);
    } else if (n.ends_with(".A_log")) {
      for (int64_t i = 0; i < p.numel; ++i) v[i] = static_cast<float>(std::log(1.0 + 15.0 * unit(gen)));
    } else if (n.ends_with(".dt_bias")) {
      for (int64_t i = 0; i < p.numel; ++i) {
        const double dt = std::max(1e-4, std::exp(std::log(1e-3) + unit(gen) * (std::log(1e-1) - std::log(1e-3))));
        v[i] = static_cast<float>(dt + std::log(-std::expm1(-dt)));  // softplus(v) = dt
      }
    } else {
      const bool out_proj = n.ends_with(".wo") || n.ends_with(".w_down") || n.ends_with(".mlp.down") ||
                            n.ends_with(".mlp.shared_down") || n.ends_with(".o_proj.weight");
      const float s = out_proj ? static_cast<float>(std * out_scale) : std;
      for (int64_t i = 0; i < p.numel; ++i) v[i] = s * normal(gen);
    }
  }
  model_common::write_values(impl_->device, impl_->flat_params, host.data());
}

void HybridModel::set_param(const std::string& name, const float* data, int64_t n) {
  model_common::write_param(impl_->device, param(name), data, n, "HybridModel");
}

std::vector<float> HybridModel::get_param(const std::string& name) const {
  return model_common::read_values(impl_->device, param(name).value);
}

std::vector<float> HybridModel::get_grad(const std::string& name) const {
  impl_->require_training("get_grad");
  return model_common::read_values(impl_->device, param(name).grad);
}

void HybridModel::zero_grad() {
  impl_->require_training("zero_grad");
  model_common::zero_values(impl_->device, impl_->flat_grads);
}

void HybridModel::zero_grad(const ExecContext& ctx) {
  impl_->require_training("zero_grad");
  kernels::fill(ctx, impl_->flat_grads, 0.0f);
}

void HybridModel::set_moe_aux_loss(double coef, double grad_scale) {
  HYD_CHECK(coef >= 0 && std::isfinite(coef) && std::isfinite(grad_scale),
            "HybridModel::set_moe_aux_loss: coefficient ", coef, " and scale ", grad_scale,
            " must be finite, the coefficient >= 0");
  Impl& m = *impl_;
  for (size_t l = 0; l < m.moe.size(); ++l)
    if (m.sparse[l]) m.moe[l].moe.cfg.aux_loss_coef = static_cast<float>(coef);
  m.aux_grad = coef > 0 ? grad_scale : 0.0;
}

double HybridModel::moe_aux_loss() const { return impl_->aux_sum; }

std::vector<HybridModel::MoeLoad> HybridModel::moe_expert_loads() const {
  const Impl& m = *impl_;
  std::vector<MoeLoad> out;
  for (size_t l = 0; l < m.moe.size(); ++l) {
    if (!m.sparse[l]) continue;
    const MoeLayer::Saved& s = m.step.moe[l].moe;
    MoeLoad x;
    x.layer = static_cast<int64_t>(l);
    if (!m.moe[l].selection_bias_param.empty())
      x.bias_param = "layers." + std::to_string(l) + ".mlp.gate.e_score_correction_bias";
    // The cuBLAS expert GEMMs left the counts on the host already; otherwise they are copied.
    x.load = s.counts_host.empty() ? s.routing.counts_host()
                                   : std::vector<int64_t>(s.counts_host.begin(), s.counts_host.end());
    out.push_back(std::move(x));
  }
  return out;
}

double HybridModel::forward_backward(ExecContext& ctx, const Batch& batch, float loss_scale) {
  Impl& m = *impl_;
  m.require_training("forward_backward");
  m.check_batch(ctx, batch);
  m.begin_step(batch);
  m.forward(ctx, batch);
  m.lm_head_loss(ctx, batch, true, loss_scale);
  m.backward(ctx, batch);
  return m.mean_loss(ctx, batch);  // synchronises: gradients are complete on return
}

double HybridModel::forward_loss(ExecContext& ctx, const Batch& batch) {
  Impl& m = *impl_;
  m.check_batch(ctx, batch);
  m.begin_step(batch);
  m.forward(ctx, batch);
  m.lm_head_loss(ctx, batch, false, 1.0f);
  return m.mean_loss(ctx, batch);
}

std::vector<float> HybridModel::forward_logits(ExecContext& ctx, const Batch& batch) {
  Impl& m = *impl_;
  m.check_batch(ctx, batch);
  m.begin_step(batch);
  m.forward(ctx, batch);
  const int64_t n = batch.num_tokens, V = m.cfg.model.vocab_size;
  std::vector<float> out(static_cast<size_t>(n * V));
  for (int64_t c0 = 0; c0 < n; c0 += m.logits_chunk) {
    const int64_t c1 = std::min(n, c0 + m.logits_chunk);
    m.scratch_arena.reset();
    // f32 output (cuBLAS accumulates in f32 and writes it unrounded): the exact logits the bf16 inputs give.
    const Tensor logits = m.scratch_arena.alloc({c1 - c0, V}, DType::f32);
    kernels::gemm(ctx, false, true, 1.0f, m.step.final_normed.slice0(c0, c1), m.lm_head.value, 0.0f, logits);
    ctx.synchronize();
    const std::vector<float> chunk = model_common::read_values(m.device, logits);
    std::copy(chunk.begin(), chunk.end(), out.begin() + c0 * V);
  }
  return out;
}

int64_t HybridModel::logits_chunk_size() const { return impl_->logits_chunk; }

void HybridModel::set_logits_chunk_size(int64_t tokens) {
  if (tokens < 1 || tokens > impl_->default_logits_chunk)
    HYD_THROW("HybridModel::set_logits_chunk_size: ", tokens, " tokens; must be 1..", impl_->default_logits_chunk,
              " (the default, which the scratch arena is sized for)");
  impl_->logits_chunk = tokens;
}

double HybridModel::forward_backward_logits(ExecContext& ctx, const Batch& batch, const LogitsChunkLoss& loss_fn,
                                            HiddenStateMatch* hidden) {
  Impl& m = *impl_;
  m.require_training("forward_backward_logits");
  if (!loss_fn) HYD_THROW("HybridModel::forward_backward_logits: empty loss function");
  m.check_batch(ctx, batch);
  if (hidden) {
    const int64_t L = m.cfg.model.num_layers;
    if (static_cast<int64_t>(hidden->targets.size()) != L)
      HYD_THROW("HybridModel::forward_backward_logits: hidden.targets has ", hidden->targets.size(), " tensors for ", L,
                " layers");
    for (const Tensor& t : hidden->targets)
      m.check_activation(t, batch.num_tokens, "forward_backward_logits", "hidden.targets");
    if (!hidden->token_mask.empty() && static_cast<int64_t>(hidden->token_mask.size()) != batch.num_tokens)
      HYD_THROW("HybridModel::forward_backward_logits: hidden.token_mask has ", hidden->token_mask.size(),
                " entries for ", batch.num_tokens, " tokens");
    if (!(hidden->weight >= 0.0f) || !std::isfinite(hidden->weight))
      HYD_THROW("HybridModel::forward_backward_logits: hidden.weight must be finite and >= 0, got ", hidden->weight);
  }
  m.begin_step(batch);
  m.forward(ctx, batch);
  double total = 0;
  {
    NvtxRange range("lm_head_loss.fwd_bwd");
    m.lm_head_chunks(ctx, batch.num_tokens, true,
                     [&](int64_t c0, int64_t c1, const Tensor& logits) { total += loss_fn(ctx, c0, c1, logits); });
  }
  m.backward(ctx, batch, hidden);
  ctx.synchronize();  // gradients are complete on return
  device_sync(m.device);
  if (hidden) {
    // H = sum of squares / (L n D); n from the mask as in backward.
    int64_t counted = batch.num_tokens;
    if (!hidden->token_mask.empty())
      counted = std::count_if(hidden->token_mask.begin(), hidden->token_mask.end(), [](uint8_t v) { return v != 0; });
    hidden->mse = 0;
    if (counted > 0) {
      const double sq = download_f32(m.step.hidden_sq)[0];
      const int64_t denominator = hidden->count > 0 ? hidden->count : counted;
      hidden->mse = sq / (static_cast<double>(m.cfg.model.num_layers) * static_cast<double>(denominator) *
                          static_cast<double>(m.cfg.model.hidden_size));
    }
    if (hidden->weight != 0.0f) total += static_cast<double>(hidden->weight) * hidden->mse;
  }
  return total;
}

void HybridModel::forward_logits_chunks(ExecContext& ctx, const Batch& batch, const LogitsChunkVisit& visit) {
  Impl& m = *impl_;
  if (!visit) HYD_THROW("HybridModel::forward_logits_chunks: empty visit function");
  m.check_batch(ctx, batch);
  m.begin_step(batch);
  m.forward(ctx, batch);
  NvtxRange range("lm_head.fwd");
  m.lm_head_chunks(ctx, batch.num_tokens, false, visit);
}

void HybridModel::forward_hidden(ExecContext& ctx, const Batch& batch) { forward_layer_inputs(ctx, batch, {}, {}); }

void HybridModel::lm_head_logits(ExecContext& ctx, int64_t t0, int64_t t1, const Tensor& logits) {
  Impl& m = *impl_;
  if (!(ctx.device() == m.device))
    HYD_THROW("HybridModel::lm_head_logits on ", m.device.str(), " called with an execution context on ",
              ctx.device().str());
  if (!m.hidden_ready)
    HYD_THROW(
        "HybridModel::lm_head_logits: no final hidden states (run a forward of this model first; a "
        "mixer_forward discards them)");
  if (t0 < 0 || t1 <= t0 || t1 > m.hidden_tokens)
    HYD_THROW("HybridModel::lm_head_logits: tokens [", t0, ", ", t1, ") outside the last forward's ", m.hidden_tokens,
              " tokens");
  expect_shape(logits, {t1 - t0, m.cfg.model.vocab_size}, "HybridModel::lm_head_logits", "logits");
  expect_dtype(logits, m.act, "HybridModel::lm_head_logits", "logits");
  if (!(logits.device == m.device))
    HYD_THROW("HybridModel::lm_head_logits: argument 'logits' on ", logits.device.str(), ", model on ", m.device.str());
  NvtxRange range("lm_head.fwd");
  kernels::linear_forward(ctx, m.step.final_normed.slice0(t0, t1), m.lm_head.value, Tensor{}, logits);
}

void HybridModel::forward_layer_inputs(ExecContext& ctx, const Batch& batch, const std::vector<Tensor>& layer_inputs,
                                       const std::vector<Tensor>& mixer_outputs) {
  Impl& m = *impl_;
  const int64_t L = m.cfg.model.num_layers;
  m.check_batch(ctx, batch);
  // Every given tensor: [N, D], activation dtype, model's device, no two overlapping.
  std::vector<std::pair<char*, char*>> ranges;
  for (const auto& [vec, arg] : {std::pair<const std::vector<Tensor>*, const char*>{&layer_inputs, "layer_inputs"},
                                 std::pair<const std::vector<Tensor>*, const char*>{&mixer_outputs, "mixer_outputs"}}) {
    if (vec->empty()) continue;
    if (static_cast<int64_t>(vec->size()) != L)
      HYD_THROW("HybridModel::forward_layer_inputs: '", arg, "' has ", vec->size(), " tensors for ", L,
                " layers (give none or one per layer)");
    for (const Tensor& t : *vec) {
      if (t.empty()) continue;
      m.check_activation(t, batch.num_tokens, "forward_layer_inputs", arg);
      char* b = static_cast<char*>(t.data);
      char* e = b + t.numel() * static_cast<int64_t>(dtype_size(t.dtype));
      for (const auto& [ob, oe] : ranges)
        if (b < oe && ob < e) HYD_THROW("HybridModel::forward_layer_inputs: overlapping tensors in '", arg, "'");
      ranges.emplace_back(b, e);
    }
  }
  m.begin_step(batch);
  // The residual stream is written straight into the caller's tensors (h_0 by the embedding, layer l's
  // input by layer l-1's MLP); the blocks read them from there.
  for (int64_t l = 0; l < static_cast<int64_t>(layer_inputs.size()); ++l)
    if (!layer_inputs[l].empty()) m.step.residual[2 * l] = layer_inputs[l];
  m.forward(ctx, batch, mixer_outputs.empty() ? nullptr : &mixer_outputs);
}

void HybridModel::forward_layer_outputs(ExecContext& ctx, const Batch& batch,
                                        const std::vector<Tensor>& layer_outputs) {
  Impl& m = *impl_;
  const int64_t L = m.cfg.model.num_layers;
  m.check_batch(ctx, batch);
  if (static_cast<int64_t>(layer_outputs.size()) != L)
    HYD_THROW("HybridModel::forward_layer_outputs: 'layer_outputs' has ", layer_outputs.size(), " tensors for ", L,
              " layers");
  std::vector<std::pair<char*, char*>> ranges;
  for (const Tensor& t : layer_outputs) {
    m.check_activation(t, batch.num_tokens, "forward_layer_outputs", "layer_outputs");
    char* b = static_cast<char*>(t.data);
    char* e = b + t.numel() * static_cast<int64_t>(dtype_size(t.dtype));
    for (const auto& [ob, oe] : ranges)
      if (b < oe && ob < e) HYD_THROW("HybridModel::forward_layer_outputs: overlapping tensors in 'layer_outputs'");
    ranges.emplace_back(b, e);
  }
  m.begin_step(batch);
  // The output of layer l (its MLP block's residual sum) is written straight into the caller's tensor;
  // layer l + 1 and final_norm read it from there.
  for (int64_t l = 0; l < L; ++l) m.step.residual[2 * l + 2] = layer_outputs[static_cast<size_t>(l)];
  m.forward(ctx, batch);
}

std::vector<std::vector<float>> HybridModel::forward_layer_inputs_host(ExecContext& ctx, const Batch& batch) {
  Impl& m = *impl_;
  m.require_training("forward_layer_inputs_host (the layer inputs are not kept: use forward_layer_inputs)");
  forward_layer_inputs(ctx, batch, {}, {});
  ctx.synchronize();
  device_sync(m.device);
  std::vector<std::vector<float>> out;
  for (int64_t l = 0; l < m.cfg.model.num_layers; ++l) out.push_back(download_f32(m.step.residual[2 * l]));
  return out;
}

void HybridModel::mixer_input_norm(ExecContext& ctx, int64_t layer, const Batch& batch, const Tensor& hidden,
                                   const Tensor& normed) {
  Impl& m = *impl_;
  m.check_layer(layer, "mixer_input_norm");
  m.check_sequence(ctx, batch, false, false, "mixer_input_norm");
  m.check_activation(hidden, batch.num_tokens, "mixer_input_norm", "hidden");
  m.check_activation(normed, batch.num_tokens, "mixer_input_norm", "normed");
  m.scratch_arena.reset();
  const Tensor rstd = m.scratch_arena.alloc({batch.num_tokens}, DType::f32);
  kernels::rmsnorm_forward(ctx, hidden, m.mixer_norm[layer].value, normed, rstd,
                           static_cast<float>(m.cfg.model.rms_norm_eps));
}

void HybridModel::mixer_forward(ExecContext& ctx, int64_t layer, const Batch& batch, const Tensor& normed_input,
                                const Tensor& out) {
  Impl& m = *impl_;
  m.require_training("mixer_forward");
  m.check_layer(layer, "mixer_forward");
  m.check_sequence(ctx, batch, false, m.uses_rope(layer), "mixer_forward");
  m.check_activation(normed_input, batch.num_tokens, "mixer_forward", "normed_input");
  m.check_activation(out, batch.num_tokens, "mixer_forward", "out");
  if (out.data == normed_input.data) HYD_THROW("HybridModel::mixer_forward: 'out' must not alias 'normed_input'");
  if (!m.mixer_mode || m.mixer_tokens != batch.num_tokens) {
    m.act_arena.reset();
    m.step = m.alloc_step(m.act_arena, batch.num_tokens);
    m.mixer_mode = true;
    m.mixer_tokens = batch.num_tokens;
    m.mixer_ready.assign(m.mixer_ready.size(), false);
    m.hidden_ready = false;
  }
  NvtxRange range(m.nvtx_fwd[layer].c_str());
  m.refresh_gates(ctx, layer);
  Impl::MixerSaved& s = m.step.mix[layer];
  s.x = Tensor{};
  m.mixer_run(ctx, m.sequence(batch), layer, normed_input, out, s);
  m.mixer_ready[layer] = true;
}

void HybridModel::mixer_backward(ExecContext& ctx, int64_t layer, const Batch& batch, const Tensor& dout,
                                 const Tensor& d_input) {
  Impl& m = *impl_;
  m.require_training("mixer_backward");
  m.check_layer(layer, "mixer_backward");
  m.check_sequence(ctx, batch, false, m.uses_rope(layer), "mixer_backward");
  if (!m.mixer_mode || m.mixer_tokens != batch.num_tokens || !m.mixer_ready[layer])
    HYD_THROW("HybridModel::mixer_backward: layer ", layer, " has no mixer_forward for this ", batch.num_tokens,
              "-token batch since the last full-model call");
  m.check_activation(dout, batch.num_tokens, "mixer_backward", "dout");
  if (!d_input.empty()) m.check_activation(d_input, batch.num_tokens, "mixer_backward", "d_input");
  NvtxRange range(m.nvtx_bwd[layer].c_str());
  m.scratch_arena.reset();
  const Tensor da = m.alloc_block_grads(m.scratch_arena, batch.num_tokens);
  m.mixer_grad(ctx, m.sequence(batch), layer, m.step.mix[layer], dout, d_input.empty() ? da : d_input);
}

size_t HybridModel::memory_bytes() const {
  const Impl& m = *impl_;
  return m.param_arena.capacity() + m.grad_arena.capacity() + m.table_arena.capacity() + m.gate_arena.capacity() +
         m.act_arena.capacity() + m.scratch_arena.capacity();
}

double hybrid_train_flops_per_token(HybridModel& model, const HybridConfig& cfg, int64_t seq_len) {
  const ModelConfig& m = cfg.model;
  double p = 0;
  for (const ParamInfo& q : model.params()) {  // whole tensors (a rank may hold some experts only)
    double n = 1;
    for (int64_t d : q.full_shape()) n *= static_cast<double>(d);
    p += n;
  }
  if (!m.tie_word_embeddings) p -= static_cast<double>(m.vocab_size) * static_cast<double>(m.hidden_size);
  double attention_layers = 0;
  for (size_t l = 0; l < cfg.layers.size(); ++l) {
    if (cfg.layers[l] != MixerKind::kda) attention_layers += 1;
    if (m.is_moe_layer(static_cast<int64_t>(l)))
      p -= static_cast<double>(m.num_experts - m.num_experts_per_tok) * 3.0 * static_cast<double>(m.hidden_size) *
           static_cast<double>(m.moe_intermediate_size);
  }
  return 6.0 * p + 6.0 * attention_layers * static_cast<double>(seq_len) * static_cast<double>(m.q_dim());
}

}  // namespace hyd

// bench/e2e: end-to-end step speed of the issue-9 pair on one GPU, our side; bench/e2e/run.sh puts it
// beside bench/e2e/torch_fla_e2e.py (PyTorch eager + FLA, the same pair and steps) measured in the same call.
//
//   bench_e2e [--mode train|distill] [--batch 8] [--seq 2048] [--steps 5] [--warmup 3] [--docs 1]
//             [--w-kl 1] [--w-ce 0] [--lr 1e-5] [--layers 12] [--pattern KKKA]
//   bench_e2e --device cpu --tiny [...]      smoke test of the same steps on the CPU backend (tiny dims:
//             vocab 512, hidden 64, 2 heads of 32, SwiGLU 176, 4 layers; f32; no memory figures)
//
// Models (random weights, the same seeds every run):
//   student: HybridConfig from the Llama dims below through student_config_from_teacher (what
//            `hydistill distill` builds): 12 layers, hidden 1024, 8 heads of 128, pattern KKKA repeated
//            (KKKAKKKAKKKA: NoPE softmax attention at layers 3, 7, 11, KDA elsewhere with 8 heads,
//            dk = dv = 128, conv 4), SwiGLU 2816, vocab 32000, untied lm_head.
//   teacher: the all-T HybridModel of the same dims (Llama attention with RoPE everywhere; the
//            DenseModel kernel for kernel), only in --mode distill.
// Batch: B sequences of T random tokens (a fixed LCG), each cut into --docs equal documents, packed
// into one micro-batch of N = B T tokens with the document boundaries (cu_seqlens); uploaded once,
// before the timed steps (data loading is not part of a step on either side).
//
// Steps (bf16 weights and activations, f32 gradients and AdamW masters/moments, AdamWConfig defaults:
// betas 0.9 / 0.95, eps 1e-8, weight decay 0.1 on matrices, global-norm clipping at 1.0):
//   train:   zero_grad; student.forward_backward (mean cross-entropy); AdamW step.
//   distill: exactly distill/distill_loop.cpp's stage 2 without the hidden-state term:
//            zero_grad; teacher.forward_hidden on a stream of its own (HYD_TEACHER_STREAM=0: on the
//            student's), overlapping with the student's forward; student.forward_backward_logits whose
//            per-chunk callback (the first waiting for the teacher's stream) computes the teacher's logits of the same
//            tokens (lm_head_logits) and kernels::distill_loss (KL(teacher || student) at tau 1 weighted --w-kl, CE
//            weighted --w-ce, grad_scale = 1 / the batch's loss tokens, per-token kl / ce kept on the device); the
//            per-token losses read back and summed on the host; AdamW step.
// Every step ends with a device synchronisation; the step time is host wall time (steady_clock)
// between two synchronisations, median over --steps after --warmup untimed steps.
//
// FLOPs (the same formula in bench/e2e/torch_fla_e2e.py, flops_per_token there):
//   P_mm(model)  = every parameter except the input embedding table (the lm_head is counted; KDA's
//                  A_log, dt_bias, conv and norm weights are included, a negligible share), i.e. the
//                  parameters that take part in a matrix multiply once per token
//   attn(model)  = (number of softmax-attention layers: A or T) * T * q_dim  (q_dim = heads * head_dim)
//   forward      = 2 P_mm + 2 attn      (causal: q.k and p.v over T/2 keys on average, 2 FLOPs each)
//   fwd + bwd    = 3 x forward = 6 P_mm + 6 attn   (ModelConfig::train_flops_per_token's convention)
//   train step   = student fwd+bwd per token
//   distill step = student fwd+bwd + teacher forward per token
// Not counted on either side: KDA's token mixing (the chunked delta-rule recurrence; ~3% of the
// student's matmul FLOPs at these dims), norms, activations, the softmax of the losses, the optimizer.
// MFU = tokens/s * FLOPs per token / peak, peak = device_peak_flops (trainer/metrics.h: H100 / H200
// SXM 989e12 bf16 dense, H100 PCIe 756e12, HYD_PEAK_TFLOPS overrides); 989e12 when the device is unknown.
//
// Memory: peak_gib = device memory in use after the last step minus what was in use before the first
// allocation (cudaMemGetInfo): the models' and the optimizer's arenas, the loop's buffers, the cuBLAS
// workspaces and the stream-ordered pool of the kernels' scratch, which ExecContext never releases
// (release threshold UINT64_MAX), so its reservation at the end is its high-water mark. It counts
// reserved memory, more than PyTorch's max_memory_allocated on the other side. arenas_gib (the models',
// optimizer's, uploader's and stage-2 buffers' arenas) and pool_gib (the pool's reserved high-water
// mark) are most of it; the rest is the cuBLAS handles' workspaces and what the libraries allocate.
//
// Prints one line per run:
//   e2e impl=hydistill mode=distill batch=8 seq=2048 docs=1 step_ms=... tokens_per_s=... mfu=... peak_gib=...
// followed by further key=value fields (parameters, FLOPs per token, loss, device; skipped = AdamW updates
// skipped for a non-finite gradient norm, which would make a step look cheaper: it must be 0).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "distill/student_init.h"
#include "kernels/distill_loss.h"
#include "kernels/elementwise.h"
#include "trainer/batch_upload.h"
#include "trainer/core/arena.h"
#include "trainer/core/exec_context.h"
#include "trainer/hybrid_model.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"

using namespace hyd;

namespace {

using Clock = std::chrono::steady_clock;

struct Args {
  std::string mode = "distill";
  int64_t batch = 8, seq = 2048, docs = 1, layers = 12;
  int steps = 5, warmup = 3;
  double w_kl = 1, w_ce = 0, lr = 1e-5;
  std::string pattern = "KKKA";
  std::string device = "cuda";
  bool tiny = false;
};

void usage() {
  std::printf(
      "usage: bench_e2e [--mode train|distill] [--batch B] [--seq T] [--steps N] [--warmup N] [--docs D]\n"
      "                 [--w-kl W] [--w-ce W] [--lr LR] [--layers L] [--pattern KKKA] [--device cuda|cpu] [--tiny]\n");
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "-h" || k == "--help") {
      usage();
      std::exit(0);
    }
    if (k == "--tiny") {
      a.tiny = true;
      continue;
    }
    if (i + 1 >= argc) HYD_THROW(k, " needs a value");
    const std::string v = argv[++i];
    if (k == "--mode")
      a.mode = v;
    else if (k == "--batch")
      a.batch = std::stoll(v);
    else if (k == "--seq")
      a.seq = std::stoll(v);
    else if (k == "--steps")
      a.steps = std::stoi(v);
    else if (k == "--warmup")
      a.warmup = std::stoi(v);
    else if (k == "--docs")
      a.docs = std::stoll(v);
    else if (k == "--w-kl")
      a.w_kl = std::stod(v);
    else if (k == "--w-ce")
      a.w_ce = std::stod(v);
    else if (k == "--lr")
      a.lr = std::stod(v);
    else if (k == "--layers")
      a.layers = std::stoll(v);
    else if (k == "--pattern")
      a.pattern = v;
    else if (k == "--device")
      a.device = v;
    else
      HYD_THROW("unknown argument ", k, " (--help lists them)");
  }
  if (a.mode != "train" && a.mode != "distill") HYD_THROW("--mode must be train or distill, got ", a.mode);
  if (a.device != "cuda" && a.device != "cpu") HYD_THROW("--device must be cuda or cpu, got ", a.device);
  if (a.device == "cpu" && !a.tiny) HYD_THROW("--device cpu is a smoke test: add --tiny");
  if (a.batch < 1 || a.seq < 2) HYD_THROW("--batch >= 1 and --seq >= 2 required");
  if (a.docs < 1 || a.seq / a.docs < 2) HYD_THROW("--docs must cut --seq into documents of >= 2 tokens");
  if (a.steps < 1 || a.warmup < 0) HYD_THROW("--steps >= 1 and --warmup >= 0 required");
  if (a.mode == "distill" && (a.w_kl < 0 || a.w_ce < 0 || a.w_kl + a.w_ce <= 0))
    HYD_THROW("--w-kl and --w-ce must be >= 0, not both 0");
  return a;
}

// The teacher's (Llama) dims of issue 9 (tiny: the smoke test's, as torch_fla_e2e.py's TINY); the
// student derives from them.
ModelConfig issue9_llama(int64_t layers, int64_t seq, bool tiny) {
  ModelConfig c;
  c.family = "llama";
  c.vocab_size = tiny ? 512 : 32000;
  c.hidden_size = tiny ? 64 : 1024;
  c.intermediate_size = tiny ? 176 : 2816;
  c.num_layers = tiny ? 4 : layers;
  c.num_heads = tiny ? 2 : 8;
  c.num_kv_heads = c.num_heads;
  c.head_dim = tiny ? 32 : 128;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  c.max_position_embeddings = std::max<int64_t>(8192, seq);
  c.tie_word_embeddings = false;
  c.finalize("bench_e2e");
  return c;
}

// B sequences of T random tokens, each cut into `docs` documents (the last takes the remainder);
// targets are the next token inside a document, -1 at every document's last token.
HostBatch random_batch(int64_t B, int64_t T, int64_t docs, int64_t vocab, uint64_t seed) {
  HostBatch hb;
  uint64_t x = seed;
  hb.cu_seqlens.push_back(0);
  const int64_t len = T / docs;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t d = 0; d < docs; ++d) {
      const int64_t n = d + 1 < docs ? len : T - len * (docs - 1);
      const auto start = static_cast<int64_t>(hb.tokens.size());
      for (int64_t i = 0; i < n; ++i) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        hb.tokens.push_back(static_cast<int32_t>((x >> 33) % static_cast<uint64_t>(vocab)));
        hb.positions.push_back(static_cast<int32_t>(i));
      }
      for (int64_t i = 0; i < n; ++i)
        hb.targets.push_back(i + 1 < n ? hb.tokens[static_cast<size_t>(start + i + 1)] : -1);
      hb.cu_seqlens.push_back(static_cast<int32_t>(start + n));
    }
  }
  hb.num_docs = B * docs;
  for (int32_t t : hb.targets) hb.num_targets += t >= 0;
  return hb;
}

// The FLOP count of the header: P_mm and the softmax-attention layers of a model.
struct FlopModel {
  double matmul_params = 0;
  int64_t attention_layers = 0;
  int64_t q_dim = 0;
  double forward_per_token(int64_t T) const {
    return 2.0 * matmul_params + 2.0 * static_cast<double>(attention_layers * T * q_dim);
  }
  double train_per_token(int64_t T) const { return 3.0 * forward_per_token(T); }
};

int64_t count_params(HybridModel& m) {
  int64_t n = 0;
  for (const ParamInfo& p : m.params()) n += p.numel;
  return n;
}

FlopModel flop_model(HybridModel& m) {
  const HybridConfig& c = m.config();
  FlopModel f;
  f.matmul_params = static_cast<double>(count_params(m) - m.param("embed").numel);
  for (int64_t l = 0; l < m.num_layers(); ++l) f.attention_layers += m.layer_kind(l) != MixerKind::kda;
  f.q_dim = c.model.q_dim();
  return f;
}

size_t device_used_bytes() {
  size_t free_b = 0, total_b = 0;
  CHECK_CUDA(cudaMemGetInfo(&free_b, &total_b));
  return total_b - free_b;
}

size_t pool_reserved_high() {
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  cudaMemPool_t pool;
  CHECK_CUDA(cudaDeviceGetDefaultMemPool(&pool, dev));
  uint64_t v = 0;
  CHECK_CUDA(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &v));
  return v;
}

std::string no_spaces(std::string s) {
  std::replace(s.begin(), s.end(), ' ', '_');
  return s;
}

int run(const Args& a) {
  const bool cuda = a.device == "cuda";
  const Device dev = cuda ? Device::cuda(0) : Device::cpu();
  const DType act = cuda ? DType::bf16 : DType::f32;  // the models' activation (and logits) dtype
  size_t used_before = 0;
  std::string device_name = "cpu";
  if (cuda) {
    CHECK_CUDA(cudaSetDevice(dev.index));
    CHECK_CUDA(cudaFree(nullptr));  // the context exists before the baseline is taken
    used_before = device_used_bytes();
    cudaDeviceProp prop{};
    CHECK_CUDA(cudaGetDeviceProperties(&prop, dev.index));
    device_name = no_spaces(prop.name);
  }

  const bool distill = a.mode == "distill";
  const int64_t B = a.batch, T = a.seq, N = B * T;
  const ModelConfig tc = issue9_llama(a.layers, T, a.tiny);
  const HybridConfig student_cfg = student_config_from_teacher(tc, a.pattern, KdaOptions{}, "bench_e2e");

  ExecContext ctx(dev);
  HybridModel student(student_cfg, dev, N);
  student.init_random(7);
  std::optional<HybridModel> teacher;
  if (distill) {
    HybridConfig teacher_cfg;  // as distill/student_checkpoint.cpp's teacher_hybrid_config: every layer T
    teacher_cfg.model = tc;
    teacher_cfg.pattern = std::string(static_cast<size_t>(tc.num_layers), 'T');
    teacher_cfg.finalize("bench_e2e");
    teacher.emplace(teacher_cfg, dev, N, ModelUse::inference);  // as hydistill distill's teacher
    teacher->init_random(11);
  }
  AdamW optimizer(student.params(), dev, AdamWConfig{});
  BatchUploader uploader(dev, N, /*with_loss_mask=*/true);
  const HostBatch hb = random_batch(B, T, a.docs, tc.vocab_size, 1234);
  const Batch batch = uploader.upload(ctx, hb);
  const Tensor mask = uploader.loss_mask();

  // Stage 2's buffers, as distill_loop.cpp allocates them: the teacher's [C, V] logits chunk, per-token kl, ce.
  const int64_t C = student.logits_chunk_size(), V = tc.vocab_size;
  std::optional<Arena> work;
  Tensor teacher_chunk, kl, ce;
  if (distill) {
    work.emplace("bench_e2e stage 2", dev,
                 static_cast<size_t>(C * V) * dtype_size(act) + 2 * static_cast<size_t>(N) * 4 + 3 * 512);
    teacher_chunk = work->alloc({C, V}, act);
    kl = work->alloc({N}, DType::f32);
    ce = work->alloc({N}, DType::f32);
  }
  kernels::DistillLossOptions opt;
  opt.temperature = 1.0f;
  opt.w_kl = static_cast<float>(a.w_kl);
  opt.w_ce = static_cast<float>(a.w_ce);
  opt.write_grad = true;
  opt.grad_scale = static_cast<float>(1.0 / static_cast<double>(hb.num_targets));

  std::vector<float> kl_host(static_cast<size_t>(N)), ce_host(static_cast<size_t>(N));
  auto download = [&](const Tensor& t, std::vector<float>& host) {
    ctx.synchronize();
    device_fence(dev);
    copy_tensor(Tensor(host.data(), DType::f32, Device::cpu(), {t.numel()}), t);
  };

  // The teacher's forward on a stream of its own, as distill_loop.cpp runs it on one GPU: it overlaps with
  // the student's forward; the student's stream waits for it before the first logits chunk.
  // HYD_TEACHER_STREAM=0: both on one stream (the A/B of the overlap).
  std::optional<ExecContext> own_teacher_ctx;
  const char* teacher_stream = std::getenv("HYD_TEACHER_STREAM");
  if (distill && dev.is_cuda() && !(teacher_stream && std::string(teacher_stream) == "0")) own_teacher_ctx.emplace(dev);
  ExecContext& tctx = own_teacher_ctx ? *own_teacher_ctx : ctx;

  // One step; returns its loss (train: mean CE; distill: w_kl * mean KL + w_ce * mean CE).
  auto step = [&]() -> double {
    student.zero_grad(ctx);
    double loss = 0;
    if (!distill) {
      loss = student.forward_backward(ctx, batch);
    } else {
      tctx.wait_for(ctx);  // the last step's logits chunks (on ctx) have read the teacher's buffers
      teacher->forward_hidden(tctx, batch);
      kernels::fill(ctx, kl, 0.0f);
      kernels::fill(ctx, ce, 0.0f);
      const HybridModel::LogitsChunkLoss chunk_loss = [&](ExecContext& c, int64_t t0, int64_t t1, const Tensor& s) {
        if (t0 == 0) c.wait_for(tctx);  // the teacher's final hidden states are written
        const Tensor t = teacher_chunk.slice0(0, t1 - t0);
        teacher->lm_head_logits(c, t0, t1, t);
        kernels::distill_loss(c, s, t, batch.targets.slice0(t0, t1), mask.slice0(t0, t1), kl.slice0(t0, t1),
                              ce.slice0(t0, t1), Tensor{}, opt);
        return 0.0;
      };
      student.forward_backward_logits(ctx, batch, chunk_loss);
      download(kl, kl_host);
      download(ce, ce_host);
      double kl_sum = 0, ce_sum = 0;
      for (size_t i = 0; i < kl_host.size(); ++i) {
        kl_sum += kl_host[i];
        ce_sum += ce_host[i];
      }
      const double n = static_cast<double>(hb.num_targets);
      loss = a.w_kl * kl_sum / n + a.w_ce * ce_sum / n;
    }
    optimizer.step(ctx, a.lr);
    ctx.synchronize();
    return loss;
  };

  std::vector<double> times;
  double loss = NAN;
  for (int s = 0; s < a.warmup + a.steps; ++s) {
    ctx.synchronize();
    const auto t0 = Clock::now();
    loss = step();
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    if (s >= a.warmup) times.push_back(dt);
  }
  double peak_gib = NAN, pool_gib = NAN;
  const double gib = static_cast<double>(1ull << 30);
  if (cuda) {
    CHECK_CUDA(cudaDeviceSynchronize());
    peak_gib = static_cast<double>(device_used_bytes() - used_before) / gib;
    pool_gib = static_cast<double>(pool_reserved_high()) / gib;
  }
  size_t arenas = student.memory_bytes() + optimizer.memory_bytes() + uploader.bytes();
  if (teacher) arenas += teacher->memory_bytes();
  if (work) arenas += work->capacity();

  std::sort(times.begin(), times.end());
  const double step_s = times[times.size() / 2];
  const double tokens_per_s = static_cast<double>(N) / step_s;
  const FlopModel fs = flop_model(student);
  double flops_per_token = fs.train_per_token(T);
  double teacher_params = 0;
  if (teacher) {
    const FlopModel ft = flop_model(*teacher);
    flops_per_token += ft.forward_per_token(T);
    teacher_params = static_cast<double>(count_params(*teacher));
  }
  double peak = device_peak_flops(dev);
  if (peak <= 0) peak = 989e12;
  std::printf(
      "e2e impl=hydistill mode=%s batch=%lld seq=%lld docs=%lld step_ms=%.2f tokens_per_s=%.0f mfu=%.4f "
      "peak_gib=%.2f arenas_gib=%.2f pool_gib=%.2f student_params=%lld teacher_params=%.0f "
      "flops_per_token=%.4e peak_tflops=%.0f loss=%.5f steps=%d warmup=%d pattern=%s w_kl=%g w_ce=%g skipped=%lld "
      "logits_chunk=%lld device=%s\n",
      a.mode.c_str(), static_cast<long long>(B), static_cast<long long>(T), static_cast<long long>(a.docs),
      step_s * 1e3, tokens_per_s, tokens_per_s * flops_per_token / peak, peak_gib, static_cast<double>(arenas) / gib,
      pool_gib, static_cast<long long>(count_params(student)), teacher_params, flops_per_token, peak / 1e12, loss,
      a.steps, a.warmup, layer_pattern_string(student_cfg.layers).c_str(), a.w_kl, distill ? a.w_ce : 0.0,
      static_cast<long long>(optimizer.skipped_steps()), static_cast<long long>(student.logits_chunk_size()),
      device_name.c_str());
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_e2e: %s\n", e.what());
    return 1;
  }
}

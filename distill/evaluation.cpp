#include "distill/evaluation.h"

#if __has_include(<hdf5.h>)
#include <hdf5.h>
#else
#include <hdf5/serial/hdf5.h>  // Debian/Ubuntu serial HDF5 (not on the default include path)
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <span>
#include <sstream>
#include <string>

#include "kernels/cross_entropy.h"
#include "kernels/distill_loss.h"
#include "kernels/elementwise.h"
#include "parallel/comm.h"
#include "parallel/sequence_parallel.h"
#include "trainer/batch_upload.h"
#include "trainer/core/arena.h"
#include "trainer/core/error.h"
#include "trainer/lasp.h"
#include "trainer/metrics.h"

namespace hyd {
namespace {

constexpr const char* kNominalLengths = "/doc_lengths_target";

// One HDF5 id, closed on scope exit.
class H5Owned {
 public:
  H5Owned(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~H5Owned() {
    if (id_ >= 0) close_(id_);
  }
  H5Owned(const H5Owned&) = delete;
  H5Owned& operator=(const H5Owned&) = delete;
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

// /doc_lengths_target of the dataset's file: [D] integers; empty when the file has none.
std::vector<int64_t> read_nominal_lengths(const std::string& path, int64_t num_docs) {
  hid_t f = H5I_INVALID_HID;
  H5E_BEGIN_TRY { f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT); }
  H5E_END_TRY;
  if (f < 0) throw Error::at(path, "", "HDF5 could not open the file");
  H5Owned file(f, H5Fclose);
  htri_t exists = -1;
  H5E_BEGIN_TRY { exists = H5Lexists(file.get(), kNominalLengths, H5P_DEFAULT); }
  H5E_END_TRY;
  if (exists <= 0) return {};
  hid_t d = H5I_INVALID_HID;
  H5E_BEGIN_TRY { d = H5Dopen2(file.get(), kNominalLengths, H5P_DEFAULT); }
  H5E_END_TRY;
  if (d < 0) throw Error::at(path, kNominalLengths, "not a dataset");
  H5Owned ds(d, H5Dclose);
  H5Owned type(H5Dget_type(ds.get()), H5Tclose);
  H5Owned space(H5Dget_space(ds.get()), H5Sclose);
  if (!type.valid() || !space.valid()) throw Error::at(path, kNominalLengths, "cannot read the type or shape");
  if (H5Tget_class(type.get()) != H5T_INTEGER) throw Error::at(path, kNominalLengths, "wrong dtype: expected int64");
  if (H5Sget_simple_extent_ndims(space.get()) != 1) throw Error::at(path, kNominalLengths, "expected a 1-D array");
  hsize_t n = 0;
  H5Sget_simple_extent_dims(space.get(), &n, nullptr);
  if (static_cast<int64_t>(n) != num_docs) {
    throw Error::at(path, kNominalLengths,
                    "has " + std::to_string(n) + " entries, the file has " + std::to_string(num_docs) + " documents");
  }
  std::vector<int64_t> out(n);
  if (n > 0) {
    herr_t st = -1;
    H5E_BEGIN_TRY { st = H5Dread(ds.get(), H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()); }
    H5E_END_TRY;
    if (st < 0) throw Error::at(path, kNominalLengths, "read failed");
  }
  return out;
}

// Index of the largest value of row[0, V); -1 when the row holds a NaN (never counts as correct).
int64_t argmax_row(const float* row, int64_t V) {
  int64_t best = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (std::isnan(row[v])) return -1;
    if (row[v] > row[best]) best = v;
  }
  return best;
}

int64_t resolved_head_dim(const ModelConfig& cfg) {
  if (cfg.head_dim > 0) return cfg.head_dim;
  HYD_CHECK(cfg.num_heads > 0 && cfg.hidden_size > 0, "kv_cache_bytes_per_token: num_heads and hidden_size must be",
            " positive to resolve head_dim, got ", cfg.num_heads, " and ", cfg.hidden_size);
  return cfg.hidden_size / cfg.num_heads;
}

// Per-token K/V bytes of one attention layer.
int64_t attention_layer_bytes(const ModelConfig& cfg, int64_t bytes_per_element) {
  HYD_CHECK(bytes_per_element > 0, "kv_cache_bytes_per_token: bytes_per_element must be positive, got ",
            bytes_per_element);
  HYD_CHECK(cfg.num_kv_heads > 0, "kv_cache_bytes_per_token: num_kv_heads must be positive, got ", cfg.num_kv_heads);
  const int64_t head_dim = resolved_head_dim(cfg);
  HYD_CHECK(head_dim > 0, "kv_cache_bytes_per_token: head_dim must be positive, got ", head_dim);
  return 2 * cfg.num_kv_heads * head_dim * bytes_per_element;
}

}  // namespace

std::vector<PasskeyResult> passkey_accuracy(const DocumentLogitsFn& logits_fn, const TokenDataset& data) {
  const DatasetInfo& info = data.info();
  const auto& mask = data.loss_mask();
  if (mask.empty()) {
    throw Error::at(info.path, "/loss_mask",
                    "missing: passkey data marks its answers with /loss_mask "
                    "(make it with data/make_passkey.py)");
  }
  HYD_CHECK(logits_fn, "passkey_accuracy: no logits function");
  const auto& tokens = data.tokens();
  const auto& offsets = data.doc_offsets();
  const int64_t num_docs = static_cast<int64_t>(offsets.size()) - 1;
  const std::vector<int64_t> nominal = read_nominal_lengths(info.path, num_docs);

  std::map<int64_t, PasskeyResult> by_length;
  for (int64_t d = 0; d < num_docs; ++d) {
    const int64_t begin = offsets[d], end = offsets[d + 1];
    std::vector<int64_t> answer;  // positions inside the document
    for (int64_t p = 0; p < end - begin; ++p) {
      if (mask[begin + p]) answer.push_back(p);
    }
    if (answer.empty()) continue;
    if (answer.front() == 0) {
      throw Error::at(info.path, "/loss_mask",
                      "document " + std::to_string(d) + " marks its first token as an answer (nothing predicts it)");
    }
    const int64_t len = end - begin;
    const std::vector<int32_t> doc(tokens.begin() + begin, tokens.begin() + end);
    const std::vector<float> logits = logits_fn(doc);
    if (logits.empty() || logits.size() % static_cast<size_t>(len) != 0) {
      HYD_THROW("passkey_accuracy: the logits function returned ", logits.size(), " values for a document of ", len,
                " tokens (", info.path, " document ", d, "); expected [len, V]");
    }
    const int64_t V = static_cast<int64_t>(logits.size()) / len;
    bool correct = true;
    for (int64_t p : answer) {
      if (argmax_row(logits.data() + (p - 1) * V, V) != doc[p]) {
        correct = false;
        break;
      }
    }
    const int64_t length = nominal.empty() ? len : nominal[d];
    PasskeyResult& r = by_length[length];
    r.length = length;
    r.total += 1;
    r.correct += correct ? 1 : 0;
  }
  if (by_length.empty()) {
    throw Error::at(info.path, "/loss_mask", "no document has answer tokens (loss_mask is 0 everywhere)");
  }
  std::vector<PasskeyResult> out;
  out.reserve(by_length.size());
  for (const auto& [length, r] : by_length) out.push_back(r);
  return out;
}

KvCacheBytes kv_cache_bytes_per_token(const ModelConfig& cfg, int64_t bytes_per_element) {
  HYD_CHECK(cfg.num_layers > 0, "kv_cache_bytes_per_token: num_layers must be positive, got ", cfg.num_layers);
  KvCacheBytes out;
  out.cached_layers = cfg.num_layers;
  out.per_token = cfg.num_layers * attention_layer_bytes(cfg, bytes_per_element);
  return out;
}

KvCacheBytes kv_cache_bytes_per_token(const HybridConfig& cfg, int64_t bytes_per_element) {
  const ModelConfig& m = cfg.model;
  HYD_CHECK(m.num_layers > 0, "kv_cache_bytes_per_token: num_layers must be positive, got ", m.num_layers);
  const std::vector<MixerKind> layers =
      cfg.layers.empty() ? parse_layer_pattern(cfg.pattern, m.num_layers, "kv_cache_bytes_per_token") : cfg.layers;
  HYD_CHECK(static_cast<int64_t>(layers.size()) == m.num_layers, "kv_cache_bytes_per_token: ", layers.size(),
            " mixers for ", m.num_layers, " layers");
  KvCacheBytes out;
  for (MixerKind kind : layers) {
    if (kind == MixerKind::kda) {
      out.state_layers += 1;
    } else {
      out.cached_layers += 1;
    }
  }
  if (out.cached_layers > 0) out.per_token = out.cached_layers * attention_layer_bytes(m, bytes_per_element);
  if (out.state_layers > 0) {
    const KdaConfig& k = cfg.kda;
    HYD_CHECK(k.heads > 0 && k.v_heads > 0 && k.dk > 0 && k.dv > 0 && k.conv_size >= 1,
              "kv_cache_bytes_per_token: KDA dims must be positive (heads ", k.heads, ", v_heads ", k.v_heads, ", dk ",
              k.dk, ", dv ", k.dv, ", conv_size ", k.conv_size, ")");
    HYD_CHECK(bytes_per_element > 0, "kv_cache_bytes_per_token: bytes_per_element must be positive, got ",
              bytes_per_element);
    const int64_t state_values = k.v_heads * k.dk * k.dv;  // S [HV, dk, dv], fp32
    const int64_t conv_values = (k.conv_size - 1) * (2 * k.key_dim() + k.value_dim());
    out.state_per_sequence = out.state_layers * state_values * static_cast<int64_t>(sizeof(float));
    out.conv_state_per_sequence = out.state_layers * conv_values * bytes_per_element;
  }
  return out;
}

// ---------------------------------------------------------------- DistillEvaluator

int64_t longest_document(const TokenDataset& data) {
  const std::vector<int64_t>& off = data.doc_offsets();
  int64_t longest = 0;
  for (size_t d = 1; d < off.size(); ++d) longest = std::max(longest, off[d] - off[d - 1]);
  return longest;
}

namespace {

constexpr size_t kPad = 512;  // per-allocation slack for the arena's alignment

// Sum of the first n values of a device tensor of T, after everything queued on ctx has finished.
template <class T>
double device_sum(ExecContext& ctx, const Tensor& t, int64_t n) {
  HostTensor host({n}, t.dtype);
  ctx.synchronize();
  device_fence(t.device);
  copy_tensor(host.t, t.slice0(0, n));
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(host.ptr<T>()[i]);
  return sum;
}

// One document as a packed micro-batch: next-token targets, -1 at the end.
HostBatch document_batch(const std::vector<int32_t>& tokens) {
  HostBatch hb;
  const auto n = static_cast<int32_t>(tokens.size());
  hb.tokens = tokens;
  hb.targets.resize(tokens.size());
  hb.positions.resize(tokens.size());
  for (int32_t i = 0; i < n; ++i) {
    hb.targets[static_cast<size_t>(i)] = i + 1 < n ? tokens[static_cast<size_t>(i) + 1] : -1;
    hb.positions[static_cast<size_t>(i)] = i;
  }
  hb.cu_seqlens = {0, n};
  hb.num_docs = 1;
  hb.num_targets = n > 0 ? n - 1 : 0;
  return hb;
}

nlohmann::json finite_or_null(double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr); }

std::string passkey_cell(const PasskeyResult& r) {
  return std::to_string(r.correct) + "/" + std::to_string(r.total) + " (" +
         format_number("%.0f", 100.0 * r.accuracy()) + "%)";
}

}  // namespace

struct DistillEvaluator::Impl {
  HybridModel& teacher;
  HybridModel& student;
  const PackedSampler* held_out;
  int64_t batches;
  const TokenDataset* passkey;
  BatchUploader uploader;
  Arena work;
  Tensor teacher_chunk, kl, student_ce, teacher_ce, top1;

  SequenceParallel* sp = nullptr;
  int64_t rows = 0, seq_len = 0;
  const MoeExpertParallel* ep = nullptr;

  Impl(HybridModel& t, HybridModel& s, int64_t max_tokens, const PackedSampler* h, int64_t b, const TokenDataset* p,
       SequenceParallel* sp_, int64_t rows_, int64_t seq_len_, const MoeExpertParallel* ep_)
      : teacher(t),
        student(s),
        held_out(b > 0 ? h : nullptr),
        batches(b),
        passkey(p),
        uploader(s.device(), max_tokens, /*with_loss_mask=*/true),
        sp(sp_ != nullptr && sp_->size() > 1 ? sp_ : nullptr),
        rows(rows_),
        seq_len(seq_len_),
        ep(ep_) {
    HYD_CHECK(sp == nullptr || passkey == nullptr,
              "DistillEvaluator: passkey evaluation under sequence parallelism is not supported");
    HYD_CHECK(t.device() == s.device(), "DistillEvaluator: teacher on ", t.device().str(), ", student on ",
              s.device().str());
    const int64_t C = s.logits_chunk_size(), V = s.config().model.vocab_size, N = max_tokens;
    const DType act = s.device().is_cuda() ? DType::bf16 : DType::f32;
    work = Arena("evaluation", s.device(),
                 static_cast<size_t>(C * V) * dtype_size(act) + 3 * static_cast<size_t>(N) * 4 +
                     static_cast<size_t>(N) + 5 * kPad);
    teacher_chunk = work.alloc({C, V}, act);
    kl = work.alloc({N}, DType::f32);
    student_ce = work.alloc({N}, DType::f32);
    teacher_ce = work.alloc({N}, DType::f32);
    top1 = work.alloc({N}, DType::u8);
  }

  HeldOutMetrics measure_held_out(ExecContext& ctx) {
    HeldOutMetrics r;
    if (!held_out) return r;
    double kl_sum = 0, student_sum = 0, teacher_sum = 0, agree = 0;
    kernels::DistillLossOptions opt;  // temperature 1, no gradient
    for (int64_t i = 0; i < batches; ++i) {
      HostBatch hb = held_out->batch(i);
      if (hb.num_targets == 0) continue;  // whole sequences: the same on every rank of an SP group
      const int64_t targets = hb.num_targets;
      // Under sequence parallelism hb becomes this rank's slice.
      Batch batch = sp ? upload_sp_batch(ctx, uploader, sp, rows, seq_len, hb) : uploader.upload(ctx, hb);
      batch.ep = ep;
      const Tensor mask = uploader.loss_mask();
      const int64_t n = batch.num_tokens;
      teacher.forward_hidden(ctx, batch);
      student.forward_logits_chunks(ctx, batch, [&](int64_t t0, int64_t t1, const Tensor& s) {
        const Tensor t = teacher_chunk.slice0(0, t1 - t0);
        teacher.lm_head_logits(ctx, t0, t1, t);
        const Tensor labels = batch.targets.slice0(t0, t1);
        kernels::distill_loss(ctx, s, t, labels, mask.slice0(t0, t1), kl.slice0(t0, t1), student_ce.slice0(t0, t1),
                              top1.slice0(t0, t1), opt);
        kernels::cross_entropy(ctx, t, labels, teacher_ce.slice0(t0, t1), /*write_grad=*/false, 1.0f);
      });
      kl_sum += device_sum<float>(ctx, kl, n);
      student_sum += device_sum<float>(ctx, student_ce, n);
      teacher_sum += device_sum<float>(ctx, teacher_ce, n);
      agree += device_sum<uint8_t>(ctx, top1, n);
      r.tokens += targets;
    }
    if (sp) {
      double sums[4] = {kl_sum, student_sum, teacher_sum, agree};
      sp->group().all_reduce(std::span<double>(sums, 4), ReduceOp::kSum);
      kl_sum = sums[0], student_sum = sums[1], teacher_sum = sums[2], agree = sums[3];
    }
    if (r.tokens > 0) {
      const auto n = static_cast<double>(r.tokens);
      r.kl = kl_sum / n;
      r.student_loss = student_sum / n;
      r.teacher_loss = teacher_sum / n;
      r.top1_agreement = agree / n;
    }
    return r;
  }

  std::vector<PasskeyResult> passkey_of(ExecContext& ctx, HybridModel& model) {
    return passkey_accuracy(
        [&](const std::vector<int32_t>& tokens) {
          Batch batch = uploader.upload(ctx, document_batch(tokens));
          batch.ep = ep;
          return model.forward_logits(ctx, batch);
        },
        *passkey);
  }
};

DistillEvaluator::DistillEvaluator(HybridModel& teacher, HybridModel& student, int64_t max_tokens,
                                   const PackedSampler* held_out, int64_t batches, const TokenDataset* passkey,
                                   SequenceParallel* sp, int64_t rows, int64_t seq_len, const MoeExpertParallel* ep)
    : impl_(std::make_unique<Impl>(teacher, student, max_tokens, held_out, batches, passkey, sp, rows, seq_len, ep)) {}

DistillEvaluator::~DistillEvaluator() = default;

DistillEvaluation DistillEvaluator::evaluate(ExecContext& ctx) {
  Impl& m = *impl_;
  DistillEvaluation e;
  e.held_out = m.measure_held_out(ctx);
  if (m.passkey) {
    e.teacher_passkey = m.passkey_of(ctx, m.teacher);
    e.student_passkey = m.passkey_of(ctx, m.student);
  }
  e.teacher_kv = kv_cache_bytes_per_token(m.teacher.config().model);
  e.student_kv = kv_cache_bytes_per_token(m.student.config());
  return e;
}

std::string DistillEvaluation::table() const {
  std::ostringstream os;
  char row[160];
  auto line = [&](const std::string& name, const std::string& teacher, const std::string& student,
                  const std::string& note = "") {
    std::snprintf(row, sizeof row, "  %-26s %14s %14s", name.c_str(), teacher.c_str(), student.c_str());
    os << row;
    if (!note.empty()) os << "   (" << note << ")";
    os << "\n";
  };
  os << "evaluation: stage " << stage << " step " << stage_step << " (step " << global_step << " of the run)";
  if (!checkpoint.empty()) os << ", checkpoint " << checkpoint;
  os << "\n";
  line("", "teacher", "student");
  if (held_out.tokens > 0) {
    line("held-out loss", format_number("%.4f", held_out.teacher_loss), format_number("%.4f", held_out.student_loss),
         std::to_string(held_out.tokens) + " tokens");
    line("perplexity", format_number("%.2f", std::exp(held_out.teacher_loss)),
         format_number("%.2f", std::exp(held_out.student_loss)));
    line("KL(teacher || student)", "-", format_number("%.5f", held_out.kl));
    line("top-1 agreement", "-", format_number("%.1f%%", 100.0 * held_out.top1_agreement));
  }
  for (size_t i = 0; i < student_passkey.size(); ++i)
    line("passkey @" + std::to_string(student_passkey[i].length), passkey_cell(teacher_passkey[i]),
         passkey_cell(student_passkey[i]));
  line("KV cache bytes / token", std::to_string(teacher_kv.per_token), std::to_string(student_kv.per_token),
       student_kv.state_layers > 0
           ? "student + " + std::to_string(student_kv.state_per_sequence + student_kv.conv_state_per_sequence) +
                 " bytes of KDA state per sequence"
           : "");
  return os.str();
}

nlohmann::json DistillEvaluation::json() const {
  nlohmann::json passkey = nlohmann::json::array();
  for (size_t i = 0; i < student_passkey.size(); ++i)
    passkey.push_back({{"length", student_passkey[i].length},
                       {"total", student_passkey[i].total},
                       {"teacher_correct", teacher_passkey[i].correct},
                       {"student_correct", student_passkey[i].correct},
                       {"teacher_accuracy", teacher_passkey[i].accuracy()},
                       {"student_accuracy", student_passkey[i].accuracy()}});
  nlohmann::json j = {
      {"stage", stage},
      {"step", stage_step},
      {"global_step", global_step},
      {"held_out_tokens", held_out.tokens},
      {"teacher_loss", finite_or_null(held_out.teacher_loss)},
      {"student_loss", finite_or_null(held_out.student_loss)},
      {"teacher_ppl", finite_or_null(std::exp(held_out.teacher_loss))},
      {"student_ppl", finite_or_null(std::exp(held_out.student_loss))},
      {"kl", finite_or_null(held_out.kl)},
      {"top1_agreement", finite_or_null(held_out.top1_agreement)},
      {"passkey", passkey},
      {"teacher_kv_bytes_per_token", teacher_kv.per_token},
      {"student_kv_bytes_per_token", student_kv.per_token},
      {"student_state_bytes_per_sequence", student_kv.state_per_sequence + student_kv.conv_state_per_sequence}};
  if (!checkpoint.empty()) j["checkpoint"] = checkpoint;
  return j;
}

}  // namespace hyd

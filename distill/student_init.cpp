// Student construction from a teacher: config derivation, the transfer plan (one entry per student
// parameter: where its value comes from and how to make it), its validation, then its execution.
// The rules are written in distill/student_init.h.
#include "distill/student_init.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <sstream>

#include "trainer/core/error.h"

namespace hyd {

namespace {

constexpr const char* kSource = "student";

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

std::string range_string(int64_t begin, int64_t end) {
  std::ostringstream os;  // (not operator+: GCC 12's -Wrestrict misfires on "[" + std::to_string(...))
  os << '[' << begin << ',' << end << ')';
  return os.str();
}

std::string float_string(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// "layers.12.q_proj.weight" -> 12; -1 for parameters outside the layers.
int64_t layer_of(const std::string& name) {
  if (!name.starts_with("layers.")) return -1;
  const size_t dot = name.find('.', 7);
  return std::stoll(name.substr(7, dot - 7));
}

// The name without its "layers.L." prefix.
std::string short_name(const std::string& name) {
  if (!name.starts_with("layers.")) return name;
  return name.substr(name.find('.', 7) + 1);
}

// One planned parameter: its report row and the function that makes its values (host f32, numel).
struct PlannedParam {
  TransferRow row;
  std::function<std::vector<float>()> make;
};

// Rows `blocks[i] * block .. + block` of a row-major [R, cols] matrix, concatenated.
std::vector<float> gather_row_blocks(const std::vector<float>& m, int64_t cols, int64_t block,
                                     const std::vector<int64_t>& blocks) {
  std::vector<float> out;
  out.reserve(static_cast<size_t>(blocks.size() * block * cols));
  for (int64_t b : blocks) {
    const auto first = m.begin() + b * block * cols;
    out.insert(out.end(), first, first + block * cols);
  }
  return out;
}

// The parameter's random stream: independent of the other parameters and of the plan's order.
std::mt19937_64 param_rng(uint64_t seed, const std::string& name) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(std::hash<std::string>{}(name))};
  return std::mt19937_64(seq);
}

const ModelConfig& teacher_config(const DenseModel& t) { return t.config(); }
const ModelConfig& teacher_config(const HybridModel& t) { return t.config().model; }

// Teacher: a DenseModel, or the all-T HybridModel of the same weights (names and shapes as DenseModel's).
template <class Teacher>
class TransferPlanner {
 public:
  TransferPlanner(const Teacher& teacher, HybridModel& student, uint64_t seed)
      : teacher_(teacher), student_(student), seed_(seed), tc_(teacher_config(teacher)), sc_(student.config()) {}

  std::vector<PlannedParam> plan() {
    // MoE teachers: the MoE FFN parameters (layers.L.mlp.gate.weight, mlp.gate_up, mlp.down) have the same
    // names and stacked storage in both models and are copied by plan_copy like the dense MLP's.
    if (sc_.model.num_layers != tc_.num_layers)
      throw Error::at(kSource, "num_layers",
                      "the student has " + std::to_string(sc_.model.num_layers) + " layers, the teacher " +
                          std::to_string(tc_.num_layers) + "; a student is built layer for layer from its teacher");
    std::vector<PlannedParam> out;
    for (const ParamInfo& p : student_.params()) {
      const int64_t l = layer_of(p.name);
      PlannedParam pp;
      pp.row.name = p.name;
      pp.row.shape = p.shape;
      pp.row.layer = l;
      if (l >= 0 && student_.layer_kind(l) == MixerKind::kda && is_kda_param(l, p.name))
        plan_kda(l, p, pp);
      else
        plan_copy(p, pp);
      out.push_back(std::move(pp));
    }
    check_nothing_dropped();
    return out;
  }

 private:
  const Teacher& teacher_;
  HybridModel& student_;
  uint64_t seed_;
  const ModelConfig& tc_;
  const HybridConfig& sc_;

  // Teacher tensors the student's A / T layers or head would silently lose (the other direction, a
  // student parameter without a teacher source, fails in plan_copy under the parameter's name).
  void check_nothing_dropped() const {
    const bool attention = sc_.has(MixerKind::nope_attention) || sc_.has(MixerKind::teacher_attention);
    auto dropped = [&](const char* field, const std::string& what) {
      throw Error::at(kSource, field,
                      "is off in the student but on in the teacher: the teacher's " + what +
                          " would be lost; the student's skeleton must be the teacher's");
    };
    if (attention && tc_.qkv_bias && !sc_.model.qkv_bias) dropped("qkv_bias", "q/k/v biases (layers.L.bqkv)");
    if (attention && tc_.qk_norm && !sc_.model.qk_norm) dropped("qk_norm", "q/k norms (layers.L.q_norm, k_norm)");
    if (!tc_.tie_word_embeddings && sc_.model.tie_word_embeddings)
      throw Error::at(kSource, "tie_word_embeddings",
                      "is on in the student but off in the teacher: the teacher's lm_head would be lost");
  }

  bool is_kda_param(int64_t l, const std::string& name) const {
    for (const ParamInfo& m : student_.mixer_params(l))
      if (m.name == name) return true;
    return false;
  }

  [[noreturn]] static void fail(const std::string& param, const std::string& msg) {
    throw Error::at(kSource, param, msg);
  }

  // A parameter the teacher has under the same name (or lm_head from a tied teacher's embed).
  void plan_copy(const ParamInfo& p, PlannedParam& pp) const {
    std::string src = p.name;
    if (!teacher_.has_param(src)) {
      if (p.name == "lm_head" && tc_.tie_word_embeddings)
        src = "embed";
      else
        fail(p.name, "the teacher has no parameter '" + p.name +
                         "' to copy (the student's skeleton must be the teacher's: family, qkv_bias, qk_norm, " +
                         "tie_word_embeddings as the teacher has them)");
    }
    const std::vector<int64_t>& ts = teacher_.param(src).shape;
    if (ts != p.shape)
      fail(p.name, "has shape " + shape_string(p.shape) + " but the teacher's '" + src + "' is " + shape_string(ts) +
                       "; the student's skeleton dims must be the teacher's");
    pp.row.from_teacher = true;
    pp.row.source = "teacher:" + src + (src != p.name ? " (tied embeddings)" : "");
    const Teacher& t = teacher_;
    pp.make = [&t, src] { return t.get_param(src); };
  }

  void plan_kda(int64_t l, const ParamInfo& p, PlannedParam& pp) const {
    const KdaConfig& k = sc_.kda;
    const int64_t d = tc_.head_dim, hq = tc_.num_heads, hkv = tc_.num_kv_heads, D = tc_.hidden_size;
    const std::string lp = "layers." + std::to_string(l) + ".";
    const std::string wqkv = lp + "wqkv", wo = lp + "wo";
    const std::string what = short_name(p.name);
    const Teacher& t = teacher_;
    const std::vector<int64_t> shape = p.shape;
    const int64_t numel = p.numel;

    auto need_hidden = [&](int64_t student_d) {
      if (student_d != D)
        fail(p.name,
             "has hidden size " + std::to_string(student_d) + " but the teacher's hidden_size is " + std::to_string(D));
    };
    // Notes on teacher tensors with no KDA counterpart.
    std::string dropped;
    if (tc_.qkv_bias) dropped += "; teacher " + lp + "bqkv dropped (no KDA bias)";

    if (what == "q_proj.weight" || what == "k_proj.weight" || what == "v_proj.weight") {
      need_hidden(shape[1]);
      const bool is_v = what == "v_proj.weight";
      const int64_t heads = is_v ? k.v_heads : k.heads, hd = is_v ? k.dv : k.dk;
      const char* hname = is_v ? "v_heads (HV)" : "heads (H)";
      const char* dname = is_v ? "dv" : "dk";
      if (hd != d)
        fail(p.name, std::string("cannot be copied from the teacher's heads: KDA ") + dname + " = " +
                         std::to_string(hd) + " but the teacher's head_dim is " + std::to_string(d) + "; set " + dname +
                         " = " + std::to_string(d) + " (the default)");
      std::vector<int64_t> blocks(static_cast<size_t>(heads));
      int64_t base = 0;
      std::string desc;
      if (what == "q_proj.weight") {
        if (heads != hq)
          fail(p.name, "cannot be copied from the teacher's q heads: KDA heads (H) = " + std::to_string(heads) +
                           " but the teacher has num_heads = " + std::to_string(hq) +
                           "; set heads = " + std::to_string(hq) + " (the default)");
        for (int64_t h = 0; h < heads; ++h) blocks[h] = h;
        desc = "teacher:" + wqkv + " rows " + range_string(0, hq * d) + " (q heads)";
        if (tc_.qk_norm) dropped += "; teacher " + lp + "q_norm dropped (KDA l2-normalises q)";
      } else {
        // k: KDA head h pairs with q head h, so it takes the kv head of that q head's GQA group.
        // v: value head hv likewise (HV = Hq), or any multiple of Hkv for a plain repetition.
        if (!is_v && heads != hq)
          fail(p.name, "cannot be mapped onto the teacher's GQA groups: KDA heads (H) = " + std::to_string(heads) +
                           " but the teacher has num_heads = " + std::to_string(hq) +
                           "; set heads = " + std::to_string(hq) + " (the default)");
        if (heads % hkv != 0)
          fail(p.name, std::string("cannot repeat the teacher's ") + std::to_string(hkv) + " kv heads to " + hname +
                           " = " + std::to_string(heads) + ": not a multiple; set " + hname + " = " +
                           std::to_string(hq) + " (the default)");
        const int64_t rep = heads / hkv;
        for (int64_t h = 0; h < heads; ++h) blocks[h] = h / rep;
        base = hq + (is_v ? hkv : 0);
        desc = "teacher:" + wqkv + " rows " + range_string(base * d, (base + hkv) * d) + (is_v ? " (v" : " (k") +
               " heads" + (rep > 1 ? ", each repeated " + std::to_string(rep) + "x)" : ")");
        if (!is_v && tc_.qk_norm) dropped += "; teacher " + lp + "k_norm dropped (KDA l2-normalises k)";
      }
      for (int64_t& b : blocks) b += base;
      if (heads * hd != shape[0]) fail(p.name, "has " + std::to_string(shape[0]) + " rows, expected heads x dim");
      pp.row.from_teacher = true;
      pp.row.source = desc + dropped;
      pp.make = [&t, wqkv, blocks, d, D] { return gather_row_blocks(t.get_param(wqkv), D, d, blocks); };
      return;
    }
    if (what == "o_proj.weight") {
      if (k.v_heads != hq || k.dv != d)
        fail(p.name, "cannot be copied from the teacher's " + wo + " " + shape_string(teacher_.param(wo).shape) +
                         ": KDA value heads x dv = " + std::to_string(k.v_heads) + " x " + std::to_string(k.dv) +
                         ", the teacher's num_heads x head_dim = " + std::to_string(hq) + " x " + std::to_string(d) +
                         "; set v_heads = " + std::to_string(hq) + " and dv = " + std::to_string(d) +
                         " (the defaults)");
      if (shape != teacher_.param(wo).shape)
        fail(p.name, "has shape " + shape_string(shape) + " but the teacher's " + wo + " is " +
                         shape_string(teacher_.param(wo).shape));
      pp.row.from_teacher = true;
      pp.row.source = "teacher:" + wo;
      pp.make = [&t, wo] { return t.get_param(wo); };
      return;
    }

    // Initialised parameters.
    const uint64_t seed = seed_;
    const std::string name = p.name;
    if (what.ends_with("_conv1d.weight")) {
      const int64_t channels = shape[0], taps = shape[1];
      pp.row.source =
          "init:identity (1 on the current-token tap " + std::to_string(taps - 1) + " of " + std::to_string(taps) + ")";
      pp.make = [channels, taps] {
        std::vector<float> w(static_cast<size_t>(channels * taps), 0.f);
        for (int64_t c = 0; c < channels; ++c) w[c * taps + taps - 1] = 1.f;
        return w;
      };
    } else if (what == "A_log") {
      pp.row.source = "init:log(uniform(1,16)) (FLA)";
      pp.make = [seed, name, numel] {
        std::mt19937_64 gen = param_rng(seed, name);
        std::uniform_real_distribution<double> unit(0.0, 1.0);
        std::vector<float> v(static_cast<size_t>(numel));
        for (float& x : v) x = static_cast<float>(std::log(1.0 + 15.0 * unit(gen)));
        return v;
      };
    } else if (what == "dt_bias") {
      pp.row.source =
          "init:softplus^-1(dt), dt log-uniform [" + float_string(kDtMin) + "," + float_string(kDtMax) + "]";
      pp.make = [seed, name, numel] {
        std::mt19937_64 gen = param_rng(seed, name);
        std::uniform_real_distribution<double> unit(0.0, 1.0);
        std::vector<float> v(static_cast<size_t>(numel));
        const double lo = std::log(kDtMin), hi = std::log(kDtMax);
        for (float& x : v) {
          const double dt = std::exp(lo + unit(gen) * (hi - lo));
          x = static_cast<float>(dt + std::log(-std::expm1(-dt)));  // softplus(x) = dt
        }
        return v;
      };
    } else if (what == "g_proj.1.bias") {
      pp.row.source = "init:zeros";
      pp.make = [numel] { return std::vector<float>(static_cast<size_t>(numel), 0.f); };
    } else if (what == "o_norm.weight") {
      pp.row.source = "init:ones";
      pp.make = [numel] { return std::vector<float>(static_cast<size_t>(numel), 1.f); };
    } else if (what == "f_proj.0.weight" || what == "f_proj.1.weight" || what == "b_proj.weight" ||
               what == "g_proj.0.weight" || what == "g_proj.1.weight") {
      pp.row.source = "init:normal(" + float_string(kSmallInitStd) + ")";
      pp.make = [seed, name, numel] {
        std::mt19937_64 gen = param_rng(seed, name);
        std::normal_distribution<double> normal(0.0, kSmallInitStd);
        std::vector<float> v(static_cast<size_t>(numel));
        for (float& x : v) x = static_cast<float>(normal(gen));
        return v;
      };
    } else {
      fail(p.name, "is a KDA parameter without a transfer rule (distill/student_init.cpp)");
    }
  }
};

}  // namespace

HybridConfig student_config_from_teacher(const ModelConfig& teacher, const std::string& pattern, const KdaOptions& kda,
                                         const std::string& source) {
  HybridConfig c;
  c.model = teacher;
  c.pattern = pattern;
  c.model.finalize(source);  // resolves head_dim before the KDA defaults read it
  c.kda.hidden = c.model.hidden_size;
  c.kda.heads = kda.heads > 0 ? kda.heads : c.model.num_heads;
  c.kda.v_heads = kda.v_heads > 0 ? kda.v_heads : c.model.num_heads;
  c.kda.dk = kda.dk > 0 ? kda.dk : c.model.head_dim;
  c.kda.dv = kda.dv > 0 ? kda.dv : c.model.head_dim;
  c.kda.conv_size = kda.conv_size;
  c.kda.norm_eps = kda.norm_eps > 0.f ? kda.norm_eps : static_cast<float>(c.model.rms_norm_eps);
  c.finalize(source);
  return c;
}

const TransferRow& TransferReport::row(const std::string& name) const {
  for (const TransferRow& r : rows)
    if (r.name == name) return r;
  throw Error::at("TransferReport", name, "is not a student parameter");
}

std::string TransferReport::table() const {
  // Columns: layer, kind, parameter (without its layers.L. prefix), shape, source.
  struct Line {
    std::string layer, kind, param, shape, source;
  };
  std::vector<Line> lines;
  lines.push_back({"layer", "kind", "parameter", "shape", "source"});
  int64_t last_layer = -2;
  for (const TransferRow& r : rows) {
    Line ln;
    if (r.layer != last_layer) {
      ln.layer = r.layer >= 0 ? std::to_string(r.layer) : "-";
      ln.kind = r.layer >= 0 && r.layer < static_cast<int64_t>(layers.size())
                    ? std::string(1, static_cast<char>(layers[static_cast<size_t>(r.layer)]))
                    : "-";
      last_layer = r.layer;
    }
    ln.param = short_name(r.name);
    ln.shape = shape_string(r.shape);
    ln.source = r.source;
    lines.push_back(std::move(ln));
  }
  size_t w[4] = {0, 0, 0, 0};
  for (const Line& ln : lines) {
    w[0] = std::max(w[0], ln.layer.size());
    w[1] = std::max(w[1], ln.kind.size());
    w[2] = std::max(w[2], ln.param.size());
    w[3] = std::max(w[3], ln.shape.size());
  }
  auto pad = [](const std::string& s, size_t n) { return s + std::string(n - s.size() + 2, ' '); };
  int64_t copied = 0;
  for (const TransferRow& r : rows) copied += r.from_teacher ? 1 : 0;
  std::string out = "student layers " + layer_pattern_string(layers) +
                    " (K = KDA, A = NoPE attention, T = teacher attention with RoPE); " + std::to_string(copied) +
                    " of " + std::to_string(rows.size()) + " parameters from the teacher\n";
  for (const Line& ln : lines) {
    std::string s = pad(ln.layer, w[0]) + pad(ln.kind, w[1]) + pad(ln.param, w[2]) + pad(ln.shape, w[3]) + ln.source;
    out += s + "\n";
  }
  return out;
}

template <class Teacher>
TransferReport init_student(const Teacher& teacher, HybridModel& student, uint64_t seed) {
  // Plan and validate everything first: an error leaves the student untouched.
  TransferPlanner<Teacher> planner(teacher, student, seed);
  std::vector<PlannedParam> plan = planner.plan();

  TransferReport report;
  for (int64_t l = 0; l < student.num_layers(); ++l) report.layers.push_back(student.layer_kind(l));
  for (PlannedParam& pp : plan) {
    const std::vector<float> v = pp.make();
    const ParamInfo& p = student.param(pp.row.name);
    HYD_CHECK(static_cast<int64_t>(v.size()) == p.numel, "transfer of '", p.name, "' made ", v.size(), " values for ",
              p.numel);
    student.set_param(p.name, v.data(), p.numel);
    report.rows.push_back(std::move(pp.row));
  }
  return report;
}

TransferReport init_student_from_teacher(const DenseModel& teacher, HybridModel& student, uint64_t seed) {
  return init_student(teacher, student, seed);
}

TransferReport init_student_from_teacher(const HybridModel& teacher, HybridModel& student, uint64_t seed) {
  for (MixerKind k : teacher.config().layers)
    if (k != MixerKind::teacher_attention)
      HYD_THROW("init_student_from_teacher: the teacher HybridModel must be all-T, its pattern is ",
                layer_pattern_string(teacher.config().layers));
  return init_student(teacher, student, seed);
}

}  // namespace hyd

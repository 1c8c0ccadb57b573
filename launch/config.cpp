#include "launch/config.h"

#include "launch/options.h"

namespace hyd {

namespace {

// Sections that `train` and `distill` share; each table adds them in its own order.
void add_device_and_run(OptionTable& t, std::string* device, RunOptions& run) {
  t.group("Top-level keys (before any [section] in the config file)");
  t.add("device", device, "compute device: cpu | cuda | cuda:N");

  t.group("[run]");
  t.add_required("run.dir", &run.dir, "run directory: config.ini, metrics.jsonl");
  t.add("run.overwrite", &run.overwrite,
        "start afresh in a run directory that holds an earlier run (its metrics and checkpoints are replaced)");
  t.add("run.stop_after", &run.stop_after,
        "stop after this step with a checkpoint, e.g. to split a run into time-limited jobs; 0 = run to the end");
}

// train.resume, in the [train] group of the caller.
void add_resume(OptionTable& t, std::string* resume) {
  t.add("train.resume", resume,
        "none = start afresh; auto = continue from the newest valid checkpoint of run.dir (afresh when there is "
        "none); or the path of a checkpoint (step-XXXXXXXX) or of a run directory to continue from");
}

void add_checkpoint(OptionTable& t, CheckpointOptions& c) {
  t.group("[checkpoint]");
  t.add("checkpoint.interval", &c.interval,
        "steps between checkpoints (RUN_DIR/step-XXXXXXXX); 0 = only at the end (always written there)");
  t.add("checkpoint.keep_last", &c.keep_last, "newest checkpoints kept; older ones are removed");
  t.add("checkpoint.keep_every", &c.keep_every,
        "also keep every M-th periodic checkpoint (steps that are multiples of M x checkpoint.interval); 0 = none");
}

void add_data(OptionTable& t, DataOptions& data, const char* path_help) {
  t.group("[data]");
  t.add_required("data.path", &data.path, path_help);
  t.add("data.val_fraction", &data.val_fraction, "fraction of documents held out for validation");
  t.add("data.seq_len", &data.seq_len, "tokens per packed sequence");
  t.add("data.batch_size", &data.batch_size, "sequences per micro-batch");
  t.add("data.seed", &data.seed, "seed of the train/validation split and the shuffling");
}

// The AdamW, clipping, seed and divergence keys of [train] (the group title is the caller's).
void add_optimizer(OptionTable& t, TrainOptions& o, const char* seed_help) {
  t.add("train.weight_decay", &o.weight_decay, "AdamW decoupled weight decay (matrices and embeddings)");
  t.add("train.beta1", &o.beta1, "AdamW beta1");
  t.add("train.beta2", &o.beta2, "AdamW beta2");
  t.add("train.eps", &o.eps, "AdamW epsilon");
  t.add("train.grad_clip", &o.grad_clip, "max global gradient norm; 0 = no clipping");
  t.add("train.seed", &o.seed, seed_help);
  t.add("train.max_bad_steps", &o.max_bad_steps, "consecutive non-finite steps that stop the run");
}

// Every option of `hydistill train`, bound to the fields of one TrainConfig (defaults = its values).
class TrainOptionTable : public OptionTable {
 public:
  explicit TrainOptionTable(TrainConfig& c) : OptionTable("hydistill train") {
    add_device_and_run(*this, &c.device, c.run);

    ModelConfig& m = c.model;
    group("[model]");
    add("model.family", &m.family, "llama | qwen2 | qwen3");
    add("model.vocab_size", &m.vocab_size, "vocabulary size; 0 = the dataset's");
    add("model.hidden_size", &m.hidden_size, "model width D");
    add("model.intermediate_size", &m.intermediate_size, "SwiGLU hidden width F");
    add("model.num_layers", &m.num_layers, "transformer blocks");
    add("model.num_heads", &m.num_heads, "query heads");
    add("model.num_kv_heads", &m.num_kv_heads, "key/value heads (grouped-query attention)");
    add("model.head_dim", &m.head_dim, "per-head width; 0 = hidden_size / num_heads");
    add("model.rms_norm_eps", &m.rms_norm_eps, "RMSNorm epsilon");
    add("model.rope_theta", &m.rope_theta, "RoPE base");
    add("model.max_position_embeddings", &m.max_position_embeddings, "longest position (>= data.seq_len)");
    add("model.tie_word_embeddings", &m.tie_word_embeddings, "share the embedding and the LM head");
    add("model.qk_norm", &m.qk_norm, "per-head RMSNorm of q and k (Qwen3)");
    add("model.qkv_bias", &m.qkv_bias, "bias on the q/k/v projections (Qwen2)");
    add("model.bos_token_id", &m.bos_token_id, "beginning-of-sequence token id (-1: none)");
    add("model.eos_token_id", &m.eos_token_id, "end-of-sequence token id (-1: the dataset's eos_id)");
    kernels::RopeScaling& r = m.rope_scaling;
    add("model.rope_scaling.type", &r.type, "default | linear | llama3 | yarn");
    add("model.rope_scaling.factor", &r.factor, "context extension factor");
    add("model.rope_scaling.low_freq_factor", &r.low_freq_factor, "llama3");
    add("model.rope_scaling.high_freq_factor", &r.high_freq_factor, "llama3");
    add("model.rope_scaling.original_max_position_embeddings", &r.original_max_position_embeddings,
        "llama3, yarn: the pre-extension context length");
    add("model.rope_scaling.beta_fast", &r.beta_fast, "yarn");
    add("model.rope_scaling.beta_slow", &r.beta_slow, "yarn");
    add("model.rope_scaling.attention_factor", &r.attention_factor, "yarn; 0 = 0.1 ln(factor) + 1");
    add("model.rope_scaling.truncate", &r.truncate, "yarn: round the correction range to whole dims");

    add_data(*this, c.data, "HDF5 token dataset (data/prepare.py)");

    TrainOptions& t = c.train;
    group("[train]");
    add("train.steps", &t.steps, "optimizer steps");
    add("train.grad_accum", &t.grad_accum, "micro-batches per optimizer step");
    add("train.lr", &t.lr, "peak learning rate");
    add("train.min_lr", &t.min_lr, "final learning rate (cosine, wsd)");
    add("train.warmup_steps", &t.warmup_steps, "linear warmup steps");
    add("train.schedule", &t.schedule, "cosine | wsd | constant");
    add("train.wsd_decay_fraction", &t.wsd_decay_fraction, "wsd: fraction of the steps spent decaying");
    add_optimizer(*this, t, "seed of the parameter initialisation");
    add_resume(*this, &t.resume);

    group("[log]");
    add("log.interval", &c.log.interval, "steps per progress line and metrics record");
    add("log.eval_interval", &c.log.eval_interval, "steps between held-out evaluations; 0 = only at the end");
    add("log.eval_batches", &c.log.eval_batches, "validation micro-batches per evaluation; 0 = none");

    add_checkpoint(*this, c.checkpoint);

    group("[parallel]");
    add("parallel.dp", &c.parallel.dp,
        "data-parallel ranks (mpirun -np dp*sp): data.batch_size sequences per rank; dp x sp > 1: ZeRO-1 over all "
        "ranks (CPU or one GPU per rank), sharded checkpoints, resume on another grid with the same global batch");
    add("parallel.sp", &c.parallel.sp,
        "sequence-parallel ranks: each sequence split into sp slices (LASP-2H attention over the slices); must "
        "divide data.seq_len");
  }
};

// Every option of `hydistill distill`, bound to the fields of one DistillConfig (defaults = its values).
class DistillOptionTable : public OptionTable {
 public:
  explicit DistillOptionTable(DistillConfig& c, std::string help_command = "hydistill distill")
      : OptionTable(std::move(help_command)) {
    add_device_and_run(*this, &c.device, c.run);

    group("[teacher]");
    add_required("teacher.dir", &c.teacher_dir, "teacher: Hugging Face directory (config.json + *.safetensors)");

    group("[student]");
    add("student.pattern", &c.student_pattern,
        "token mixer per layer: K = KDA, A = NoPE attention, T = teacher attention; repeated to the teacher's "
        "layers (e.g. KKKA), or an explicit comma-separated list");

    add_data(*this, c.data, "HDF5 token dataset tokenized for the teacher (data/prepare.py)");

    group("[train]");
    add_optimizer(*this, c.train, "seed of the student's new (non-transferred) parameters");
    add_resume(*this, &c.train.resume);

    DistillStageOptions& d = c.distill;
    group("[distill]");
    add("distill.stage1_steps", &d.stage1_steps, "stage 1 (alignment MSE of the K layers) steps; 0 = skip");
    add("distill.stage1_lr", &d.stage1_lr, "stage 1 peak learning rate");
    add("distill.stage2_steps", &d.stage2_steps, "stage 2 (end-to-end KL [+ CE]) steps; 0 = skip");
    add("distill.stage2_lr", &d.stage2_lr, "stage 2 peak learning rate");
    add("distill.min_lr_ratio", &d.min_lr_ratio, "cosine floor of each stage as a fraction of its peak");
    add("distill.warmup_steps", &d.warmup_steps, "linear warmup steps of each stage");
    add("distill.temperature", &d.temperature, "KL temperature tau (the KL term is scaled by tau^2)");
    add("distill.w_kl", &d.w_kl, "stage 2 weight of KL(teacher || student)");
    add("distill.w_ce", &d.w_ce, "stage 2 weight of the cross-entropy with the data labels");
    add("distill.w_hidden", &d.w_hidden,
        "stage 2 weight w of the hidden-state MSE; 0 = off. Adds w * H, H = mean over the student's layers l and "
        "the loss tokens t (target >= 0, as the KL) of ||h_s[l,t] - h_t[l,t]||^2 / D, h[l] = residual stream after "
        "layer l (the last one before final_norm), D = hidden size");
    add("distill.router_aux_coef", &d.router_aux_coef,
        "stage 2 coefficient of the student's MoE load-balancing loss (coef x E x sum_e f_e P_e per MoE layer, "
        "summed over the layers; MoE teachers only); 0 = off");
    add("distill.router_bias_rate", &d.router_bias_rate,
        "stage 2 auxiliary-loss-free balancing: after each step every MoE layer's selection bias moves by rate x "
        "sign(mean load - load of the expert), loads summed over the ranks (teachers with a selection bias, e.g. "
        "dots1); 0 = off");

    group("[log]");
    add("log.interval", &c.log.interval, "steps per progress line and metrics record");

    add_checkpoint(*this, c.checkpoint);

    group("[parallel]");
    add("parallel.dp", &c.parallel.dp,
        "data-parallel ranks (mpirun -np dp*sp): data.batch_size sequences per rank; ZeRO-1 over all ranks (CPU "
        "or one GPU per rank), sharded checkpoints");
    add("parallel.sp", &c.parallel.sp,
        "sequence-parallel ranks: each sequence split into sp slices (LASP-2 for K layers, LASP-2H for "
        "attention, teacher included); must divide data.seq_len");
    add("parallel.ep", &c.parallel.ep,
        "expert-parallel group size for MoE teachers and students: groups of ep consecutive ranks share the "
        "routed experts' work (all-to-all of token rows: MPI on the CPU, NCCL on GPUs); must divide dp x sp and "
        "the number of experts");

    group("[eval]");
    add("eval.interval", &c.eval.interval,
        "steps (both stages counted) between evaluations (table + RUN_DIR/eval.jsonl); 0 = only at the end");
    add("eval.batches", &c.eval.batches,
        "held-out micro-batches (the data.val_fraction split) for loss, KL and top-1 agreement; 0 = none");
    add("eval.passkey_data", &c.eval.passkey_data,
        "passkey prompts (data/make_passkey.py, tokenized for the teacher) for retrieval accuracy by length; "
        "empty = none");
  }
};

// `hydistill eval`: the distill options and the checkpoint to evaluate.
class EvalOptionTable : public DistillOptionTable {
 public:
  EvalOptionTable(DistillConfig& c, std::string* checkpoint) : DistillOptionTable(c, "hydistill eval") {
    group("Checkpoint (a top-level key, usually given on the command line)");
    add_required("checkpoint", checkpoint, "the distill checkpoint (RUN_DIR/step-XXXXXXXX) whose student is evaluated");
  }
};

class ExportOptionTable : public OptionTable {
 public:
  explicit ExportOptionTable(ExportArgs& a) : OptionTable("hydistill export") {
    group("Options (top-level keys)");
    add_required("checkpoint", &a.checkpoint, "checkpoint to export (RUN_DIR/step-XXXXXXXX of train or distill)");
    add_required("out", &a.out, "output directory (must not exist or be empty)");
    add("dtype", &a.dtype, "dtype of the stored matrices: bfloat16 | float32");
    add("tokenizer", &a.tokenizer,
        "directory whose tokenizer files are copied; empty = the teacher's (distill) or, for train, the "
        "tokenizer.json next to the dataset when its sha256 matches the dataset's");
  }
};

// The option table that parses into `p`.
template <class Table, class Parsed>
Table table_for(Parsed& p) {
  return Table(p.config);
}
template <>
EvalOptionTable table_for<EvalOptionTable, ParsedEvalArgs>(ParsedEvalArgs& p) {
  return EvalOptionTable(p.config, &p.checkpoint);
}

// Defaults, then the config file, then the command line into Parsed::config; then the range checks,
// where a bad value that came from the command line is reported as such.
template <class Parsed, class Table, class Validate>
Parsed parse_command_args(const std::vector<std::string>& args, Validate validate) {
  Parsed out;
  const Table table = table_for<Table>(out);
  const ParsedOptions parsed = parse_options(table, args);
  if (parsed.help) {
    out.help = true;
    return out;
  }
  out.config_path = parsed.config_path;
  out.config.source = parsed.source();
  try {
    validate(out.config);
  } catch (const ConfigError& e) {
    if (!e.key().empty() && parsed.command_line_keys.count(e.key()))
      throw ConfigError::at(kCommandLineSource, e.key(), e.message());
    throw;
  }
  if constexpr (requires { out.effective; }) out.effective = table.values();  // what train and distill record
  return out;
}

// A command's --help: its usage and description, the general options, then every option of its table.
std::string command_help(const std::string& intro, const OptionTable& table) {
  return intro + general_options_help() + "\nOptions (config file keys; each also as --KEY VALUE):\n\n" + table.help();
}

}  // namespace

std::string ParsedTrainArgs::to_ini() const {
  return write_ini(effective,
                   {"Effective configuration of this run (defaults, then the config file, then the command line).",
                    "Re-run it with: hydistill train --config config.ini"});
}

ParsedTrainArgs parse_train_args(const std::vector<std::string>& args) {
  return parse_command_args<ParsedTrainArgs, TrainOptionTable>(args, validate_train_config);
}

std::string train_help() {
  TrainConfig defaults;
  const TrainOptionTable table(defaults);
  return command_help(
      "usage: hydistill train --config FILE [--section.key VALUE ...]\n\n"
      "Trains a dense decoder (llama / qwen2 / qwen3) on an HDF5 token dataset with AdamW. Every option below is\n"
      "a key of the config file (`lr = 2e-3` under [train] is train.lr; `device` comes before any section) and\n"
      "is also accepted on the command line, which wins over the file. Unknown keys are errors.\n\n",
      table);
}

std::string ParsedDistillArgs::to_ini() const {
  return write_ini(effective,
                   {"Effective configuration of this run (defaults, then the config file, then the command line).",
                    "Re-run it with: hydistill distill --config config.ini"});
}

ParsedDistillArgs parse_distill_args(const std::vector<std::string>& args) {
  return parse_command_args<ParsedDistillArgs, DistillOptionTable>(args, validate_distill_config);
}

std::string distill_help() {
  DistillConfig defaults;
  const DistillOptionTable table(defaults);
  return command_help(
      "usage: hydistill distill --config FILE [--section.key VALUE ...]\n\n"
      "Distills a teacher (Hugging Face directory) into a hybrid KDA student on one device: stage 1 aligns each\n"
      "KDA layer's output to the teacher's attention output (MSE, only the new mixers train), stage 2 trains every\n"
      "student parameter on KL(teacher || student) [+ cross-entropy]. Every option below is a key of the config\n"
      "file and is also accepted on the command line, which wins over the file. Unknown keys are errors.\n\n",
      table);
}

ParsedEvalArgs parse_eval_args(const std::vector<std::string>& args) {
  return parse_command_args<ParsedEvalArgs, EvalOptionTable>(args, validate_distill_config);
}

std::string eval_help() {
  DistillConfig defaults;
  std::string checkpoint;
  const EvalOptionTable table(defaults, &checkpoint);
  return command_help(
      "usage: hydistill eval --config FILE --checkpoint RUN_DIR/step-XXXXXXXX [--section.key VALUE ...]\n\n"
      "Evaluates the student of a distill checkpoint against its teacher, as the evaluations during distill do:\n"
      "held-out loss and perplexity of both, KL(teacher || student), top-1 agreement, passkey retrieval accuracy by\n"
      "length (eval.passkey_data), KV-cache bytes per token. Prints a table and appends one JSON record to\n"
      "RUN_DIR/eval.jsonl (run.dir). The config file is the run's distill config; its teacher.dir and\n"
      "student.pattern must be the checkpoint's.\n\n",
      table);
}

ParsedExportArgs parse_export_args(const std::vector<std::string>& args) {
  ParsedExportArgs out;
  const ExportOptionTable table(out.args);
  const ParsedOptions parsed = parse_options(table, args);
  out.help = parsed.help;
  if (!out.help && out.args.dtype != "bfloat16" && out.args.dtype != "float32")
    throw ConfigError::at(parsed.source(), "dtype", "'" + out.args.dtype + "' is not bfloat16 or float32");
  return out;
}

std::string export_help() {
  ExportArgs defaults;
  const ExportOptionTable table(defaults);
  return "usage: hydistill export --checkpoint RUN_DIR/step-XXXXXXXX --out DIR [--dtype bfloat16|float32]\n\n"
         "Writes a checkpoint as a Hugging Face directory (docs/export.md). A distill checkpoint becomes the hybrid\n"
         "student (model_type hydistill_hybrid, loaded with trust_remote_code=True) with the teacher's tokenizer; a\n"
         "train checkpoint becomes a plain llama / qwen2 / qwen3 model, usable as a distillation teacher.\n\n" +
         general_options_help() + "\n" + table.help();
}

}  // namespace hyd

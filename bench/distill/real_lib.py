#!/usr/bin/env python3
"""Helpers of bench/distill/run_real.sh (stdlib only): config values, run planning, the summary.

    real_lib.py get INI KEY [--KEY VALUE ...]      effective value of KEY (section.key, or a top-level key)
                                                   of a hydistill config file after command-line overrides
    real_lib.py tps METRICS.jsonl [STAGE]          tokens/s of a train or distill run (distill: of one stage):
                                                   the median over the log intervals after the first (the
                                                   first holds start-up)
    real_lib.py plan-teacher TPS TOKENS_PER_STEP TARGET_STEPS MAX_S MIN_STEPS
                                                   -> "steps warmup eval_interval projected_s"
    real_lib.py plan-students TEACHER_TOKENS RATIO TOKENS_PER_STEP STAGE1_FRACTION
                                                   -> "stage1 stage2 warmup tokens"
    real_lib.py summary WORK OUT.md                the markdown summary from what WORK holds (any part may
                                                   be missing: a failed run still gets a summary)
"""
import json
import math
import os
import re
import statistics
import sys


# ---------------------------------------------------------------- config values

def ini_value(path, key, overrides):
    """hydistill's INI: top-level keys before any [section], `key = value  # comment`."""
    for i in range(0, len(overrides) - 1, 2):
        if overrides[i] == "--" + key:
            return overrides[i + 1]
    section, found = "", None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1].strip()
                continue
            if "=" in line:
                k, v = (s.strip() for s in line.split("=", 1))
                full = f"{section}.{k}" if section else k
                if full == key:
                    found = v
    if found is None:
        raise SystemExit(f"real_lib.py: {path}: no key '{key}'")
    return found


def read_jsonl(path):
    out = []
    if not path or not os.path.isfile(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def tokens_per_s(path, stage=None):
    rates = [r["tokens_per_s"] for r in read_jsonl(path)
             if isinstance(r.get("tokens_per_s"), (int, float)) and (stage is None or r.get("stage") == stage)]
    if not rates:
        return 0.0
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


# ---------------------------------------------------------------- planning

def plan_teacher(tps, tokens_per_step, target_steps, max_s, min_steps):
    steps = target_steps
    if tps > 0 and max_s > 0:
        steps = min(steps, int(max_s * tps / tokens_per_step))
    steps = max(steps, min(min_steps, target_steps))
    warmup = max(1, steps // 20)
    eval_interval = max(1, steps // 5)
    projected = steps * tokens_per_step / tps if tps > 0 else float("nan")
    return steps, warmup, eval_interval, projected


def plan_students(teacher_tokens, ratio, tokens_per_step, stage1_fraction):
    budget = int(math.floor(teacher_tokens * ratio))
    total = budget // tokens_per_step
    if total < 2:
        raise SystemExit(f"real_lib.py: a budget of {budget} tokens is under two steps of {tokens_per_step}")
    stage1 = min(total - 1, max(1, int(round(total * stage1_fraction))))
    stage2 = total - stage1
    warmup = max(1, min(stage1 // 4, stage2 // 10))  # distill.warmup_steps applies to both stages
    return stage1, stage2, warmup, total * tokens_per_step


# ---------------------------------------------------------------- summary

def read_facts(path):
    facts = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    facts[k] = v
    return facts


def fmt(x, spec):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def count(n):
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def passkey_cell(correct, total):
    return f"{correct}/{total} ({100.0 * correct / total:.0f}%)" if total else "n/a"


def last_eval(path):
    recs = read_jsonl(path)
    return recs[-1] if recs else None


def summary(work, out_path):
    facts = read_facts(os.path.join(work, "facts.txt"))
    mix = {}
    mix_path = os.path.join(work, "data", "mix.json")
    if os.path.isfile(mix_path):
        with open(mix_path, encoding="utf-8") as f:
            mix = json.load(f)
    students = [("hybrid", f"3:1 hybrid ({facts.get('hybrid_layers', 'KKKA')})"),
                ("kda", f"KDA-only ({facts.get('kda_layers', 'K')})")]
    evals = {k: last_eval(os.path.join(work, f"eval_{k}", "eval.jsonl")) for k, _ in students}
    end_evals = {k: last_eval(os.path.join(work, k, "eval.jsonl")) for k, _ in students}
    L = []
    L.append(f"# Real distillation on real text (issue 5): teacher vs 3:1 hybrid vs KDA-only")
    L.append("")
    L.append(f"- when: {facts.get('date', '?')}; device: {facts.get('device_name', '?')} (`--device "
             f"{facts.get('device', '?')}`); commit {facts.get('commit', '?')}; mode: {facts.get('mode', '?')}")
    L.append(f"- status: **{facts.get('status', 'incomplete (the run stopped before its end)')}**; "
             f"total wall time {facts.get('total_s', '?')} s")
    L.append("")
    L.append("## Setup")
    if mix:
        L.append(f"- data (bench/distill/make_mix.py): KJV ({mix['corpus_docs']} chapters, "
                 f"{count(mix['corpus_tokens'])} tokens) + {mix['passkey_docs']} synthetic passkey prompts "
                 f"({100 * mix['passkey_doc_fraction']:.0f}% of the documents, "
                 f"{100 * mix['passkey_token_fraction']:.0f}% of the tokens, lengths "
                 f"{mix['passkey_len_range'][0]}..{mix['passkey_len_range'][1]}) + {mix['copy_docs']} repeated number "
                 f"lists ({100 * mix['copy_doc_fraction']:.0f}% of the documents, "
                 f"{100 * mix['copy_token_fraction']:.0f}% of the tokens); held out (data.val_fraction "
                 f"{facts.get('val_fraction', '?')}, seed {facts.get('split_seed', '?')}): {mix['corpus_val_docs']} KJV "
                 f"chapters ({count(mix['corpus_val_tokens'])} tokens) and {mix['synthetic_val_docs']} synthetic "
                 f"documents, never trained on by any model")
    if "teacher_params" in facts:
        L.append(f"- teacher: {facts.get('teacher_shape', '?')}, {facts['teacher_params']} parameters; "
                 f"{facts.get('teacher_steps', '?')} steps x {facts.get('teacher_tokens_per_step', '?')} tokens = "
                 f"**{count(facts.get('teacher_tokens', 0))} training tokens**"
                 f" ({facts.get('teacher_epochs', '?')} passes over the mix's training split); "
                 f"{count(facts.get('teacher_tps', 0))} tokens/s (median over log intervals), "
                 f"{facts.get('time_teacher', '?')} s wall for the command"
                 + (f"; planned from a {facts.get('probe_steps', '?')}-step probe at {count(facts.get('probe_tps', 0))}"
                    f" tokens/s (cap {facts.get('teacher_max_s', '?')} s)" if "probe_tps" in facts else ""))
    if "student_tokens" in facts:
        ratio = float(facts["student_tokens"]) / float(facts["teacher_tokens"])
        L.append(f"- students: same budget each: stage 1 {facts['stage1_steps']} + stage 2 {facts['stage2_steps']} "
                 f"steps x {facts['student_tokens_per_step']} tokens = **{count(facts['student_tokens'])} tokens = "
                 f"{100 * ratio:.2f}% of the teacher's {count(facts['teacher_tokens'])}**; stage 1 lr "
                 f"{facts.get('stage1_lr', '?')}, stage 2 lr {facts.get('stage2_lr', '?')} (KL, tau 1, w_ce 0)")
        for k, name in students:
            if f"{k}_tps1" in facts:
                L.append(f"  - {name}: stage 1 {count(facts[k + '_tps1'])} tokens/s, stage 2 "
                         f"{count(facts.get(k + '_tps2', 0))} tokens/s (medians over log intervals), "
                         f"{facts.get('time_distill_' + k, '?')} s wall for the distill command")
    if "passkey_lengths" in facts:
        L.append(f"- passkey evaluation: {facts['passkey_per_length']} prompts per length "
                 f"{facts['passkey_lengths']} (data/make_passkey.py, seed {facts.get('passkey_seed', '?')}; its keys "
                 f"are excluded from the training documents), teacher-forced exact match of the whole key")
    L.append("")

    L.append("## Results")
    ref = next((evals[k] for k, _ in students if evals[k]), None)
    if ref is None:
        L.append("No `hydistill eval` record: see the timings and logs below.")
    else:
        L.append(f"`hydistill eval` of each student's final checkpoint on {ref['held_out_tokens']} held-out KJV tokens "
                 f"(data.path data/corpus/kjv.h5, its validation split) and the passkey prompts:")
        L.append("")
        head = "| metric | teacher | " + " | ".join(name for _, name in students) + " |"
        L.append(head)
        L.append("|" + " --- |" * (2 + len(students)))

        def row(name, teacher, key_fn):
            cells = [key_fn(evals[k]) if evals[k] else "n/a" for k, _ in students]
            L.append(f"| {name} | {teacher} | " + " | ".join(cells) + " |")

        row("held-out loss (nats/token)", fmt(ref["teacher_loss"], ".4f"), lambda e: fmt(e["student_loss"], ".4f"))
        row("held-out perplexity", fmt(ref["teacher_ppl"], ".2f"), lambda e: fmt(e["student_ppl"], ".2f"))
        row("KL(teacher ‖ student) (nats/token)", "-", lambda e: fmt(e["kl"], ".4f"))
        row("top-1 agreement with the teacher", "-",
            lambda e: fmt(100 * e["top1_agreement"] if e["top1_agreement"] is not None else None, ".1f") + "%")
        for i, p in enumerate(ref["passkey"]):
            row(f"passkey @{p['length']}", passkey_cell(p["teacher_correct"], p["total"]),
                lambda e, i=i: passkey_cell(e["passkey"][i]["student_correct"], e["passkey"][i]["total"]))
        if ref["passkey"]:
            tot = sum(p["total"] for p in ref["passkey"])
            row("passkey, all lengths", passkey_cell(sum(p["teacher_correct"] for p in ref["passkey"]), tot),
                lambda e: passkey_cell(sum(p["student_correct"] for p in e["passkey"]), tot))
        row("KV cache bytes / token (bf16)", str(ref["teacher_kv_bytes_per_token"]),
            lambda e: str(e["student_kv_bytes_per_token"]))
        row("KDA state bytes / sequence", "0", lambda e: str(e["student_state_bytes_per_sequence"]))
        if "student_tokens" in facts:
            row("training / distillation tokens", count(facts["teacher_tokens"]),
                lambda e: count(facts["student_tokens"]))
        # Teacher numbers must agree between the two records (same tokens, same teacher).
        others = [evals[k] for k, _ in students if evals[k] and evals[k] is not ref]
        for o in others:
            if o["held_out_tokens"] != ref["held_out_tokens"] or (
                    o["teacher_loss"] is not None and abs(o["teacher_loss"] - ref["teacher_loss"]) > 2e-3):
                L.append("")
                L.append(f"Note: the teacher's numbers differ between the two records (loss {o['teacher_loss']} vs "
                         f"{ref['teacher_loss']}, tokens {o['held_out_tokens']} vs {ref['held_out_tokens']}); the "
                         f"teacher column is the hybrid's record.")
        L.append("")
        # The verdict the issue asks for.
        if all(evals[k] for k, _ in students) and ref["passkey"]:
            tot = sum(p["total"] for p in ref["passkey"])
            t_ok = sum(p["teacher_correct"] for p in ref["passkey"])
            h_ok = sum(p["student_correct"] for p in evals["hybrid"]["passkey"])
            k_ok = sum(p["student_correct"] for p in evals["kda"]["passkey"])
            verdict = ("beats" if h_ok > k_ok else "ties with" if h_ok == k_ok else "does NOT beat")
            L.append(f"Passkey retrieval within the training length: teacher {t_ok}/{tot}, 3:1 hybrid {h_ok}/{tot}, "
                     f"KDA-only {k_ok}/{tot}: the hybrid **{verdict}** KDA-only.")
            if t_ok < tot // 2:
                L.append(f"The teacher itself retrieves only {t_ok}/{tot}: the comparison says little.")
            L.append("")

    if any(end_evals.values()):
        L.append("At the end of each distill run, on the mix's validation split (KJV chapters and synthetic documents "
                 "together, the data the students were distilled on):")
        L.append("")
        L.append("| student | tokens | teacher loss | student loss | KL | top-1 |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for k, name in students:
            e = end_evals[k]
            if e:
                L.append(f"| {name} | {e['held_out_tokens']} | {fmt(e['teacher_loss'], '.4f')} | "
                         f"{fmt(e['student_loss'], '.4f')} | {fmt(e['kl'], '.4f')} | "
                         f"{fmt(100 * e['top1_agreement'] if e['top1_agreement'] is not None else None, '.1f')}% |")
        L.append("")

    records = read_jsonl(os.path.join(work, "teacher", "metrics.jsonl"))
    curve = [r for r in records if "val_loss" in r]
    train = [r for r in records if "loss" in r]
    if curve or train:
        text = "Teacher training: held-out loss on the mix's validation split by step: " + (
            ", ".join(f"{r['step']}: {r['val_loss']:.3f}" for r in curve) or "none")
        if train:
            text += f"; last logged train loss {train[-1]['loss']:.3f} (step {train[-1]['step']})"
        L.append(text)
        L.append("")
    for k, name in students:
        m = [r for r in read_jsonl(os.path.join(work, k, "metrics.jsonl"))]
        s1 = [r for r in m if r.get("stage") == 1 and "mse" in r]
        s2 = [r for r in m if r.get("stage") == 2 and "kl" in r]
        parts = []
        if s1:
            parts.append(f"stage 1 mse {s1[0]['mse']:.4g} -> {s1[-1]['mse']:.4g}")
        if s2:
            parts.append(f"stage 2 kl {s2[0]['kl']:.4g} -> {s2[-1]['kl']:.4g}")
        if parts:
            L.append(f"- {name} training: " + ", ".join(parts) + " (first and last logged intervals)")
    L.append("")

    tim = os.path.join(work, "timings.tsv")
    if os.path.isfile(tim):
        L.append("## Steps")
        L.append("")
        L.append("| step | exit | seconds |")
        L.append("| --- | --- | --- |")
        with open(tim, encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 3:
                    L.append(f"| {parts[0]} | {parts[1]} | {parts[2]} |")
        L.append("")
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(L).rstrip("\n") + "\n")
    os.replace(tmp, out_path)


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "get":
        print(ini_value(args[0], args[1], args[2:]))
    elif cmd == "tps":
        print(f"{tokens_per_s(args[0], int(args[1]) if len(args) > 1 else None):.1f}")
    elif cmd == "plan-teacher":
        steps, warmup, ev, proj = plan_teacher(float(args[0]), int(args[1]), int(args[2]), float(args[3]),
                                               int(args[4]))
        print(f"{steps} {warmup} {ev} {proj:.0f}")
    elif cmd == "plan-students":
        print(" ".join(str(x) for x in plan_students(int(args[0]), float(args[1]), int(args[2]), float(args[3]))))
    elif cmd == "summary":
        summary(args[0], args[1])
    else:
        raise SystemExit(f"real_lib.py: unknown command {cmd}\n{__doc__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

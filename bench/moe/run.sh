#!/usr/bin/env bash
# bench/moe: HyDistill's MoE FFN layer (bench_moe) vs the same layer in PyTorch (torch_moe.py: argsort
# dispatch + torch._grouped_mm, or a per-expert loop where that is missing), same shapes, same machine,
# same call. Needs BUILD_DIR/bench_moe (a CUDA build: make bench_moe) and an importable torch with CUDA.
# Without options it runs issue 7's shape twice: the qwen3_moe-like layer (softmax, top-8, norm_topk_prob)
# and the variant with a sigmoid router and one shared expert; with options, one configuration with them
# (both programs take the same ones: --tokens --hidden --experts --top_k --ffn --shared --shared_ffn
# --score --norm_topk --iters --warmup). Prints both programs' lines and a table with ratios; a program
# that fails leaves '-' in its columns (its error goes to stderr) and the other still runs.
# TORCH_MOE_EXTRA: more options for torch_moe.py alone (--path loop, --align 8, --device cpu, ...).
# MOE_GEMMS: the expert-GEMM implementations of ours to run, e.g. MOE_GEMMS="grouped loop wmma": bench_moe
# runs once per implementation (HYD_MOE_GEMM, kernels/moe.h MoeGemm), torch once, and the table has a row
# per implementation (ratios against the same torch line). Unset: one run with HYD_MOE_GEMM as set (else
# the default, auto: the loop for large per-expert GEMMs, one grouped call for small ones).
# Usage: bash bench/moe/run.sh [BUILD_DIR] [options...]     (BUILD_DIR defaults to build)
#        MOE_GEMMS="grouped loop wmma" bash bench/moe/run.sh build
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
build=build
if [[ $# -gt 0 && $1 != -* ]]; then
  build=$1
  shift
fi
if [[ $# -gt 0 ]]; then
  configs=("$*")
else
  configs=("" "--score sigmoid --shared 1")
fi
read -r -a gemms <<<"${MOE_GEMMS:-}"
for g in "${gemms[@]}"; do
  case $g in
    auto | grouped | loop | wmma) ;;
    *)
      echo "MOE_GEMMS: unknown implementation '$g' (auto, grouped, loop, wmma)" >&2
      exit 2
      ;;
  esac
done
ours=""
theirs=""
for c in "${configs[@]}"; do
  if [[ ${#gemms[@]} -eq 0 ]]; then
    # shellcheck disable=SC2086  # $c is a list of options
    o=$("$build/bench_moe" $c) || echo "bench_moe failed (options: ${c:-none})" >&2
    [[ -n $o ]] && echo "$o" && ours+="$o"$'\n'
  else
    for g in "${gemms[@]}"; do
      # shellcheck disable=SC2086
      o=$(HYD_MOE_GEMM=$g "$build/bench_moe" $c) || echo "bench_moe failed (gemm $g, options: ${c:-none})" >&2
      [[ -n $o ]] && echo "$o" && ours+="$o"$'\n'
    done
  fi
  # shellcheck disable=SC2086
  t=$(python3 bench/moe/torch_moe.py $c ${TORCH_MOE_EXTRA:-} | grep '^torch ') || echo "torch_moe.py failed (options: ${c:-none})" >&2
  [[ -n $t ]] && echo "$t" && theirs+="$t"$'\n'
done
python3 - "$ours" "$theirs" <<'PY'
import sys
KEY = ("tokens", "hidden", "experts", "top_k", "ffn", "shared", "score")
def parse(text):
    rows = []
    for line in text.splitlines():
        if line.strip():
            f = dict(kv.split("=", 1) for kv in line.split()[1:])
            rows.append((tuple(f[k] for k in KEY), f))
    return rows
ours, torch_ = parse(sys.argv[1]), dict(parse(sys.argv[2]))
def num(f, k, fmt):
    return format(float(f[k]), fmt) if f is not None else "-"
def ratio(o, t, k):
    return f"{float(o[k]) / float(t[k]):.2f}" if o is not None and t is not None else "-"
def gemm(f):
    if f is None:
        return "-"
    g, dw = f.get("gemm", "?"), f.get("gemm_dw", f.get("gemm", "?"))
    return g if dw == g else f"{g}/dW:{dw}"
# One row per run of ours (one per implementation), then the torch shapes ours did not run.
rows = [(key, o) for key, o in ours] + [(key, None) for key in torch_ if key not in {k for k, _ in ours}]
print(f"{'shape':>34} {'gemm':>16} | {'ours fwd':>9} {'torch fwd':>9} {'ratio':>6} | {'ours f+b':>9} {'torch f+b':>9} "
      f"{'ratio':>6} | {'ours MiB':>8} {'torch MiB':>9}")
for key, o in rows:
    t = torch_.get(key)
    N, D, E, k, F, S, score = key
    shape = f"N{N} D{D} E{E} k{k} F{F}" + (f" S{S}" if S != "0" else "") + f" {score}"
    print(f"{shape:>34} {gemm(o):>16} | {num(o, 'fwd_ms', '9.2f'):>9} {num(t, 'fwd_ms', '9.2f'):>9} "
          f"{ratio(o, t, 'fwd_ms'):>6} | {num(o, 'fwdbwd_ms', '9.2f'):>9} {num(t, 'fwdbwd_ms', '9.2f'):>9} "
          f"{ratio(o, t, 'fwdbwd_ms'):>6} | {num(o, 'peak_mib', '8.0f'):>8} {num(t, 'peak_mib', '9.0f'):>9}")
for key, o in rows:
    t = torch_.get(key)
    parts = []
    for name, f in ((f"ours ({gemm(o)})", o), ("torch", t)):
        if f is not None:
            parts.append(f"{name} {f['fwd_tflops']}/{f['fwdbwd_tflops']} TF/s, load {f['load_min']}..{f['load_max']}")
    print(f"  {key[6]} S{key[5]}: " + "; ".join(parts))
path = next((f"{t['path']} (align {t['align']}, torch {t['torch']})" for t in torch_.values()), None)
print(f"ratio = ours / torch time (below 1 is faster); TF/s = fwd/fwd+bwd; torch experts path: {path}")
PY

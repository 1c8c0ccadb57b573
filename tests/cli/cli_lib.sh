# Helpers shared by the CLI tests of checkpoints, evaluation and export (sourced, not run):
#   fail MSG                      print FAIL and exit 1
#   expect_error NAME RC NEEDLE... -- CMD...
#                                 CMD must exit with RC (or any non-zero for "nz"), print the
#                                 `hydistill: error:` prefix and every NEEDLE on stderr, and leave
#                                 NOT_CREATED (a path, when set) nonexistent
#   same_records A.jsonl B.jsonl  the two files hold the same records, timing fields aside
# Needs WORK (a scratch folder) to be set.

fail() {
  echo "FAIL: $*"
  exit 1
}

expect_error() {
  local name="$1" want="$2"
  shift 2
  local needles=()
  while [ "$1" != "--" ]; do
    needles+=("$1")
    shift
  done
  shift
  "$@" >"$WORK/err_out.txt" 2>"$WORK/err.txt"
  local rc=$?
  [ "$rc" -ne 0 ] || { cat "$WORK/err_out.txt"; fail "$name: exit code 0"; }
  if [ "$want" != "nz" ] && [ "$rc" -ne "$want" ]; then
    cat "$WORK/err.txt"
    fail "$name: exit code $rc, expected $want"
  fi
  grep -q "^hydistill: error: " "$WORK/err.txt" || { cat "$WORK/err.txt"; fail "$name: no 'hydistill: error:' line"; }
  local n
  for n in "${needles[@]}"; do
    grep -qF -- "$n" "$WORK/err.txt" || { cat "$WORK/err.txt"; fail "$name: stderr does not name '$n'"; }
  done
  [ -z "${NOT_CREATED:-}" ] || [ ! -e "$NOT_CREATED" ] || fail "$name: the refused command created $NOT_CREATED"
  echo "ok: $name (exit $rc): $(head -c 300 "$WORK/err.txt")"
}

same_records() {
  python3 - "$1" "$2" <<'PY' || fail "$1 and $2 differ"
import json, sys
def records(path):
    out = []
    for line in open(path):
        r = json.loads(line)
        for k in ("tokens_per_s", "elapsed_s", "eta_s", "checkpoint", "mfu", "comm_share"):  # timings
            r.pop(k, None)
        out.append(r)
    return out
a, b = records(sys.argv[1]), records(sys.argv[2])
assert a, f"{sys.argv[1]} is empty"
if a != b:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            print(f"record {i}:\n  {x}\n  {y}")
            break
    print(f"{len(a)} vs {len(b)} records")
    sys.exit(1)
PY
}

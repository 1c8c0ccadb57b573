#!/usr/bin/env bash
# For device runs while others edit the same working tree: resets every tracked and untracked
# (not ignored) file to HEAD except the paths given, so that only committed work plus those paths
# is built. It discards uncommitted work, so it refuses to run unless HYD_DEVICE_COPY=1 is set.
# Usage (on the device machine's copy of the tree only): HYD_DEVICE_COPY=1 bash bench/isolate.sh PATH...
set -euo pipefail
[ "${HYD_DEVICE_COPY:-}" = 1 ] || { echo "isolate.sh: discards uncommitted work; set HYD_DEVICE_COPY=1 on a throw-away copy" >&2; exit 2; }
cd "$(dirname "$0")/.."
keep=$(mktemp -d)
for p in "$@"; do [ -e "$p" ] && cp -r --parents "$p" "$keep/"; done
git checkout -q -- . && git clean -fdq
cp -r "$keep"/. .
git status --short | head -n 20

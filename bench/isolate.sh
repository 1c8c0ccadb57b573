#!/usr/bin/env bash
# For device runs while others edit the same working tree: resets every tracked and untracked
# (not ignored) file to HEAD except the paths given, so that only committed work plus those paths
# is built. Usage (on the device copy only!): bash bench/isolate.sh PATH...
set -euo pipefail
cd "$(dirname "$0")/.."
keep=$(mktemp -d)
for p in "$@"; do [ -e "$p" ] && cp -r --parents "$p" "$keep/"; done
git checkout -q -- . && git clean -fdq
cp -r "$keep"/. .
git status --short | head -n 20

#!/usr/bin/env bash
# The exported Python modeling files (checkpoint/python/*_hydistill.py) against transformers and FLA:
# runs tests/python/test_modeling_hydistill.py. Exit 77 (skipped) where torch or transformers is missing.
#   bash tests/cli/test_python_modeling.sh <path-to-hydistill> <source-dir>
set -uo pipefail

SRC=${2:?usage: test_python_modeling.sh HYDISTILL SOURCE_DIR}
PY=${PYTHON:-python3}

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "SKIPPED: $PY not found"
  exit 77
fi
"$PY" "$SRC/tests/python/test_modeling_hydistill.py"
rc=$?
case $rc in
  0 | 77) exit $rc ;;
  *) echo "FAIL: test_modeling_hydistill.py exited $rc" >&2; exit 1 ;;
esac

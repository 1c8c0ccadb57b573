#!/usr/bin/env bash
# Export parity with a real client: the C++ test binary (./unit_test_export, run from the build dir)
# exports small hybrid students (K, A and T layers; f32 and bf16) together with its fp32 logits, then
# tests/python/check_export_parity.py loads each export with
# AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) and compares logits (rel < 1e-4), and reads
# every tensor with safetensors.safe_open (names, shapes, dtypes). Exit 77 (skipped) where python3, torch,
# transformers or safetensors is missing.
#   bash tests/cli/test_export_parity.sh <path-to-hydistill> <source-dir>     (cwd: the build dir)
set -uo pipefail

SRC=${2:?usage: test_export_parity.sh HYDISTILL SOURCE_DIR}
PY=${PYTHON:-python3}
BIN=${HYD_TEST_EXPORT_BIN:-./unit_test_export}

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "SKIPPED: $PY not found"
  exit 77
fi
if ! "$PY" -c "import torch, transformers, safetensors" >/dev/null 2>&1; then
  echo "SKIPPED: torch/transformers/safetensors not importable by $PY"
  exit 77
fi
if [ ! -x "$BIN" ]; then
  echo "FAIL: $BIN not found (run from the build dir after building unit_test_export)" >&2
  exit 1
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hyd_export_parity.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if ! HYD_EXPORT_PARITY_DIR="$WORK" OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
  "$BIN" --gtest_filter=ExportParity.WriteCase; then
  echo "FAIL: $BIN --gtest_filter=ExportParity.WriteCase" >&2
  exit 1
fi
"$PY" "$SRC/tests/python/check_export_parity.py" "$WORK"
rc=$?
case $rc in
  0 | 77) exit $rc ;;
  *) echo "FAIL: check_export_parity.py exited $rc" >&2; exit 1 ;;
esac

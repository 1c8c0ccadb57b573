#!/usr/bin/env bash
# Byte compatibility of checkpoint/safetensors.{h,cpp} with the reference `safetensors` Python package,
# both ways: a file written by SafetensorsWriter (unit_test_safetensors, Safetensors.PythonInteropWrite)
# is read with safetensors.numpy and checked value by value, and a file written by safetensors.numpy is
# read by SafetensorsFile (Safetensors.PythonInteropRead). Skipped (77) without numpy + safetensors.
#   bash tests/cli/test_safetensors_python.sh <path-to-hydistill> <source-dir>
set -euo pipefail

HYD=${1:?usage: test_safetensors_python.sh HYDISTILL SOURCE_DIR}
PY=${PYTHON:-python3}
TEST_BIN="$(dirname "$HYD")/unit_test_safetensors"

if ! "$PY" -c "import numpy, safetensors.numpy" 2>/dev/null; then
  echo "SKIPPED: $PY lacks numpy/safetensors (pip install safetensors numpy)"
  exit 77
fi
[[ -x "$TEST_BIN" ]] || { echo "FAIL: $TEST_BIN not built (it is part of the default build)" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hyd_test_st_py.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export HYD_ST_INTEROP_DIR="$WORK"

# 1. C++ writes.
"$TEST_BIN" --gtest_filter=Safetensors.PythonInteropWrite
[[ -f "$WORK/from_cpp.safetensors" ]] || { echo "FAIL: C++ writer produced no file" >&2; exit 1; }

# 2. Python reads (and checks the layout), then writes its own file.
"$PY" - "$WORK" <<'EOF'
import json, struct, sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

work = sys.argv[1]
path = f"{work}/from_cpp.safetensors"
# safe_open validates the whole header (offsets tile the buffer); numpy cannot hold BF16, so that one
# tensor is checked from the raw bytes below.
with safe_open(path, framework="np") as f:
    assert f.metadata() == {"producer": "hydistill"}, f.metadata()
    keys = set(f.keys())
    t = {k: f.get_tensor(k) for k in keys if k != "bf16"}
assert keys == {"f32", "bf16", "f16", "i64", "i32", "u8", "scalar_f64", "empty"}, keys
def check(name, want, dtype):
    got = t[name]
    assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.array_equal(got, want), f"{name}: {got} != {want}"
check("f32", (0.25 * np.arange(12, dtype=np.float32) - 1.0).astype(np.float32).reshape(3, 4), np.float32)
check("f16", np.array([1.0, -2.5, 65504.0], dtype=np.float16), np.float16)
check("i64", np.array([[-1, 0], [1 << 40, 7]], dtype=np.int64), np.int64)
check("i32", np.array([-5, 6, 2**31 - 1], dtype=np.int32), np.int32)
check("u8", np.array([0, 1, 254, 255], dtype=np.uint8), np.uint8)
check("scalar_f64", np.array(2.5, dtype=np.float64), np.float64)
check("empty", np.zeros((0, 3), dtype=np.float32), np.float32)
# BF16 and the layout, from the raw bytes.
raw = open(path, "rb").read()
(n,) = struct.unpack("<Q", raw[:8])
assert (8 + n) % 8 == 0, f"data buffer not 8-byte aligned (header {n} bytes)"
header = json.loads(raw[8 : 8 + n])
e = header["bf16"]
assert e["dtype"] == "BF16" and e["shape"] == [5], e
b, end = e["data_offsets"]
bits = np.frombuffer(raw[8 + n + b : 8 + n + end], dtype="<u2").astype(np.uint32) << 16
vals = bits.view(np.float32)
assert np.array_equal(vals, np.array([1.0, -2.5, 0.15625, 256.0, -0.0078125], dtype=np.float32)), vals
print("python read the C++ file: OK")

save_file(
    {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3) / np.float32(3),
        "h": np.array([0x3C00, 0xC100, 0x7BFF, 0x0001], dtype=np.uint16).view(np.float16),
        "d": np.array([1.5, -2.0], dtype=np.float64),
        "i": np.array([1, -2, 3], dtype=np.int32),
        "l": np.array([[1 << 40]], dtype=np.int64),
        "b": np.array([True, False, True]),
    },
    f"{work}/from_python.safetensors",
    metadata={"producer": "numpy"},
)
EOF

# 3. C++ reads the Python file.
"$TEST_BIN" --gtest_filter=Safetensors.PythonInteropRead
echo "safetensors interop with python: OK"

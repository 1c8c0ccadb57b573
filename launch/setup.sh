#!/usr/bin/env bash
# One-step setup of a HyDistill checkout on Debian 12 / Ubuntu 24.04:
#
#   bash launch/setup.sh
#
# 1. installs the missing system packages (apt-get, as root, no prompts; apt-get update only when
#    something is missing), 2. the missing Python modules (pip), 3. configures and builds with CMake
#    into build/ (CUDA backend when nvcc is found, else CPU-only), 4. builds the demo corpus
#    data/corpus/kjv.h5 when bible-kjv-text is installed and the file is missing.
# Idempotent: a second run installs nothing and only rebuilds what changed. Works from any directory.
#
# Environment:
#   HYD_CUDA=ON|OFF     force the CUDA backend on or off (default: on when nvcc is found)
#   HYD_CUDA_ARCH=90    CUDA architectures (default: the GPU's compute capability, else CMake's default)
#   HYD_BUILD_DIR=build build directory, relative to the repository (default build)
#   HYD_JOBS=N          parallel build jobs (default nproc)
#   PYTHON=python3      the Python interpreter for data/prepare.py and its modules
#
# Required packages that cannot be installed stop the script with the list; optional ones (ccache,
# bible-kjv-text) only give a warning. A package counts as present when dpkg says so or when what it
# provides is found another way (e.g. a cmake from pip, a python with pip from a venv).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PY=${PYTHON:-python3}
BUILD_DIR=${HYD_BUILD_DIR:-build}
JOBS=${HYD_JOBS:-$(nproc 2>/dev/null || echo 2)}
CMAKE_MIN=3.24

REQUIRED_PKGS=(build-essential cmake pkg-config libopenmpi-dev openmpi-bin libhdf5-dev libgtest-dev libopenblas-dev
  nlohmann-json3-dev)
OPTIONAL_PKGS=(ccache bible-kjv-text)
PY_MODULES=(numpy h5py safetensors tokenizers)

say() { printf '[setup] %s\n' "$*"; }
warn() { printf '[setup] WARNING: %s\n' "$*" >&2; }
die() {
  printf '[setup] ERROR: %s\n' "$*" >&2
  exit 1
}

INSTALLED_APT=()
INSTALLED_PIP=()
MISSING_OPTIONAL=()
NOTES=()

# ---------------------------------------------------------------- system packages

have() { command -v "$1" >/dev/null 2>&1; }

version_ge() {  # version_ge A B: A >= B (dotted numbers)
  [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]
}

dpkg_installed() {
  have dpkg-query || return 1
  local st
  st=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
  [[ "$st" == *" ok installed" ]]
}

any_file() {  # any_file GLOB...: true when one of the patterns matches an existing path
  local g
  for g in "$@"; do compgen -G "$g" >/dev/null && return 0; done
  return 1
}

# What each package provides, checked without dpkg (machines where tools come from elsewhere). Libraries
# count only with their link-time files, not just headers (e.g. a libgtest-dev without libgtest.a).
provided_otherwise() {
  local lib="/usr/lib/*-linux-gnu"
  case "$1" in
    build-essential) have g++ && have make ;;
    cmake) have cmake ;;
    pkg-config) have pkg-config || have pkgconf ;;
    libopenmpi-dev) have mpicxx && any_file "$lib/libmpi_cxx.so" "$lib/openmpi/lib/libmpi.so" "$lib/libmpi.so" ;;
    openmpi-bin) have mpirun ;;
    libhdf5-dev) any_file /usr/include/hdf5/serial/hdf5.h /usr/include/hdf5.h &&
      any_file "$lib/hdf5/serial/libhdf5.so" "$lib/libhdf5_serial.so" "$lib/libhdf5.so" ;;
    libgtest-dev) any_file /usr/include/gtest/gtest.h && any_file "$lib/libgtest.a" "$lib/libgtest.so" ;;
    libopenblas-dev) any_file "/usr/include/*-linux-gnu/openblas-pthread/cblas.h" /usr/include/openblas/cblas.h &&
      any_file "$lib/libopenblas.so" "$lib/openblas-pthread/libopenblas.so" ;;
    nlohmann-json3-dev) any_file /usr/include/nlohmann/json.hpp ;;
    ccache) have ccache ;;
    bible-kjv-text) any_file /usr/lib/bible.data ;;
    python3-pip) "$PY" -m pip --version >/dev/null 2>&1 ;;
    python3) have "$PY" ;;
    *) return 1 ;;
  esac
}

present() { dpkg_installed "$1" || provided_otherwise "$1"; }

# Python modules first: they decide whether pip (python3-pip) is needed.
MISSING_PY=()
if have "$PY"; then
  for m in "${PY_MODULES[@]}"; do
    "$PY" -c "import $m" >/dev/null 2>&1 || MISSING_PY+=("$m")
  done
else
  REQUIRED_PKGS+=(python3)
  MISSING_PY=("${PY_MODULES[@]}")
fi
if ((${#MISSING_PY[@]})) && ! "$PY" -m pip --version >/dev/null 2>&1; then
  REQUIRED_PKGS+=(python3-pip)
fi

MISSING_REQ=()
MISSING_OPT=()
for p in "${REQUIRED_PKGS[@]}"; do present "$p" || MISSING_REQ+=("$p"); done
for p in "${OPTIONAL_PKGS[@]}"; do present "$p" || MISSING_OPT+=("$p"); done

SUDO=()
CAN_APT=1
WHY_NOT=""
if ! have apt-get; then
  CAN_APT=0
  WHY_NOT="apt-get is not available (this script installs packages on Debian/Ubuntu only)"
elif ! have dpkg-query; then
  CAN_APT=0
  WHY_NOT="dpkg-query is not available (install the dpkg package)"
elif [[ $(id -u) -ne 0 ]]; then
  if have sudo && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    CAN_APT=0
    WHY_NOT="not running as root (run: sudo bash launch/setup.sh)"
  fi
fi

APT_UPDATED=0
apt_update_once() {
  ((APT_UPDATED)) && return 0
  APT_UPDATED=1
  say "apt-get update"
  # Short timeouts: on a machine without network this fails fast instead of hanging.
  if ! timeout 300 "${SUDO[@]}" apt-get -q update -o Acquire::Retries=1 -o Acquire::http::Timeout=20 \
    -o Acquire::https::Timeout=20; then
    warn "apt-get update failed (no network?): trying the package lists already on this machine"
  fi
}

apt_install() {  # apt_install PKG...: 0 when all were installed
  DEBIAN_FRONTEND=noninteractive timeout 1800 "${SUDO[@]}" apt-get -q -y --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold install "$@"
}

if ((${#MISSING_REQ[@]} + ${#MISSING_OPT[@]} == 0)); then
  say "system packages: all present"
fi

if ((${#MISSING_REQ[@]})); then
  if ((!CAN_APT)); then
    die "missing required packages: ${MISSING_REQ[*]}
  $WHY_NOT.
  Install them with: apt-get install -y ${MISSING_REQ[*]}"
  fi
  say "installing required packages: ${MISSING_REQ[*]}"
  apt_update_once
  apt_install "${MISSING_REQ[@]}" || true
  STILL=()
  for p in "${MISSING_REQ[@]}"; do
    if present "$p"; then INSTALLED_APT+=("$p"); else STILL+=("$p"); fi
  done
  if ((${#STILL[@]})); then
    die "could not install required packages: ${STILL[*]} (see the apt-get output above; no network?)"
  fi
fi

for p in "${MISSING_OPT[@]}"; do
  if ((CAN_APT)); then
    say "installing optional package: $p"
    apt_update_once
    apt_install "$p" || true
  fi
  if present "$p"; then
    INSTALLED_APT+=("$p")
  else
    MISSING_OPTIONAL+=("$p")
    case "$p" in
      ccache) warn "ccache not installed: builds work, rebuilds are just slower${WHY_NOT:+ ($WHY_NOT)}" ;;
      bible-kjv-text)
        warn "bible-kjv-text not installed: the demo corpus data/corpus/kjv.h5 is not built${WHY_NOT:+ ($WHY_NOT)}"
        ;;
    esac
  fi
done

CMAKE_VERSION=$(cmake --version | head -n1 | awk '{print $3}')
version_ge "$CMAKE_VERSION" "$CMAKE_MIN" ||
  die "cmake $CMAKE_VERSION ($(command -v cmake)) is older than $CMAKE_MIN: install a newer one (pip install cmake)"

# ---------------------------------------------------------------- Python modules

pip_install() {  # PEP 668 systems refuse pip outside a venv: add --break-system-packages only then
  local log
  log=$(mktemp)
  if PIP_NO_INPUT=1 "$PY" -m pip install --disable-pip-version-check "$@" 2>&1 | tee "$log"; then
    rm -f "$log"
    return 0
  fi
  if grep -q "externally-managed-environment" "$log"; then
    rm -f "$log"
    say "pip: externally managed Python (PEP 668): retrying with --break-system-packages"
    PIP_NO_INPUT=1 "$PY" -m pip install --disable-pip-version-check --break-system-packages "$@"
    return
  fi
  rm -f "$log"
  return 1
}

if ((${#MISSING_PY[@]})); then
  say "installing Python modules with pip: ${MISSING_PY[*]}"
  pip_install "${MISSING_PY[@]}" || true
  STILL=()
  for m in "${MISSING_PY[@]}"; do
    if "$PY" -c "import $m" >/dev/null 2>&1; then INSTALLED_PIP+=("$m"); else STILL+=("$m"); fi
  done
  if ((${#STILL[@]})); then
    die "Python modules still missing for $PY: ${STILL[*]} (pip install ${STILL[*]}; no network?)"
  fi
else
  say "Python modules: all present ($PY: ${PY_MODULES[*]})"
fi

# ---------------------------------------------------------------- configure and build

NVCC=""
if have nvcc; then
  NVCC=$(command -v nvcc)
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
  NVCC=/usr/local/cuda/bin/nvcc
  export PATH="/usr/local/cuda/bin:$PATH"
fi

CUDA_MODE=${HYD_CUDA:-auto}
case "${CUDA_MODE^^}" in
  ON | 1 | TRUE | YES)
    [[ -n "$NVCC" ]] || die "HYD_CUDA=ON but nvcc was not found (PATH, /usr/local/cuda/bin): install the CUDA toolkit"
    CUDA_MODE=ON
    ;;
  OFF | 0 | FALSE | NO) CUDA_MODE=OFF ;;
  AUTO)
    if [[ -n "$NVCC" ]]; then
      CUDA_MODE=ON
      say "CUDA toolkit found: $NVCC (-DHYD_CUDA=ON)"
    else
      CUDA_MODE=OFF
      say "CUDA toolkit not found: building the CPU-only backend (-DHYD_CUDA=OFF)"
    fi
    ;;
  *) die "HYD_CUDA must be ON or OFF, got '$HYD_CUDA'" ;;
esac

CMAKE_ARGS=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "-DHYD_CUDA=$CUDA_MODE")
CUDA_DESC="off (CPU-only backend)"
if [[ "$CUDA_MODE" == ON ]]; then
  ARCH=${HYD_CUDA_ARCH:-}
  if [[ -z "$ARCH" ]] && have nvidia-smi; then
    # The first GPU's compute capability, e.g. "9.0" -> "90".
    ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .' || true)
    [[ "$ARCH" =~ ^[0-9]+$ ]] || ARCH=""
  fi
  [[ -n "$ARCH" ]] && CMAKE_ARGS+=("-DHYD_CUDA_ARCH=$ARCH")
  CUDA_DESC="on (nvcc $NVCC, architectures ${ARCH:-CMake default})"
elif [[ -n "${HYD_CUDA_ARCH:-}" ]]; then
  warn "HYD_CUDA_ARCH=$HYD_CUDA_ARCH ignored: the CUDA backend is off"
fi

say "cmake ${CMAKE_ARGS[*]}"
cmake "${CMAKE_ARGS[@]}"
say "cmake --build $BUILD_DIR -j$JOBS"
cmake --build "$BUILD_DIR" -j"$JOBS"

# ---------------------------------------------------------------- demo corpus

CORPUS_DESC="data/corpus/kjv.h5 already present"
if [[ -f data/corpus/kjv.h5 ]]; then
  :
elif present bible-kjv-text; then
  say "building the demo corpus: bash data/make_kjv.sh"
  if bash data/make_kjv.sh; then
    CORPUS_DESC="data/corpus/kjv.h5 built"
  else
    warn "data/make_kjv.sh failed: the demo corpus is missing (rerun it after fixing the error above)"
    CORPUS_DESC="FAILED to build data/corpus/kjv.h5"
    NOTES+=("data/make_kjv.sh failed")
  fi
else
  CORPUS_DESC="not built (bible-kjv-text missing)"
fi

# ---------------------------------------------------------------- summary

join() {
  local IFS=' '
  if (($#)); then echo "$*"; else echo "none"; fi
}
echo
say "summary"
say "  apt packages installed : $(join "${INSTALLED_APT[@]+"${INSTALLED_APT[@]}"}")"
say "  pip modules installed  : $(join "${INSTALLED_PIP[@]+"${INSTALLED_PIP[@]}"}")"
say "  optional, missing      : $(join "${MISSING_OPTIONAL[@]+"${MISSING_OPTIONAL[@]}"}")"
say "  cmake                  : $CMAKE_VERSION ($(command -v cmake))"
say "  python                 : $("$PY" --version 2>&1) ($(command -v "$PY"))"
say "  CUDA backend           : $CUDA_DESC"
say "  build                  : $ROOT/$BUILD_DIR (Release, $JOBS jobs)"
say "  demo corpus            : $CORPUS_DESC"
((${#NOTES[@]})) && say "  notes                  : ${NOTES[*]}"
say "done. Run the tests with: ctest --test-dir $BUILD_DIR --output-on-failure -j2"

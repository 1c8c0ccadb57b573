# shellcheck shell=bash disable=SC2034  # sourced; the HYD_* arrays are read by the caller
# Shared by launch/mpirun_one_node.sh, launch/mpirun_multi_node.sh and launch/slurm_distill.sbatch
# (sourced, not run). Each function reports a problem with `hyd_die` (exit 2), so the caller's
# `set -euo pipefail` stays in charge.

HYD_TAG=${HYD_TAG:-launch}

hyd_say() { printf '[%s] %s\n' "$HYD_TAG" "$*" >&2; }
hyd_die() {
  printf '[%s] ERROR: %s\n' "$HYD_TAG" "$*" >&2
  exit 2
}

# hyd_find_binary ROOT: sets HYD_BIN to $HYDISTILL, else ROOT/build/hydistill, else hydistill on PATH.
hyd_find_binary() {
  local root=$1
  if [[ -n "${HYDISTILL:-}" ]]; then
    [[ -x "$HYDISTILL" ]] || hyd_die "HYDISTILL=$HYDISTILL is not an executable file"
    HYD_BIN=$HYDISTILL
  elif [[ -x "$root/build/hydistill" ]]; then
    HYD_BIN=$root/build/hydistill
  elif command -v hydistill >/dev/null 2>&1; then
    HYD_BIN=$(command -v hydistill)
  else
    hyd_die "no hydistill binary: not at $root/build/hydistill nor on PATH; build it (bash launch/setup.sh) or set HYDISTILL=/path/to/hydistill"
  fi
}

# hyd_check_args COMMAND CONFIG: the command is train or distill and the config file exists.
hyd_check_args() {
  case "$1" in
    train | distill) ;;
    *) hyd_die "command must be train or distill, got '$1'" ;;
  esac
  [[ -f "$2" ]] || hyd_die "config file not found: $2 (relative paths are taken from $(pwd))"
  [[ -r "$2" ]] || hyd_die "config file not readable: $2"
}

# hyd_check_count NAME VALUE: VALUE is a positive integer.
hyd_check_count() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || hyd_die "$1 must be a positive integer, got '$2'"
}

# hyd_parallel_args WORLD COMMAND: sets HYD_PAR_ARGS (--parallel.dp / --parallel.sp / --parallel.ep from the
# env DP / SP / EP when given) and refuses a world of several ranks for a command without parallel.* options
# (every rank would run the whole job into the same run directory).
hyd_parallel_args() {
  local world=$1 cmd=$2 has_par=0
  HYD_PAR_ARGS=()
  if "$HYD_BIN" "$cmd" --help 2>/dev/null | grep -q -- '--parallel\.dp'; then has_par=1; fi
  if ((!has_par)); then
    if [[ -n "${DP:-}" || -n "${SP:-}" || -n "${EP:-}" ]]; then
      hyd_die "DP/SP/EP given, but 'hydistill $cmd' has no parallel.* options ($HYD_BIN $cmd --help)"
    fi
    if ((world > 1)); then
      hyd_die "'hydistill $cmd' runs on one device only (no parallel.* options in $HYD_BIN $cmd --help): use 1 rank, not $world"
    fi
    return 0
  fi
  if [[ -n "${DP:-}" ]]; then
    hyd_check_count DP "$DP"
    HYD_PAR_ARGS+=(--parallel.dp "$DP")
  fi
  if [[ -n "${SP:-}" ]]; then
    hyd_check_count SP "$SP"
    HYD_PAR_ARGS+=(--parallel.sp "$SP")
  fi
  if [[ -n "${EP:-}" ]]; then
    hyd_check_count EP "$EP"
    "$HYD_BIN" "$cmd" --help 2>/dev/null | grep -q -- '--parallel\.ep' ||
      hyd_die "EP given, but 'hydistill $cmd' has no parallel.ep option (expert parallelism: distill only)"
    HYD_PAR_ARGS+=(--parallel.ep "$EP")
  fi
  if [[ -n "${DP:-}" || -n "${SP:-}" ]] && ((${DP:-1} * ${SP:-1} != world)); then
    hyd_die "DP x SP = ${DP:-1} x ${SP:-1} = $((${DP:-1} * ${SP:-1})) must equal the number of ranks ($world)"
  fi
  return 0
}

# hyd_env_args: sets HYD_ENV_ARGS, the `-x VAR` flags of mpirun. NCCL_NVLS_ENABLE is always 0: NVLink
# multicast (NVLS) can put the GPUs of a shared host out of service, so it stays off here; the other
# variables are passed on only when set.
hyd_env_args() {
  if [[ -n "${NCCL_NVLS_ENABLE:-}" && "$NCCL_NVLS_ENABLE" != 0 ]]; then
    hyd_say "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE ignored: NVLink multicast stays off (NCCL_NVLS_ENABLE=0)"
  fi
  export NCCL_NVLS_ENABLE=0
  HYD_ENV_ARGS=(-x NCCL_NVLS_ENABLE)
  local v
  for v in PATH LD_LIBRARY_PATH OMP_NUM_THREADS OPENBLAS_NUM_THREADS CUDA_VISIBLE_DEVICES \
    NCCL_DEBUG NCCL_DEBUG_SUBSYS NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_P2P_DISABLE \
    NCCL_NET_GDR_LEVEL UCX_NET_DEVICES UCX_TLS; do
    if [[ -n "${!v:-}" ]]; then HYD_ENV_ARGS+=(-x "$v"); fi
  done
}

# hyd_threads RANKS_PER_NODE: OMP_NUM_THREADS = cores / ranks per node when not set (CPU runs).
hyd_threads() {
  if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    local cores
    cores=$(nproc 2>/dev/null || echo 1)
    export OMP_NUM_THREADS=$((cores / $1 > 0 ? cores / $1 : 1))
    hyd_say "OMP_NUM_THREADS=$OMP_NUM_THREADS ($cores cores / $1 ranks per node; set it to override)"
  fi
}

# hyd_root_args: --allow-run-as-root only for root (OpenMPI refuses root otherwise).
hyd_root_args() {
  HYD_ROOT_ARGS=()
  if [[ $(id -u) -eq 0 ]]; then HYD_ROOT_ARGS=(--allow-run-as-root); fi
}

# hyd_extra_mpi_args: sets HYD_MPI_EXTRA from MPIRUN_ARGS (split on spaces).
hyd_extra_mpi_args() {
  HYD_MPI_EXTRA=()
  if [[ -n "${MPIRUN_ARGS:-}" ]]; then read -r -a HYD_MPI_EXTRA <<<"$MPIRUN_ARGS"; fi
}

# hyd_print CMD...: prints the command, shell-quoted.
hyd_print() {
  local q
  q=$(printf '%q ' "$@")
  printf '[%s] %s\n' "$HYD_TAG" "${q% }" >&2
}

# hyd_has_option KEY ARGS...: true when ARGS hold --KEY or --KEY=VALUE.
hyd_has_option() {
  local key=$1 a
  shift
  for a in "$@"; do
    if [[ "$a" == "--$key" || "$a" == "--$key="* ]]; then return 0; fi
  done
  return 1
}

# hyd_run CMD...: prints the command, then runs it in place of the script unless DRY_RUN=1.
hyd_run() {
  hyd_print "$@"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then exit 0; fi
  exec "$@"
}

#!/usr/bin/env bash
# Runs `hydistill train|distill --config CFG` as N ranks on this machine with OpenMPI's mpirun.
# See usage() below, or: bash launch/mpirun_one_node.sh -h
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HYD_TAG=mpirun_one_node
# shellcheck source=launch/mpi_common.sh
source "$HERE/mpi_common.sh"

usage() {
  cat <<'EOF'
usage: bash launch/mpirun_one_node.sh COMMAND CONFIG N [HYDISTILL OPTIONS...]

Runs `hydistill COMMAND --config CONFIG [OPTIONS...]` as N MPI ranks on this machine (one GPU per rank,
rank -> GPU by node-local rank; or N CPU processes with device = cpu). Run it from the repository root
(the configs' relative paths, e.g. data.path, are taken from the current directory).

  COMMAND   train | distill
  CONFIG    INI config file, e.g. launch/configs/tiny-cpu-train.ini
  N         number of ranks (mpirun -np N); must equal parallel.dp x parallel.sp
  OPTIONS   passed to hydistill unchanged, e.g. --train.steps 50 --run.dir runs/dp2

Environment:
  DP, SP        add --parallel.dp DP / --parallel.sp SP (DP x SP must equal N)
  EP            distill with MoE models: add --parallel.ep EP (divides N; each rank stores 1/EP of the
                routed experts; CPUs and GPUs)
  HYDISTILL     the binary (default: build/hydistill of this checkout, else hydistill on PATH)
  BIND          none (default: no CPU binding) | socket (--map-by socket --bind-to socket, ranks spread
                over the sockets) | core (--map-by core --bind-to core)
  OVERSUBSCRIBE 1: pass --oversubscribe (also added when N exceeds the cores here)
  MPIRUN        mpirun command (default mpirun); MPIRUN_ARGS: more mpirun flags, split on spaces
  OMP_NUM_THREADS  threads per rank (default: cores / N)
  DRY_RUN=1     print the mpirun command without running it
NCCL_NVLS_ENABLE=0 is always exported; NCCL_DEBUG, NCCL_SOCKET_IFNAME, NCCL_IB_HCA, CUDA_VISIBLE_DEVICES,
OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, PATH, LD_LIBRARY_PATH, ... are exported (-x) when set.

Example (CPU, ZeRO-1 data parallelism over 2 ranks):
  DP=2 bash launch/mpirun_one_node.sh train launch/configs/tiny-cpu-train.ini 2 --run.dir runs/tiny-dp2
EOF
}

if [[ $# -ge 1 && ("$1" == -h || "$1" == --help) ]]; then
  usage
  exit 0
fi
if [[ $# -lt 3 ]]; then
  usage >&2
  hyd_die "expected COMMAND CONFIG N, got $# argument(s)"
fi
CMD=$1
CFG=$2
NP=$3
shift 3

hyd_check_args "$CMD" "$CFG"
hyd_check_count N "$NP"
hyd_find_binary "$ROOT"
command -v "${MPIRUN:-mpirun}" >/dev/null 2>&1 ||
  hyd_die "${MPIRUN:-mpirun} not found: install OpenMPI (apt-get install openmpi-bin) or set MPIRUN"
hyd_parallel_args "$NP" "$CMD"
hyd_threads "$NP"
hyd_env_args
hyd_root_args
hyd_extra_mpi_args

MAP_ARGS=()
case "${BIND:-none}" in
  none) MAP_ARGS=(--bind-to none) ;;
  socket) MAP_ARGS=(--map-by socket --bind-to socket) ;;
  core) MAP_ARGS=(--map-by core --bind-to core) ;;
  *) hyd_die "BIND must be none, socket or core, got '$BIND'" ;;
esac
# mpirun's slots on one node = physical cores (hardware threads do not count).
CORES=$(lscpu -p=Core,Socket 2>/dev/null | grep -v '^#' | sort -u | wc -l || true)
[[ "$CORES" =~ ^[1-9][0-9]*$ ]] || CORES=$(nproc 2>/dev/null || echo 1)
if [[ "${OVERSUBSCRIBE:-0}" == 1 ]] || ((NP > CORES)); then MAP_ARGS+=(--oversubscribe); fi

hyd_run "${MPIRUN:-mpirun}" "${HYD_ROOT_ARGS[@]}" -np "$NP" "${MAP_ARGS[@]}" "${HYD_ENV_ARGS[@]}" \
  "${HYD_MPI_EXTRA[@]}" "$HYD_BIN" "$CMD" --config "$CFG" "${HYD_PAR_ARGS[@]}" "$@"

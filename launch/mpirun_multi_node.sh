#!/usr/bin/env bash
# Runs `hydistill train|distill --config CFG` over the nodes of a hostfile with OpenMPI's mpirun,
# GPUS_PER_NODE ranks per node. See usage() below, or: bash launch/mpirun_multi_node.sh -h
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HYD_TAG=mpirun_multi_node
# shellcheck source=launch/mpi_common.sh
source "$HERE/mpi_common.sh"

usage() {
  cat <<'EOF'
usage: HOSTFILE=hosts GPUS_PER_NODE=G bash launch/mpirun_multi_node.sh COMMAND CONFIG [HYDISTILL OPTIONS...]

Runs `hydistill COMMAND --config CONFIG [OPTIONS...]` as G ranks on each node of the hostfile
(mpirun -np NODES*G --map-by ppr:G:node); rank -> GPU by node-local rank. Every node needs the same
checkout, binary and data at the same paths (a shared file system), and passwordless ssh from this
node to the others. Run it from the repository root on one of the nodes (relative paths in the
config, e.g. data.path, are taken from the current directory).

  COMMAND   train | distill
  CONFIG    INI config file
  OPTIONS   passed to hydistill unchanged, e.g. --run.dir runs/big

Environment:
  HOSTFILE       OpenMPI hostfile, one node a line: `node01 slots=8` (required); '#' starts a comment
  GPUS_PER_NODE  ranks per node (default: the number of GPUs nvidia-smi lists on this node)
  NNODES         use only the first NNODES hosts of the hostfile (default: all of them)
  DP, SP         add --parallel.dp DP / --parallel.sp SP (DP x SP must equal NODES x G)
  EP             distill with MoE models: add --parallel.ep EP (divides NODES x G; each rank stores 1/EP of
                 the routed experts; CPUs and GPUs)
  HYDISTILL      the binary (default: build/hydistill of this checkout, else hydistill on PATH)
  MPIRUN         mpirun command (default mpirun); MPIRUN_ARGS: more mpirun flags, split on spaces
  DRY_RUN=1      print the mpirun command without running it
NCCL_NVLS_ENABLE=0 is always exported; NCCL_SOCKET_IFNAME (e.g. eth0 or ^lo,docker), NCCL_IB_HCA
(e.g. mlx5_0,mlx5_1), NCCL_IB_DISABLE, NCCL_DEBUG, UCX_NET_DEVICES, PATH, LD_LIBRARY_PATH,
OMP_NUM_THREADS, ... are exported (-x) to every rank when set.

Example (2 nodes of 8 GPUs, data parallel over 16 ranks):
  printf 'node01 slots=8\nnode02 slots=8\n' > hosts
  HOSTFILE=hosts GPUS_PER_NODE=8 DP=16 NCCL_SOCKET_IFNAME=eth0 \
    bash launch/mpirun_multi_node.sh train my-config.ini --run.dir runs/big
EOF
}

if [[ $# -ge 1 && ("$1" == -h || "$1" == --help) ]]; then
  usage
  exit 0
fi
if [[ $# -lt 2 ]]; then
  usage >&2
  hyd_die "expected COMMAND CONFIG, got $# argument(s)"
fi
CMD=$1
CFG=$2
shift 2

hyd_check_args "$CMD" "$CFG"
[[ -n "${HOSTFILE:-}" ]] || hyd_die "HOSTFILE is not set: give the OpenMPI hostfile (one 'host slots=G' a line)"
[[ -f "$HOSTFILE" ]] || hyd_die "hostfile not found: $HOSTFILE"

# Hosts: the first word of each line that is not blank or a comment, each host once.
mapfile -t HOSTS < <(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF { print $1 }' | awk '!seen[$0]++')
((${#HOSTS[@]} > 0)) || hyd_die "no hosts in $HOSTFILE"
NODES=${#HOSTS[@]}
if [[ -n "${NNODES:-}" ]]; then
  hyd_check_count NNODES "$NNODES"
  ((NNODES <= NODES)) || hyd_die "NNODES=$NNODES but $HOSTFILE lists only $NODES host(s)"
  NODES=$NNODES
fi

if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] ||
    hyd_die "GPUS_PER_NODE is not set and nvidia-smi lists no GPU on this node: set GPUS_PER_NODE"
  hyd_say "GPUS_PER_NODE=$GPUS_PER_NODE (the GPUs nvidia-smi lists on this node)"
fi
hyd_check_count GPUS_PER_NODE "$GPUS_PER_NODE"
NP=$((NODES * GPUS_PER_NODE))
hyd_say "$NODES node(s) x $GPUS_PER_NODE rank(s) = $NP ranks: ${HOSTS[*]:0:NODES}"

hyd_find_binary "$ROOT"
command -v "${MPIRUN:-mpirun}" >/dev/null 2>&1 ||
  hyd_die "${MPIRUN:-mpirun} not found: install OpenMPI (apt-get install openmpi-bin) or set MPIRUN"
hyd_parallel_args "$NP" "$CMD"
hyd_threads "$GPUS_PER_NODE"
hyd_env_args
hyd_root_args
hyd_extra_mpi_args

# MPI only bootstraps the ranks here (rank, size, local rank, NCCL's unique id); the GPU traffic goes
# through NCCL. Where OpenMPI picks the wrong network for its own messages, add to MPIRUN_ARGS:
#   TCP only:  --mca pml ob1 --mca btl tcp,self,vader --mca btl_tcp_if_include eth0 --mca oob_tcp_if_include eth0
#   UCX:       --mca pml ucx -x UCX_NET_DEVICES=mlx5_0:1   (UCX_TLS=rc,sm,self to leave out TCP)
# and for NCCL: NCCL_SOCKET_IFNAME=eth0 (bootstrap/socket transport), NCCL_IB_HCA=mlx5_0,mlx5_1
# (InfiniBand / RoCE adapters), NCCL_IB_DISABLE=1 (sockets only), NCCL_DEBUG=INFO (which transport).
hyd_run "${MPIRUN:-mpirun}" "${HYD_ROOT_ARGS[@]}" -np "$NP" --hostfile "$HOSTFILE" \
  --map-by "ppr:$GPUS_PER_NODE:node" --bind-to none "${HYD_ENV_ARGS[@]}" "${HYD_MPI_EXTRA[@]}" \
  "$HYD_BIN" "$CMD" --config "$CFG" "${HYD_PAR_ARGS[@]}" "$@"

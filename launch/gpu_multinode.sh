#!/usr/bin/env bash
# Train on GPU machines without a scheduler: run this on every node, with the same arguments,
# one process per node driving all of its GPUs. Node 0 hosts the coordinator.
#   node0$ COORDINATOR=10.0.0.1:8476 NUM_NODES=2 NODE_RANK=0 WORKDIR=/shared/run bash launch/gpu_multinode.sh --config=configs/gpt_small.py
#   node1$ COORDINATOR=10.0.0.1:8476 NUM_NODES=2 NODE_RANK=1 WORKDIR=/shared/run bash launch/gpu_multinode.sh --config=configs/gpt_small.py
# (or from one machine: for i in 0 1; do ssh node$i "cd llmjax && COORDINATOR=... NODE_RANK=$i ..." & done; wait)
#
# Environment (required: COORDINATOR, NUM_NODES, NODE_RANK, WORKDIR):
#   COORDINATOR           host:port of node 0, reachable from every node (a free TCP port)
#   NUM_NODES, NODE_RANK  how many nodes, and this node's index (0 .. NUM_NODES-1)
#   WORKDIR               a directory every node sees (NFS, or gs:// with the gcs extras)
#   LLMJAX_SKIP_SETUP=1   the venv is ready: skip scripts/setup.sh and the CUDA wheels
#   LLMJAX_CUDA=0         skip only the jax[cuda12] install
#   LLMJAX_PYTHON         the interpreter to run (default .venv/bin/python)
# NCCL and XLA: see docs/launch.md (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG=INFO; the GPU XLA
# flags llmjax.xla_flags adds). Flags: --dry-run prints the command instead of running it.
set -euo pipefail

die() { echo "gpu_multinode.sh: $*" >&2; exit 2; }

DRY_RUN=0
ARGS=()
for arg in "$@"; do
  if [ "$arg" = --dry-run ]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done

cd "$(dirname "$0")/.."
[ -n "${COORDINATOR:-}" ] || die "set COORDINATOR to node 0's host:port, e.g. COORDINATOR=10.0.0.1:8476"
case "$COORDINATOR" in *:[0-9]*) ;; *) die "COORDINATOR must be host:port, not $COORDINATOR" ;; esac
case "${NUM_NODES:-}" in '' | *[!0-9]* | 0) die "set NUM_NODES to the number of nodes (a positive integer)" ;; esac
case "${NODE_RANK:-}" in '' | *[!0-9]*) die "set NODE_RANK to this node's index (0 .. $((NUM_NODES - 1)))" ;; esac
[ "$NODE_RANK" -lt "$NUM_NODES" ] || die "NODE_RANK=$NODE_RANK is not below NUM_NODES=$NUM_NODES"
[ -n "${WORKDIR:-}" ] || die "set WORKDIR to a directory every node sees"

if [ "$DRY_RUN" = 0 ] && [ "${LLMJAX_SKIP_SETUP:-0}" != 1 ]; then
  bash scripts/setup.sh
  if [ "${LLMJAX_CUDA:-1}" = 1 ]; then
    jax_version=$(sed -n 's/^jax==\([^ ;]*\).*/\1/p' requirements/lock.txt)
    .venv/bin/python -m pip install -q --disable-pip-version-check "jax[cuda12]==$jax_version"
  fi
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
cmd=("${LLMJAX_PYTHON:-.venv/bin/python}" -m llmjax.main "--coordinator_address=$COORDINATOR"
     "--num_processes=$NUM_NODES" "--process_id=$NODE_RANK" "--workdir=$WORKDIR"
     "${ARGS[@]+"${ARGS[@]}"}")
if [ "$DRY_RUN" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi

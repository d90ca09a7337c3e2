#!/usr/bin/env bash
# Multi-node AEMIM pre-training launched with torchrun (no SLURM needed): run this same command on every node.
#
#   MASTER_ADDR=node0.example.org bash scripts/torchrun_multinode.sh [extra advmim flags]
#
# Defaults: 2 nodes x 8 GPUs, job mae_adv.yaml (point it at your data with extra flags, e.g.
# --data.init_args.train_root /data/imagenet/train). The c10d rendezvous assigns node ranks, so no NODE_RANK is
# needed; Lightning reads RANK / LOCAL_RANK / GROUP_RANK / WORLD_SIZE from torchrun (TorchElasticEnvironment).
# Override with NNODES, NPROC_PER_NODE, MASTER_PORT, RDZV_ID, JOB, PYTHON.
set -euo pipefail

NNODES="${NNODES:-2}"                  # nodes taking part; also --trainer.num_nodes
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"  # processes (GPUs) per node; also --trainer.devices
MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR to a host name of one participating node, reachable from all}"
MASTER_PORT="${MASTER_PORT:-29500}"    # rendezvous port on MASTER_ADDR
RDZV_ID="${RDZV_ID:-advmim}"           # same on every node of one run, different between concurrent runs
JOB="${JOB:-mae_adv.yaml}"             # job config (a shipped name or a path)
PYTHON="${PYTHON:-.venv/bin/python}"   # the project's environment (scripts/setup_env.sh)

# Inside a SLURM allocation Lightning would take its ranks from SLURM rather than torchrun; the job name
# "interactive" tells it not to (see lightning SLURMEnvironment.detect).
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  export SLURM_JOB_NAME=interactive
fi

# `python -m advmim_pl.cli` (not the `advmim` console script) so that a successful run exits with status 0.
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
  -m advmim_pl.cli fit -c "$JOB" -c trainer/multinode.yaml \
  --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" "$@"

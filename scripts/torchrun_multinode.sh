#!/usr/bin/env bash
# Multi-node AEMIM pre-training launched with torchrun (no SLURM needed): run this same command on every node.
#
#   MASTER_ADDR=node0.example.org bash scripts/torchrun_multinode.sh [extra advmim flags]
#
# Defaults: 2 nodes x 8 GPUs, job mae_adv.yaml (point it at your data with extra flags, e.g.
# --data.init_args.train_root /data/imagenet/train). The c10d rendezvous assigns node ranks, so no NODE_RANK is
# needed; Lightning reads RANK / LOCAL_RANK / GROUP_RANK / WORLD_SIZE from torchrun (TorchElasticEnvironment).
# Override with NNODES, NPROC_PER_NODE, MASTER_PORT, RDZV_ID, JOB, PYTHON, MAX_RESTARTS.
#
# When a worker dies, MAX_RESTARTS > 0 restarts the whole group (every node) that many times; pass --ckpt_path last
# so that the restarted group resumes the newest checkpoint (the first attempt, with none yet, starts a new run):
#   MAX_RESTARTS=3 MASTER_ADDR=node0 bash scripts/torchrun_multinode.sh --ckpt_path last \
#     --checkpoint.every_n_train_steps 1000 --checkpoint.monitor null
set -euo pipefail

NNODES="${NNODES:-2}"                  # nodes taking part; also --trainer.num_nodes
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"  # processes (GPUs) per node; also --trainer.devices
MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR to a host name of one participating node, reachable from all}"
MASTER_PORT="${MASTER_PORT:-29500}"    # rendezvous port on MASTER_ADDR
RDZV_ID="${RDZV_ID:-advmim}"           # same on every node of one run, different between concurrent runs
JOB="${JOB:-mae_adv.yaml}"             # job config (a shipped name or a path)
PYTHON="${PYTHON:-.venv/bin/python}"   # the project's environment (scripts/setup_env.sh)
MAX_RESTARTS="${MAX_RESTARTS:-0}"      # restarts of the worker group after a failure (0: the job fails with it)

# A restarted group must not read the previous attempt's addresses: by default torch keeps one store for every
# rendezvous round, where a restarted rank found the dead peer's address and failed to connect (torch 2.14). With
# this, each round gets a store of its own.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# Inside a SLURM allocation Lightning would take its ranks from SLURM rather than torchrun; the job name
# "interactive" tells it not to (see lightning SLURMEnvironment.detect).
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  export SLURM_JOB_NAME=interactive
fi

# `python -m advmim_pl.cli` (not the `advmim` console script) so that a successful run exits with status 0.
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
  -m advmim_pl.cli fit -c "$JOB" -c trainer/multinode.yaml \
  --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" "$@"

#!/usr/bin/env bash
#SBATCH --job-name=structattn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
#
# Multi-node GPU training under SLURM: one task (process) per node, each seeing all of its
# node's GPUs; jax.distributed.initialize() reads SLURM_* (the coordinator is the first node).
#
#   sbatch scripts/launch_slurm.sh WORKDIR [CONFIG] [--config.a.b=v ...]
#   sbatch --nodes=4 --export=ALL,FSDP=8 scripts/launch_slurm.sh /shared/runs/mlr768
#
# WORKDIR must be on a filesystem every node sees (checkpoints are written by all processes,
# the run directory by process 0).  Mesh: DATA (default -1: across nodes), FSDP and TENSOR
# (default 1; keep fsdp x tensor within a node, i.e. <= GPUs per node).  train.batch_size is the
# global batch; each process loads its 1/num_nodes shard of the data.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '10,19p' "$0"; exit 2
fi
WORKDIR=$1; shift
CONFIG=lm:paper-mlr-768
if [[ $# -gt 0 && $1 != --* ]]; then CONFIG=$1; shift; fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
srun --kill-on-bad-exit=1 "${PYTHON:-python3}" -m structattn.train \
  --config="$CONFIG" --workdir="$WORKDIR" --distributed=on \
  --config.mesh.data="${DATA:--1}" --config.mesh.fsdp="${FSDP:-1}" \
  --config.mesh.tensor="${TENSOR:-1}" "$@"

#!/usr/bin/env bash
# Train on every GPU of one node: one process that sees all local GPUs (no jax.distributed).
#
#   scripts/launch_multigpu.sh WORKDIR [CONFIG] [--config.a.b=v ...]
#   DATA=-1 FSDP=1 TENSOR=1 scripts/launch_multigpu.sh runs/mlr768 lm:paper-mlr-768
#   FSDP=-1 DATA=1 scripts/launch_multigpu.sh runs/big lm:paper-mha-768   # ZeRO-3
#
# Mesh sizes come from DATA / FSDP / TENSOR (-1 = the rest of the GPUs; default: data parallel
# over all GPUs).  train.batch_size is the global batch (split over data x fsdp).  Re-running
# the same command resumes from the last checkpoint, on any mesh.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,11p' "$0"; exit 2
fi
WORKDIR=$1; shift
CONFIG=lm:paper-mlr-768
if [[ $# -gt 0 && $1 != --* ]]; then CONFIG=$1; shift; fi
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m structattn.train --config="$CONFIG" --workdir="$WORKDIR" \
  --distributed=off \
  --config.mesh.data="${DATA:--1}" --config.mesh.fsdp="${FSDP:-1}" \
  --config.mesh.tensor="${TENSOR:-1}" "$@"

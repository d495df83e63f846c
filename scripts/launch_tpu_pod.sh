#!/usr/bin/env bash
# Train on a Cloud TPU pod slice (e.g. v5e-32): the same command on every worker VM,
# jax.distributed.initialize() detects the pod (--distributed=on).
#
#   TPU=my-pod ZONE=us-west4-a scripts/launch_tpu_pod.sh WORKDIR [CONFIG] [--config.a.b=v ...]
#   SETUP=1 TPU=my-pod ZONE=us-west4-a scripts/launch_tpu_pod.sh /mnt/shared/runs/mlr768
#
# Run from a machine with gcloud.  REPO (default ~/structattn) must hold this repository on
# every worker; SETUP=1 first copies it there (gcloud scp) and installs it with jax[tpu].
# WORKDIR must be a filesystem all workers mount (e.g. Filestore/NFS): the run directory is
# a local path.  Mesh: DATA (default -1), FSDP, TENSOR (default 1; keep tensor within a host).
set -euo pipefail
if [[ $# -lt 1 || -z ${TPU:-} || -z ${ZONE:-} ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
WORKDIR=$1; shift
CONFIG=lm:paper-mlr-768
if [[ $# -gt 0 && $1 != --* ]]; then CONFIG=$1; shift; fi
REPO=${REPO:-structattn}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ ${SETUP:-0} == 1 ]]; then
  gcloud compute tpus tpu-vm scp --recurse "$ROOT" "$TPU":"~/$REPO" --zone="$ZONE" --worker=all
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="\
    cd ~/$REPO && pip install -q -e . 'jax[tpu]'"
fi
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="\
  cd ~/$REPO && python3 -m structattn.train --config=$CONFIG --workdir=$WORKDIR \
  --distributed=on --config.mesh.data=${DATA:--1} --config.mesh.fsdp=${FSDP:-1} \
  --config.mesh.tensor=${TENSOR:-1}$EXTRA"

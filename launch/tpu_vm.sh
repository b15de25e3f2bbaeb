#!/usr/bin/env bash
# Run rlaifv_jax on every worker of a Cloud TPU VM slice (multi-host via jax.distributed).
# Usage: launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
# WORKDIR must be shared by all hosts (e.g. a gs:// bucket mounted with gcsfuse, or NFS).
set -euo pipefail
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO=${REPO:-https://github.com/your-org/rlaifv_jax}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d rlaifv_jax ] || git clone $REPO rlaifv_jax
  cd rlaifv_jax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  RLAIFV_DISTRIBUTED=1 python -m rlaifv_jax.main --config $CONFIG --workdir $WORKDIR $*
"

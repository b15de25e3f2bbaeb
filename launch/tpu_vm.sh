#!/usr/bin/env bash
# Run rlaifv_jax on every worker of a Cloud TPU VM slice (one process per host, jax.distributed
# auto-detects the slice). Each worker clones REPO_URL at BRANCH (or updates its clone), installs
# only when not installed yet (launch/ensure_venv.sh), then all run the same command.
# WORKDIR must be shared by all hosts: a gs://BUCKET/PATH (needs gcsfs, installed by ensure_venv.sh).
# Usage: launch/tpu_vm.sh TPU_NAME ZONE REPO_URL BRANCH CONFIG WORKDIR [--config.x=y ...]
set -euo pipefail
if [ $# -lt 6 ]; then
  echo "usage: $0 TPU_NAME ZONE REPO_URL BRANCH CONFIG WORKDIR [--config.x=y ...]" >&2; exit 2
fi
TPU_NAME=$1; ZONE=$2; REPO_URL=$3; BRANCH=$4; CONFIG=$5; WORKDIR=$6; shift 6
# Every argument is quoted for the remote shell, so values with spaces or quotes arrive intact.
q() { if [ $# -gt 0 ]; then printf '%q ' "$@"; fi; }
REMOTE="set -euo pipefail
if [ -d rlaifv_jax/.git ]; then
  git -C rlaifv_jax fetch -q origin $(q "$BRANCH") && git -C rlaifv_jax checkout -q -B $(q "$BRANCH") FETCH_HEAD
else
  git clone -q --branch $(q "$BRANCH") $(q "$REPO_URL") rlaifv_jax
fi
cd rlaifv_jax
launch/ensure_venv.sh tpu
. .venv/bin/activate
python -m rlaifv_jax.main --config $(q "$CONFIG") --workdir $(q "$WORKDIR") --distributed $(q "$@")"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE"

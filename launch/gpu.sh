#!/usr/bin/env bash
# Single-host GPU run (all local GPUs form the mesh). Usage: launch/gpu.sh CONFIG WORKDIR [--config.x=y ...]
set -euo pipefail
CONFIG=$1; WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
launch/ensure_venv.sh cuda12
. .venv/bin/activate
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
python -m rlaifv_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"

#!/usr/bin/env bash
# Create or refresh this checkout's .venv only when needed (no stamp for the current setup.py).
# Usage: launch/ensure_venv.sh cpu|cuda12|tpu
set -euo pipefail
ACCEL=${1:?usage: launch/ensure_venv.sh cpu|cuda12|tpu}
case $ACCEL in cpu|cuda12|tpu) ;; *) echo "ensure_venv.sh: accelerator must be cpu, cuda12 or tpu, got '$ACCEL'" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
STAMP=".venv/.installed-$ACCEL-$(sha1sum setup.py | cut -c1-12)"
if [ -f "$STAMP" ]; then exit 0; fi
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -e '.[gcs]'
if [ "$ACCEL" != cpu ]; then
  # The accelerator plugin at exactly the jax version setup.py resolved.
  pip install -q "jax[$ACCEL]==$(python -c 'import jax; print(jax.__version__)')"
fi
rm -f .venv/.installed-*
touch "$STAMP"

#!/usr/bin/env bash
# Set up (idempotent) and run the main job on its embedded default (no network, no Hub).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec python3 examples/digits_demo.py "$@"

#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, in PYTEST_WORKERS parallel pytest workers
# (pytest-xdist; default 3 on 2 cores, 1 thread each: many tests wait on the processes they launch, and a third
# worker fills those gaps). PYTEST_WORKERS=0 runs it in one process. One interpreter for set-up and tests:
# scripts/python_env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
workers=${PYTEST_WORKERS:-3}
if [ "$workers" = "0" ]; then
  exec "$PYTHON" -m pytest -q tests "$@"
fi
exec "$PYTHON" -m pytest -q -n "$workers" --dist loadgroup tests "$@"

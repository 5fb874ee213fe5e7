#!/usr/bin/env bash
# Installs hf_fop and everything its demo, tests and benchmarks need.
# torch is pinned to the CPU build that lies on this machine's disk; plain
# `pip install torch` would fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install -q -e ".[test,bench]"
